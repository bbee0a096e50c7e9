//! An upload staged in the journal while it arrives: each checked chunk is appended to
//! `u<N>.safetensors` as it comes, so an update is never held in memory whole; once complete
//! and verified the file is synced, and the aggregator folds it by reading it back in blocks.
//!
//! The file is a plain safetensors file whose tensors lie in the order the client sent them,
//! with the payload's xxh3 (over the data section: as the manifest declared it, or as written
//! when the update arrived compressed and was decoded) in its metadata: read back at restart,
//! it is checked against that before it counts again.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fedtune_common::blocks::Blocks;
use fedtune_common::checkpoint::sync_parent;
use fedtune_common::tensors::{TensorSpec, check_specs};
use xxhash_rust::xxh3::Xxh3;

/// Metadata key of the payload checksum (xxh3 of the data section, hex).
const PAYLOAD_KEY: &str = "fedtune.payload_xxh3";
/// Bytes read at a time when an update is folded or checked from its file.
const BLOCK_BYTES: usize = 1 << 20;
/// The most header bytes a journal file may declare (a name table, not data).
const MAX_HEADER_BYTES: u64 = 64 << 20;

/// An update being written to its journal file.
pub struct StagedWriter {
    file: File,
    path: PathBuf,
    name: String,
    specs: Vec<TensorSpec>,
    data_start: u64,
    written: u64,
    total: u64,
    /// Hashing the data as it is written, when no checksum was known at creation.
    hasher: Option<Xxh3>,
    finished: bool,
}

/// A complete, synced update file (not yet counted: its journal line is the commit point).
#[derive(Debug)]
pub struct StagedUpdate {
    path: PathBuf,
    name: String,
    specs: Vec<TensorSpec>,
    data_start: u64,
}

/// Where the checksum's 16 hex digits start in the file (see [`header`]).
fn checksum_at() -> u64 {
    8 + format!("{{\"__metadata__\":{{\"{PAYLOAD_KEY}\":\"").len() as u64
}

/// The safetensors header of an update of `specs` in that order, padded to 8 bytes.
fn header(specs: &[TensorSpec], checksum: u64) -> Vec<u8> {
    let mut json = format!("{{\"__metadata__\":{{\"{PAYLOAD_KEY}\":\"{checksum:016x}\"}}");
    let mut offset = 0usize;
    for s in specs {
        let end = offset + s.num_elements() * 4;
        // A JSON string is a valid JSON key: names are escaped as serde_json writes them.
        let name = serde_json::Value::String(s.name.clone()).to_string();
        let shape = serde_json::Value::from(s.shape.clone()).to_string();
        json.push_str(&format!(
            ",{name}:{{\"dtype\":\"F32\",\"shape\":{shape},\"data_offsets\":[{offset},{end}]}}"
        ));
        offset = end;
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out
}

impl StagedWriter {
    /// Creates `dir/name` for an update of `specs` whose payload hashes to `checksum`; `None`:
    /// the writer hashes the bytes it is given and records that when it finishes.
    pub(super) fn create(
        dir: &Path,
        name: String,
        specs: &[TensorSpec],
        checksum: Option<u64>,
    ) -> anyhow::Result<Self> {
        let path = dir.join(&name);
        let mut file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let head = header(specs, checksum.unwrap_or(0));
        file.write_all(&head)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self {
            file,
            path,
            name,
            specs: specs.to_vec(),
            data_start: head.len() as u64,
            written: 0,
            total: specs.iter().map(|s| s.num_elements() as u64 * 4).sum(),
            hasher: checksum.is_none().then(Xxh3::new),
            finished: false,
        })
    }

    /// Appends the next checked bytes of the payload.
    pub fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.file
            .write_all(bytes)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        if let Some(h) = &mut self.hasher {
            h.update(bytes);
        }
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Syncs the complete file and its folder entry.
    pub fn finish(mut self) -> anyhow::Result<StagedUpdate> {
        if self.written != self.total {
            bail!(
                "{}: {} of {} bytes staged",
                self.path.display(),
                self.written,
                self.total
            );
        }
        if let Some(h) = &self.hasher {
            let digits = format!("{:016x}", h.digest());
            self.file
                .write_all_at(digits.as_bytes(), checksum_at())
                .with_context(|| format!("cannot write {}", self.path.display()))?;
        }
        self.file
            .sync_data()
            .and_then(|_| sync_parent(&self.path))
            .with_context(|| format!("cannot sync {}", self.path.display()))?;
        self.finished = true;
        Ok(StagedUpdate {
            path: self.path.clone(),
            name: std::mem::take(&mut self.name),
            specs: std::mem::take(&mut self.specs),
            data_start: self.data_start,
        })
    }
}

