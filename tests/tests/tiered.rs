//! Tiered aggregation with real processes over mutual TLS on 127.0.0.1: a root, aggregators
//! (`serve --upstream`) each with their own clients, on real Fashion-MNIST shares. FedAvg
//! over the tree equals FedAvg over the same clients flat; the root moves one update per
//! aggregator; an aggregator that dies mid-round fails only its subtree; a root whose strategy
//! cannot combine pre-aggregated updates refuses aggregators, naming why.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedtune_common::checkpoint;
use fedtune_tests::{Proc, client_args, client_shares, free_port, kit_dir};

fedtune_tests::test_binaries!();

const ROUNDS: &str = "2";
/// The root's recipe, the same in both topologies.
const RECIPE: &[&str] = &[
    "--model",
    "mlp",
    "--local-epochs",
    "1",
    "--batch-size",
    "32",
    "--fraction-evaluate",
    "1",
    "--seed",
    "5",
];

fn root_args(
    port: u16,
    out: &Path,
    min_clients: usize,
    round_timeout: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--out",
        &out.display().to_string(),
        "--rounds",
        ROUNDS,
        "--min-available-clients",
        &min_clients.to_string(),
        "--round-timeout",
        round_timeout,
    ]
    .map(String::from)
    .to_vec();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Starts the root on a free port, writing to `dir/root`: (the process, its port).
fn start_root(dir: &Path, min_clients: usize, round_timeout: &str, extra: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let args = root_args(port, &dir.join("root"), min_clients, round_timeout, extra);
    (Proc::spawn("root", coordinator_bin(), &args, dir), port)
}

