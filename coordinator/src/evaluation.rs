//! Server-side evaluation of the global model on a held-out set (`--eval-data`), on flex.

use std::path::Path;

use anyhow::Context;
use burn::tensor::Device;
use fedtune_common::data::{DataFolder, Examples, TextDataset, TextTokenizer, TokenizedText};
use fedtune_common::models::ModelSpec;
use fedtune_common::tensors::TensorSet;
use fedtune_common::train::{self, Evaluation};

const EVAL_BATCH: usize = 500;
/// Text batches are smaller: activations grow with batch × tokens × the transformer's width.
const TEXT_EVAL_BATCH: usize = 64;

pub struct ServerEval {
    data: Box<dyn Examples + Send + Sync>,
    indices: Vec<usize>,
    spec: ModelSpec,
}

/// Where text columns are, for text evaluation data.
pub struct TextColumns<'a> {
    pub tokenizer: &'a Path,
    pub text_column: &'a str,
    pub label_column: &'a str,
}

impl ServerEval {
    pub fn open(path: &Path, spec: ModelSpec, text: Option<TextColumns>) -> anyhow::Result<Self> {
        let data: Box<dyn Examples + Send + Sync> = match (&spec.text, text) {
            (Some(input), Some(cols)) => {
                let raw = TextDataset::read(path, cols.text_column, cols.label_column)
                    .context("cannot open `eval_data`")?;
                let tokenizer = TextTokenizer::open(cols.tokenizer, input.max_seq_len)?;
                Box::new(
                    TokenizedText::prepare(&raw, &tokenizer, &input.labels, spec.num_classes)
                        .context("`eval_data` does not fit the model")?,
                )
            }
            _ => {
                let data = DataFolder::open(path)
                    .context("cannot open `eval_data`")?
                    .evaluation_set();
                spec.check_data(&data)
                    .context("`eval_data` does not fit the model")?;
                Box::new(data)
            }
        };
        let indices = (0..data.len()).collect();
        Ok(Self {
            data,
            indices,
            spec,
        })
    }

    pub fn examples(&self) -> usize {
        self.indices.len()
    }

    pub fn evaluate(&self, global: &TensorSet) -> anyhow::Result<Evaluation> {
        let device = Device::flex();
        let model = self.spec.build(&device)?;
        let model = model.inject(global)?;
        let batch = if self.spec.is_text() {
            TEXT_EVAL_BATCH
        } else {
            EVAL_BATCH
        };
        Ok(train::evaluate(
            &model,
            self.data.as_ref(),
            &self.indices,
            batch,
            self.spec.num_classes as usize,
            &device,
        )?)
    }
}
