//! Helpers for fedtune's end-to-end tests: the real binaries as real processes, free ports on
//! 127.0.0.1, the bundled real data.

pub mod raw;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The real Fashion-MNIST subset committed under data/ (train 10k, t10k 2k).
pub fn fashion_subset() -> PathBuf {
    workspace_root().join("data/fashion-mnist-subset")
}

/// Defines `coordinator_bin()` and `client_bin()` in the calling test: the two binaries cargo
/// builds for this package's tests from coordinator/src/main.rs and client/src/main.rs (see
/// tests/Cargo.toml). A macro, because cargo sets their paths only for integration tests.
#[macro_export]
macro_rules! test_binaries {
    () => {
        fn coordinator_bin() -> &'static std::path::Path {
            std::path::Path::new(env!("CARGO_BIN_EXE_fedtune-coordinator-under-test"))
        }

        fn client_bin() -> &'static std::path::Path {
            std::path::Path::new(env!("CARGO_BIN_EXE_fedtune-client-under-test"))
        }
    };
}

/// `fedtune-client run` against the coordinator on 127.0.0.1:`port`, then `extra`.
pub fn client_args(port: u16, data: &Path, name: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--coordinator",
        &format!("http://127.0.0.1:{port}"),
        "--data",
        &data.display().to_string(),
        "--name",
        name,
        "--no-progress",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process whose stdout and stderr go to a log file; killed when dropped.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[String], log_dir: &Path) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("create log");
        let err = out.try_clone().expect("clone log handle");
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        Self {
            name: name.to_string(),
            log,
            child,
        }
    }

    /// Waits for the process to exit, killing it after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
