//! Crash points for the fault tests: with `FEDTUNE_CRASH_AT=<point>:<n>` in its environment, a
//! process kills itself with SIGKILL the `n`-th time it reaches `point` — a real kill -9 at an
//! exact place (mid-download, between an update's file and its journal line, inside the
//! checkpoint write, ...), which a kill from outside can only hit by chance.
//! `<point>:<n>:stop` freezes it with SIGSTOP instead (until SIGCONT). Without the variable a
//! crash point is one `OnceLock` read.
//!
//! Points: coordinator `waiting`, `download`, `upload`, `journal`, `aggregate`, `checkpoint`;
//! client `train`, `upload` (see `docs/reliability.md`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

pub const ENV: &str = "FEDTUNE_CRASH_AT";

struct Armed {
    point: String,
    at: u64,
    seen: AtomicU64,
    /// SIGSTOP instead of SIGKILL.
    freeze: bool,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(ENV).ok()?;
            let mut parts = spec.split(':');
            let point = parts.next().unwrap_or_default();
            let at = parts.next().unwrap_or("1").parse();
            let freeze = match parts.next() {
                None | Some("kill") => Some(false),
                Some("stop") => Some(true),
                Some(_) => None,
            };
            let (Ok(at), Some(freeze)) = (at, freeze) else {
                eprintln!(
                    "{ENV}={spec}: expected <point>:<n>[:kill|:stop], e.g. upload:2; ignored"
                );
                return None;
            };
            Some(Armed {
                point: point.to_string(),
                at,
                seen: AtomicU64::new(0),
                freeze,
            })
        })
        .as_ref()
}

/// Kills this process with SIGKILL if it is armed for `point` and this is the `n`-th time
/// it is reached.
pub fn reached(point: &str) {
    let Some(a) = armed() else { return };
    if a.point != point || a.seen.fetch_add(1, Ordering::Relaxed) + 1 != a.at {
        return;
    }
    if a.freeze {
        eprintln!("{ENV}: freezing this process at `{point}` #{}", a.at);
        signal_self(Signal::Stop);
    } else {
        eprintln!("{ENV}: killing this process at `{point}` #{}", a.at);
        signal_self(Signal::Kill);
    }
}

enum Signal {
    Kill,
    Stop,
}

#[cfg(unix)]
fn signal_self(signal: Signal) {
    let sig = match signal {
        Signal::Kill => libc::SIGKILL,
        Signal::Stop => libc::SIGSTOP,
    };
    // SAFETY: kill(2) on our own pid with a signal number has no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), sig);
    }
}

#[cfg(not(unix))]
fn signal_self(_: Signal) {
    std::process::abort();
}
