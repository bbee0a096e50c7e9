//! `fedtune-coordinator tune` over real client processes on real Fashion-MNIST shares: the
//! clients join once and train every trial; successive halving cuts trials early; the answer
//! is a `best.toml` that `serve` runs; a killed search continues where it was.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedtune_tests::{Proc, client_args, client_shares, free_port, tls_serve_args};

fedtune_tests::test_binaries!();

/// The base settings: mlp with SGD, two clients in every round, over mutual TLS.
fn base_toml(dir: &Path, port: u16) -> PathBuf {
    let tls = tls_serve_args();
    let file = |flag: &str| {
        let i = tls.iter().position(|a| a == flag).unwrap();
        tls[i + 1].clone()
    };
    let text = format!(
        r#"listen = "127.0.0.1:{port}"
model = "mlp"
min_clients = 2
min_fit_clients = 2
optimizer = "sgd"
batch_size = 32
rounds = 3
tls_cert = "{}"
tls_key = "{}"
client_ca = "{}"
"#,
        file("--tls-cert"),
        file("--tls-key"),
        file("--client-ca")
    );
    let path = dir.join("base.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn tune_args(base: &Path, out: &Path) -> Vec<String> {
    [
        "tune",
        "--config",
        base.to_str().unwrap(),
        "--trials",
        "4",
        "--space",
        "lr=loguniform(1e-3,0.3)",
        "--space",
        "strategy=choice(fedavg,fedavgm)",
        "--sampler",
        "random",
        "--seed",
        "5",
        "--min-rounds",
        "1",
        "--max-rounds",
        "3",
        "--eta",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

fn clients(port: u16, shares: &[PathBuf], dir: &Path) -> Vec<Proc> {
    shares
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let name = format!("edge-{i}");
            let state = dir.join(format!("state-{i}")).display().to_string();
            let args = client_args(port, d, &name, &["--state-dir", &state]);
            Proc::spawn(&name, client_bin(), &args, dir)
        })
        .collect()
}

fn lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("tune.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn results(lines: &[serde_json::Value], rung: u64) -> Vec<(u64, f64)> {
    lines
        .iter()
        .filter(|l| l["kind"] == "result" && l["rung"] == rung)
        .map(|l| {
            (
                l["trial"].as_u64().unwrap(),
                l["objective"].as_f64().unwrap_or(f64::INFINITY),
            )
        })
        .collect()
}

/// A search's folder, two clients' Fashion-MNIST shares (drawn with `seed`), a free port, and
/// the base settings on it and the search's `--out`.
fn setup(seed: u64) -> (tempfile::TempDir, Vec<PathBuf>, u16, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let shares = client_shares(dir.path(), 2000, 2, 1.0, seed);
    let port = free_port();
    let base = base_toml(dir.path(), port);
    let out = dir.path().join("tune");
    (dir, shares, port, base, out)
}

#[test]
fn tune_cuts_the_worst_trials_early_and_its_best_toml_runs_under_serve() {
    let (dir, shares, port, base, out) = setup(3);
    let mut tune = Proc::spawn(
        "tune",
        coordinator_bin(),
        &tune_args(&base, &out),
        dir.path(),
    );
    let mut cs = clients(port, &shares, dir.path());
    tune.expect_success(Duration::from_secs(300));
    for c in &mut cs {
        // Joined once: the whole search on one session.
        c.expect_success(Duration::from_secs(30));
        let joins = c.output().matches("joined").count();
        assert_eq!(joins, 1, "{}", c.output());
    }
    let lines = lines(&out);
    let (first, second) = (results(&lines, 0), results(&lines, 1));
    assert_eq!(first.len(), 4, "every trial trains 1 round");
    assert_eq!(second.len(), 2, "the best ⌈4/3⌉ go on to 3 rounds");
    // The ones cut were the worst after 1 round.
    let kept: Vec<u64> = second.iter().map(|(t, _)| *t).collect();
    let worst_kept = first
        .iter()
        .filter(|(t, _)| kept.contains(t))
        .map(|(_, o)| *o)
        .fold(f64::MIN, f64::max);
    let best_cut = first
        .iter()
        .filter(|(t, _)| !kept.contains(t))
        .map(|(_, o)| *o)
        .fold(f64::MAX, f64::min);
    assert!(worst_kept <= best_cut, "{first:?} → {kept:?}");
    let best = lines
        .iter()
        .find(|l| l["kind"] == "best")
        .expect("a best line");
    let best_trial = best["trial"].as_u64().unwrap();
    assert!(kept.contains(&best_trial), "{best}");
    assert!(
        tune.output().contains("stopped at rung 0"),
        "{}",
        tune.output()
    );

    // best.toml runs as it is: the base settings with the winner's values and rounds.
    let best_toml = out.join("best.toml");
    let text = std::fs::read_to_string(&best_toml).unwrap();
    assert!(text.contains("rounds = 3"), "{text}");
    for key in best["params"].as_object().unwrap().keys() {
        assert!(
            text.contains(&format!("\n{key} = ")),
            "{key} missing from {text}"
        );
    }
    let run = dir.path().join("best-run");
    let serve = [
        "serve",
        "--config",
        best_toml.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]
    .map(String::from);
    let mut coordinator = Proc::spawn("serve-best", coordinator_bin(), &serve, dir.path());
    let mut cs = clients(port, &shares, dir.path());
    coordinator.expect_success(Duration::from_secs(120));
    for c in &mut cs {
        c.expect_success(Duration::from_secs(30));
    }
    let rows = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 3);
}

