//! Labelled examples read from files: IDX pairs (`idx`), image folders (`image_folder`) and CSV
//! tables (`table`), into an [`ImageDataset`]. The data folder rules, text, partitions and the
//! `Examples` training reads are `fedtune_common::data`'s.

pub mod idx;
pub mod image_folder;
pub mod table;

use std::path::{Path, PathBuf};

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
