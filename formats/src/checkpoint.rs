//! safetensors files in and out: the global model after every round, server state, and the
//! files `pretrained` reads.
//!
//! Files are written atomically and durably (a temporary file in the same folder, synced, then
//! renamed, and the folder synced), so a crash or a power cut never leaves a half-written model
//! where a reader expects a whole one. Each file carries a checksum of its tensors in its
//! metadata (`fedtune.checksum`), checked when it is read: a damaged file is refused, never
//! used.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors, View};

use crate::tensors::{NamedTensor, TensorSet};
use crate::wire::decode_le_vec;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    Format { path: PathBuf, message: String },
    #[error("{}: tensor `{name}` has dtype {dtype}; only F32 tensors can be loaded", path.display())]
    DType {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{}: tensor `{name}` has shape {actual:?} but the model's `{name}` is {expected:?}", path.display())]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{}: damaged: its tensors' checksum is {actual}, the file says {expected}", path.display())]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{}: none of the model's tensors were found (the file has {}); check that the file belongs to this model", path.display(), unused.join(", "))]
    NothingApplied { path: PathBuf, unused: Vec<String> },
}

struct F32View<'a>(&'a NamedTensor);

/// A tensor's values as little-endian bytes (borrowed where the machine is little-endian).
fn le_bytes(t: &NamedTensor) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(&t.data))
    } else {
        Cow::Owned(t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        le_bytes(self.0)
    }
    fn data_len(&self) -> usize {
        self.0.data.len() * 4
    }
}

/// The metadata key of a file's checksum.
pub const CHECKSUM_KEY: &str = "fedtune.checksum";

/// xxh3 over the tensors' names, shapes and values in name order (the order [`load`] returns),
/// so the same tensors give the same checksum whatever order they were saved in.
pub fn checksum(set: &TensorSet) -> String {
    checksum_raw(
        set.tensors()
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice(), le_bytes(t))),
    )
}

/// [`checksum`] of tensors given as (name, shape, little-endian f32 bytes).
fn checksum_raw<'a, B: AsRef<[u8]>>(
    tensors: impl Iterator<Item = (&'a str, &'a [usize], B)>,
) -> String {
    let mut tensors: Vec<_> = tensors.collect();
    tensors.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (name, shape, bytes) in tensors {
        let bytes = bytes.as_ref();
        h.update(name.as_bytes());
        h.update(&[0]);
        for d in shape {
            h.update(&(*d as u64).to_le_bytes());
        }
        h.update(&((bytes.len() / 4) as u64).to_le_bytes());
        h.update(bytes);
    }
    format!("xxh3:{:016x}", h.digest())
}

/// Writes `set` to `path` atomically and durably, with string metadata and its checksum.
pub fn save(
    set: &TensorSet,
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<(), CheckpointError> {
    let checksum = checksum(set);
    write_atomically(
        set.tensors().iter().map(|t| (t.name.as_str(), F32View(t))),
        metadata,
        checksum,
        path,
    )
}

/// [`save`] for tensors already in their wire form, (name, shape, little-endian f32 bytes):
/// an update is written as it arrived, without a second model-sized copy.
pub fn save_le(
    tensors: &[(&str, &[usize], &[u8])],
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<(), CheckpointError> {
    let checksum = checksum_raw(tensors.iter().map(|&(n, s, b)| (n, s, b)));
    write_atomically(
        tensors
            .iter()
            .map(|&(name, shape, bytes)| (name, LeView { shape, bytes })),
        metadata,
        checksum,
        path,
    )
}

struct LeView<'a> {
    shape: &'a [usize],
    bytes: &'a [u8],
}

impl View for LeView<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn write_atomically<'a, V: View>(
    tensors: impl Iterator<Item = (&'a str, V)>,
    mut metadata: HashMap<String, String>,
    checksum: String,
    path: &Path,
) -> Result<(), CheckpointError> {
    let io = |e: &dyn std::fmt::Display| CheckpointError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    metadata.insert(CHECKSUM_KEY.to_string(), checksum);
    let tmp = tmp_path(path);
    safetensors::serialize_to_file(tensors, Some(metadata), &tmp).map_err(|e| io(&e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(&e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(&e))?;
    sync_parent(path).map_err(|e| io(&e))
}

/// Syncs the folder holding `path`, so that a rename into it survives a power cut.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => std::fs::File::open(".")?.sync_all(),
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Reads every tensor of a safetensors file (all must be F32), with its metadata.
pub fn load(path: &Path) -> Result<(TensorSet, HashMap<String, String>), CheckpointError> {
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::Io {
        path: path.to_path_buf(),
        message: format!("cannot read: {e}"),
    })?;
    let format = |e: &dyn std::fmt::Display| CheckpointError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format(&e))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| format(&e))?;
    let mut tensors = Vec::new();
    // Sorted for a stable order; `pretrained::load` restores the model's own order.
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name).map_err(|e| format(&e))?;
        if view.dtype() != Dtype::F32 {
            return Err(CheckpointError::DType {
                path: path.to_path_buf(),
                name,
                dtype: format!("{:?}", view.dtype()),
            });
        }
        let t = NamedTensor::new(name, view.shape().to_vec(), decode_le_vec(view.data()))
            .map_err(|e| format(&e))?;
        tensors.push(t);
    }
    let set = TensorSet::new(tensors).map_err(|e| format(&e))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    // Files from elsewhere (pre-trained weights) have no checksum of ours; ours must match.
    if let Some(expected) = meta.get(CHECKSUM_KEY) {
        let actual = checksum(&set);
        if *expected != actual {
            return Err(CheckpointError::Checksum {
                path: path.to_path_buf(),
                expected: expected.clone(),
                actual,
            });
        }
    }
    Ok((set, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let set = TensorSet::new(vec![
            NamedTensor::new(
                "fc1.weight",
                vec![2, 3],
                vec![1.0, -2.0, 3.5, 0.0, 1e-30, 7.0],
            )
            .unwrap(),
            NamedTensor::new("fc1.bias", vec![3], vec![0.5, 0.25, -0.125]).unwrap(),
        ])
        .unwrap();
        save(&set, HashMap::from([("round".into(), "3".into())]), &p).unwrap();
        let (back, meta) = load(&p).unwrap();
        assert_eq!(meta.get("round").map(String::as_str), Some("3"));
        assert_eq!(back.get("fc1.weight"), set.get("fc1.weight"));

        std::fs::write(&p, b"garbage").unwrap();
        assert!(matches!(load(&p), Err(CheckpointError::Format { .. })));
    }

    #[test]
    fn a_flipped_value_is_refused_as_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let set = TensorSet::new(vec![
            NamedTensor::new("w", vec![4], vec![1.0, 2.0, 3.0, 4.0]).unwrap(),
        ])
        .unwrap();
        save(&set, HashMap::new(), &p).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        // The last byte is in the last value's data: a bit flip a safetensors parser cannot see.
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&p, &bytes).unwrap();
        let err = load(&p).unwrap_err();
        assert!(matches!(err, CheckpointError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains("damaged"), "{err}");
    }

    #[test]
    fn a_truncated_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let set = TensorSet::new(vec![
            NamedTensor::new("w", vec![1000], vec![0.5; 1000]).unwrap(),
        ])
        .unwrap();
        save(&set, HashMap::new(), &p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(load(&p), Err(CheckpointError::Format { .. })));
    }
}