/// An aggregator named `name` under the root on `root_port`, serving its clients on `port`.
fn aggregator_args(
    port: u16,
    root_port: u16,
    name: &str,
    out: &Path,
    extra: &[&str],
) -> Vec<String> {
    let kit = kit_dir(&[name])
        .join("clients")
        .join(name)
        .join("client.toml");
    let mut a: Vec<String> = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--out",
        &out.display().to_string(),
        "--upstream",
        &format!("https://127.0.0.1:{root_port}"),
        "--upstream-kit",
        &kit.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn rows(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn leaf(port: u16, data: &Path, name: &str, logs: &Path) -> Proc {
    Proc::spawn(
        name,
        client_bin(),
        &client_args(port, data, name, &[]),
        logs,
    )
}

/// One aggregator of a test: its own flags, its environment (a crash point) and its clients,
/// each `(number, data)`: client `leaf<number>`.
struct Agg<'a> {
    extra: &'a [&'a str],
    env: &'a [(&'a str, &'a str)],
    leaves: Vec<(usize, &'a Path)>,
}

/// Starts `agg0`, `agg1`, ... under the root on `root_port`, each followed by its clients.
fn start_aggregators(dir: &Path, root_port: u16, aggs: &[Agg]) -> Vec<Proc> {
    let mut procs = Vec::new();
    for (a, agg) in aggs.iter().enumerate() {
        let port = free_port();
        let name = format!("agg{a}");
        let args = aggregator_args(port, root_port, &name, &dir.join(&name), agg.extra);
        procs.push(Proc::spawn_with_env(
            &name,
            coordinator_bin(),
            &args,
            agg.env,
            dir,
        ));
        for (l, data) in &agg.leaves {
            procs.push(leaf(port, data, &format!("leaf{l}"), dir));
        }
    }
    procs
}

/// Runs the flat federation of `shares` and returns its output folder.
fn flat(dir: &Path, shares: &[PathBuf]) -> PathBuf {
    let out = dir.join("flat");
    let port = free_port();
    let mut root = Proc::spawn(
        "flat-root",
        coordinator_bin(),
        &root_args(port, &out, shares.len(), "120s", RECIPE),
        dir,
    );
    let mut leaves: Vec<Proc> = shares
        .iter()
        .enumerate()
        .map(|(i, d)| leaf(port, d, &format!("leaf{i}"), dir))
        .collect();
    root.expect_success(Duration::from_secs(300));
    for l in &mut leaves {
        l.expect_success(Duration::from_secs(30));
    }
    out
}

#[test]
fn tiered_fedavg_equals_flat_fedavg_and_the_root_moves_one_update_per_aggregator() {
    let dir = tempfile::tempdir().unwrap();
    let shares = client_shares(dir.path(), 2000, 4, 1.0, 3);
    let flat_out = flat(dir.path(), &shares);

    let tiered_out = dir.path().join("tiered");
    let root_port = free_port();
    let mut root = Proc::spawn(
        "root",
        coordinator_bin(),
        &root_args(root_port, &tiered_out, 2, "120s", RECIPE),
        dir.path(),
    );
    let mut procs = start_aggregators(
        dir.path(),
        root_port,
        &[0, 1].map(|a| Agg {
            extra: &["--min-available-clients", "2"],
            env: &[],
            leaves: vec![(2 * a, &shares[2 * a]), (2 * a + 1, &shares[2 * a + 1])],
        }),
    );
    root.expect_success(Duration::from_secs(300));
    for p in &mut procs {
        p.expect_success(Duration::from_secs(30));
    }

    // The same model, to f32 rounding of one more mean.
    let (flat_model, _) = checkpoint::load(&flat_out.join("global.safetensors")).unwrap();
    let (tiered_model, _) = checkpoint::load(&tiered_out.join("global.safetensors")).unwrap();
    let (mut worst, mut moved) = (0f32, 0f32);
    let (initial, _) = checkpoint::load(&flat_out.join("global.previous.safetensors")).unwrap();
    for t in flat_model.tensors() {
        let other = tiered_model.get(&t.name).unwrap();
        let before = initial.get(&t.name).unwrap();
        for ((a, b), c) in t.data.iter().zip(&other.data).zip(&before.data) {
            worst = worst.max((a - b).abs());
            moved = moved.max((a - c).abs());
        }
    }
    eprintln!(
        "tiered vs flat: largest difference {worst:e}; last round moved weights by up to {moved:e}"
    );
    assert!(
        moved > 1e-3,
        "the last round moved the model by at most {moved}"
    );
    assert!(
        worst <= 1e-5,
        "tiered and flat FedAvg differ by up to {worst}"
    );

    // The root counted one update per aggregator, standing for both of its clients, and the
    // evaluation figures came up whole.
    let (flat_rows, tiered_rows) = (rows(&flat_out), rows(&tiered_out));
    assert_eq!(tiered_rows.len(), 2);
    let update_bytes = |r: &serde_json::Value| r["bytes_up"].as_u64().unwrap();
    for (f, t) in flat_rows.iter().zip(&tiered_rows) {
        assert_eq!(f["clients_reported"], 4, "{f}");
        assert_eq!(t["clients_reported"], 2, "{t}");
        assert_eq!(t["contributors"], 4, "{t}");
        assert_eq!(f["contributors"], 4, "{f}");
        assert_eq!(update_bytes(f), 2 * update_bytes(t), "flat {f}\ntiered {t}");
        assert_eq!(t["fed_eval_examples"], f["fed_eval_examples"], "{t}");
        let acc = |r: &serde_json::Value| r["fed_eval_accuracy"].as_f64().unwrap();
        assert!((acc(f) - acc(t)).abs() < 1e-6, "flat {f}\ntiered {t}");
        let loss = |r: &serde_json::Value| r["train_loss"].as_f64().unwrap();
        // A mean of means: the same up to f64 rounding.
        assert!((loss(f) - loss(t)).abs() < 1e-7, "flat {f}\ntiered {t}");
    }
    let root_log = root.output();
    assert!(
        root_log.contains("clients 2/2 ok (4 clients behind them)"),
        "{root_log}"
    );
    let agg_log = procs[0].output();
    eprintln!("{root_log}\n{agg_log}");
    assert!(
        agg_log.contains("aggregator round 2: 2/2 clients reported"),
        "{agg_log}"
    );
}

#[test]
fn an_aggregator_dying_mid_round_fails_its_subtree_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let shares = client_shares(dir.path(), 1000, 2, 1.0, 4);
    let out = dir.path().join("root");
    let (mut root, root_port) = start_root(
        dir.path(),
        2,
        "20s",
        &["--model", "mlp", "--min-fit-clients", "1"],
    );
    let one_client = ["--min-available-clients", "1"];
    let mut procs = start_aggregators(
        dir.path(),
        root_port,
        &[
            Agg {
                extra: &one_client,
                env: &[],
                leaves: vec![(0, &shares[0])],
            },
            // agg1 dies after its clients' round, before its update leaves.
            Agg {
                extra: &one_client,
                env: &[("FEDTUNE_CRASH_AT", "relay-upload:1")],
                leaves: vec![(1, &shares[1])],
            },
        ],
    );
    root.expect_success(Duration::from_secs(240));
    assert!(
        procs[2].exited().is_some_and(|s| !s.success()),
        "agg1 should have died:\n{}",
        procs[2].output()
    );
    let rows = rows(&out);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert_eq!(r["clients_reported"], 1, "{r}");
        assert_eq!(r["clients_failed"], 1, "{r}");
        assert_eq!(r["contributors"], 1, "{r}");
    }
    let log = root.output();
    assert!(log.contains("no update from agg1"), "{log}");
}

