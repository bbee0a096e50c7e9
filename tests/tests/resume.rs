//! Resuming a run, against a real coordinator over real gRPC on 127.0.0.1 with a scripted
//! client: an unfinished run continues by itself when `serve` is run again, exactly as if it
//! had not stopped; other settings are refused naming what changed; `--fresh` moves the
//! earlier run aside; a damaged latest model falls back to the round before.

use std::path::Path;

use fedtune_common::checkpoint;
use fedtune_common::tensors::TensorSet;
use fedtune_coordinator::config::ServeArgs;
use fedtune_tests::scripted::{metrics, run_with_one_worker, serve_args};

/// `rounds` rounds of FedAdam (server state that must survive the restart) in `out`.
fn fedadam(out: &Path, rounds: u64) -> ServeArgs {
    let mut a = serve_args(out, rounds, 1);
    a.strategy = Some("fedadam".into());
    a.server_lr = Some(0.05);
    a
}

async fn run(a: ServeArgs) -> anyhow::Result<()> {
    run_with_one_worker(a).await.map(|_| ())
}

fn global(out: &Path) -> (TensorSet, u64) {
    let (set, meta) = checkpoint::load(&out.join("global.safetensors")).unwrap();
    (set, meta["fedtune.round"].parse().unwrap())
}

fn rounds_in_metrics(out: &Path) -> Vec<u64> {
    metrics(out)
        .iter()
        .map(|r| r["round"].as_u64().unwrap())
        .collect()
}

fn assert_bit_equal(a: &TensorSet, b: &TensorSet, what: &str) {
    for (x, y) in a.tensors().iter().zip(b.tensors()) {
        assert!(
            x.data
                .iter()
                .zip(&y.data)
                .all(|(p, q)| p.to_bits() == q.to_bits()),
            "{}: {what}",
            x.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unfinished_run_continues_by_itself_exactly() {
    let straight = tempfile::tempdir().unwrap();
    run(fedadam(straight.path(), 3)).await.unwrap();
    let split = tempfile::tempdir().unwrap();
    run(fedadam(split.path(), 2)).await.unwrap();
    // The same command with more rounds: no flag needed to continue.
    run(fedadam(split.path(), 3)).await.unwrap();

    let (a, round) = global(straight.path());
    let (b, _) = global(split.path());
    assert_eq!(round, 3);
    assert_bit_equal(&a, &b, "differs between the straight and the resumed run");
    assert_eq!(rounds_in_metrics(split.path()), vec![1, 2, 3]);
    // The state of the last two models is kept, older ones removed.
    let state = |r: u64| {
        split
            .path()
            .join(format!("strategy-state.r{r}.safetensors"))
    };
    assert!(state(3).is_file() && state(2).is_file());
    assert!(!state(1).exists());
    assert!(split.path().join("global.previous.safetensors").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_run_or_other_settings_are_refused_naming_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    run(fedadam(dir.path(), 2)).await.unwrap();

    let e = format!("{:#}", run(fedadam(dir.path(), 2)).await.unwrap_err());
    assert!(
        e.contains("already completed 2 of 2 rounds") && e.contains("--fresh"),
        "{e}"
    );

    let mut other = fedadam(dir.path(), 4);
    other.lr = Some(0.5);
    other.strategy = Some("fedyogi".into());
    let e = format!("{:#}", run(other).await.unwrap_err());
    assert!(
        e.contains("strategy: fedadam → fedyogi") && e.contains("lr: ") && e.contains("--fresh"),
        "{e}"
    );
    // Nothing was touched by the refusals.
    assert_eq!(global(dir.path()).1, 2);
    assert_eq!(rounds_in_metrics(dir.path()), vec![1, 2]);

    // Operational settings may change: more rounds, another timeout.
    let mut more = fedadam(dir.path(), 3);
    more.round_timeout = Some(std::time::Duration::from_secs(77));
    run(more).await.unwrap();
    assert_eq!(global(dir.path()).1, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fresh_starts_over_and_moves_the_earlier_run_aside() {
    let dir = tempfile::tempdir().unwrap();
    run(fedadam(dir.path(), 2)).await.unwrap();
    let (earlier_model, _) = global(dir.path());

    let mut fresh = serve_args(dir.path(), 1, 1);
    fresh.fresh = true;
    run(fresh).await.unwrap();
    assert_eq!(global(dir.path()).1, 1);
    assert_eq!(rounds_in_metrics(dir.path()), vec![1]);
    // The fedadam state of the earlier run is not this run's.
    assert!(!dir.path().join("strategy-state.r2.safetensors").exists());

    let moved: Vec<_> = std::fs::read_dir(dir.path().join("earlier-runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    let (kept, meta) = checkpoint::load(&moved[0].join("global.safetensors")).unwrap();
    assert_eq!(meta["fedtune.round"], "2");
    assert_bit_equal(&kept, &earlier_model, "the earlier run's model was changed");
    for f in ["metrics.jsonl", "run.json", "strategy-state.r2.safetensors"] {
        assert!(moved[0].join(f).is_file(), "{f} not moved");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_latest_model_falls_back_to_the_round_before() {
    let straight = tempfile::tempdir().unwrap();
    run(fedadam(straight.path(), 4)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    run(fedadam(dir.path(), 3)).await.unwrap();

    // One flipped bit in the last value of round 3's model: a well-formed file that lies.
    let latest = dir.path().join("global.safetensors");
    let mut bytes = std::fs::read(&latest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    std::fs::write(&latest, &bytes).unwrap();

    run(fedadam(dir.path(), 4)).await.unwrap();
    // Round 3 was done again from round 2's model and state: the same model as a run that
    // was never damaged.
    let (a, round) = global(straight.path());
    let (b, _) = global(dir.path());
    assert_eq!(round, 4);
    assert_bit_equal(&a, &b, "differs from the undamaged run");
    assert_eq!(rounds_in_metrics(dir.path()), vec![1, 2, 3, 4]);
    let damaged = dir.path().join("global.damaged.safetensors");
    let err = checkpoint::load(&damaged).unwrap_err().to_string();
    assert!(err.contains("damaged"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_usable_to_resume_from_is_refused_naming_each_file() {
    let dir = tempfile::tempdir().unwrap();
    run(fedadam(dir.path(), 2)).await.unwrap();
    for f in ["global.safetensors", "global.previous.safetensors"] {
        let p = dir.path().join(f);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    }
    let e = format!("{:#}", run(fedadam(dir.path(), 3)).await.unwrap_err());
    assert!(
        e.contains("global.safetensors")
            && e.contains("global.previous.safetensors")
            && e.contains("--fresh"),
        "{e}"
    );
    let empty = tempfile::tempdir().unwrap();
    let mut require = fedadam(empty.path(), 3);
    require.resume = true;
    let e = format!("{:#}", run(require).await.unwrap_err());
    assert!(e.contains("nothing to resume"), "{e}");
}
