//! BERT (as in Hugging Face's `BertModel`) for sentence classification: word + position +
//! token-type embeddings, a post-norm transformer encoder with exact (erf) GELU
//! ([`super::bert_encoder`]), masked mean pooling (what sentence-transformers does), dropout and
//! a linear head.
//!
//! The architecture is a [`BertArch`], read from a Hugging Face `config.json` on the
//! coordinator and carried in the model name (`bert:v30522,h384,l6,a12,i1536,p512,t2,eps1e-12`)
//! so that every client builds exactly the same network. Tensor names are burn's
//! (`bert.encoder.layers.0.attention.query.weight`); `hf_bert` maps them to and from Hugging Face's.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use burn::module::Module;
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear,
    LinearConfig,
};
use burn::tensor::{Bool, Device, Int, Tensor};

use super::bert_encoder::BertEncoder;
use super::lora::LoraSpec;
use super::{Architecture, Input, InputMismatch, ModelError, ModelInput, ModelSpec};

/// The shape of a BERT network: what a Hugging Face `config.json` says about it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BertArch {
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    pub type_vocab: usize,
    pub layer_norm_eps: f64,
}

/// The fields of a Hugging Face BERT `config.json` that fedtune reads.
#[derive(Debug, serde::Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_position_type")]
    position_embedding_type: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}
fn default_position_type() -> String {
    "absolute".into()
}

/// Model types whose checkpoints are BERT's architecture under BERT's tensor names.
const BERT_MODEL_TYPES: &[&str] = &["bert"];

impl BertArch {
    /// Reads `config.json` from a Hugging Face model folder, refusing what is not a BERT this
    /// implementation computes exactly.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, String> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "{}: cannot read ({e}); --init for --model bert takes a Hugging Face model folder holding config.json, model.safetensors and tokenizer.json",
                path.display()
            )
        })?;
        Self::from_hf_config(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the text of a Hugging Face `config.json`.
    pub fn from_hf_config(text: &str) -> Result<Self, String> {
        let cfg: HfConfig =
            serde_json::from_str(text).map_err(|e| format!("not a BERT config.json: {e}"))?;
        match cfg.model_type.as_deref() {
            Some(t) if BERT_MODEL_TYPES.contains(&t) => {}
            Some(t) => {
                return Err(format!(
                    "model_type is `{t}`, not a BERT checkpoint (supported: {})",
                    BERT_MODEL_TYPES.join(", ")
                ));
            }
            None => return Err("no model_type: not a Hugging Face BERT config".into()),
        }
        if cfg.hidden_act != "gelu" {
            return Err(format!(
                "hidden_act `{}` is not supported (only exact \"gelu\")",
                cfg.hidden_act
            ));
        }
        if cfg.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type `{}` is not supported (only \"absolute\")",
                cfg.position_embedding_type
            ));
        }
        let arch = Self {
            vocab_size: cfg.vocab_size,
            hidden: cfg.hidden_size,
            layers: cfg.num_hidden_layers,
            heads: cfg.num_attention_heads,
            intermediate: cfg.intermediate_size,
            max_positions: cfg.max_position_embeddings,
            type_vocab: cfg.type_vocab_size,
            layer_norm_eps: cfg.layer_norm_eps,
        };
        arch.check()?;
        Ok(arch)
    }

    fn check(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden),
            ("num_hidden_layers", self.layers),
            ("num_attention_heads", self.heads),
            ("intermediate_size", self.intermediate),
            ("max_position_embeddings", self.max_positions),
            ("type_vocab_size", self.type_vocab),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be at least 1"));
        }
        if !self.hidden.is_multiple_of(self.heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden, self.heads
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(format!(
                "layer_norm_eps {} must be a positive number",
                self.layer_norm_eps
            ));
        }
        // Guards against absurd sizes sent by a peer (a 2^40-row embedding would abort).
        let params = self.vocab_size as u128 * self.hidden as u128
            + self.layers as u128 * self.hidden as u128 * self.intermediate as u128 * 2;
        if params > 1 << 36 {
            return Err(format!("{params} parameters is beyond what fedtune builds"));
        }
        Ok(())
    }
}

impl fmt::Display for BertArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bert:v{},h{},l{},a{},i{},p{},t{},eps{:e}",
            self.vocab_size,
            self.hidden,
            self.layers,
            self.heads,
            self.intermediate,
            self.max_positions,
            self.type_vocab,
            self.layer_norm_eps
        )
    }
}

