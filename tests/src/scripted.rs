//! An in-process coordinator with scripted raw clients: for tests of what the coordinator
//! decides (rounds, resumption), where a real client's training would only add time.

use std::path::Path;

use fedtune_common::logging::LogFormat;
use fedtune_coordinator::config::{SecurityArgs, ServeArgs};
use fedtune_coordinator::round::RunSummary;
use fedtune_proto::task::Kind;

use crate::raw::{RawClient, pattern};

/// A model without an architecture: tensors only, so rounds take milliseconds.
pub const MODEL: &str = "synthetic:5000";

/// `serve` settings for `rounds` rounds of [`MODEL`] writing to `out`, waiting for
/// `min_available` clients, over plaintext on a free port (scripted clients speak the raw
/// protocol; TLS has its own tests).
pub fn serve_args(out: &Path, rounds: u64, min_available: usize) -> ServeArgs {
    ServeArgs {
        listen: Some("127.0.0.1:0".parse().expect("a socket address")),
        rounds: Some(rounds),
        min_available_clients: Some(min_available),
        model: Some(MODEL.into()),
        out: Some(out.to_path_buf()),
        log_format: Some(LogFormat::Text),
        seed: Some(11),
        security: SecurityArgs {
            insecure: true,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Starts a coordinator; returns its URL and the task running the federation.
pub async fn start(a: ServeArgs) -> (String, tokio::task::JoinHandle<anyhow::Result<RunSummary>>) {
    let cfg = a.resolve().expect("valid test settings");
    let listener = fedtune_coordinator::bind(&cfg)
        .await
        .expect("bind 127.0.0.1");
    let url = format!("http://{}", listener.local_addr().expect("a bound address"));
    (url, tokio::spawn(fedtune_coordinator::serve(cfg, listener)))
}

/// A client that trains whenever asked, sending a delta that depends only on the round, and
/// evaluates with a fixed accuracy. Returns the rounds it trained in.
pub async fn worker(url: String, name: String, examples: u64, accuracy: f64) -> Vec<u64> {
    let mut c = RawClient::join(&url, &name, examples).await;
    let mut rounds = Vec::new();
    loop {
        match c.next().await {
            Kind::Train(t) => {
                let g = c.fetch(&t.task_id).await;
                let r = t.round as usize;
                let d = pattern(&g, |i| ((i + r) % 7) as f32 * 0.01 - 0.03);
                c.submit(&t, &d, examples, None)
                    .await
                    .expect("the update is accepted");
                rounds.push(t.round);
            }
            Kind::Evaluate(t) => {
                assert!(t.task_id.starts_with('e'), "{}", t.task_id);
                c.submit_eval(
                    &t,
                    examples,
                    &[("accuracy", accuracy), ("loss", 1.0 - accuracy)],
                )
                .await
                .expect("the evaluation is accepted");
            }
            Kind::Finished(_) => return rounds,
            Kind::Wait(_) => {}
            Kind::Secagg(s) => {
                panic!("a secure-aggregation step without secure aggregation: {s:?}")
            }
        }
    }
}

/// Runs a federation of `a` with one [`worker`] to its end.
pub async fn run_with_one_worker(a: ServeArgs) -> anyhow::Result<RunSummary> {
    let cfg = a.resolve()?;
    let listener = fedtune_coordinator::bind(&cfg).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(fedtune_coordinator::serve(cfg, listener));
    let w = tokio::spawn(worker(url, "w".into(), 7, 0.5));
    let result = server.await?;
    if result.is_ok() {
        w.await?;
    } else {
        w.abort();
    }
    result
}

/// The rows of `out/metrics.jsonl`.
pub fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON row"))
        .collect()
}
