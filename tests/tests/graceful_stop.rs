//! Stopping the coordinator with a signal, as an operator does: the real coordinator binary
//! and two real client processes over mutual TLS on 127.0.0.1. SIGTERM stops it cleanly (exit
//! 0, the last completed round whole) and the same command continues the run while the
//! clients wait for it; a second signal exits at once and leaves nothing damaged.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fedtune_common::checkpoint;
use fedtune_tests::{Proc, free_port, kit_dir};

fedtune_tests::test_binaries!();

const ROUNDS: u64 = 40;

fn serve(port: u16, out: &Path, log_dir: &Path, name: &str) -> Proc {
    let args: Vec<String> = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--rounds",
        &ROUNDS.to_string(),
        "--min-clients",
        "2",
        "--model",
        "synthetic:20000",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    Proc::spawn(name, coordinator_bin(), &args, log_dir)
}

/// A client that sends a fixed delta (`--train none`) and retries while the coordinator is
/// away, for up to a minute.
fn client(port: u16, name: &str, log_dir: &Path) -> Proc {
    let kit = kit_dir(&[name])
        .join("clients")
        .join(name)
        .join("client.toml");
    let args: Vec<String> = [
        "run",
        "--config",
        kit.to_str().unwrap(),
        "--coordinator",
        &format!("https://127.0.0.1:{port}"),
        "--train",
        "none",
        "--name",
        name,
        "--no-progress",
    ]
    .map(String::from)
    .to_vec();
    Proc::spawn(name, client_bin(), &args, log_dir)
}

fn rounds_written(out: &Path) -> Vec<u64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| r["round"].as_u64())
        .collect()
}

/// Waits until `out` holds at least `rounds` completed rounds.
fn wait_for_rounds(out: &Path, rounds: usize, coordinator: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while rounds_written(out).len() < rounds {
        assert!(
            Instant::now() < deadline,
            "no {rounds} rounds in time\n{}",
            coordinator.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn committed_round(out: &Path) -> u64 {
    let (_, meta) = checkpoint::load(&out.join("global.safetensors")).unwrap();
    meta["fedtune.round"].parse().unwrap()
}

fn setup() -> (tempfile::TempDir, PathBuf, u16) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    (dir, out, free_port())
}

#[test]
fn sigterm_stops_cleanly_and_the_same_command_continues_the_run() {
    let (dir, out, port) = setup();
    let mut first = serve(port, &out, dir.path(), "coordinator-1");
    let mut clients = [
        client(port, "stop-a", dir.path()),
        client(port, "stop-b", dir.path()),
    ];
    wait_for_rounds(&out, 3, &first);
    first.signal("TERM");
    first.expect_success(Duration::from_secs(20));
    let log = first.output();
    assert!(log.contains("SIGTERM: stopping"), "{log}");
    assert!(log.contains("run the same command to continue"), "{log}");
    let stopped_after = committed_round(&out);
    assert!(stopped_after < ROUNDS, "the run ended before the signal");
    assert_eq!(
        rounds_written(&out),
        (1..=stopped_after).collect::<Vec<_>>()
    );

    let mut second = serve(port, &out, dir.path(), "coordinator-2");
    second.expect_success(Duration::from_secs(120));
    let log = second.output();
    assert!(
        log.contains(&format!("resumed after round {stopped_after}")),
        "{log}"
    );
    // Every round written once, in order, the clients carried over the restart.
    assert_eq!(rounds_written(&out), (1..=ROUNDS).collect::<Vec<_>>());
    assert_eq!(committed_round(&out), ROUNDS);
    for c in &mut clients {
        c.expect_success(Duration::from_secs(30));
    }
}

#[test]
fn a_second_signal_exits_at_once_and_leaves_the_output_whole() {
    let (dir, out, port) = setup();
    let mut first = serve(port, &out, dir.path(), "coordinator-1");
    let _clients = [
        client(port, "twice-a", dir.path()),
        client(port, "twice-b", dir.path()),
    ];
    wait_for_rounds(&out, 2, &first);
    first.signal("INT");
    first.signal("INT");
    let status = first.wait(Duration::from_secs(20));
    assert!(status.is_some(), "still running\n{}", first.output());
    // Whatever it was doing, the files read back whole and the run resumes.
    let round = committed_round(&out);
    assert!(rounds_written(&out).len() as u64 >= round);
    let mut second = serve(port, &out, dir.path(), "coordinator-2");
    second.expect_success(Duration::from_secs(120));
    assert_eq!(rounds_written(&out), (1..=ROUNDS).collect::<Vec<_>>());
}
