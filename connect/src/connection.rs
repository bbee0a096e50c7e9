//! The connection to the coordinator: the endpoint (HTTP/2 windows, keep-alive), which gRPC
//! failures are worth retrying, and the backoff between retries.

use std::time::Duration;

use anyhow::{Context, bail};
use tonic::transport::Endpoint;
use tonic::{Code, Status};
use tracing::warn;

pub const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub fn endpoint(url: &str) -> anyhow::Result<Endpoint> {
    let uri: tonic::transport::Uri = url.parse().with_context(|| {
        format!("invalid coordinator URL `{url}` (expected e.g. https://10.0.0.5:50051)")
    })?;
    if !matches!(uri.scheme_str(), Some("https" | "http")) || uri.host().is_none() {
        bail!(
            "invalid coordinator URL `{url}`: it must start with https:// (or http:// with --insecure) and name a host, e.g. https://10.0.0.5:50051"
        );
    }
    Ok(Endpoint::from_shared(url.to_string())
        .with_context(|| {
            format!("invalid coordinator URL `{url}` (expected e.g. https://10.0.0.5:50051)")
        })?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(2 << 20))
        .initial_connection_window_size(Some(4 << 20))
        .max_frame_size(Some((1 << 20) + (64 << 10))))
}

pub fn transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::DataLoss
            | Code::Internal
            | Code::ResourceExhausted
    )
}

/// The coordinator refused the request for good (a late, repeated or unknown task): retrying
/// cannot help, and the run goes on without it.
pub fn refused(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::FailedPrecondition | Code::InvalidArgument | Code::NotFound
    )
}

pub struct Backoff {
    next: Duration,
    down_since: Option<tokio::time::Instant>,
    give_up_after: Duration,
}

impl Backoff {
    pub fn new(give_up_after: Duration) -> Self {
        Self {
            next: BACKOFF_START,
            down_since: None,
            give_up_after,
        }
    }

    pub fn reset(&mut self) {
        self.next = BACKOFF_START;
        self.down_since = None;
    }

    /// Sleeps before the next attempt; fails once the coordinator has been away too long.
    pub async fn wait(&mut self, what: &str, err: &dyn std::fmt::Display) -> anyhow::Result<()> {
        let since = *self
            .down_since
            .get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() > self.give_up_after {
            bail!(
                "{what}: coordinator unreachable for {}; giving up: {err}",
                humantime::format_duration(self.give_up_after)
            );
        }
        let jitter =
            Duration::from_millis(rand::random::<u64>() % (self.next.as_millis() as u64 / 4 + 1));
        // The target is `fedtune_common::logging::NET` (this crate does not depend on common).
        warn!(
            target: "fedtune::net",
            "{what}: {err}; retrying in {:.1} s",
            (self.next + jitter).as_secs_f64()
        );
        tokio::time::sleep(self.next + jitter).await;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        Ok(())
    }
}
