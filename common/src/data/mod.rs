//! Local data: examples read from IDX folders, image folders (`<class>/<file>.png|jpg`), CSV
//! tables or text files (CSV / TSV / JSONL, tokenised once); validation splits and non-IID
//! partitions; [`Examples`], what training and evaluation read.

mod examples;
pub mod idx;
pub mod image_folder;
mod partition;
mod split;
pub mod table;
pub mod text;
pub mod tokenizer;
pub mod tokens;

use std::path::{Path, PathBuf};

pub use examples::Examples;
pub use partition::dirichlet_partition;
pub use split::validation_split;
pub use text::TextDataset;
pub use tokenizer::TextTokenizer;
pub use tokens::TokenizedText;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Idx(#[from] idx::IdxError),
    #[error("{}: {reason}", path.display())]
    Folder { path: PathBuf, reason: String },
    #[error("{images} and {labels} disagree: {image_count} images but {label_count} labels")]
    CountMismatch {
        images: String,
        labels: String,
        image_count: usize,
        label_count: usize,
    },
    #[error("{path}: images are {rows}x{cols}, the model takes {want_rows}x{want_cols}")]
    ImageSize {
        path: String,
        rows: usize,
        cols: usize,
        want_rows: usize,
        want_cols: usize,
    },
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error(
        "{path}: label {label} at index {index} is not below the number of classes ({classes})"
    )]
    LabelOutOfRange {
        path: String,
        index: usize,
        label: u8,
        classes: u32,
    },
}

/// Labelled examples: grey images (`len * rows * cols` bytes in `images`), or, for tabular data,
/// rows of f32 features (`tabular`, `len * cols` values, with `rows` = 1 and `images` empty).
#[derive(Debug, Clone)]
pub struct ImageDataset {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
    /// Where it came from, for messages.
    pub source: String,
    /// Feature values of tabular data (used as they are: scale them beforehand).
    pub tabular: Option<Vec<f32>>,
}

impl ImageDataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.images[i * n..(i + 1) * n]
    }

    /// Example `i`'s features, for tabular data.
    pub fn features(&self, i: usize) -> Option<&[f32]> {
        let n = self.rows * self.cols;
        self.tabular.as_ref().map(|v| &v[i * n..(i + 1) * n])
    }

    pub fn is_tabular(&self) -> bool {
        self.tabular.is_some()
    }

    /// Reads an images file and its labels file.
    pub fn read_pair(images: &Path, labels: &Path) -> Result<Self, DataError> {
        let img = idx::read(images)?;
        let lab = idx::read(labels)?;
        if img.dims.len() != 3 {
            return Err(idx::IdxError {
                path: images.into(),
                reason: format!(
                    "images must have 3 dimensions (count, rows, cols), found {:?}",
                    img.dims
                ),
            }
            .into());
        }
        if lab.dims.len() != 1 {
            return Err(idx::IdxError {
                path: labels.into(),
                reason: format!("labels must have 1 dimension, found {:?}", lab.dims),
            }
            .into());
        }
        if img.dims[0] != lab.dims[0] {
            return Err(DataError::CountMismatch {
                images: images.display().to_string(),
                labels: labels.display().to_string(),
                image_count: img.dims[0],
                label_count: lab.dims[0],
            });
        }
        Ok(Self {
            images: img.values,
            labels: lab.values,
            rows: img.dims[1],
            cols: img.dims[2],
            source: images.display().to_string(),
            tabular: None,
        })
    }

    /// Images must have the size the model takes.
    pub fn check_image_size(&self, rows: usize, cols: usize) -> Result<(), DataError> {
        if (self.rows, self.cols) == (rows, cols) {
            return Ok(());
        }
        Err(DataError::ImageSize {
            path: self.source.clone(),
            rows: self.rows,
            cols: self.cols,
            want_rows: rows,
            want_cols: cols,
        })
    }

    /// Every label must index one of `classes` outputs.
    pub fn check_labels(&self, classes: u32) -> Result<(), DataError> {
        match self.labels.iter().position(|&l| u32::from(l) >= classes) {
            None => Ok(()),
            Some(index) => Err(DataError::LabelOutOfRange {
                path: self.source.clone(),
                index,
                label: self.labels[index],
                classes,
            }),
        }
    }

    /// The examples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Self {
        let mut images = Vec::new();
        let mut tabular = self.tabular.as_ref().map(|_| Vec::new());
        for &i in indices {
            match (&mut tabular, self.features(i)) {
                (Some(t), Some(f)) => t.extend_from_slice(f),
                _ => images.extend_from_slice(self.image(i)),
            }
        }
        Self {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            rows: self.rows,
            cols: self.cols,
            source: self.source.clone(),
            tabular,
        }
    }

    /// Writes `<dir>/<prefix>images-idx3-ubyte` and `<dir>/<prefix>labels-idx1-ubyte`.
    pub fn write_pair(&self, dir: &Path, prefix: &str) -> std::io::Result<()> {
        idx::write(
            &dir.join(format!("{prefix}images-idx3-ubyte")),
            &[self.len(), self.rows, self.cols],
            &self.images,
        )?;
        idx::write(
            &dir.join(format!("{prefix}labels-idx1-ubyte")),
            &[self.len()],
            &self.labels,
        )
    }
}

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
