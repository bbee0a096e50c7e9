//! Text to token ids with a Hugging Face `tokenizer.json` (the `tokenizers` crate, pure Rust):
//! truncated at the run's `max_seq_len`, not padded (batches pad to their longest text).
//!
//! The shipped MiniLM tokenizer pads every text to 128 tokens; that padding is switched off
//! here, because padding is per batch and masked.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokenizers::{Tokenizer, TruncationParams};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("{}: the tokenizer's vocabulary has {tokens} tokens but the model's embedding has {model} rows; use the tokenizer.json of the same checkpoint", path.display())]
    Vocabulary {
        path: PathBuf,
        tokens: usize,
        model: usize,
    },
    #[error("tokenizing {source_name}: {message}")]
    Encode {
        source_name: String,
        message: String,
    },
}

/// A loaded `tokenizer.json` with the run's truncation.
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    sha256: String,
    max_seq_len: usize,
}

/// `tokenizer.json` inside `path` when `path` is a folder (a Hugging Face model folder).
pub fn tokenizer_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    }
}

impl TextTokenizer {
    /// Loads `path` (a `tokenizer.json`, or a folder holding one).
    pub fn open(path: &Path, max_seq_len: usize) -> Result<Self, TokenizerError> {
        let path = tokenizer_file(path);
        let err = |message: String| TokenizerError::File {
            path: path.clone(),
            message,
        };
        if max_seq_len < 2 {
            return Err(err(format!(
                "max sequence length {max_seq_len} leaves no room for text (at least 2: [CLS] and [SEP])"
            )));
        }
        let bytes = std::fs::read(&path).map_err(|e| err(format!("cannot read: {e}")))?;
        let sha256 = hex(&Sha256::digest(&bytes));
        let mut inner = Tokenizer::from_bytes(&bytes)
            .map_err(|e| err(format!("not a Hugging Face tokenizer.json: {e}")))?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_len,
                ..Default::default()
            }))
            .map_err(|e| err(format!("cannot truncate at {max_seq_len}: {e}")))?;
        Ok(Self {
            inner,
            path,
            sha256,
            max_seq_len,
        })
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Refuses a tokenizer whose ids would index past the model's embedding.
    pub fn check_fits(&self, model_vocab: usize) -> Result<(), TokenizerError> {
        if self.vocab_size() > model_vocab {
            return Err(TokenizerError::Vocabulary {
                path: self.path.clone(),
                tokens: self.vocab_size(),
                model: model_vocab,
            });
        }
        Ok(())
    }

    /// Token ids of every text, with the special tokens (`[CLS] … [SEP]`), truncated.
    pub fn encode(&self, texts: &[String], source: &str) -> Result<Vec<Vec<u32>>, TokenizerError> {
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encodings =
            self.inner
                .encode_batch(inputs, true)
                .map_err(|e| TokenizerError::Encode {
                    source_name: source.to_string(),
                    message: e.to_string(),
                })?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }
}

/// SHA-256 of a file, hex.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BERT-style WordPiece tokenizer.json (lower-casing, [CLS] … [SEP]).
    const TINY: &str = r###"{
      "version": "1.0", "truncation": null,
      "padding": {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": null,
                  "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
      "added_tokens": [],
      "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                     "strip_accents": null, "lowercase": true},
      "pre_tokenizer": {"type": "BertPreTokenizer"},
      "post_processor": {"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                           "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
      "decoder": null,
      "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                "max_input_chars_per_word": 100,
                "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "good": 4, "film": 5,
                          "bad": 6, "##s": 7}}
    }"###;

    #[test]
    fn encodes_without_fixed_padding_truncates_and_checks_the_vocabulary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, TINY).unwrap();
        let texts = vec!["Good films".to_string(), "bad".to_string()];
        // The folder works too; the file's fixed padding to 16 is switched off.
        let t = TextTokenizer::open(dir.path(), 128).unwrap();
        assert_eq!(
            t.encode(&texts, "t").unwrap(),
            [vec![2, 4, 5, 7, 3], vec![2, 6, 3]]
        );
        assert_eq!(t.sha256(), file_sha256(&path).unwrap());
        // Truncation counts [CLS] and [SEP].
        let short = TextTokenizer::open(&path, 4).unwrap();
        assert_eq!(short.encode(&texts, "t").unwrap()[0], [2, 4, 5, 3]);
        assert!(t.check_fits(8).is_ok());
        let e = t.check_fits(6).unwrap_err().to_string();
        assert!(e.contains("8 tokens") && e.contains("6 rows"), "{e}");
        std::fs::write(&path, "{}").unwrap();
        let e = TextTokenizer::open(&path, 16).err().unwrap().to_string();
        assert!(e.contains("not a Hugging Face tokenizer.json"), "{e}");
    }
}
