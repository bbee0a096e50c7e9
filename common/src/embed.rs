//! Sentence embeddings with a Hugging Face BERT folder, as sentence-transformers computes them
//! (mean pooling over real tokens, then L2 normalisation): the check that the model in burn is
//! the published one, and the features of the frozen-embedding baseline.

use std::path::Path;

use burn::module::Module;
use burn::tensor::Device;

use crate::data::tokenizer::TokenizerError;
use crate::data::{Examples, TextTokenizer, TokenizedText};
use crate::models::bert::l2_normalize;
use crate::models::{
    Architecture, BertArch, ModelError, ModelInput, ModelSpec, TextClassifier, hf_bert,
};
use crate::params::{self, ParamsError};
use crate::pretrained::LoadReport;

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("{0}")]
    Folder(String),
    #[error(transparent)]
    Weights(#[from] hf_bert::HfError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Params(#[from] ParamsError),
    #[error("reading embeddings back from the device failed: {0}")]
    Read(String),
}

pub struct SentenceEncoder {
    net: TextClassifier,
    tokenizer: TextTokenizer,
    device: Device,
    pub report: LoadReport,
}

impl SentenceEncoder {
    /// Loads `dir` (config.json, model.safetensors, tokenizer.json) onto `device`.
    pub fn open(dir: &Path, device: &Device, max_seq_len: usize) -> Result<Self, EmbedError> {
        let arch = BertArch::from_hf_dir(dir).map_err(EmbedError::Folder)?;
        let spec = ModelSpec::parse(&arch.to_string(), 2)?;
        let weights_path = hf_bert::weights_path(dir).map_err(EmbedError::Folder)?;
        let (weights, report) = hf_bert::load(&weights_path, &spec.init_weights(0)?)?;
        let tokenizer = TextTokenizer::open(dir, max_seq_len.min(arch.max_positions))?;
        tokenizer.check_fits(arch.vocab_size)?;
        let net = TextClassifier::build(&spec, device, 0.0)?;
        let net = params::inject(net, &weights)?.valid();
        Ok(Self {
            net,
            tokenizer,
            device: device.clone(),
            report,
        })
    }

    /// Unit-length embeddings, one per sentence.
    pub fn encode(
        &self,
        sentences: &[String],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let ids = self.tokenizer.encode(sentences, "sentences")?;
        let data = TokenizedText {
            labels: vec![0; ids.len()],
            ids,
            pad_id: 0,
            source: "sentences".into(),
        };
        let mut out = Vec::with_capacity(sentences.len());
        let all: Vec<usize> = (0..data.len()).collect();
        for chunk in all.chunks(batch_size.max(1)) {
            let (ModelInput::Tokens { ids, padding }, _) = data.batch(chunk, &self.device, None)
            else {
                return Err(EmbedError::Folder("text batches are tokens".into()));
            };
            let pooled = l2_normalize(self.net.bert.mean_pooled(ids, padding));
            let [rows, dim] = pooled.dims();
            let values = pooled
                .into_data()
                .try_into_vec_as::<f32>()
                .map_err(|e| EmbedError::Read(format!("{e:?}")))?;
            out.extend((0..rows).map(|r| values[r * dim..(r + 1) * dim].to_vec()));
        }
        Ok(out)
    }
}

/// Cosine similarity of two unit vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b)).max(1e-12)
}
