//! Watching a federation from outside, as Prometheus, Kubernetes probes and gRPC tools do: the
//! coordinator's `/metrics`, `/healthz` and `/readyz` on `--metrics-listen`, and
//! `grpc.health.v1` and server reflection on its gRPC port. Real processes, real sockets.

use std::path::Path;
use std::time::{Duration, Instant};

use fedtune_proto as pb;
use fedtune_tests::raw::{RawClient, pattern};
use fedtune_tests::scrape::{Scrape, get};
use fedtune_tests::{Proc, client_shares, fashion_subset, free_port, insecure_serve};
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

fedtune_tests::test_binaries!();

const ROUNDS: usize = 3;

/// Every family a scrape describes from the first round on, by its `# TYPE` name.
const FAMILIES: [&str; 22] = [
    "fedtune_build_info",
    "fedtune_rounds_completed",
    "fedtune_round",
    "fedtune_rounds",
    "fedtune_round_attempt",
    "fedtune_phase",
    "fedtune_round_duration_seconds",
    "fedtune_aggregation_duration_seconds",
    "fedtune_clients_joined",
    "fedtune_clients_live",
    "fedtune_clients_selected",
    "fedtune_clients_reported",
    "fedtune_clients_failed",
    "fedtune_updates",
    "fedtune_refused",
    "fedtune_transfer_bytes",
    "fedtune_eval_loss",
    "fedtune_eval_accuracy_ratio",
    "fedtune_eval_f1_ratio",
    "fedtune_dp_epsilon",
    "process_resident_memory_bytes",
    "process_open_fds",
];

fn rows(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// The scrape says what the first `rows.len()` lines of metrics.jsonl say.
fn agrees(s: &Scrape, rows: &[serde_json::Value]) {
    let n = rows.len() as f64;
    let last = rows.last().unwrap();
    let f = |row: &serde_json::Value, key: &str| row[key].as_f64().unwrap_or(f64::NAN);
    let sum = |key: &str| rows.iter().map(|r| f(r, key)).sum::<f64>();
    let v = |series: &str| {
        s.value(series)
            .unwrap_or_else(|| panic!("no series {series} in\n{}", s.0))
    };
    let expect = [
        ("fedtune_rounds_completed_total", n),
        ("fedtune_round_duration_seconds_count", n),
        ("fedtune_aggregation_duration_seconds_count", n),
        (
            "fedtune_round_duration_seconds_sum",
            sum("round_ms") / 1000.0,
        ),
        (
            "fedtune_aggregation_duration_seconds_sum",
            sum("aggregate_ms") / 1000.0,
        ),
        (
            "fedtune_transfer_bytes_total{direction=\"down\"}",
            sum("bytes_down"),
        ),
        (
            "fedtune_transfer_bytes_total{direction=\"up\"}",
            sum("bytes_up"),
        ),
        ("fedtune_clients_reported", f(last, "clients_reported")),
        ("fedtune_clients_failed", f(last, "clients_failed")),
        ("fedtune_clients_selected", f(last, "clients_selected")),
        ("fedtune_eval_loss{source=\"server\"}", f(last, "eval_loss")),
        (
            "fedtune_eval_accuracy_ratio{source=\"server\"}",
            f(last, "eval_accuracy"),
        ),
        (
            "fedtune_eval_f1_ratio{source=\"server\"}",
            f(last, "eval_f1"),
        ),
        (
            "fedtune_eval_loss{source=\"federated\"}",
            f(last, "fed_eval_loss"),
        ),
        (
            "fedtune_eval_accuracy_ratio{source=\"federated\"}",
            f(last, "fed_eval_accuracy"),
        ),
        (
            "fedtune_eval_f1_ratio{source=\"federated\"}",
            f(last, "fed_eval_f1"),
        ),
        ("fedtune_clients_joined_total", 2.0),
        ("fedtune_clients_live", 2.0),
        ("fedtune_rounds", ROUNDS as f64),
        ("fedtune_dp_epsilon", 0.0),
    ];
    for (series, want) in expect {
        let got = v(series);
        assert!(
            close(got, want),
            "{series}: scraped {got}, metrics.jsonl says {want}"
        );
    }
    assert!(v("fedtune_round") >= f(last, "round"));
    // Updates count when they are accepted, before their round completes: the next round's
    // may already be in.
    let accepted = v("fedtune_updates_total{outcome=\"accepted\"}");
    let reported = sum("clients_reported");
    assert!(
        (reported..=reported + 2.0).contains(&accepted),
        "{accepted} updates accepted, {reported} counted in the file's rounds"
    );
    let phases: f64 = [
        "waiting",
        "training",
        "aggregating",
        "evaluating",
        "finished",
        "stopping",
    ]
    .iter()
    .map(|p| v(&format!("fedtune_phase{{phase=\"{p}\"}}")))
    .sum();
    assert_eq!(phases, 1.0, "exactly one phase is current:\n{}", s.0);
}

/// A real federation: the coordinator (plaintext, `--metrics-listen`, server-side and
/// federated evaluation) and two clients training an MLP on bundled Fashion-MNIST shares.
struct Run {
    coordinator: Proc,
    clients: Vec<Proc>,
    out: std::path::PathBuf,
    metrics_port: u16,
    _dir: tempfile::TempDir,
}

impl Run {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let shares = client_shares(dir.path(), 3000, 2, 1.0, 7);
        let (port, metrics_port) = (free_port(), free_port());
        let out = dir.path().join("out");
        let eval = fashion_subset();
        let coordinator = Proc::spawn(
            "coordinator",
            coordinator_bin(),
            &insecure_serve(
                port,
                &out,
                &[
                    "--metrics-listen",
                    &format!("127.0.0.1:{metrics_port}"),
                    "--rounds",
                    &ROUNDS.to_string(),
                    "--min-clients",
                    "2",
                    "--model",
                    "mlp",
                    "--eval-data",
                    eval.to_str().unwrap(),
                    "--fraction-evaluate",
                    "1",
                ],
            ),
            dir.path(),
        );
        let clients = shares
            .iter()
            .enumerate()
            .map(|(i, data)| {
                let args = [
                    "run",
                    "--insecure",
                    "--coordinator",
                    &format!("http://127.0.0.1:{port}"),
                    "--data",
                    data.to_str().unwrap(),
                    "--name",
                    &format!("site-{i}"),
                    "--no-progress",
                ]
                .map(String::from);
                Proc::spawn(&format!("client{i}"), client_bin(), &args, dir.path())
            })
            .collect();
        Self {
            coordinator,
            clients,
            out,
            metrics_port,
            _dir: dir,
        }
    }

    fn finish(&mut self) {
        self.coordinator.expect_success(Duration::from_secs(300));
        for c in &mut self.clients {
            c.expect_success(Duration::from_secs(60));
        }
        assert_eq!(rows(&self.out).len(), ROUNDS);
    }
}

