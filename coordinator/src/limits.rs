//! Limits against abuse: Join attempts per address per minute, and concurrent model streams
//! per client. A call over a limit is refused with `RESOURCE_EXHAUSTED` and a log line naming
//! the peer; everyone else keeps being served. (The number of live clients is the round
//! engine's to count: `max_clients`; update sizes are bounded by the model.)

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Status;
use tracing::warn;

/// The limits, each configurable (`serve --max-…`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Live clients at once; a Join beyond is refused.
    pub max_clients: usize,
    /// Downloads and uploads one session may have open at once.
    pub streams_per_client: usize,
    /// Join attempts from one IP address per minute (successful or not).
    pub joins_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_clients: 10_000,
            streams_per_client: 4,
            joins_per_minute: 60,
        }
    }
}

const WINDOW: Duration = Duration::from_secs(60);

/// The counters behind [`Limits`].
pub struct Admission {
    limits: Limits,
    joins: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
    streams: Arc<Mutex<HashMap<String, usize>>>,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            joins: Mutex::new(HashMap::new()),
            streams: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Counts a Join attempt from `addr`; refuses it beyond `joins_per_minute`.
    pub fn join_attempt(&self, addr: Option<SocketAddr>) -> Result<(), Status> {
        let Some(addr) = addr else {
            return Ok(());
        };
        let now = Instant::now();
        let mut joins = self.joins.lock().unwrap_or_else(|p| p.into_inner());
        // Forget addresses that have been quiet for a minute, so the map stays small.
        if joins.len() > 1024 {
            joins.retain(|_, times| times.back().is_some_and(|t| now - *t < WINDOW));
        }
        let times = joins.entry(addr.ip()).or_default();
        while times.front().is_some_and(|t| now - *t >= WINDOW) {
            times.pop_front();
        }
        if times.len() >= self.limits.joins_per_minute as usize {
            warn!(
                "refused a Join from {addr}: {} attempts from {} in the last minute (--max-joins-per-minute {})",
                times.len(),
                addr.ip(),
                self.limits.joins_per_minute
            );
            return Err(Status::resource_exhausted(format!(
                "too many Join attempts from {}: at most {} per minute; wait and retry",
                addr.ip(),
                self.limits.joins_per_minute
            )));
        }
        times.push_back(now);
        Ok(())
    }

    /// A slot for one more open stream of the session `token` (`peer` names the caller and
    /// the task for the log), released when dropped; refused beyond `streams_per_client`.
    pub fn stream(&self, token: &str, peer: &str) -> Result<StreamSlot, Status> {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let open = streams.entry(token.to_string()).or_default();
        if *open >= self.limits.streams_per_client {
            warn!(
                "refused a stream of {peer}: {open} of its session already open (--max-streams-per-client {})",
                self.limits.streams_per_client
            );
            return Err(Status::resource_exhausted(format!(
                "{open} downloads/uploads of this client are already open (at most {}); finish one first",
                self.limits.streams_per_client
            )));
        }
        *open += 1;
        Ok(StreamSlot {
            streams: self.streams.clone(),
            token: token.to_string(),
        })
    }
}

/// One open stream; dropping it frees the slot.
pub struct StreamSlot {
    streams: Arc<Mutex<HashMap<String, usize>>>,
    token: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = streams.get_mut(&self.token) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                streams.remove(&self.token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_beyond_the_rate_are_refused_per_address() {
        let a = Admission::new(Limits {
            joins_per_minute: 2,
            ..Default::default()
        });
        let (x, y) = (
            Some("10.0.0.1:5000".parse().unwrap()),
            Some("10.0.0.2:5000".parse().unwrap()),
        );
        assert!(a.join_attempt(x).is_ok() && a.join_attempt(x).is_ok());
        let refused = a.join_attempt(x).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("10.0.0.1"), "{refused}");
        assert!(a.join_attempt(y).is_ok(), "another address is served");
    }

    #[test]
    fn streams_beyond_the_limit_are_refused_until_one_ends() {
        let a = Admission::new(Limits {
            streams_per_client: 2,
            ..Default::default()
        });
        let one = a.stream("t", "a").unwrap();
        let _two = a.stream("t", "a").unwrap();
        assert_eq!(
            a.stream("t", "a").err().map(|s| s.code()),
            Some(tonic::Code::ResourceExhausted)
        );
        assert!(a.stream("u", "b").is_ok(), "another client is served");
        drop(one);
        assert!(a.stream("t", "a").is_ok());
    }
}
