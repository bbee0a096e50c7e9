//! Files the coordinator re-reads whenever one of their modification times changes (the
//! allow-list, the client tokens, the TLS certificates), so that an operator's edit takes
//! effect without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tracing::{info, warn};

type Load<T> = Box<dyn Fn() -> Result<T, String> + Send + Sync>;

pub struct Watched<T> {
    paths: Vec<PathBuf>,
    /// What the files are, for logs (`allow-list`).
    what: &'static str,
    load: Load<T>,
    /// The modification times the current value was loaded at, and the value.
    state: Mutex<(Vec<Option<SystemTime>>, Arc<T>)>,
}

impl<T> Watched<T> {
    /// A text file, parsed by `parse`; it must exist and parse now.
    pub fn open(
        path: &Path,
        what: &'static str,
        parse: fn(&str) -> Result<T, String>,
    ) -> anyhow::Result<Self>
    where
        T: 'static,
    {
        let file = path.to_path_buf();
        Self::over(vec![file.clone()], what, move || {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("{}: cannot read ({e})", file.display()))?;
            parse(&text).map_err(|e| format!("{}: {e}", file.display()))
        })
    }

    /// Whatever `load` makes of `paths`, loaded again when any of them changes; it must load
    /// now.
    pub fn over(
        paths: Vec<PathBuf>,
        what: &'static str,
        load: impl Fn() -> Result<T, String> + Send + Sync + 'static,
    ) -> anyhow::Result<Self> {
        let stamps = stamps(&paths);
        let value = load().map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        Ok(Self {
            paths,
            what,
            load: Box::new(load),
            state: Mutex::new((stamps, Arc::new(value))),
        })
    }

    /// The current value, loaded again if a file changed. Files that cannot be read or loaded
    /// keep the last good value (logged, and tried again at the next call): a half-written
    /// edit must neither let everyone in nor lock everyone out.
    pub fn current(&self) -> Arc<T> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Stamps taken before loading: a write during the load shows as a change next time.
        let now = stamps(&self.paths);
        if now != state.0 {
            let names = self
                .paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            match (self.load)() {
                Ok(value) => {
                    info!("{} {names} changed: re-read", self.what);
                    *state = (now, Arc::new(value));
                }
                Err(e) => warn!("{} {e}; keeping the previous one", self.what),
            }
        }
        state.1.clone()
    }
}

fn stamps(paths: &[PathBuf]) -> Vec<Option<SystemTime>> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_loaded_and_a_broken_edit_keeps_the_last_good_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.txt");
        std::fs::write(&path, "1").unwrap();
        let n = Watched::open(&path, "number", |t| {
            t.trim().parse::<u32>().map_err(|e| e.to_string())
        })
        .unwrap();
        assert_eq!(*n.current(), 1);
        let touch = |text: &str, secs: u64| {
            std::fs::write(&path, text).unwrap();
            let when = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(when)
                .unwrap();
        };
        touch("2", 1_000);
        assert_eq!(*n.current(), 2);
        touch("two", 2_000);
        assert_eq!(*n.current(), 2, "a broken edit keeps the last good value");
        touch("3", 3_000);
        assert_eq!(*n.current(), 3);
    }
}