#[test]
fn a_scrape_mid_run_agrees_with_metrics_jsonl() {
    let mut run = Run::start();
    let (out, metrics_port) = (run.out.clone(), run.metrics_port);
    // Scrape while the run goes; each time a round has completed, compare with the file.
    let mut compared = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while run.coordinator.exited().is_none() && Instant::now() < deadline {
        if let Some(scrape) = Scrape::of(metrics_port) {
            let families = scrape.families();
            for family in FAMILIES {
                assert!(families.contains(&family), "no {family} in\n{}", scrape.0);
            }
            let done = scrape
                .value("fedtune_rounds_completed_total")
                .unwrap_or(0.0) as usize;
            if done > compared {
                let rows = rows(&out);
                assert!(
                    rows.len() >= done,
                    "{done} rounds scraped, {} in the file",
                    rows.len()
                );
                agrees(&scrape, &rows[..done]);
                compared = done;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    run.finish();
    // The last round may end just before the process does; the ones before it are seen.
    assert!(compared >= ROUNDS - 1, "only {compared} rounds compared");
}

#[test]
fn the_report_of_a_real_run_draws_a_point_per_round_in_png_and_svg() {
    let mut run = Run::start();
    run.finish();
    let report = std::process::Command::new(coordinator_bin())
        .args(["report", run.out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let dir = run.out.join("report");
    // (chart, lines drawn): server-side and federated evaluation, training and both
    // evaluations' loss, bytes down and up, clients selected/reported/failed, three timings.
    for (chart, lines) in [
        ("accuracy", 2),
        ("f1", 2),
        ("loss", 3),
        ("bytes", 2),
        ("clients", 3),
        ("time", 3),
    ] {
        let png = image::open(dir.join(format!("{chart}.png")))
            .unwrap_or_else(|e| panic!("{chart}.png is not a PNG: {e}"))
            .to_rgb8();
        assert_eq!(png.dimensions(), (800, 480), "{chart}.png");
        let colours: std::collections::HashSet<_> = png.pixels().map(|p| p.0).collect();
        assert!(colours.len() > 3, "{chart}.png is (nearly) blank");
        let svg = std::fs::read_to_string(dir.join(format!("{chart}.svg"))).unwrap();
        assert!(
            svg.trim_start().starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{chart}.svg is not an SVG document"
        );
        assert_eq!(
            svg.matches("<circle").count(),
            lines * ROUNDS,
            "{chart}.svg: one marker per round on each of its {lines} lines"
        );
        assert!(svg.contains("round"), "{chart}.svg has no axis label");
    }
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert_eq!(html.matches("<tr>").count(), ROUNDS + 1, "a row per round");
    assert!(html.contains("accuracy.svg") && md.contains("accuracy.png"));
}

async fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn grpc_health(url: &str, service: &str) -> ServingStatus {
    let mut health = HealthClient::new(channel(url).await);
    let reply = health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(reply.status).unwrap()
}

async fn reflected_services(url: &str) -> Vec<String> {
    let mut reflection = ServerReflectionClient::new(channel(url).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    match replies.next().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("not a list of services: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_grpc_health_turn_off_when_the_run_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let (port, metrics_port) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{port}");
    let mut coordinator = Proc::spawn(
        "coordinator",
        coordinator_bin(),
        &insecure_serve(
            port,
            &dir.path().join("out"),
            &[
                "--metrics-listen",
                &format!("127.0.0.1:{metrics_port}"),
                "--rounds",
                "1",
                "--min-clients",
                "1",
                "--model",
                "synthetic:1000",
            ],
        ),
        dir.path(),
    );
    let mut client = RawClient::join_when_up(&url, "site-a", 10).await;
    assert_eq!(get(metrics_port, "/healthz").map(|r| r.0), Some(200));
    assert_eq!(get(metrics_port, "/readyz").map(|r| r.0), Some(200));
    assert_eq!(grpc_health(&url, "").await, ServingStatus::Serving);
    assert_eq!(
        grpc_health(&url, "fedtune.v1.Federation").await,
        ServingStatus::Serving
    );
    let services = reflected_services(&url).await;
    for s in ["fedtune.v1.Federation", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|n| n == s), "{s} not in {services:?}");
    }

    // A refusal is counted by its reason.
    let refused = client
        .rpc
        .heartbeat(pb::HeartbeatRequest {
            session_token: "not-a-session".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);
    let scrape = Scrape::of(metrics_port).unwrap();
    assert_eq!(
        scrape.value("fedtune_refused_total{reason=\"unknown_session\"}"),
        Some(1.0),
        "{}",
        scrape.0
    );

    // The one round: this client's update completes the run. It then stays silent, so the
    // coordinator waits for its goodbye: finished, but still answering.
    let task = client.next_train().await;
    let global = client.fetch(&task.task_id).await;
    client
        .submit(&task, &pattern(&global, |i| i as f32 * 1e-3), 10, None)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(8);
    while get(metrics_port, "/readyz").map(|r| r.0) != Some(503) {
        assert!(
            Instant::now() < deadline,
            "/readyz still ready after the run finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while grpc_health(&url, "fedtune.v1.Federation").await != ServingStatus::NotServing {
        assert!(
            Instant::now() < deadline,
            "gRPC health still SERVING after the run finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let scrape = Scrape::of(metrics_port).unwrap();
    for (series, want) in [
        ("fedtune_rounds_completed_total", 1.0),
        ("fedtune_phase{phase=\"finished\"}", 1.0),
        ("fedtune_updates_total{outcome=\"accepted\"}", 1.0),
    ] {
        assert_eq!(scrape.value(series), Some(want), "{series}\n{}", scrape.0);
    }
    assert_eq!(get(metrics_port, "/healthz").map(|r| r.0), Some(200));

    // Told the run is over, the coordinator ends.
    assert!(matches!(client.next().await, pb::task::Kind::Finished(_)));
    coordinator.expect_success(Duration::from_secs(30));
}

#[test]
fn every_metric_the_grafana_dashboard_queries_is_exported() {
    let dir = tempfile::tempdir().unwrap();
    let (port, metrics_port) = (free_port(), free_port());
    let _coordinator = Proc::spawn(
        "coordinator",
        coordinator_bin(),
        &insecure_serve(
            port,
            &dir.path().join("out"),
            &[
                "--metrics-listen",
                &format!("127.0.0.1:{metrics_port}"),
                "--model",
                "synthetic:1000",
            ],
        ),
        dir.path(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let scrape = loop {
        if let Some(s) = Scrape::of(metrics_port) {
            break s;
        }
        assert!(Instant::now() < deadline, "no /metrics within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    };
    let families = scrape.families();
    let dashboard = std::fs::read_to_string(
        fedtune_tests::workspace_root().join("deploy/grafana/fedtune.json"),
    )
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("fedtune_") || word.starts_with("process_") {
                    queried.push(word.to_string());
                }
            }
        }
    }
    assert!(queried.len() >= 15, "{queried:?}");
    for name in &queried {
        // Series carry suffixes their family's `# TYPE` line does not.
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        assert!(
            families.contains(&family),
            "the dashboard queries {name}, which no scrape has:\n{}",
            scrape.0
        );
    }
}
