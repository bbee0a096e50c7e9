//! kill -9 anywhere: the real coordinator and three real clients (`--train none`: the same
//! fixed delta every time, so the result is known) over real gRPC on 127.0.0.1. One process
//! is killed with SIGKILL at an exact point (`FEDTUNE_CRASH_AT`, see `docs/reliability.md`)
//! and started again with the same command; a client is frozen with SIGSTOP. In each scenario
//! the run finishes every round, every round counts each client's update once (the
//! coordinator's own metrics.jsonl), and the final model equals an uninterrupted run's.
//!
//! `deploy/stress-faults.sh N` runs each scenario N times and prints passes and failures.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fedtune_common::checkpoint;
use fedtune_common::tensors::TensorSet;
use fedtune_tests::{Proc, free_port};

fedtune_tests::test_binaries!();

const ROUNDS: u64 = 3;
const CLIENTS: [&str; 3] = ["client-1", "client-2", "client-3"];
/// 4 MB: four 1 MiB chunks, so that "mid-download" and "mid-upload" are mid-stream.
const MODEL: &str = "synthetic:1000000";
const TIMEOUT: Duration = Duration::from_secs(120);

struct Federation {
    port: u16,
    out: PathBuf,
    logs: PathBuf,
    _dir: tempfile::TempDir,
}

impl Federation {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            port: free_port(),
            out: dir.path().join("out"),
            logs: dir.path().to_path_buf(),
            _dir: dir,
        }
    }

    fn coordinator(&self, name: &str, crash_at: Option<&str>, extra: &[&str]) -> Proc {
        let mut args: Vec<String> = [
            "serve",
            "--insecure",
            "--listen",
            &format!("127.0.0.1:{}", self.port),
            "--rounds",
            &ROUNDS.to_string(),
            "--min-clients",
            "3",
            "--model",
            MODEL,
            "--seed",
            "5",
            "--out",
            self.out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        let env: Vec<(&str, &str)> = crash_at
            .map(|c| (fedtune_common::crash_point::ENV, c))
            .into_iter()
            .collect();
        Proc::spawn_with_env(name, coordinator_bin(), &args, &env, &self.logs)
    }

    fn client(&self, name: &str, log: &str, crash_at: Option<&str>) -> Proc {
        let args: Vec<String> = [
            "run",
            "--insecure",
            "--coordinator",
            &format!("http://127.0.0.1:{}", self.port),
            "--train",
            "none",
            "--name",
            name,
            "--no-progress",
            "--give-up-after",
            "2m",
        ]
        .map(String::from)
        .to_vec();
        let env: Vec<(&str, &str)> = crash_at
            .map(|c| (fedtune_common::crash_point::ENV, c))
            .into_iter()
            .collect();
        Proc::spawn_with_env(log, client_bin(), &args, &env, &self.logs)
    }

    fn rows(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.out.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn model(&self) -> TensorSet {
        checkpoint::load(&self.out.join("global.safetensors"))
            .unwrap()
            .0
    }
}

/// Waits for `p` to die from its crash point; fails the test with its log if it finishes
/// instead or takes too long.
fn killed(p: &mut Proc) {
    let status = p.wait(TIMEOUT);
    assert!(
        status.is_some_and(|s| !s.success()),
        "{} was to be killed at its crash point: {status:?}\n{}",
        p.name,
        p.output()
    );
    assert!(
        p.output().contains("killing this process"),
        "{} died elsewhere\n{}",
        p.name,
        p.output()
    );
}

/// Each round once, each with every client's update counted once.
fn assert_counted_once(f: &Federation, coordinator: &Proc) {
    let rows = f.rows();
    let rounds: Vec<u64> = rows.iter().filter_map(|r| r["round"].as_u64()).collect();
    assert_eq!(
        rounds,
        (1..=ROUNDS).collect::<Vec<_>>(),
        "{}",
        coordinator.output()
    );
    for r in &rows {
        assert_eq!(r["clients_reported"], CLIENTS.len(), "{r}");
        let mut reported: Vec<&str> = r["clients"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["outcome"] == "reported")
            .map(|c| c["client"].as_str().unwrap())
            .collect();
        reported.sort();
        assert_eq!(reported, CLIENTS, "{r}");
    }
}

fn assert_same_model(a: &TensorSet, b: &TensorSet) {
    for (x, y) in a.tensors().iter().zip(b.tensors()) {
        let worst = x
            .data
            .iter()
            .zip(&y.data)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-6, "{}: differs by {worst}", x.name);
    }
}

/// The final model of a run nothing interrupted (computed once per test process).
fn uninterrupted() -> &'static TensorSet {
    static MODEL: std::sync::OnceLock<TensorSet> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| {
        let f = Federation::new();
        let mut c = f.coordinator("coordinator", None, &[]);
        let mut clients: Vec<Proc> = CLIENTS.iter().map(|n| f.client(n, n, None)).collect();
        c.expect_success(TIMEOUT);
        for p in &mut clients {
            p.expect_success(TIMEOUT);
        }
        assert_counted_once(&f, &c);
        f.model()
    })
}

