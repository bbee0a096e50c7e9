//! Tokenised text, ready to batch: done once per client and run, not per epoch.

use super::DataError;
use super::text::TextDataset;
use super::tokenizer::{TextTokenizer, TokenizerError};

/// Token ids (with special tokens, truncated) and class numbers.
#[derive(Debug, Clone)]
pub struct TokenizedText {
    pub ids: Vec<Vec<u32>>,
    pub labels: Vec<u8>,
    pub pad_id: u32,
    pub source: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

impl TokenizedText {
    /// Tokenises `data` and numbers its labels through `label_names` (see
    /// [`TextDataset::class_numbers`]).
    pub fn prepare(
        data: &TextDataset,
        tokenizer: &TextTokenizer,
        label_names: &[String],
        num_classes: u32,
    ) -> Result<Self, PrepareError> {
        let labels = data.class_numbers(label_names, num_classes)?;
        let ids = tokenizer.encode(&data.texts, &data.source)?;
        Ok(Self {
            ids,
            labels,
            pad_id: 0,
            source: data.source.clone(),
        })
    }

    /// Mean tokens per example (special tokens included).
    pub fn mean_len(&self) -> f64 {
        if self.ids.is_empty() {
            return 0.0;
        }
        self.ids.iter().map(Vec::len).sum::<usize>() as f64 / self.ids.len() as f64
    }
}
