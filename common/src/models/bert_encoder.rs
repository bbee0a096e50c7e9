//! BERT's post-norm encoder, layer by layer as Hugging Face's `BertLayer` computes it, with
//! every projection a [`LoraLinear`] so that any of them can carry an adapter.
//!
//! Module names follow Hugging Face's (`attention.query`, `intermediate`, `output`), which
//! keeps the name table in `hf_bert` a plain lookup.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, LayerNorm, LayerNormConfig, LinearConfig};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Bool, Device, Tensor};

use super::bert::BertArch;
use super::lora::LoraSpec;
use super::lora_linear::LoraLinear;

/// What masked attention scores are set to before the softmax: `exp` of it is 0 in f32.
const MASKED_SCORE: f64 = -1.0e4;

/// Multi-head self-attention and its output projection.
#[derive(Module, Debug)]
pub struct BertAttention {
    pub query: LoraLinear,
    pub key: LoraLinear,
    pub value: LoraLinear,
    /// Hugging Face's `attention.output.dense`.
    pub output: LoraLinear,
    /// On the attention probabilities.
    pub dropout: Dropout,
    pub heads: usize,
}

impl BertAttention {
    /// `x`: `[batch, seq, hidden]`; `padding`: `[batch, seq]`, true at padding (never attended to).
    pub fn forward(&self, x: Tensor<3>, padding: Tensor<2, Bool>) -> Tensor<3> {
        let [batch, seq, hidden] = x.dims();
        let head_dim = hidden / self.heads;
        let split = |t: Tensor<3>| {
            t.reshape([batch, seq, self.heads, head_dim])
                .swap_dims(1, 2)
        };
        let query = split(self.query.forward(x.clone()));
        let key = split(self.key.forward(x.clone()));
        let value = split(self.value.forward(x));
        let scores = query
            .matmul(key.transpose())
            .div_scalar((head_dim as f64).sqrt())
            .mask_fill(padding.reshape([batch, 1, 1, seq]), MASKED_SCORE);
        let probs = self.dropout.forward(softmax(scores, 3));
        let context = probs
            .matmul(value)
            .swap_dims(1, 2)
            .reshape([batch, seq, hidden]);
        self.output.forward(context)
    }
}

/// One encoder layer: attention, then the feed-forward block, each followed by dropout, the
/// residual sum and LayerNorm (BERT is post-norm).
#[derive(Module, Debug)]
pub struct BertLayer {
    pub attention: BertAttention,
    /// Hugging Face's `attention.output.LayerNorm`.
    pub attention_norm: LayerNorm,
    /// Hugging Face's `intermediate.dense`: hidden → intermediate, then exact GELU.
    pub intermediate: LoraLinear,
    /// Hugging Face's `output.dense`: intermediate → hidden.
    pub output: LoraLinear,
    /// Hugging Face's `output.LayerNorm`.
    pub output_norm: LayerNorm,
    /// On each sub-layer's output, before the residual sum.
    pub dropout: Dropout,
}

impl BertLayer {
    pub fn forward(&self, x: Tensor<3>, padding: Tensor<2, Bool>) -> Tensor<3> {
        let attended = self
            .dropout
            .forward(self.attention.forward(x.clone(), padding));
        let x = self.attention_norm.forward(x + attended);
        let inner = gelu(self.intermediate.forward(x.clone()));
        let fed = self.dropout.forward(self.output.forward(inner));
        self.output_norm.forward(x + fed)
    }
}

#[derive(Module, Debug)]
pub struct BertEncoder {
    pub layers: Vec<BertLayer>,
}

impl BertEncoder {
    /// Fresh weights; adapters on the projections `lora` targets.
    pub fn new(arch: &BertArch, dropout: f64, lora: Option<&LoraSpec>, device: &Device) -> Self {
        let (h, i) = (arch.hidden, arch.intermediate);
        let projection = |target: &str, d_in: usize, d_out: usize| {
            LoraLinear::new(
                LinearConfig::new(d_in, d_out).init(device),
                lora.and_then(|l| l.adapter(target, [d_in, d_out], device)),
            )
        };
        let norm = || {
            LayerNormConfig::new(h)
                .with_epsilon(arch.layer_norm_eps)
                .init(device)
        };
        let layers = (0..arch.layers)
            .map(|_| BertLayer {
                attention: BertAttention {
                    query: projection("query", h, h),
                    key: projection("key", h, h),
                    value: projection("value", h, h),
                    output: projection("attention_output", h, h),
                    dropout: DropoutConfig::new(dropout).init(),
                    heads: arch.heads,
                },
                attention_norm: norm(),
                intermediate: projection("intermediate", h, i),
                output: projection("output", i, h),
                output_norm: norm(),
                dropout: DropoutConfig::new(dropout).init(),
            })
            .collect();
        Self { layers }
    }

    /// `x`: embedded tokens `[batch, seq, hidden]`; `padding`: `[batch, seq]`, true at padding.
    pub fn forward(&self, mut x: Tensor<3>, padding: Tensor<2, Bool>) -> Tensor<3> {
        for layer in &self.layers {
            x = layer.forward(x, padding.clone());
        }
        x
    }
}
