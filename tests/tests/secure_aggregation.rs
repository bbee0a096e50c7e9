//! Secure aggregation end to end: the real coordinator and client binaries over mutual TLS on
//! 127.0.0.1. Clients run `--train none` with real data shares of different sizes (so FedAvg's
//! weights differ) and `--simulate-attack scale:K` with a different K each (so their updates
//! differ): the securely aggregated model is compared with a plain FedAvg run of the same
//! clients, within the quantisation bound.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedtune_common::checkpoint;
use fedtune_common::tensors::TensorSet;
use fedtune_tests::{Proc, client_args, client_shares, free_port};

fedtune_tests::test_binaries!();

/// Quantisation of these runs: values in [−0.05, 0.05] with 16 bits.
const CLIP: f64 = 0.05;
const BITS: u32 = 16;

/// One federation: `clients` (indices into `data`, client i sends (i + 1)·Δ), `rounds`
/// rounds, `secure` or plain FedAvg, extra serve flags, and the clients that abort after a
/// step (`--die-after`). Returns the coordinator's exit success, its log and the final model.
struct Run<'a> {
    dir: &'a Path,
    data: &'a [PathBuf],
    clients: Vec<usize>,
    rounds: u64,
    secure: bool,
    serve: Vec<&'a str>,
    die: Vec<(usize, &'a str)>,
}

struct Ran {
    ok: bool,
    log: String,
    global: Option<TensorSet>,
    /// Each client's declared number of examples, by index.
    examples: Vec<(usize, u64)>,
}

impl Run<'_> {
    fn go(self, tag: &str) -> Ran {
        let dir = self.dir.join(tag);
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let out = dir.join("out");
        let n = self.clients.len();
        let mut args: Vec<String> = [
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--min-available-clients",
            &n.to_string(),
            "--model",
            "synthetic:20000",
            "--rounds",
            &self.rounds.to_string(),
            "--seed",
            "7",
            "--on-round-failure",
            "stop",
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        if self.secure {
            args.extend(
                [
                    "--secure-aggregation",
                    "--secagg-clip",
                    &CLIP.to_string(),
                    "--secagg-bits",
                    &BITS.to_string(),
                    "--secagg-step-timeout",
                    "4s",
                ]
                .map(String::from),
            );
        }
        args.extend(self.serve.iter().map(|s| s.to_string()));
        let mut coordinator = Proc::spawn("coordinator", coordinator_bin(), &args, &dir);
        let mut procs: Vec<(usize, Proc)> = self
            .clients
            .iter()
            .map(|&i| {
                let scale = format!("scale:{}", i + 1);
                let mut extra = vec!["--train", "none", "--simulate-attack", &scale];
                if let Some((_, step)) = self.die.iter().find(|(d, _)| *d == i) {
                    extra.extend(["--die-after", step]);
                }
                let args = client_args(port, &self.data[i], &format!("site-{i}"), &extra);
                (
                    i,
                    Proc::spawn(&format!("client{i}"), client_bin(), &args, &dir),
                )
            })
            .collect();
        let status = coordinator.wait(Duration::from_secs(180));
        for (i, p) in &mut procs {
            let status = p.wait(Duration::from_secs(30));
            if !self.die.iter().any(|(d, _)| d == i) && status.is_some_and(|s| s.success()) {
                continue;
            }
            if self.die.iter().any(|(d, _)| d == i) {
                assert!(
                    status.is_some_and(|s| !s.success()),
                    "client {i} should have died:\n{}",
                    p.output()
                );
            }
        }
        let log = coordinator.output();
        let examples = self
            .clients
            .iter()
            .map(|&i| (i, declared_examples(&log, &format!("site-{i}"))))
            .collect();
        let global = checkpoint::load(&out.join("global.safetensors"))
            .ok()
            .map(|(g, _)| g);
        Ran {
            ok: status.is_some_and(|s| s.success()),
            log,
            global,
            examples,
        }
    }
}

/// The examples a client declared when it joined, from the coordinator's log.
fn declared_examples(log: &str, name: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains(&format!("client joined: {name} ")))
        .unwrap_or_else(|| panic!("{name} never joined:\n{log}"));
    line.split(" with ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no example count in `{line}`"))
}

/// Largest error of one securely aggregated value of the mean, per round: each client's
/// stochastic rounding is off by less than one step, and the sum is divided by the total
/// weight (weights n_i / max n), plus f32 rounding.
fn bound(examples: &[(usize, u64)], rounds: u64) -> f64 {
    let step = 2.0 * CLIP / f64::from(1u32 << BITS);
    let max = examples.iter().map(|e| e.1).max().unwrap() as f64;
    let total: f64 = examples.iter().map(|e| e.1 as f64 / max).sum();
    rounds as f64 * (examples.len() as f64 * step / total + 1e-7)
}