#[test]
fn an_aggregator_whose_round_fails_declines_and_the_root_does_not_wait_for_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let shares = client_shares(dir.path(), 500, 1, 1.0, 6);
    let out = dir.path().join("root");
    // The root would wait 10 minutes for a silent aggregator.
    let (mut root, root_port) = start_root(
        dir.path(),
        2,
        "10m",
        &["--model", "mlp", "--min-fit-clients", "1"],
    );
    let flags = ["--min-available-clients", "1", "--available-timeout", "2s"];
    let _procs = start_aggregators(
        dir.path(),
        root_port,
        &[
            Agg {
                extra: &flags,
                env: &[],
                leaves: vec![(0, &shares[0])],
            },
            // No clients: it gives up waiting for them after 2 s.
            Agg {
                extra: &flags,
                env: &[],
                leaves: vec![],
            },
        ],
    );
    root.expect_success(Duration::from_secs(120));
    let rows = rows(&out);
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(
            (r["clients_reported"].as_u64(), r["clients_failed"].as_u64()),
            (Some(1), Some(1)),
            "{r}"
        );
        let agg1 = r["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["client"] == "agg1")
            .unwrap();
        let reason = agg1["reason"].as_str().unwrap();
        assert_eq!(agg1["outcome"], "failed", "{agg1}");
        assert!(
            reason.starts_with("declined: its round failed: only 0 of the 1 clients needed"),
            "{reason}"
        );
        assert!(r["round_ms"].as_u64().unwrap() < 60_000, "{r}");
    }
}

#[test]
fn a_root_with_a_robust_strategy_refuses_aggregators_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_root, root_port) = start_root(dir.path(), 1, "120s", &["--strategy", "median"]);
    let mut agg = Proc::spawn(
        "agg0",
        coordinator_bin(),
        &aggregator_args(
            free_port(),
            root_port,
            "agg0",
            &dir.path().join("agg0"),
            &[],
        ),
        dir.path(),
    );
    let status = agg.wait(Duration::from_secs(60));
    assert!(status.is_some_and(|s| !s.success()), "{}", agg.output());
    let log = agg.output();
    assert!(
        log.contains("cannot join as a tiered aggregator")
            && log.contains("`median`")
            && log.contains("linear strategy"),
        "{log}"
    );
}

#[test]
fn an_aggregator_refuses_flags_its_parent_decides() {
    let dir = tempfile::tempdir().unwrap();
    let mut agg = Proc::spawn(
        "agg0",
        coordinator_bin(),
        &aggregator_args(
            free_port(),
            free_port(),
            "agg0",
            &dir.path().join("agg0"),
            &["--lr", "0.1", "--rounds", "3"],
        ),
        dir.path(),
    );
    let status = agg.wait(Duration::from_secs(30));
    assert!(status.is_some_and(|s| !s.success()), "{}", agg.output());
    let log = agg.output();
    assert!(
        log.contains("--rounds, --lr are set by the parent; remove them here"),
        "{log}"
    );
}
