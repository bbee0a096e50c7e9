//! Helpers for fedtune's end-to-end tests: the real binaries as real processes, free ports on
//! 127.0.0.1, the bundled real data.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The real Fashion-MNIST subset committed under data/ (train 10k, t10k 2k).
pub fn fashion_subset() -> PathBuf {
    workspace_root().join("data/fashion-mnist-subset")
}

/// Features the test build was compiled with, passed on when (re)building the binaries.
fn features() -> &'static [&'static str] {
    if cfg!(feature = "tch") { &["--features", "fedtune-client/tch,fedtune-coordinator/tch"] } else { &[] }
}

/// Paths of the two binaries, built (once per test process) with the same profile and
/// features as this test. `cargo test` only builds a package's own binaries, so the tests ask
/// cargo for the workspace's; when they are up to date this is a no-op.
pub fn binaries() -> &'static (PathBuf, PathBuf) {
    static BINS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINS.get_or_init(|| {
        // target/<profile>/deps/<test-binary>
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root()).args(["build", "--workspace", "--bins"]).args(features());
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the binaries");
        assert!(status.success(), "building the binaries failed");
        let bin = |name: &str| profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
        (bin("fedtune-coordinator"), bin("fedtune-client"))
    })
}

pub fn coordinator_bin() -> &'static Path {
    &binaries().0
}

pub fn client_bin() -> &'static Path {
    &binaries().1
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
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
        Self { name: name.to_string(), log, child }
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