fn max_diff(a: &TensorSet, b: &TensorSet) -> f64 {
    a.tensors()
        .iter()
        .zip(b.tensors())
        .flat_map(|(x, y)| x.data.iter().zip(&y.data))
        .map(|(u, v)| f64::from((u - v).abs()))
        .fold(0.0, f64::max)
}

fn shares(dir: &Path, n: usize) -> Vec<PathBuf> {
    // Skewed sizes (Dirichlet α = 0.5): FedAvg's weights differ from client to client.
    client_shares(dir, 3000, n, 0.5, 11)
}

fn run<'a>(dir: &'a Path, data: &'a [PathBuf], clients: Vec<usize>, secure: bool) -> Run<'a> {
    Run {
        dir,
        data,
        clients,
        rounds: 1,
        secure,
        serve: Vec::new(),
        die: Vec::new(),
    }
}

#[test]
fn the_unmasked_sum_of_ten_clients_equals_plain_fedavg_within_the_quantisation_bound() {
    let dir = tempfile::tempdir().unwrap();
    let data = shares(dir.path(), 10);
    let all: Vec<usize> = (0..10).collect();
    let plain = Run {
        rounds: 2,
        ..run(dir.path(), &data, all.clone(), false)
    }
    .go("plain");
    let secure = Run {
        rounds: 2,
        ..run(dir.path(), &data, all, true)
    }
    .go("secure");
    assert!(plain.ok, "{}", plain.log);
    assert!(secure.ok, "{}", secure.log);
    assert!(
        secure.log.contains("the sum of 10 masked updates unmasked"),
        "{}",
        secure.log
    );
    let (p, s) = (plain.global.unwrap(), secure.global.unwrap());
    let (diff, bound) = (max_diff(&p, &s), bound(&secure.examples, 2));
    assert!(diff <= bound, "secure vs plain: {diff:e} > bound {bound:e}");
    // The clients' updates differ by 1e-3 per scale step: a sum that lost or doubled one
    // would be far outside the bound.
    assert!(bound < 1e-4, "the bound {bound:e} must be able to fail");
}

#[test]
fn one_two_or_three_clients_killed_after_masking_stay_in_the_unmasked_sum() {
    let dir = tempfile::tempdir().unwrap();
    let data = shares(dir.path(), 10);
    let all: Vec<usize> = (0..10).collect();
    let plain = run(dir.path(), &data, all.clone(), false).go("plain");
    assert!(plain.ok, "{}", plain.log);
    let p = plain.global.unwrap();
    for killed in 1..=3 {
        let secure = Run {
            die: (0..killed).map(|i| (i * 3, "masked")).collect(),
            ..run(dir.path(), &data, all.clone(), true)
        }
        .go(&format!("killed{killed}"));
        assert!(secure.ok, "{killed} killed:\n{}", secure.log);
        let diff = max_diff(&p, &secure.global.unwrap());
        let bound = bound(&secure.examples, 1);
        assert!(
            diff <= bound,
            "{killed} killed after masking: {diff:e} > bound {bound:e}"
        );
    }
}

#[test]
fn clients_killed_after_sharing_keys_are_left_out_and_their_masks_removed() {
    let dir = tempfile::tempdir().unwrap();
    let data = shares(dir.path(), 8);
    let survivors: Vec<usize> = (2..8).collect();
    let plain = run(dir.path(), &data, survivors.clone(), false).go("plain");
    assert!(plain.ok, "{}", plain.log);
    let secure = Run {
        die: vec![(0, "shared-keys"), (1, "shared-keys")],
        ..run(dir.path(), &data, (0..8).collect(), true)
    }
    .go("secure");
    assert!(secure.ok, "{}", secure.log);
    assert!(
        secure
            .log
            .contains("2 clients shared keys but sent no masked update"),
        "{}",
        secure.log
    );
    let kept: Vec<(usize, u64)> = secure
        .examples
        .iter()
        .copied()
        .filter(|(i, _)| survivors.contains(i))
        .collect();
    let diff = max_diff(&plain.global.unwrap(), &secure.global.unwrap());
    let bound = bound(&kept, 1);
    assert!(
        diff <= bound,
        "the mean of the 6 survivors: {diff:e} > bound {bound:e}"
    );
}

#[test]
fn below_the_threshold_the_round_fails_without_moving_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = shares(dir.path(), 6);
    let secure = Run {
        serve: vec!["--secagg-threshold", "4"],
        die: vec![(0, "masked"), (1, "masked"), (2, "masked")],
        ..run(dir.path(), &data, (0..6).collect(), true)
    }
    .go("secure");
    assert!(!secure.ok, "the run must fail:\n{}", secure.log);
    assert!(
        secure.log.contains("fewer than the threshold 4") && secure.log.contains("round 1 failed"),
        "{}",
        secure.log
    );
    // No unmasked sum, so no aggregated model: the output holds at most the initial one.
    assert!(
        !secure.log.contains("masked updates unmasked"),
        "{}",
        secure.log
    );
}
