//! A fault-injecting TCP proxy for tests, in process: clients dial it, it dials the
//! coordinator, and each connection it accepts gets the faults a plan gives it — cut after so
//! many bytes towards the client (mid-download) or towards the coordinator (mid-upload), with
//! a reset rather than a clean close, or stalled for a while after so many bytes. HTTP/2
//! carries every call of a client on one connection, so a cut breaks all its streams at once,
//! as a real network failure does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// What happens to one connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Reset the connection once this many bytes went from the coordinator to the client.
    pub cut_down_after: Option<u64>,
    /// Reset the connection once this many bytes went from the client to the coordinator.
    pub cut_up_after: Option<u64>,
    /// Stop forwarding towards the client for this long once this many bytes went that way.
    pub stall_down: Option<(u64, Duration)>,
}

/// What the proxy did, for the test's assertions.
#[derive(Debug, Default)]
pub struct Tally {
    pub connections: AtomicUsize,
    pub cuts: AtomicUsize,
    pub stalls: AtomicUsize,
    pub bytes_down: AtomicU64,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    pub tally: Arc<Tally>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Listens on a free loopback port; connection `i` (from 0, in the order they reached the
    /// coordinator) gets `plan(i)`.
    pub async fn start(
        upstream: SocketAddr,
        plan: impl Fn(usize) -> Faults + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let tally = Arc::new(Tally::default());
        let t = tally.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                // Nothing to forward to (the coordinator is not up yet): the client sees the
                // connection close, and it does not count as one of the plan's connections.
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let i = t.connections.fetch_add(1, Ordering::Relaxed);
                let faults = plan(i);
                let t = t.clone();
                tokio::spawn(async move { relay(client, server, faults, &t).await });
            }
        });
        Self { addr, tally, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Forwards both ways until either side closes or a cut is due, then resets both.
async fn relay(client: TcpStream, server: TcpStream, faults: Faults, tally: &Tally) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    let down = pump(
        server_r,
        client_w,
        faults.cut_down_after,
        faults.stall_down,
        tally,
        true,
    );
    let up = pump(client_r, server_w, faults.cut_up_after, None, tally, false);
    let cut = tokio::select! {
        cut = down => cut,
        cut = up => cut,
    };
    if cut {
        tally.cuts.fetch_add(1, Ordering::Relaxed);
    }
    // Dropping the halves closes both connections; a cut resets them (linger 0 is set
    // before the halves go).
}

/// Copies `from` to `to`; returns true when it stopped because a cut was due.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    cut_after: Option<u64>,
    stall: Option<(u64, Duration)>,
    tally: &Tally,
    down: bool,
) -> bool {
    let mut buf = vec![0u8; 64 << 10];
    let mut sent = 0u64;
    let mut stalled = false;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        let mut n = n as u64;
        let mut cut = false;
        if let Some(limit) = cut_after
            && sent + n >= limit
        {
            n = limit.saturating_sub(sent);
            cut = true;
        }
        if to.write_all(&buf[..n as usize]).await.is_err() {
            return false;
        }
        sent += n;
        if down {
            tally.bytes_down.fetch_add(n, Ordering::Relaxed);
        }
        if cut {
            // A reset, not a clean close: the peer sees the connection fail mid-stream.
            let _ = to.as_ref().set_zero_linger();
            let _ = from.as_ref().set_zero_linger();
            return true;
        }
        if let Some((after, pause)) = stall
            && !stalled
            && sent >= after
        {
            stalled = true;
            tally.stalls.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(pause).await;
        }
    }
}