/// The coordinator killed at `crash_at`, then started again with the same command, which
/// says `resumed` (how it carried on).
fn coordinator_killed_at(crash_at: &str, resumed: &str) {
    let want = uninterrupted();
    let f = Federation::new();
    let mut first = f.coordinator("coordinator-1", Some(crash_at), &[]);
    let mut clients: Vec<Proc> = CLIENTS.iter().map(|n| f.client(n, n, None)).collect();
    killed(&mut first);
    let mut second = f.coordinator("coordinator-2", None, &[]);
    second.expect_success(TIMEOUT);
    for p in &mut clients {
        p.expect_success(TIMEOUT);
    }
    assert!(second.output().contains(resumed), "{}", second.output());
    assert_counted_once(&f, &second);
    assert_same_model(want, &f.model());
}

/// `client-2` killed at `crash_at`, then started again with the same command.
fn client_killed_at(crash_at: &str) {
    let want = uninterrupted();
    let f = Federation::new();
    let mut c = f.coordinator("coordinator", None, &[]);
    let mut clients = vec![
        f.client("client-1", "client-1", None),
        f.client("client-3", "client-3", None),
    ];
    let mut victim = f.client("client-2", "client-2-killed", Some(crash_at));
    killed(&mut victim);
    clients.push(f.client("client-2", "client-2", None));
    c.expect_success(TIMEOUT);
    for p in &mut clients {
        p.expect_success(TIMEOUT);
    }
    assert!(
        c.output().contains("client-2 joined again"),
        "{}",
        c.output()
    );
    assert_counted_once(&f, &c);
    assert_same_model(want, &f.model());
}

#[test]
fn coordinator_killed_while_waiting_for_clients() {
    coordinator_killed_at("waiting:2", "resumed after round 1");
}

#[test]
fn coordinator_killed_mid_download() {
    coordinator_killed_at(
        "download:5",
        "round 2/3: continuing after the restart from its journal",
    );
}

#[test]
fn coordinator_killed_mid_upload() {
    coordinator_killed_at(
        "upload:2",
        "round 1/3: continuing after the restart from its journal",
    );
}

#[test]
fn coordinator_killed_between_an_update_and_its_journal_line() {
    coordinator_killed_at(
        "journal:5",
        "round 2/3: continuing after the restart from its journal: 1 of 3 updates already counted",
    );
}

#[test]
fn coordinator_killed_during_aggregation() {
    coordinator_killed_at(
        "aggregate:2",
        "round 2/3: continuing after the restart from its journal: the round had closed with 3 of 3 updates",
    );
}

#[test]
fn coordinator_killed_during_the_checkpoint_write() {
    coordinator_killed_at(
        "checkpoint:2",
        "round 2/3: continuing after the restart from its journal: the round had closed with 3 of 3 updates",
    );
}

#[test]
fn client_killed_mid_training() {
    client_killed_at("train:2");
}

#[test]
fn client_killed_mid_upload() {
    client_killed_at("upload:2");
}

/// A client frozen with SIGSTOP holding its round-2 task keeps its connection open and never
/// answers: the round closes at its deadline without it, the run goes on, and its update,
/// once it thaws, is refused as late rather than counted into a later round.
#[test]
fn a_frozen_client_does_not_hold_the_run() {
    let f = Federation::new();
    let mut c = f.coordinator(
        "coordinator",
        None,
        &["--min-fit-clients", "2", "--round-timeout", "4s"],
    );
    let mut clients = vec![
        f.client("client-1", "client-1", None),
        f.client("client-3", "client-3", None),
        f.client("client-2", "client-2", Some("train:2:stop")),
    ];
    let deadline = Instant::now() + TIMEOUT;
    while f.rows().len() < 2 {
        assert!(Instant::now() < deadline, "no round 2\n{}", c.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(clients[2].output().contains("freezing this process"));
    clients[2].signal("CONT");
    c.expect_success(TIMEOUT);
    for p in &mut clients {
        p.expect_success(TIMEOUT);
    }
    let rows = f.rows();
    assert_eq!(rows.len() as u64, ROUNDS);
    // Round 2 closed without client-2; no round counted more updates than it selected.
    assert_eq!(rows[1]["clients_reported"], 2, "{}", rows[1]);
    assert!(
        c.output()
            .contains("no update from client-2 before round 2 closed"),
        "{}",
        c.output()
    );
    for r in &rows {
        assert!(
            r["clients_reported"].as_u64() <= r["clients_selected"].as_u64(),
            "{r}"
        );
    }
}