impl Drop for StagedWriter {
    /// An upload that broke off leaves no file behind.
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl StagedUpdate {
    /// The file's name in the journal folder (what its journal line records).
    pub fn file_name(&self) -> &str {
        &self.name
    }

    /// Opens a journal file written by [`StagedWriter`] at restart: its header must describe
    /// exactly the update tensors `want` (in any order), and its data must hash to the
    /// checksum it was accepted with.
    pub fn open(path: &Path, want: &[TensorSpec]) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = file.metadata()?.len();
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0)
            .with_context(|| format!("{}: no header", path.display()))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER_BYTES || 8 + n > len {
            bail!("{}: header of {n} bytes does not fit", path.display());
        }
        let mut head = vec![0u8; n as usize];
        file.read_exact_at(&mut head, 8)?;
        let head: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&head)
            .with_context(|| format!("{}: the header is not JSON", path.display()))?;
        let checksum = head
            .get("__metadata__")
            .and_then(|m| m.get(PAYLOAD_KEY))
            .and_then(|v| v.as_str())
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .with_context(|| format!("{}: no `{PAYLOAD_KEY}` in its metadata", path.display()))?;
        let mut tensors = Vec::new();
        for (name, t) in head.iter().filter(|(k, _)| *k != "__metadata__") {
            let bad = || format!("{}: tensor `{name}` is not described", path.display());
            let shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).with_context(bad)?;
            let offsets: [u64; 2] =
                serde_json::from_value(t["data_offsets"].clone()).with_context(bad)?;
            if t["dtype"] != "F32" {
                bail!("{}: tensor `{name}` is not F32", path.display());
            }
            tensors.push((
                offsets,
                TensorSpec {
                    name: name.clone(),
                    shape,
                },
            ));
        }
        tensors.sort_by_key(|(o, _)| *o);
        let (offsets, specs): (Vec<[u64; 2]>, Vec<TensorSpec>) = tensors.into_iter().unzip();
        // The model's own names and shapes first: sizes computed below come from those.
        check_specs(&specs, want)
            .with_context(|| format!("{} does not hold an update of this model", path.display()))?;
        let mut end = 0;
        for (o, s) in offsets.iter().zip(&specs) {
            if o[0] != end || o[1] != o[0] + s.num_elements() as u64 * 4 {
                bail!(
                    "{}: tensor `{}` is not where it should be",
                    path.display(),
                    s.name
                );
            }
            end = o[1];
        }
        if 8 + n + end != len {
            bail!(
                "{}: {} bytes, the header describes {}",
                path.display(),
                len,
                8 + n + end
            );
        }
        let update = Self {
            path: path.to_path_buf(),
            name: path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            specs,
            data_start: 8 + n,
        };
        let mut hasher = Xxh3::new();
        update.for_each_block(&mut |_, _, bytes| hasher.update(bytes))?;
        if hasher.digest() != checksum {
            bail!("{}: its data does not match its checksum", path.display());
        }
        Ok(update)
    }
}

impl Blocks for StagedUpdate {
    fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    fn for_each_block(
        &self,
        f: &mut dyn FnMut(&TensorSpec, usize, &[u8]),
    ) -> Result<(), std::io::Error> {
        let file = File::open(&self.path)?;
        let mut buf = vec![0u8; BLOCK_BYTES];
        let mut at = self.data_start;
        for spec in &self.specs {
            let values = spec.num_elements();
            let mut first = 0;
            while first < values {
                let n = (values - first).min(BLOCK_BYTES / 4);
                let block = &mut buf[..n * 4];
                file.read_exact_at(block, at)?;
                f(spec, first, block);
                first += n;
                at += n as u64 * 4;
            }
        }
        Ok(())
    }
}