impl FromStr for BertArch {
    type Err = String;

    /// Parses what [`fmt::Display`] writes (after `bert:`).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: String| {
            format!(
                "`bert:{s}`: {why}; expected e.g. bert:v30522,h384,l6,a12,i1536,p512,t2,eps1e-12, or `--model bert --init DIR` to read it from DIR/config.json"
            )
        };
        let mut arch = Self {
            vocab_size: 0,
            hidden: 0,
            layers: 0,
            heads: 0,
            intermediate: 0,
            max_positions: 0,
            type_vocab: 2,
            layer_norm_eps: 1e-12,
        };
        for part in s.split(',') {
            let (key, value) = part
                .find(|c: char| c.is_ascii_digit())
                .map(|at| part.split_at(at))
                .ok_or_else(|| bad(format!("`{part}` has no number")))?;
            let int = || {
                value
                    .parse::<usize>()
                    .map_err(|_| bad(format!("`{part}`: `{value}` is not a count")))
            };
            match key {
                "v" => arch.vocab_size = int()?,
                "h" => arch.hidden = int()?,
                "l" => arch.layers = int()?,
                "a" => arch.heads = int()?,
                "i" => arch.intermediate = int()?,
                "p" => arch.max_positions = int()?,
                "t" => arch.type_vocab = int()?,
                "eps" => {
                    arch.layer_norm_eps = value
                        .parse()
                        .map_err(|_| bad(format!("`{part}`: `{value}` is not a number")))?
                }
                _ => return Err(bad(format!("unknown field `{key}`"))),
            }
        }
        arch.check().map_err(bad)?;
        Ok(arch)
    }
}

/// Word + position + token-type embeddings, then LayerNorm and dropout.
#[derive(Module, Debug)]
pub struct BertEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub token_type_embeddings: Embedding,
    pub layer_norm: LayerNorm,
    pub dropout: Dropout,
}

impl BertEmbeddings {
    /// `ids`: `[batch, seq]`; every token has type 0 (single sentences).
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [batch, seq] = ids.dims();
        let device = ids.device();
        let positions = Tensor::<1, Int>::arange(0..seq as i64, &device)
            .reshape([1, seq])
            .expand([batch, seq]);
        let types = Tensor::<2, Int>::zeros([batch, seq], &device);
        let x = self.word_embeddings.forward(ids)
            + self.position_embeddings.forward(positions)
            + self.token_type_embeddings.forward(types);
        self.dropout.forward(self.layer_norm.forward(x))
    }
}

/// The BERT encoder without a pooler.
#[derive(Module, Debug)]
pub struct Bert {
    pub embeddings: BertEmbeddings,
    pub encoder: BertEncoder,
}

impl Bert {
    /// Fresh weights; LoRA adapters on the projections `lora` targets.
    pub fn new(arch: &BertArch, dropout: f64, lora: Option<&LoraSpec>, device: &Device) -> Self {
        let embedding = |n, d| EmbeddingConfig::new(n, d).init(device);
        Self {
            embeddings: BertEmbeddings {
                word_embeddings: embedding(arch.vocab_size, arch.hidden),
                position_embeddings: embedding(arch.max_positions, arch.hidden),
                token_type_embeddings: embedding(arch.type_vocab, arch.hidden),
                layer_norm: LayerNormConfig::new(arch.hidden)
                    .with_epsilon(arch.layer_norm_eps)
                    .init(device),
                dropout: DropoutConfig::new(dropout).init(),
            },
            encoder: BertEncoder::new(arch, dropout, lora, device),
        }
    }

    /// Token states `[batch, seq, hidden]`. `padding`: `[batch, seq]`, true at padding.
    pub fn forward(&self, ids: Tensor<2, Int>, padding: Tensor<2, Bool>) -> Tensor<3> {
        let x = self.embeddings.forward(ids);
        self.encoder.forward(x, padding)
    }

    /// The sentence embedding of sentence-transformers: the mean of the token states over the
    /// real (unpadded) tokens.
    pub fn mean_pooled(&self, ids: Tensor<2, Int>, padding: Tensor<2, Bool>) -> Tensor<2> {
        let states = self.forward(ids, padding.clone());
        mean_pool(states, padding)
    }
}

