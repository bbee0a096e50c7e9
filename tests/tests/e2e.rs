//! A whole federation as a user runs it: the real coordinator binary and three real client
//! processes on 127.0.0.1, real Fashion-MNIST data split non-IID, three rounds, with
//! server-side and federated evaluation.

use std::path::Path;
use std::time::Duration;

use fedtune_common::data::{DataFolder, dirichlet_partition};
use fedtune_tests::{Proc, client_args, fashion_subset, free_port};

fedtune_tests::test_binaries!();

const ROUNDS: usize = 3;
const CLIENTS: usize = 3;

fn run_federation(device: &str, dir: &Path) -> Vec<serde_json::Value> {
    let folder = DataFolder::open(&fashion_subset()).unwrap();
    // 6,000 of the 10,000 bundled training images, non-IID across the clients.
    let train = folder.train.subset(&(0..6000).collect::<Vec<_>>());
    let parts = dirichlet_partition(&train.labels, CLIENTS, 1.0, 7);
    let port = free_port();
    let out = dir.join("out");
    let coordinator = Proc::spawn(
        "coordinator",
        coordinator_bin(),
        &[
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--rounds",
            &ROUNDS.to_string(),
            "--min-clients",
            &CLIENTS.to_string(),
            "--model",
            "mlp",
            "--eval-data",
            fashion_subset().to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--fraction-evaluate",
            "1",
            "--log-format",
            "json",
        ]
        .map(String::from),
        dir,
    );
    let mut coordinator = coordinator;
    let mut clients: Vec<Proc> = parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let data = dir.join(format!("client{i}"));
            std::fs::create_dir_all(&data).unwrap();
            train.subset(part).write_pair(&data, "train-").unwrap();
            let args = client_args(port, &data, &format!("edge-{i}"), &["--device", device]);
            Proc::spawn(&format!("client{i}"), client_bin(), &args, dir)
        })
        .collect();

    let status = coordinator.wait(Duration::from_secs(300));
    assert!(
        status.is_some_and(|s| s.success()),
        "coordinator failed: {status:?}\n{}",
        coordinator.output()
    );
    for c in &mut clients {
        let status = c.wait(Duration::from_secs(60));
        assert!(
            status.is_some_and(|s| s.success()),
            "{} failed: {status:?}\n{}",
            c.name,
            c.output()
        );
        let log = c.output();
        // Each client logs its own line per round, and one per evaluation.
        assert_eq!(
            log.matches("| train loss").count(),
            ROUNDS,
            "{}: {log}",
            c.name
        );
        assert_eq!(
            log.matches("evaluation of model v").count(),
            ROUNDS,
            "{}: {log}",
            c.name
        );
    }

    // The JSON round lines of the log and metrics.jsonl hold the same objects.
    let logged: Vec<serde_json::Value> = coordinator
        .output()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("clients_reported").is_some())
        .collect();
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics.len(), ROUNDS);
    assert_eq!(logged.len(), ROUNDS);
    for (m, l) in metrics.iter().zip(&logged) {
        for key in [
            "round",
            "rounds",
            "clients_selected",
            "clients_reported",
            "clients_failed",
            "train_loss",
            "eval_loss",
            "eval_accuracy",
            "eval_f1",
            "fed_eval_clients",
            "fed_eval_loss",
            "fed_eval_accuracy",
            "fed_eval_f1",
            "bytes_down",
            "bytes_up",
            "aggregate_ms",
            "round_ms",
        ] {
            assert!(
                m.get(key).is_some_and(|v| !v.is_null()),
                "metrics.jsonl lacks {key}: {m}"
            );
            assert_eq!(
                m.get(key),
                l.get(key),
                "log and metrics.jsonl differ on {key}"
            );
        }
        assert_eq!(m["clients_reported"], CLIENTS);
        assert_eq!(m["clients_failed"], 0);
        assert_eq!(m["eval_source"], "server");
        // Per-class F1 and the confusion matrix of the server-side evaluation.
        let per_class = m["eval_per_class_f1"].as_array().unwrap();
        assert_eq!(per_class.len(), 10);
        let confusion = m["eval_confusion"].as_array().unwrap();
        assert_eq!(confusion.len(), 10);
        let total: u64 = confusion
            .iter()
            .flat_map(|r| r.as_array().unwrap())
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(total, m["eval_examples"].as_u64().unwrap());
        let mean_f1 = per_class.iter().map(|v| v.as_f64().unwrap()).sum::<f64>() / 10.0;
        assert!(
            (mean_f1 - m["eval_f1"].as_f64().unwrap()).abs() < 1e-9,
            "{m}"
        );
        assert_eq!(m["fed_eval_clients"], CLIENTS);
        assert!(m["fed_eval_examples"].as_u64().unwrap() > 0, "{m}");
        assert!(m["bytes_down"].as_u64().unwrap() >= 3 * 4 * 200_000, "{m}");
    }
    assert!(out.join("global.safetensors").is_file());
    metrics
}

