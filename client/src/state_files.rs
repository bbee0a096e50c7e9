//! Files a client keeps in its state folder (`--state-dir`) per federation run: SCAFFOLD's
//! control variate and Ditto's personal model. Each is named by the run's key (which the
//! coordinator's tasks carry), so another run starts afresh and runs that take turns on the
//! same client (`tune` trials) each keep their own; those of the [`KEEP`] most recently used
//! runs are kept. What is kept only steers training: a file that cannot be used is said in
//! the log and started again, never fatal.

use std::path::{Path, PathBuf};

use fedtune_common::checkpoint;
use fedtune_common::tensors::{TensorSet, TensorSpec};
use tracing::{info, warn};

/// Files of this many runs are kept per kind; older ones are removed.
pub const KEEP: usize = 8;
/// The metadata entry naming the run a file belongs to.
pub const KEY: &str = "fedtune.federation";

/// The file `<prefix><key>.safetensors` in `dir`, the key made safe for a file name.
pub fn keyed_file(dir: &Path, prefix: &str, key: &str) -> PathBuf {
    let safe: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{prefix}{safe}.safetensors"))
}

/// The tensors kept in `path` for run `key`, if they belong to it and fit `specs`; `what`
/// names them in the log ("the SCAFFOLD variate").
pub fn load_for(path: &Path, key: &str, specs: &[TensorSpec], what: &str) -> Option<TensorSet> {
    if !path.exists() {
        return None;
    }
    match checkpoint::load(path) {
        Ok((_, meta)) if meta.get(KEY).map(String::as_str) != Some(key) => {
            info!(
                "{what} in {} belongs to another federation run; starting afresh",
                path.display()
            );
            None
        }
        Ok((set, _)) => match set.check_matches(specs) {
            Ok(()) => Some(set),
            Err(e) => {
                warn!(
                    "{what} in {} does not fit the model ({e}); starting afresh",
                    path.display()
                );
                None
            }
        },
        Err(e) => {
            warn!(
                "cannot read {what} {} ({e}); starting afresh",
                path.display()
            );
            None
        }
    }
}

/// Removes the files `<prefix>*` in `dir` (but `except`) of all but the [`KEEP`] most
/// recently written.
pub fn prune(dir: &Path, prefix: &str, except: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut kept: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(prefix) && name.as_ref() != except
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    kept.sort_by_key(|k| std::cmp::Reverse(k.0));
    for (_, old) in kept.into_iter().skip(KEEP) {
        let _ = std::fs::remove_file(old);
    }
}