/// Mean of `states` (`[batch, seq, hidden]`) over the positions where `padding` is false.
pub fn mean_pool(states: Tensor<3>, padding: Tensor<2, Bool>) -> Tensor<2> {
    let [batch, seq, _] = states.dims();
    let keep = padding.bool_not().float().reshape([batch, seq, 1]);
    let summed = (states * keep.clone()).sum_dim(1).squeeze_dim::<2>(1);
    let counts = keep.sum_dim(1).squeeze_dim::<2>(1).clamp_min(1e-9);
    summed / counts
}

/// Rows scaled to unit L2 norm (sentence-transformers' `Normalize`).
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

/// BERT with a classification head on the mean-pooled sentence embedding.
#[derive(Module, Debug)]
pub struct TextClassifier {
    pub bert: Bert,
    pub dropout: Dropout,
    pub head: Linear,
}

impl TextClassifier {
    pub fn new(
        arch: &BertArch,
        num_classes: usize,
        dropout: f64,
        lora: Option<&LoraSpec>,
        device: &Device,
    ) -> Self {
        Self {
            bert: Bert::new(arch, dropout, lora, device),
            dropout: DropoutConfig::new(dropout).init(),
            head: LinearConfig::new(arch.hidden, num_classes).init(device),
        }
    }

    /// Logits `[batch, classes]`.
    pub fn forward(&self, ids: Tensor<2, Int>, padding: Tensor<2, Bool>) -> Tensor<2> {
        let pooled = self.bert.mean_pooled(ids, padding);
        self.head.forward(self.dropout.forward(pooled))
    }
}

impl Architecture for TextClassifier {
    const NAME: &'static str = "bert";
    const USAGE: &'static str = "bert (with --init DIR, a Hugging Face BERT folder)";
    const HEAD: Option<&'static str> = Some("head.");
    const LORA: bool = true;

    fn input(options: Option<&str>) -> Result<Input, String> {
        match options {
            Some(arch) => arch.parse::<BertArch>().map(|a| Input::Text {
                vocab_size: a.vocab_size,
                max_positions: a.max_positions,
            }),
            None => Err(
                "model `bert` needs its architecture: give --init DIR (a Hugging Face BERT folder with config.json), or name it in full, e.g. bert:v30522,h384,l6,a12,i1536,p512,t2,eps1e-12".into(),
            ),
        }
    }

    fn build(spec: &ModelSpec, device: &Device, dropout: f64) -> Result<Self, ModelError> {
        let arch = spec.kind.options().unwrap_or_default();
        let arch: BertArch = arch.parse().map_err(ModelError::BadBert)?;
        Ok(Self::new(
            &arch,
            spec.num_classes as usize,
            dropout,
            spec.lora.as_ref(),
            device,
        ))
    }

    fn forward(&self, input: ModelInput) -> Result<Tensor<2>, InputMismatch> {
        let (ids, padding) = input.tokens()?;
        Ok(TextClassifier::forward(self, ids, padding))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_round_trips_through_its_name() {
        let arch: BertArch = "v30522,h384,l6,a12,i1536,p512,t2,eps1e-12".parse().unwrap();
        assert_eq!(arch.hidden, 384);
        assert_eq!(arch.layer_norm_eps, 1e-12);
        let name = arch.to_string();
        assert_eq!(name, "bert:v30522,h384,l6,a12,i1536,p512,t2,eps1e-12");
        assert_eq!(name["bert:".len()..].parse::<BertArch>().unwrap(), arch);
    }

    #[test]
    fn bad_arch_names_and_configs_say_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            ("v10,h30,l1,a4,i8,p8", "multiple"),
            ("v10,h32,l1,a4,i8,p8,x3", "unknown field `x`"),
            ("v10,h32,l1,a4,i8,pp", "has no number"),
            ("v0,h32,l1,a4,i8,p8", "vocab_size"),
        ];
        for (name, want) in cases {
            let e = name.parse::<BertArch>().unwrap_err();
            assert!(e.contains(want), "{name}: {e}");
        }
        let e = BertArch::from_hf_config(r#"{"model_type":"gpt2","vocab_size":1}"#).unwrap_err();
        assert!(
            e.contains("not a BERT config.json") || e.contains("gpt2"),
            "{e}"
        );
        let e = BertArch::from_hf_config(
            r#"{"model_type":"roberta","vocab_size":10,"hidden_size":8,"num_hidden_layers":1,
                "num_attention_heads":2,"intermediate_size":16,"max_position_embeddings":8}"#,
        )
        .unwrap_err();
        assert!(e.contains("`roberta`, not a BERT"), "{e}");
    }
}
