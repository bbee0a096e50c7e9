//! Joining the coordinator: connect (TLS failures are told at once, not retried), Join, and
//! the session that every later call uses.

use std::time::Duration;

use fedtune_proto::federation_client::FederationClient;
use fedtune_proto::{self as pb, PROTOCOL_VERSION};
use tonic::transport::Endpoint;
use tracing::info;

use crate::connection::{endpoint, transient};
use crate::session::Session;
use crate::tls::{ClientAuth, ClientSecurity};

/// Who joins: a training client, or a tiered aggregator (`serve --upstream`).
pub(crate) struct Joiner<'a> {
    pub coordinator: &'a str,
    pub name: &'a str,
    pub device: String,
    pub aggregator: bool,
}

/// The endpoint of `coordinator` with `security` (TLS from the kit, or plaintext by name) and
/// the credentials every call carries.
pub(crate) fn reach(
    coordinator: &str,
    security: &ClientSecurity,
) -> anyhow::Result<(Endpoint, ClientAuth)> {
    let endpoint = crate::tls::secure(endpoint(coordinator)?, coordinator, security)?;
    Ok((endpoint, crate::tls::client_auth(coordinator, security)?))
}

/// Why a join did not give a session: worth another try (the coordinator may be starting or
/// away), or not (a certificate problem, a refusal).
pub(crate) enum JoinError {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

pub(crate) async fn join(
    endpoint: &Endpoint,
    auth: &ClientAuth,
    opts: &Joiner<'_>,
    num_examples: u64,
) -> Result<Session, JoinError> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| match crate::tls::explain(&e) {
            // A certificate problem does not mend by retrying.
            Some(why) => JoinError::Fatal(anyhow::anyhow!(
                "cannot connect to {}: {why}",
                opts.coordinator
            )),
            None => JoinError::Retry(anyhow::anyhow!("cannot connect: {e}")),
        })?;
    let mut rpc = FederationClient::with_interceptor(channel, auth.clone());
    let req = pb::JoinRequest {
        protocol_version: PROTOCOL_VERSION,
        name: opts.name.to_string(),
        device: opts.device.clone(),
        num_examples,
        aggregator: opts.aggregator,
    };
    let reply = match rpc.join(req).await {
        Ok(r) => r.into_inner(),
        // Under TLS 1.3 a refused client certificate shows only at the first call.
        Err(st) if let Some(why) = crate::tls::explain(&st) => {
            return Err(JoinError::Fatal(anyhow::anyhow!(
                "{} cannot join {}: {why}",
                opts.name,
                opts.coordinator
            )));
        }
        Err(st) if transient(&st) => {
            let hint = if opts.coordinator.starts_with("http://") {
                " (this client dials plaintext http://: if the coordinator serves TLS, use https:// with the client's kit)"
            } else {
                ""
            };
            return Err(JoinError::Retry(anyhow::anyhow!("{st}{hint}")));
        }
        Err(st) => {
            return Err(JoinError::Fatal(anyhow::anyhow!(
                "coordinator refused to let {} join: {}",
                opts.name,
                st.message()
            )));
        }
    };
    info!(
        "{} joined {} as {} (run {})",
        opts.name, opts.coordinator, reply.client_id, reply.run_id
    );
    Ok(Session {
        rpc,
        client_id: reply.client_id,
        token: reply.session_token,
        heartbeat_every: Duration::from_millis(u64::from(reply.heartbeat_interval_ms.max(1000))),
    })
}
