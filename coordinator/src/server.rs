//! The gRPC server around a [`Federation`]: TLS (or plaintext by name), who may call, the
//! `Federation` and `Admin` services, health and reflection on the same port, and the metrics
//! endpoint. Shared by a root coordinator and a tiered aggregator, which serve their clients
//! the same way.

use std::sync::Arc;
use std::time::Duration;

use fedtune_proto::admin_server::AdminServer;
use fedtune_proto::federation_server::FederationServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

use crate::auth::{AllowList, Gate};
use crate::config::{Security, ServeConfig};
use crate::round::Federation;
use crate::service::{AdminService, FederationService};
use crate::{CONNECTION_WINDOW, KEEPALIVE_INTERVAL, MAX_FRAME, STREAM_WINDOW};
use crate::{limits, telemetry, tls, tokens};

/// A server running; [`Serving::shutdown`] stops it.
pub struct Serving {
    stop: tokio::sync::oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    health_follows: JoinHandle<()>,
    metrics_endpoint: Option<JoinHandle<()>>,
}

/// Serves `engine` on `listener` with `cfg`'s security, limits and metrics address.
pub async fn start(
    cfg: &ServeConfig,
    listener: TcpListener,
    engine: Arc<Federation>,
) -> anyhow::Result<Serving> {
    let addr = listener.local_addr()?;
    let (gate, tls) = match &cfg.security {
        Security::Insecure => {
            warn!(
                "serving plaintext (--insecure): anyone who reaches {addr} can read the model and submit updates"
            );
            (Gate::new(false, None, None), None)
        }
        Security::Tls(files) => {
            let tls = tls::ServerTls::load(files)?;
            let allow = files
                .allowed_clients
                .as_deref()
                .map(AllowList::open)
                .transpose()?;
            info!(
                "TLS with {}{}",
                files.cert.display(),
                match (&files.client_ca, &files.allowed_clients) {
                    (Some(ca), Some(list)) => format!(
                        "; mutual TLS: clients need a certificate of {} and a line in {}",
                        ca.display(),
                        list.display()
                    ),
                    (Some(ca), None) => format!(
                        "; mutual TLS: clients need a certificate of {}",
                        ca.display()
                    ),
                    _ => "; clients are not authenticated by certificate".into(),
                } + &files
                    .client_tokens
                    .as_ref()
                    .map(|t| format!("; client tokens from {}", t.display()))
                    .unwrap_or_default()
            );
            let tokens = files
                .client_tokens
                .as_deref()
                .map(tokens::ClientTokens::open)
                .transpose()?;
            (
                Gate::new(files.client_ca.is_some(), allow, tokens).with_admins(&files.admins),
                Some(tls),
            )
        }
    };
    let metrics_endpoint = match cfg.metrics_listen {
        Some(addr) => {
            let listener = telemetry::http::bind(addr).await?;
            info!(
                "metrics on http://{}/metrics (and /healthz, /readyz)",
                listener.local_addr()?
            );
            Some(telemetry::http::spawn(listener, engine.clone()))
        }
        None => None,
    };
    let admission = Arc::new(limits::Admission::new(cfg.limits));
    let gate = Arc::new(gate);
    let admin = AdminServer::new(AdminService::new(engine.clone(), gate.clone()));
    let service = FederationServer::new(FederationService::new(engine.clone(), gate, admission));
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<FederationServer<FederationService>>()
        .await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(service)
        .add_service(admin)
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);
    // gRPC health follows readiness: NOT_SERVING once the run has finished or is stopping.
    let health_follows = {
        let engine = engine.clone();
        tokio::spawn(async move {
            while engine.ready() {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            health
                .set_not_serving::<FederationServer<FederationService>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        })
    };
    let stopped = async {
        let _ = stop_rx.await;
    };
    let server = match tls {
        Some(tls) => {
            tokio::spawn(router.serve_with_incoming_shutdown(tls::incoming(listener, tls), stopped))
        }
        None => tokio::spawn(router.serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            stopped,
        )),
    };

    Ok(Serving {
        stop: stop_tx,
        server,
        health_follows,
        metrics_endpoint,
    })
}

impl Serving {
    /// Stops serving: open long-polls end with the server; give it a moment, then stop
    /// regardless.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
        self.health_follows.abort();
        if let Some(endpoint) = self.metrics_endpoint {
            endpoint.abort();
        }
    }
}

/// gRPC server reflection over fedtune's services and grpc.health.v1, so that tools such as
/// grpcurl, Postman or evans list and call them without the .proto files (v1 and v1alpha: tools
/// still differ in which they ask for).
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fedtune_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}