#[test]
fn a_killed_tuning_run_continues_its_trials_when_started_again() {
    let (dir, shares, port, base, out) = setup(4);
    let args = tune_args(&base, &out);
    // Killed in the third trial's first round, after trials 0 and 1 were logged.
    let mut first = Proc::spawn_with_env(
        "tune-1",
        coordinator_bin(),
        &args,
        &[("FEDTUNE_CRASH_AT", "aggregate:3")],
        dir.path(),
    );
    let mut cs = clients(port, &shares, dir.path());
    assert!(
        first
            .wait(Duration::from_secs(300))
            .is_some_and(|s| !s.success()),
        "{}",
        first.output()
    );
    let before = lines(&out);
    assert_eq!(results(&before, 0).len(), 2, "{before:?}");

    let mut second = Proc::spawn("tune-2", coordinator_bin(), &args, dir.path());
    second.expect_success(Duration::from_secs(300));
    for c in &mut cs {
        c.expect_success(Duration::from_secs(30));
    }
    let after = lines(&out);
    // Trials 0 and 1 were not run again; 2 and 3 were run once each.
    let mut trials: Vec<u64> = results(&after, 0).iter().map(|(t, _)| *t).collect();
    trials.sort();
    assert_eq!(trials, vec![0, 1, 2, 3]);
    for t in ["trial 0, rung 0", "trial 1, rung 0"] {
        assert!(
            !second.output().contains(t),
            "{t} ran again\n{}",
            second.output()
        );
    }
    assert!(second.output().contains("trial 2, rung 0"));
    assert!(after.iter().any(|l| l["kind"] == "best"));
    // The same trials as an uninterrupted search with this seed would draw: the values of
    // trials 0 and 1 are in the log once.
    assert_eq!(after[1], before[1]);
}

#[test]
fn tune_with_the_accuracy_objective_picks_the_most_accurate_trial() {
    let (dir, shares, port, base, out) = setup(6);
    let mut args = tune_args(&base, &out);
    // One rung of one round: the answer is the ranking of the four trials.
    let at = args.iter().position(|a| a == "--max-rounds").unwrap();
    args[at + 1] = "1".into();
    args.extend(["--objective", "accuracy"].map(String::from));
    let mut tune = Proc::spawn("tune", coordinator_bin(), &args, dir.path());
    let mut cs = clients(port, &shares, dir.path());
    tune.expect_success(Duration::from_secs(300));
    for c in &mut cs {
        c.expect_success(Duration::from_secs(30));
    }
    let lines = lines(&out);
    assert_eq!(lines[0]["objective"], "accuracy", "{}", lines[0]);
    let rung: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["kind"] == "result" && l["rung"] == 0)
        .collect();
    assert_eq!(rung.len(), 4);
    for r in &rung {
        assert_eq!(r["objective"], r["fed_eval_accuracy"], "{r}");
        assert!(r["fed_eval_loss"].as_f64().is_some(), "{r}");
    }
    let most_accurate = rung
        .iter()
        .max_by(|a, b| {
            let acc = |l: &serde_json::Value| l["fed_eval_accuracy"].as_f64().unwrap_or(-1.0);
            acc(a).total_cmp(&acc(b))
        })
        .unwrap();
    let best = lines.iter().find(|l| l["kind"] == "best").unwrap();
    assert_eq!(
        best["objective"], most_accurate["fed_eval_accuracy"],
        "{best} vs {most_accurate}"
    );
    let text = std::fs::read_to_string(out.join("best.toml")).unwrap();
    assert!(text.contains("federated validation accuracy"), "{text}");
}
