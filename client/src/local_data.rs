//! The client's private data: a training part and a validation part it never trains on.
//! Images and tables are used as read; text is tokenised once with the run's tokenizer, when
//! the first task says which one (and which label names), then kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use fedtune_common::data::text::{csv_holds_text, is_text_file};
use fedtune_common::data::{
    DataFolder, Examples, ImageDataset, TextDataset, TextTokenizer, TokenizedText, validation_split,
};
use fedtune_common::models::{Input, ModelSpec};
use tracing::info;

/// Where a text file's columns are.
#[derive(Debug, Clone)]
pub struct Columns {
    pub text: String,
    pub label: String,
}

pub enum LocalExamples {
    Images(Arc<ImageDataset>),
    Text(TextDataset),
}

/// Text tokenised for one run's model (tokenizer, truncation, labels).
struct Prepared {
    key: String,
    examples: Arc<TokenizedText>,
}

pub struct LocalData {
    pub examples: LocalExamples,
    /// Indices used for training.
    pub train_idx: Vec<usize>,
    /// Indices held out for validation (deterministic in the seed).
    pub val_idx: Vec<usize>,
    /// The folder's t10k-* pair, if any (evaluation only).
    pub test: Option<ImageDataset>,
    pub source: String,
    /// The tokenizer file this client holds (text only).
    tokenizer: Option<PathBuf>,
    prepared: Mutex<Option<Prepared>>,
}

impl LocalData {
    pub fn open(
        path: &Path,
        columns: &Columns,
        tokenizer: Option<PathBuf>,
        val_fraction: f64,
        seed: u64,
    ) -> anyhow::Result<Self> {
        if !(0.0..1.0).contains(&val_fraction) {
            bail!("--val-fraction must be in [0, 1), got {val_fraction}");
        }
        let text = path.is_file()
            && (is_text_file(path) || csv_holds_text(path, &columns.text, &columns.label));
        let (examples, test, len) = if text {
            let data = TextDataset::read(path, &columns.text, &columns.label)
                .with_context(|| format!("cannot load local text data from {}", path.display()))?;
            let len = data.len();
            (LocalExamples::Text(data), None, len)
        } else {
            let folder = DataFolder::open_with(path, &columns.label)
                .with_context(|| format!("cannot load local data from {}", path.display()))?;
            let len = folder.train.len();
            (
                LocalExamples::Images(Arc::new(folder.train)),
                folder.test,
                len,
            )
        };
        if len < 2 {
            bail!(
                "{}: at least 2 training examples are needed (found {len})",
                path.display()
            );
        }
        let (train_idx, val_idx) = validation_split(len, val_fraction, seed);
        Ok(Self {
            examples,
            train_idx,
            val_idx,
            test,
            source: path.display().to_string(),
            tokenizer,
            prepared: Mutex::new(None),
        })
    }

    pub fn is_text(&self) -> bool {
        matches!(self.examples, LocalExamples::Text(_))
    }

    /// The examples as `spec`'s model reads them: checked against it, and for text tokenised
    /// with the run's tokenizer (once per tokenizer, length and label list).
    pub fn examples_for(
        &self,
        spec: &ModelSpec,
    ) -> anyhow::Result<Arc<dyn Examples + Send + Sync>> {
        let vocab = match spec.kind.input() {
            Some(Input::Text { vocab_size, .. }) => Some(vocab_size),
            _ => None,
        };
        match (&self.examples, vocab) {
            (LocalExamples::Images(data), _) => {
                spec.check_data(data)
                    .context("local data does not fit the coordinator's model")?;
                if let Some(test) = &self.test {
                    spec.check_data(test)
                        .context("local test data does not fit the coordinator's model")?;
                }
                Ok(data.clone())
            }
            (LocalExamples::Text(data), Some(vocab_size)) => {
                let input = spec
                    .text
                    .as_ref()
                    .context("the coordinator's text model came without its tokenizer settings")?;
                let key = format!(
                    "{}/{}/{}/{}",
                    input.tokenizer_sha256,
                    input.max_seq_len,
                    spec.num_classes,
                    input.labels.join("\u{1f}")
                );
                let mut prepared = self
                    .prepared
                    .lock()
                    .map_err(|_| anyhow::anyhow!("tokenised data lock poisoned"))?;
                if let Some(p) = prepared.as_ref().filter(|p| p.key == key) {
                    return Ok(p.examples.clone());
                }
                let path = self.tokenizer.as_ref().with_context(|| {
                    format!(
                        "the coordinator's model reads text: give --tokenizer PATH, the tokenizer.json it uses (SHA-256 {})",
                        input.tokenizer_sha256
                    )
                })?;
                let tokenizer = TextTokenizer::open(path, input.max_seq_len)?;
                if tokenizer.sha256() != input.tokenizer_sha256 {
                    bail!(
                        "--tokenizer {}: this tokenizer (SHA-256 {}) is not the coordinator's (SHA-256 {}); use the same tokenizer.json",
                        tokenizer.path().display(),
                        tokenizer.sha256(),
                        input.tokenizer_sha256
                    );
                }
                tokenizer.check_fits(vocab_size)?;
                let started = std::time::Instant::now();
                let examples = Arc::new(
                    TokenizedText::prepare(data, &tokenizer, &input.labels, spec.num_classes)
                        .context("local data does not fit the coordinator's model")?,
                );
                info!(
                    "tokenised {} texts from {} in {:.1} s ({:.1} tokens on average, truncated at {})",
                    examples.labels.len(),
                    self.source,
                    started.elapsed().as_secs_f64(),
                    examples.mean_len(),
                    input.max_seq_len
                );
                *prepared = Some(Prepared {
                    key,
                    examples: examples.clone(),
                });
                Ok(examples)
            }
            (LocalExamples::Text(_), None) => bail!(
                "{}: this client holds text, but the coordinator's model `{}` reads images or table rows",
                self.source,
                spec.kind
            ),
        }
    }
}
