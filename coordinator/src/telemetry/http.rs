//! `serve --metrics-listen ADDR`: plain HTTP/1.1 on a port of its own — Prometheus's
//! convention, and it keeps scrapes and Kubernetes probes off the gRPC port and its mutual TLS.
//!
//! - `/metrics`: every metric, OpenMetrics text;
//! - `/healthz`: 200 while the process answers;
//! - `/readyz`: 200 while the run takes clients, 503 once it has finished or is stopping.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the endpoint asks of the coordinator at each request.
pub trait Probe: Send + Sync + 'static {
    /// Whether the run takes clients now.
    fn ready(&self) -> bool;
    /// Every metric, brought up to date for this scrape, as OpenMetrics text.
    fn scrape(&self) -> String;
}

/// Binds `addr` with an error that says what to do.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("--metrics-listen {addr}: cannot listen there (is the port taken? choose another)")
    })
}

/// Serves the endpoint on `listener` until the task is aborted.
pub fn spawn(listener: TcpListener, probe: Arc<dyn Probe>) -> JoinHandle<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(probe);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("the metrics endpoint stopped: {e}");
        }
    })
}

async fn metrics(State(probe): State<Arc<dyn Probe>>) -> impl IntoResponse {
    let text = tokio::task::spawn_blocking(move || probe.scrape())
        .await
        .unwrap_or_default();
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(probe): State<Arc<dyn Probe>>) -> (StatusCode, &'static str) {
    if probe.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the run has finished or is stopping\n",
        )
    }
}
