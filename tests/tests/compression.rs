//! Update compression end to end: what a task announces, what the coordinator counts (the
//! values as it decodes them), what it refuses, and real federations on Fashion-MNIST with
//! compressed updates and broadcasts, their wire bytes in the round line and metrics.jsonl.

use std::path::Path;
use std::time::Duration;

use fedtune_common::checkpoint;
use fedtune_common::codec::Codec;
use fedtune_common::logging::LogFormat;
use fedtune_common::models::ModelSpec;
use fedtune_common::tensors::TensorSet;
use fedtune_common::wire::{Assembler, EncodedTensors, MAX_CHUNK_BYTES};
use fedtune_coordinator::config::{CompressionArgs, SecurityArgs, ServeArgs};
use fedtune_proto::submit_reply::Outcome;
use fedtune_tests::raw::{RawClient, pattern};
use fedtune_tests::{Proc, client_args, client_shares, fashion_subset, free_port};
use tonic::Code;

fedtune_tests::test_binaries!();

/// ~1.2 MB in tensors whose sizes do not divide the chunk size.
const MODEL: &str = "synthetic:300007";
const SEED: u64 = 11;

/// An in-process coordinator of one round for `clients` raw clients, with `up` and `down`.
async fn serve(dir: &Path, clients: usize, up: &str, down: &str) -> String {
    let cfg = ServeArgs {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        rounds: Some(1),
        min_available_clients: Some(clients),
        model: Some(MODEL.into()),
        out: Some(dir.to_path_buf()),
        lr: Some(0.01),
        optimizer: Some("sgd".into()),
        round_timeout: Some(Duration::from_secs(120)),
        log_format: Some(LogFormat::Text),
        seed: Some(SEED),
        compression: CompressionArgs {
            compress_up: Some(up.into()),
            compress_down: Some(down.into()),
        },
        // Raw protocol clients: plaintext keeps the test about the protocol.
        security: SecurityArgs {
            insecure: true,
            ..Default::default()
        },
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let listener = fedtune_coordinator::bind(&cfg).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(fedtune_coordinator::serve(cfg, listener));
    url
}

/// What a receiver holds after `enc` arrives.
fn decoded(enc: &EncodedTensors) -> TensorSet {
    let mut asm = Assembler::new(enc.manifest.clone(), u64::MAX).unwrap();
    for c in &enc.chunks {
        asm.push(c).unwrap();
    }
    asm.finish().unwrap().into_tensor_set().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compressed_updates_count_as_decoded_and_the_broadcast_arrives_rounded() {
    let dir = tempfile::tempdir().unwrap();
    let url = serve(dir.path(), 2, "int8", "bf16").await;
    let mut a = RawClient::join(&url, "a", 1).await;
    let mut b = RawClient::join(&url, "b", 3).await;
    let (ta, tb) = (a.next_train().await, b.next_train().await);
    // The task says how the update must travel.
    assert_eq!(
        Codec::from_proto(ta.upload.as_ref()).unwrap(),
        Codec::Int8,
        "{:?}",
        ta.upload
    );

    // The broadcast is the initial model, each value rounded to bf16.
    let initial = ModelSpec::parse(MODEL, 10)
        .unwrap()
        .init_weights(SEED)
        .unwrap();
    let global = a.fetch(&ta.task_id).await;
    for (x, y) in initial.tensors().iter().zip(global.tensors()) {
        assert_eq!(x.name, y.name);
        for (p, q) in x.data.iter().zip(&y.data) {
            assert_eq!(Codec::Bf16.round(*p).to_bits(), q.to_bits(), "{}", x.name);
        }
    }

    let d1 = pattern(&global, |i| (i % 7) as f32 * 0.01 - 0.03);
    let d2 = pattern(&global, |i| -((i % 5) as f32) * 0.02);
    let encode = |d: &TensorSet| {
        EncodedTensors::compress(d, |_| true, Codec::Int8, ta.model_version, MAX_CHUNK_BYTES)
            .unwrap()
    };
    let (e1, e2) = (encode(&d1), encode(&d2));
    assert!(e1.total_bytes() as f64 <= 0.26 * d1.byte_len() as f64);
    for (client, task, enc, n) in [(&mut a, &ta, &e1, 1), (&mut b, &tb, &e2, 3)] {
        let reply = client.submit_encoded(task, enc, n).await.unwrap();
        assert_eq!(reply.outcome, Outcome::Accepted as i32, "{}", reply.message);
    }

    // The run ends after its round: global = initial + (1·D(d1) + 3·D(d2)) / 4, where D is
    // what int8 delivers; the coordinator keeps the model in f32 (not rounded to bf16).
    let path = dir.path().join("global.safetensors");
    for _ in 0..200 {
        if checkpoint::load(&path).is_ok_and(|(_, m)| m["fedtune.round"] == "1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (after, _) = checkpoint::load(&path).unwrap();
    let (v1, v2) = (decoded(&e1), decoded(&e2));
    for t in initial.tensors() {
        let (got, x, y) = (
            after.get(&t.name).unwrap(),
            v1.get(&t.name).unwrap(),
            v2.get(&t.name).unwrap(),
        );
        for (i, &g0) in t.data.iter().enumerate() {
            let want = f64::from(g0) + (f64::from(x.data[i]) + 3.0 * f64::from(y.data[i])) / 4.0;
            let g1 = f64::from(got.data[i]);
            assert!((g1 - want).abs() < 1e-6, "{}[{i}]: {g1} vs {want}", t.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_update_encoded_otherwise_than_the_task_asks_is_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let url = serve(dir.path(), 1, "topk:0.1", "fp32").await;
    let mut a = RawClient::join(&url, "a", 1).await;
    let ta = a.next_train().await;
    let global = a.fetch(&ta.task_id).await;
    let delta = pattern(&global, |i| i as f32 * 1e-6);
    let err = a.submit(&ta, &delta, 1, None).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message()
            .contains("encoded as fp32, but this run's tasks ask for topk:0.1"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_compressed_chunk_is_refused_naming_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let url = serve(dir.path(), 1, "int8", "fp32").await;
    let mut a = RawClient::join(&url, "a", 1).await;
    let ta = a.next_train().await;
    let global = a.fetch(&ta.task_id).await;
    let delta = pattern(&global, |i| (i % 3) as f32 * 0.1);
    let mut enc = EncodedTensors::compress(
        &delta,
        |_| true,
        Codec::Int8,
        ta.model_version,
        MAX_CHUNK_BYTES,
    )
    .unwrap();
    // The second chunk's scale becomes negative (and its checksum matches, so only the codec
    // can catch it).
    let c = &mut enc.chunks[1];
    let mut data = c.data.to_vec();
    data[..4].copy_from_slice(&(-2f32).to_le_bytes());
    c.checksum = xxhash_rust::xxh3::xxh3_64(&data);
    c.data = data.into();
    let offset = c.offset;
    let err = a.submit_encoded(&ta, &enc, 1).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains(&format!(
            "chunk at offset {offset} is not valid int8: its int8 scale is -2"
        )),
        "{}",
        err.message()
    );
}

const ROUNDS: usize = 3;
const CLIENTS: usize = 2;

/// A federation of real client processes on 4,000 Fashion-MNIST images (non-IID), the mlp,
/// updates as `up` and the model as `down`; returns metrics.jsonl and the coordinator's and
/// clients' logs.
fn federation(dir: &Path, up: &str, down: &str) -> (Vec<serde_json::Value>, String, Vec<String>) {
    let shares = client_shares(dir, 4000, CLIENTS, 1.0, 3);
    let port = free_port();
    let out = dir.join("out");
    let args = [
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
        "--compress-up",
        up,
        "--compress-down",
        down,
    ]
    .map(String::from);
    let mut coordinator = Proc::spawn("coordinator", coordinator_bin(), &args, dir);
    let mut clients: Vec<Proc> = shares
        .iter()
        .enumerate()
        .map(|(i, data)| {
            let args = client_args(port, data, &format!("edge-{i}"), &[]);
            Proc::spawn(&format!("client{i}"), client_bin(), &args, dir)
        })
        .collect();
    let status = coordinator.wait(Duration::from_secs(300));
    assert!(
        status.is_some_and(|s| s.success()),
        "coordinator failed: {status:?}\n{}",
        coordinator.output()
    );
    let logs = clients
        .iter_mut()
        .map(|c| {
            let status = c.wait(Duration::from_secs(60));
            assert!(
                status.is_some_and(|s| s.success()),
                "{} failed: {status:?}\n{}",
                c.name,
                c.output()
            );
            c.output()
        })
        .collect();
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (metrics, coordinator.output(), logs)
}

/// Every round counted both clients, carried `up`/`down` within the bounds of their raw f32
/// size, and the model learned.
fn check_rounds(metrics: &[serde_json::Value], up: &str, up_bound: f64, down: &str) {
    assert_eq!(metrics.len(), ROUNDS);
    let ratio = |m: &serde_json::Value, wire: &str, fp32: &str| {
        m[wire].as_f64().unwrap() / m[fp32].as_f64().unwrap()
    };
    for m in metrics {
        assert_eq!(m["clients_reported"], CLIENTS, "{m}");
        assert_eq!(m["compress_up"], up, "{m}");
        assert_eq!(m["compress_down"], down, "{m}");
        let up_ratio = ratio(m, "bytes_up", "bytes_up_fp32");
        assert!(up_ratio <= up_bound, "up {up_ratio:.4} of fp32: {m}");
        let down_ratio = ratio(m, "bytes_down", "bytes_down_fp32");
        let down_bound = if down == "fp32" { 1.0 } else { 0.51 };
        assert!(
            down_ratio <= down_bound,
            "down {down_ratio:.4} of fp32: {m}"
        );
    }
    let acc: Vec<f64> = metrics
        .iter()
        .map(|m| m["eval_accuracy"].as_f64().unwrap())
        .collect();
    assert!(acc[ROUNDS - 1] > acc[0], "accuracy did not rise: {acc:?}");
    assert!(acc[ROUNDS - 1] > 0.65, "final accuracy too low: {acc:?}");
}

#[test]
fn an_int8_federation_with_an_fp16_broadcast_learns_and_its_round_line_shows_the_wire_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (metrics, log, clients) = federation(dir.path(), "int8", "fp16");
    check_rounds(&metrics, "int8", 0.26, "fp16");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("| round ")).collect();
    assert_eq!(lines.len(), ROUNDS, "{log}");
    for line in lines {
        assert!(
            line.contains(" fp16 (0.50× fp32) up ") && line.contains(" int8 (0.25× fp32)"),
            "{line}"
        );
    }
    for c in clients {
        assert_eq!(c.matches(" MB int8 in ").count(), ROUNDS, "{c}");
    }
}

#[test]
fn a_top_k_federation_learns_with_the_unsent_values_carried_by_each_client() {
    let dir = tempfile::tempdir().unwrap();
    let (metrics, _, clients) = federation(dir.path(), "topk:0.1", "fp32");
    check_rounds(&metrics, "topk:0.1", 0.21, "fp32");
    for c in clients {
        let carried: Vec<f64> = c
            .lines()
            .filter_map(|l| l.split(" MB topk:0.1 (unsent values carried: norm ").nth(1))
            .map(|rest| rest.split(')').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(carried.len(), ROUNDS, "{c}");
        // 90% of each update stays behind: never nothing, and never growing without bound.
        assert!(
            carried.iter().all(|n| *n > 0.0 && n.is_finite()),
            "{carried:?}"
        );
    }
}
