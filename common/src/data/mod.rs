//! Local data: examples read from IDX folders, image folders (`<class>/<file>.png|jpg`), CSV
//! tables or text files (CSV / TSV / JSONL, tokenised once); validation splits and non-IID
//! partitions; [`Examples`], what training and evaluation read.

mod examples;
mod partition;
mod split;
pub mod text;
pub mod tokenizer;
pub mod tokens;

use std::path::{Path, PathBuf};

pub use fedtune_formats::data::{DataError, ImageDataset, idx, image_folder, table};

pub use examples::Examples;
pub use partition::{dirichlet_partition, shots_partition};
pub use split::validation_split;
pub use text::TextDataset;
pub use tokenizer::TextTokenizer;
pub use tokens::TokenizedText;

/// A data folder: a training set and, when the folder has one, a separate test set.
#[derive(Debug)]
pub struct DataFolder {
    pub train: ImageDataset,
    pub test: Option<ImageDataset>,
}

const IMAGES_SUFFIX: &str = "images-idx3-ubyte";
const LABELS_SUFFIX: &str = "labels-idx1-ubyte";

impl DataFolder {
    /// Opens a folder of IDX pairs as Fashion-MNIST ships them. With both `train-*` and `t10k-*`
    /// pairs, training uses `train-*` and evaluation `t10k-*`; a folder with one pair uses it.
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        Self::open_with(dir, table::DEFAULT_LABEL_COLUMN)
    }

    /// As [`DataFolder::open`], also reading a CSV file (`label_column` names its label) or an
    /// image folder (`<class>/<file>.png|jpg`, resized to 28×28 grey).
    pub fn open_with(dir: &Path, label_column: &str) -> Result<Self, DataError> {
        if dir.is_file()
            && dir
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
        {
            return Ok(Self {
                train: table::read_csv(dir, label_column)?,
                test: None,
            });
        }
        if dir.is_dir() && image_folder::looks_like_one(dir) {
            return Ok(Self {
                train: image_folder::read(dir, crate::models::IMAGE_SIZE)?,
                test: None,
            });
        }
        let folder_err = |reason: String| DataError::Folder {
            path: dir.to_path_buf(),
            reason,
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|e| folder_err(format!("cannot read the data folder: {e}")))?;
        // prefix -> (images, labels)
        let mut pairs: std::collections::BTreeMap<String, (Option<PathBuf>, Option<PathBuf>)> =
            Default::default();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let stem = name.strip_suffix(".gz").unwrap_or(name);
            if let Some(prefix) = stem.strip_suffix(IMAGES_SUFFIX) {
                pairs.entry(prefix.to_string()).or_default().0 = Some(path.clone());
            } else if let Some(prefix) = stem.strip_suffix(LABELS_SUFFIX) {
                pairs.entry(prefix.to_string()).or_default().1 = Some(path.clone());
            }
        }
        let mut complete = Vec::new();
        for (prefix, (images, labels)) in &pairs {
            match (images, labels) {
                (Some(i), Some(l)) => complete.push((prefix.clone(), i.clone(), l.clone())),
                (Some(i), None) => {
                    return Err(folder_err(format!(
                        "{} has no matching `{prefix}{LABELS_SUFFIX}[.gz]` file",
                        i.display()
                    )));
                }
                (None, Some(l)) => {
                    return Err(folder_err(format!(
                        "{} has no matching `{prefix}{IMAGES_SUFFIX}[.gz]` file",
                        l.display()
                    )));
                }
                (None, None) => {}
            }
        }
        let find = |p: &str| complete.iter().find(|(prefix, _, _)| prefix == p);
        match (find("train-"), find("t10k-"), complete.as_slice()) {
            (Some(train), Some(test), _) => Ok(Self {
                train: ImageDataset::read_pair(&train.1, &train.2)?,
                test: Some(ImageDataset::read_pair(&test.1, &test.2)?),
            }),
            (_, _, [only]) => Ok(Self {
                train: ImageDataset::read_pair(&only.1, &only.2)?,
                test: None,
            }),
            (_, _, []) => Err(folder_err(format!(
                "no IDX data found: expected files ending in `{IMAGES_SUFFIX}` and `{LABELS_SUFFIX}` (optionally .gz), e.g. Fashion-MNIST's train-images-idx3-ubyte.gz"
            ))),
            (_, _, many) => Err(folder_err(format!(
                "found {} IDX pairs ({}); a folder holds one pair, or a `train-` and a `t10k-` pair",
                many.len(),
                many.iter()
                    .map(|(p, _, _)| format!("`{p}*`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// The evaluation set: the test pair if the folder has one, else the training pair.
    pub fn evaluation_set(self) -> ImageDataset {
        self.test.unwrap_or(self.train)
    }
}
