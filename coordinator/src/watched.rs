//! A small file the coordinator re-reads whenever its modification time changes (the
//! allow-list, the client tokens), so that an operator's edit takes effect without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tracing::{info, warn};

pub struct Watched<T> {
    path: PathBuf,
    /// What the file is, for logs (`allow-list`).
    what: &'static str,
    parse: fn(&str) -> Result<T, String>,
    state: Mutex<(Option<SystemTime>, Arc<T>)>,
}

impl<T> Watched<T> {
    /// Reads the file now: it must exist and parse.
    pub fn open(
        path: &Path,
        what: &'static str,
        parse: fn(&str) -> Result<T, String>,
    ) -> anyhow::Result<Self> {
        let (mtime, value) = Self::read(path, parse).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        Ok(Self {
            path: path.to_path_buf(),
            what,
            parse,
            state: Mutex::new((Some(mtime), Arc::new(value))),
        })
    }

    fn read(path: &Path, parse: fn(&str) -> Result<T, String>) -> Result<(SystemTime, T), String> {
        let mtime = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .map_err(|e| format!("{}: cannot read ({e})", path.display()))?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read ({e})", path.display()))?;
        let value = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((mtime, value))
    }

    /// The file's contents, re-read if it changed. A file that cannot be read or parsed keeps
    /// the last good contents (logged): a half-written edit must neither let everyone in nor
    /// lock everyone out.
    pub fn current(&self) -> Arc<T> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let changed = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .map(|m| state.0 != Some(m))
            .unwrap_or(true);
        if changed {
            match Self::read(&self.path, self.parse) {
                Ok((mtime, value)) => {
                    info!("{} {} changed: re-read", self.what, self.path.display());
                    *state = (Some(mtime), Arc::new(value));
                }
                Err(e) => warn!("{} {e}; keeping the previous one", self.what),
            }
        }
        state.1.clone()
    }
}
