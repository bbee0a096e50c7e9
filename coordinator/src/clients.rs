//! Who joined, their sessions, whether they are still alive, and what each is doing as far
//! as the coordinator can tell (for `fedtune-coordinator status`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::RngCore;

#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub id: String,
    pub name: String,
    pub device: String,
    pub num_examples: u64,
    pub last_seen: Instant,
    /// The client has been told the run is over.
    pub told_finished: bool,
    /// Training and evaluation rounds it was selected for (sampling favours the least used).
    pub times_trained: u64,
    pub times_evaluated: u64,
    /// Its latest model download and update upload (how far each got), and the last word on
    /// its training it sent with a heartbeat.
    pub download: Option<Arc<Transfer>>,
    pub upload: Option<Arc<Transfer>>,
    pub training: Option<TrainingProgress>,
}

/// How far one model download or update upload of a task is: the transport advances it chunk
/// by chunk without taking the state lock.
#[derive(Debug)]
pub struct Transfer {
    pub task_id: String,
    pub total: u64,
    done: AtomicU64,
}

impl Transfer {
    pub fn new(task_id: &str, total: u64) -> Arc<Self> {
        Arc::new(Self {
            task_id: task_id.to_string(),
            total,
            done: AtomicU64::new(0),
        })
    }

    /// The bytes up to `offset` are through (a resumed download starts past zero).
    pub fn reached(&self, offset: u64) {
        self.done.fetch_max(offset, Ordering::Relaxed);
    }

    pub fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// 0..1; 1 for an empty transfer.
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            return 1.0;
        }
        (self.done.load(Ordering::Relaxed) as f64 / self.total as f64).min(1.0)
    }
}

/// A client's own account of its local training (sent with its heartbeats).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingProgress {
    pub task_id: String,
    pub epoch: u32,
    pub epochs: u32,
    pub loss: Option<f64>,
}

#[derive(Debug, Default)]
pub struct Clients {
    by_id: HashMap<String, ClientInfo>,
    id_by_token: HashMap<String, String>,
    /// Ids whose sessions were revoked (never live again; they may join anew if allowed).
    revoked: std::collections::HashSet<String>,
    /// The latest session of each name: a client that restarts joins again under its name,
    /// and its earlier session no longer counts as live (nor is selected).
    latest: HashMap<String, String>,
    joined: u64,
}

impl Clients {
    /// Registers a client; returns its id and session token.
    pub fn join(&mut self, name: &str, device: &str, num_examples: u64) -> (String, String) {
        self.joined += 1;
        let id = format!("c{}", self.joined);
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let name = if name.trim().is_empty() {
            id.clone()
        } else {
            name.trim().to_string()
        };
        self.id_by_token.insert(token.clone(), id.clone());
        self.latest.insert(name.clone(), id.clone());
        self.by_id.insert(
            id.clone(),
            ClientInfo {
                id: id.clone(),
                name,
                device: device.to_string(),
                num_examples,
                last_seen: Instant::now(),
                told_finished: false,
                times_trained: 0,
                times_evaluated: 0,
                download: None,
                upload: None,
                training: None,
            },
        );
        (id, token)
    }

    /// The client holding `token`, marked as seen now.
    pub fn touch(&mut self, token: &str) -> Option<&mut ClientInfo> {
        let id = self.id_by_token.get(token)?;
        let c = self.by_id.get_mut(id)?;
        c.last_seen = Instant::now();
        Some(c)
    }

    pub fn by_id(&self, id: &str) -> Option<&ClientInfo> {
        self.by_id.get(id)
    }

    pub fn by_id_mut(&mut self, id: &str) -> Option<&mut ClientInfo> {
        self.by_id.get_mut(id)
    }

    /// Ends the session `token` (the operator removed the client): its token stops working
    /// and it no longer counts as live. Returns the client's id.
    pub fn revoke(&mut self, token: &str) -> Option<String> {
        let id = self.id_by_token.remove(token)?;
        self.revoked.insert(id.clone());
        Some(id)
    }

    /// Every client's latest session (the one status shows), by join order, and whether it
    /// is live.
    pub fn latest_sessions(&self, timeout: Duration) -> Vec<(&ClientInfo, bool)> {
        let now = Instant::now();
        let mut v: Vec<_> = self
            .latest
            .values()
            .filter_map(|id| self.by_id.get(id))
            .map(|c| (c, self.is_live(c, now, timeout)))
            .collect();
        v.sort_by_key(|(c, _)| c.id[1..].parse::<u64>().unwrap_or(u64::MAX));
        v
    }

    /// Heard from within `timeout`, not revoked, and the latest session of its name.
    fn is_live(&self, c: &ClientInfo, now: Instant, timeout: Duration) -> bool {
        now.duration_since(c.last_seen) <= timeout
            && !self.revoked.contains(&c.id)
            && self.latest.get(&c.name) == Some(&c.id)
    }

    /// How many clients are live, without building the list (called often: O(n), no sort).
    pub fn live_count(&self, timeout: Duration) -> usize {
        let now = Instant::now();
        self.by_id
            .values()
            .filter(|c| self.is_live(c, now, timeout))
            .count()
    }

    /// The live client called `name` that joined last, if any.
    pub fn live_id_of(&self, name: &str, timeout: Duration) -> Option<String> {
        let id = self.latest.get(name)?;
        let c = self.by_id.get(id)?;
        self.is_live(c, Instant::now(), timeout).then(|| id.clone())
    }

    /// Clients heard from within `timeout`, ordered by join order.
    pub fn live(&self, timeout: Duration) -> Vec<&ClientInfo> {
        let now = Instant::now();
        let mut v: Vec<_> = self
            .by_id
            .values()
            .filter(|c| self.is_live(c, now, timeout))
            .collect();
        v.sort_by_key(|c| c.id[1..].parse::<u64>().unwrap_or(u64::MAX));
        v
    }
}
