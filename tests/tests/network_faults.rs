//! Network faults between real clients and the real coordinator (processes, gRPC on
//! 127.0.0.1), through an in-process proxy that resets connections mid-download and
//! mid-upload and stalls them: downloads resume after their last good chunk, uploads are sent
//! again under the same task, and the run ends with every update counted once and the same
//! model as a run over a clean network.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fedtune_common::checkpoint;
use fedtune_common::tensors::TensorSet;
use fedtune_tests::fault_proxy::{FaultProxy, Faults};
use fedtune_tests::{Proc, free_port};

fedtune_tests::test_binaries!();

const CLIENTS: [&str; 3] = ["client-1", "client-2", "client-3"];
/// 4 MB in four 1 MiB chunks.
const MODEL: &str = "synthetic:1000000";
const TIMEOUT: Duration = Duration::from_secs(180);

struct Run {
    model: TensorSet,
    rows: Vec<serde_json::Value>,
    client_logs: String,
}

/// A 3-round federation of three `--train none` clients that reach the coordinator through
/// a proxy with `plan`.
async fn federation(
    dir: &Path,
    plan: impl Fn(usize) -> Faults + Send + Sync + 'static,
) -> (Run, FaultProxy) {
    let port = free_port();
    let out = dir.join("out");
    let args: Vec<String> = [
        "serve",
        "--insecure",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--rounds",
        "3",
        "--min-clients",
        "3",
        "--model",
        MODEL,
        "--seed",
        "5",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let mut coordinator = Proc::spawn("coordinator", coordinator_bin(), &args, dir);
    let proxy = FaultProxy::start(format!("127.0.0.1:{port}").parse().unwrap(), plan).await;
    let mut clients: Vec<Proc> = CLIENTS
        .iter()
        .map(|name| {
            let args: Vec<String> = [
                "run",
                "--insecure",
                "--coordinator",
                &proxy.url(),
                "--train",
                "none",
                "--name",
                name,
                "--no-progress",
            ]
            .map(String::from)
            .to_vec();
            Proc::spawn(name, client_bin(), &args, dir)
        })
        .collect();
    tokio::task::block_in_place(|| {
        coordinator.expect_success(TIMEOUT);
        for c in &mut clients {
            c.expect_success(TIMEOUT);
        }
    });
    let rows = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let run = Run {
        model: checkpoint::load(&out.join("global.safetensors")).unwrap().0,
        rows,
        client_logs: clients.iter().map(Proc::output).collect(),
    };
    (run, proxy)
}

fn assert_every_update_counted_once(run: &Run) {
    assert_eq!(run.rows.len(), 3);
    for r in &run.rows {
        assert_eq!(r["clients_reported"], 3, "{r}");
        assert_eq!(r["clients_selected"], 3, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn downloads_resume_and_uploads_retry_through_cut_and_stalled_connections() {
    let clean_dir = tempfile::tempdir().unwrap();
    let (clean, _) = federation(clean_dir.path(), |_| Faults::default()).await;
    assert_every_update_counted_once(&clean);

    let dir = tempfile::tempdir().unwrap();
    let (faulty, proxy) = federation(dir.path(), |i| match i {
        // Each client's first connection breaks in the middle of the round-1 model.
        0..=2 => Faults {
            cut_down_after: Some(2_500_000),
            ..Default::default()
        },
        // Their next ones break in the middle of an update.
        3..=5 => Faults {
            cut_up_after: Some(2_500_000),
            ..Default::default()
        },
        // Then a stall of 3 s in the middle of a download.
        6..=8 => Faults {
            stall_down: Some((1_000_000, Duration::from_secs(3))),
            ..Default::default()
        },
        _ => Faults::default(),
    })
    .await;
    assert_every_update_counted_once(&faulty);
    let tally = &proxy.tally;
    assert!(tally.cuts.load(Ordering::Relaxed) >= 6, "{tally:?}");
    assert!(tally.stalls.load(Ordering::Relaxed) >= 1, "{tally:?}");
    let logs = &faulty.client_logs;
    assert!(logs.contains("resuming at byte 2097152"), "{logs}");
    assert!(logs.contains("upload failed"), "{logs}");

    for (a, b) in clean.model.tensors().iter().zip(faulty.model.tensors()) {
        assert_eq!(a.name, b.name);
        let worst = a
            .data
            .iter()
            .zip(&b.data)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= 1e-6,
            "{}: differs from the clean run by {worst}",
            a.name
        );
    }
}
