//! Holds every update of a round for the robust strategies, which need all of them at once
//! (a median cannot be streamed). Updates stay in memory up to a byte budget; past it each
//! further update goes to an anonymous temporary file in the spill folder (removed by the OS
//! when the round ends, even after a crash). Readers fetch coordinate blocks, so combining
//! needs only `updates × block` values in memory, however large the model.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use fedtune_common::blocks::Blocks;
use fedtune_common::wire::decode_le_vec;

use super::AggregateError;
use super::layout::Layout;

/// Coordinates read per block while combining.
pub const BLOCK: usize = 1 << 16;

enum Stored {
    Memory(Vec<f32>),
    Disk(File),
}

pub struct UpdateBuffer {
    layout: Arc<Layout>,
    memory_budget: u64,
    in_memory: u64,
    spill_dir: PathBuf,
    updates: Vec<Stored>,
    weights: Vec<u64>,
}

impl UpdateBuffer {
    pub fn new(layout: Arc<Layout>, memory_budget: u64, spill_dir: PathBuf) -> Self {
        Self {
            layout,
            memory_budget,
            in_memory: 0,
            spill_dir,
            updates: Vec::new(),
            weights: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.updates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.updates.is_empty()
    }

    pub fn weights(&self) -> &[u64] {
        &self.weights
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn spilled(&self) -> usize {
        self.updates
            .iter()
            .filter(|u| matches!(u, Stored::Disk(_)))
            .count()
    }

    pub fn push(&mut self, delta: &dyn Blocks, num_examples: u64) -> Result<(), AggregateError> {
        let bytes = self.layout.len() as u64 * 4;
        let stored = if self.in_memory + bytes <= self.memory_budget {
            self.in_memory += bytes;
            Stored::Memory(self.layout.flatten(delta)?)
        } else {
            let spill = |source| AggregateError::Spill {
                path: self.spill_dir.clone(),
                source,
            };
            std::fs::create_dir_all(&self.spill_dir).map_err(spill)?;
            let file = tempfile::tempfile_in(&self.spill_dir).map_err(spill)?;
            file.set_len(bytes).map_err(spill)?;
            let mut written = Ok(());
            self.layout.place(delta, &mut |range, data| {
                // Update bytes are already little-endian f32: written as they are.
                if written.is_ok() {
                    written = file.write_all_at(data, range.start as u64 * 4);
                }
            })?;
            written.map_err(spill)?;
            if self.spilled() == 0 {
                tracing::info!(
                    "robust aggregation: updates past the {} MiB memory budget go to {}",
                    self.memory_budget >> 20,
                    self.spill_dir.display()
                );
            }
            Stored::Disk(file)
        };
        self.updates.push(stored);
        self.weights.push(num_examples);
        Ok(())
    }

    /// Update `i`'s values at `range`.
    pub fn read(&self, i: usize, range: Range<usize>) -> Result<Vec<f32>, AggregateError> {
        match &self.updates[i] {
            Stored::Memory(v) => Ok(v[range].to_vec()),
            Stored::Disk(file) => {
                let mut bytes = vec![0u8; range.len() * 4];
                file.read_exact_at(&mut bytes, range.start as u64 * 4)
                    .map_err(|source| AggregateError::Spill {
                        path: self.spill_dir.clone(),
                        source,
                    })?;
                Ok(decode_le_vec(&bytes))
            }
        }
    }

    /// Every update's values at `range`: `out[i]` is update `i`'s block.
    pub fn read_all(&self, range: Range<usize>) -> Result<Vec<Vec<f32>>, AggregateError> {
        (0..self.len())
            .map(|i| self.read(i, range.clone()))
            .collect()
    }

    /// The coordinate blocks covering the model.
    pub fn blocks(&self) -> impl Iterator<Item = Range<usize>> + use<> {
        let len = self.layout.len();
        (0..len.div_ceil(BLOCK)).map(move |b| b * BLOCK..((b + 1) * BLOCK).min(len))
    }
}

impl Drop for UpdateBuffer {
    fn drop(&mut self) {
        // The files are anonymous (already unlinked); remove the round's folder, and the spill
        // folder if nothing else is in it.
        if self.spilled() > 0 {
            let _ = std::fs::remove_dir(&self.spill_dir);
            if let Some(parent) = self.spill_dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}