/// Runs the federation with clients on `device` and checks that the global model learned.
fn federation_learns(device: &str) {
    let dir = tempfile::tempdir().unwrap();
    let metrics = run_federation(device, dir.path());
    let acc: Vec<f64> = metrics
        .iter()
        .map(|m| m["eval_accuracy"].as_f64().unwrap())
        .collect();
    assert!(
        acc[ROUNDS - 1] > acc[0],
        "accuracy did not rise over the rounds: {acc:?}"
    );
    assert!(acc[ROUNDS - 1] > 0.70, "final accuracy too low: {acc:?}");
}

#[test]
fn three_clients_three_rounds_on_fashion_mnist() {
    federation_learns("flex");
}

#[cfg(feature = "tch")]
#[test]
fn three_libtorch_clients_three_rounds_on_fashion_mnist() {
    federation_learns("libtorch");
}

/// Fine-tuning a PyTorch checkpoint with real processes: `--init` a `.pt` file through
/// `--init-remap` rules, `--freeze head-only`: the frozen tensors come back bit-identical to the
/// checkpoint's, are never sent up, and are sent down only once per client;
/// `--export-pytorch` writes the result in PyTorch's layout.
#[test]
fn pretrained_frozen_layers_stay_put_and_shrink_traffic() {
    use fedtune_common::checkpoint;
    use fedtune_common::models::ModelSpec;

    let dir = tempfile::tempdir().unwrap();
    let folder = DataFolder::open(&fashion_subset()).unwrap();
    let port = free_port();
    let out = dir.path().join("out");
    let mut coordinator = Proc::spawn(
        "coordinator",
        coordinator_bin(),
        &[
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--rounds",
            "3",
            "--min-available-clients",
            "2",
            "--model",
            "mlp",
            "--freeze",
            "head-only",
            "--init",
            fedtune_tests::workspace_root()
                .join("tests/fixtures/mlp-torch.pt")
                .to_str()
                .unwrap(),
            "--init-remap",
            r"^features\.0\.=fc1.",
            "--init-remap",
            r"^classifier\.=fc2.",
            "--export-pytorch",
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from),
        dir.path(),
    );
    let mut clients: Vec<Proc> = (0..2)
        .map(|i| {
            let data = dir.path().join(format!("client{i}"));
            std::fs::create_dir_all(&data).unwrap();
            let part: Vec<usize> = (i * 1000..(i + 1) * 1000).collect();
            folder
                .train
                .subset(&part)
                .write_pair(&data, "train-")
                .unwrap();
            let args = client_args(port, &data, &format!("edge-{i}"), &[]);
            Proc::spawn(&format!("client{i}"), client_bin(), &args, dir.path())
        })
        .collect();
    let status = coordinator.wait(Duration::from_secs(120));
    assert!(
        status.is_some_and(|s| s.success()),
        "{}",
        coordinator.output()
    );
    for c in &mut clients {
        assert!(
            c.wait(Duration::from_secs(60)).is_some_and(|s| s.success()),
            "{}",
            c.output()
        );
    }

    let spec = ModelSpec::parse("mlp", 10).unwrap();
    let bytes = |head: bool| -> u64 {
        spec.specs()
            .iter()
            .filter(|s| s.name.starts_with("fc2.") == head || !head)
            .map(|s| s.num_elements() as u64 * 4)
            .sum()
    };
    let (full, head) = (bytes(false), bytes(true));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    // Round 1: each client downloads the whole model; later rounds only the head.
    assert_eq!(rows[0]["bytes_down"], 2 * full);
    assert_eq!(rows[1]["bytes_down"], 2 * head);
    assert_eq!(rows[2]["bytes_down"], 2 * head);
    for r in &rows {
        assert_eq!(r["bytes_up"], 2 * head, "only the head goes up: {r}");
        assert_eq!(r["clients_reported"], 2);
    }
    let log = coordinator.output();
    assert!(
        log.contains("4 tensors applied") && log.contains("transposed from PyTorch"),
        "{log}"
    );
    // The starting point is the checkpoint itself, read back the same way.
    let initial = fedtune_common::pretrained::load(
        &fedtune_tests::workspace_root().join("tests/fixtures/mlp-torch.pt"),
        &spec.init_weights(42).unwrap(),
        &fedtune_common::pretrained::InitOptions {
            remap: vec![
                fedtune_common::pretrained::Remap::new(r"^features\.0\.", "fc1.").unwrap(),
                fedtune_common::pretrained::Remap::new(r"^classifier\.", "fc2.").unwrap(),
            ],
            layout: fedtune_common::pretrained::Layout::Auto,
            reset_head: None,
        },
    )
    .unwrap()
    .0;
    let (global, _) = checkpoint::load(&out.join("global.safetensors")).unwrap();
    for t in initial.tensors() {
        let g = global.get(&t.name).unwrap();
        if t.name.starts_with("fc2.") {
            assert_ne!(g, t, "{} (the head) trained", t.name);
        } else {
            assert_eq!(g, t, "{} (frozen) must be bit-identical", t.name);
        }
    }
    // The PyTorch-layout export, read with the safetensors crate as a PyTorch user would.
    let bytes = std::fs::read(out.join("global.pytorch.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let fc2 = file.tensor("fc2.weight").unwrap();
    assert_eq!(fc2.shape(), [10, 256], "Linear weights are [out, in]");
    let burn_fc2 = global.get("fc2.weight").unwrap();
    let value = |k: usize| f32::from_le_bytes(fc2.data()[k * 4..k * 4 + 4].try_into().unwrap());
    // PyTorch's (o, i) is burn's (i, o).
    for (o, i) in [(0, 0), (3, 17), (9, 255)] {
        assert_eq!(value(o * 256 + i), burn_fc2.data[i * 10 + o]);
    }
    assert_eq!(file.tensor("fc1.weight").unwrap().shape(), [256, 784]);
}

/// `fedtune-coordinator pretrain` as a process: trains on a subset of the labels, reports
/// validation every epoch, and writes weights `serve --init` loads.
#[test]
fn pretrain_writes_a_checkpoint_for_init() {
    use fedtune_common::checkpoint;
    use fedtune_common::models::ModelSpec;

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pre/mlp.safetensors");
    let mut p = Proc::spawn(
        "pretrain",
        coordinator_bin(),
        &[
            "pretrain",
            "--model",
            "mlp",
            "--data",
            fashion_subset().to_str().unwrap(),
            "--classes",
            "0,1,2,3,4",
            "--epochs",
            "2",
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from),
        dir.path(),
    );
    let status = p.wait(Duration::from_secs(120));
    let log = p.output();
    assert!(status.is_some_and(|s| s.success()), "{log}");
    assert_eq!(log.matches("| val loss").count(), 2, "{log}");
    assert!(log.contains("labels [0, 1, 2, 3, 4]"), "{log}");
    let (weights, meta) = checkpoint::load(&out).unwrap();
    assert_eq!(meta["fedtune.model"], "mlp");
    assert_eq!(meta["fedtune.classes"], "[0, 1, 2, 3, 4]");
    let acc: f64 = meta["fedtune.test_accuracy"].parse().unwrap();
    assert!(acc > 0.7, "5-class test accuracy {acc}");
    weights
        .check_matches(&ModelSpec::parse("mlp", 10).unwrap().specs())
        .unwrap();
}

/// `--test-data`: federated evaluation measures the global model on the client's own test set,
/// all of it, instead of on its validation split.
#[test]
fn a_client_with_a_test_set_is_evaluated_on_all_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let folder = DataFolder::open(&fashion_subset()).unwrap();
    let (train, test) = (dir.path().join("train"), dir.path().join("test"));
    for (path, range) in [(&train, 0..1000), (&test, 5000..5300)] {
        std::fs::create_dir_all(path).unwrap();
        let part: Vec<usize> = range.collect();
        folder
            .train
            .subset(&part)
            .write_pair(path, "train-")
            .unwrap();
    }
    let port = free_port();
    let out = dir.path().join("out");
    let mut coordinator = Proc::spawn(
        "coordinator",
        coordinator_bin(),
        &[
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--rounds",
            "1",
            "--min-clients",
            "1",
            "--model",
            "mlp",
            "--fraction-evaluate",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from),
        dir.path(),
    );
    let test_arg = test.display().to_string();
    let args = client_args(port, &train, "site", &["--test-data", &test_arg]);
    let mut client = Proc::spawn("client", client_bin(), &args, dir.path());
    coordinator.expect_success(Duration::from_secs(120));
    client.expect_success(Duration::from_secs(30));
    let log = client.output();
    assert!(log.contains("| 300 test examples |"), "{log}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let row: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(row["fed_eval_examples"], 300, "{row}");
}

#[test]
fn a_client_that_cannot_train_its_task_declines_it_naming_why() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let out = dir.path().join("out");
    // Without the decline the round would wait 10 minutes for the client that cannot train.
    let mut coordinator = Proc::spawn(
        "coordinator",
        coordinator_bin(),
        &[
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--rounds",
            "1",
            "--min-clients",
            "2",
            "--min-fit-clients",
            "1",
            "--round-timeout",
            "10m",
            "--model",
            "mlp",
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from),
        dir.path(),
    );
    let good = client_args(port, &fashion_subset(), "edge-ok", &[]);
    // A table of 64 features for a model of 28x28 images.
    let digits = fedtune_tests::workspace_root().join("data/digits.csv");
    let bad = client_args(port, &digits, "edge-table", &[]);
    let mut clients = [
        Proc::spawn("good", client_bin(), &good, dir.path()),
        Proc::spawn("bad", client_bin(), &bad, dir.path()),
    ];
    coordinator.expect_success(Duration::from_secs(120));
    clients[0].expect_success(Duration::from_secs(30));
    assert!(
        clients[1]
            .wait(Duration::from_secs(30))
            .is_some_and(|s| !s.success()),
        "{}",
        clients[1].output()
    );
    let row: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let declined = row["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client"] == "edge-table")
        .unwrap();
    let reason = declined["reason"].as_str().unwrap();
    assert!(reason.starts_with("declined: round 1: "), "{declined}");
    eprintln!("{reason}");
    assert!(row["round_ms"].as_u64().unwrap() < 60_000, "{row}");
}
