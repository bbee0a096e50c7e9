//! examples/custom-model as a user runs it: a burn module of their own (`tiny-conv`) federated
//! by a coordinator and clients they built on the fedtune libraries, over real gRPC on
//! 127.0.0.1 with real Fashion-MNIST data; and a stock client, which does not know the
//! architecture, refusing it by name.

use std::path::Path;
use std::time::Duration;

use fedtune_common::checkpoint;
use fedtune_common::data::DataFolder;
use fedtune_tests::{Proc, client_args, fashion_subset, free_port};

fedtune_tests::test_binaries!();

fn tiny_conv_coordinator() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tiny-conv-coordinator-under-test"))
}

fn tiny_conv_client() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tiny-conv-client-under-test"))
}

const ROUNDS: usize = 2;
const MODEL: &str = "tiny-conv:8";

fn serve(port: u16, clients: usize, out: &Path, dir: &Path) -> Proc {
    let args = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--rounds",
        &ROUNDS.to_string(),
        "--min-clients",
        &clients.to_string(),
        "--model",
        MODEL,
        "--lr",
        "0.01",
        "--eval-data",
        fashion_subset().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--log-format",
        "json",
    ]
    .map(String::from);
    Proc::spawn("coordinator", tiny_conv_coordinator(), &args, dir)
}

/// Client `i`'s share: 1,500 of the bundled training images.
fn client_data(dir: &Path, i: usize) -> std::path::PathBuf {
    let folder = DataFolder::open(&fashion_subset()).unwrap();
    let part: Vec<usize> = (i * 1500..(i + 1) * 1500).collect();
    let data = dir.join(format!("client{i}"));
    std::fs::create_dir_all(&data).unwrap();
    folder
        .train
        .subset(&part)
        .write_pair(&data, "train-")
        .unwrap();
    data
}

#[test]
fn own_architecture_federates_on_binaries_built_from_the_libraries() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let port = free_port();
    let out = dir.join("out");
    let mut coordinator = serve(port, 2, &out, dir);
    let mut clients: Vec<Proc> = (0..2)
        .map(|i| {
            let args = client_args(port, &client_data(dir, i), &format!("edge-{i}"), &[]);
            Proc::spawn(&format!("client{i}"), tiny_conv_client(), &args, dir)
        })
        .collect();
    coordinator.expect_success(Duration::from_secs(300));
    for c in &mut clients {
        c.expect_success(Duration::from_secs(60));
    }

    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics.len(), ROUNDS);
    let acc: Vec<f64> = metrics
        .iter()
        .map(|m| m["eval_accuracy"].as_f64().unwrap())
        .collect();
    for m in &metrics {
        assert_eq!(m["clients_reported"], 2, "{m}");
    }
    // Ten classes: chance is 10%. Two short rounds of this tiny net already do far better.
    println!("tiny-conv global accuracy by round: {acc:?}");
    assert!(
        acc[ROUNDS - 1] > 0.3 && acc[ROUNDS - 1] > acc[0],
        "the global tiny-conv did not learn: {acc:?}"
    );

    // The global model carries the user's own tensor names and shapes.
    let (global, _) = checkpoint::load(&out.join("global.safetensors")).unwrap();
    let mut shapes: Vec<(String, Vec<usize>)> = global
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    shapes.sort();
    assert_eq!(
        shapes,
        [
            ("conv1.bias".to_string(), vec![8]),
            ("conv1.weight".to_string(), vec![8, 1, 3, 3]),
            ("conv2.bias".to_string(), vec![16]),
            ("conv2.weight".to_string(), vec![16, 8, 3, 3]),
            ("head.bias".to_string(), vec![10]),
            ("head.weight".to_string(), vec![16, 10]),
        ]
    );
}

#[test]
fn a_stock_client_refuses_an_architecture_it_does_not_know_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let port = free_port();
    let coordinator = serve(port, 1, &dir.join("out"), dir);
    let args = client_args(port, &client_data(dir, 0), "stock", &[]);
    let stock = Proc::spawn("stock-client", client_bin(), &args, dir);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut log = String::new();
    while std::time::Instant::now() < deadline {
        log = stock.output();
        if log.contains("unknown model") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for want in [
        "unknown model `tiny-conv:8`",
        "this program knows mlp (28x28 images)",
        "examples/custom-model",
    ] {
        assert!(log.contains(want), "{want}:\n{log}");
    }
    drop((stock, coordinator));
    // The stock coordinator refuses the name at start-up, before it listens.
    let mut stock_coordinator = Proc::spawn(
        "stock-coordinator",
        coordinator_bin(),
        &[
            "serve",
            "--model",
            MODEL,
            "--out",
            dir.join("out2").to_str().unwrap(),
        ]
        .map(String::from),
        dir,
    );
    let status = stock_coordinator.wait(Duration::from_secs(30));
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    let log = stock_coordinator.output();
    assert!(log.contains("unknown model `tiny-conv:8`"), "{log}");
}
