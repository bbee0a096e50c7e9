//! One cell of the benchmark: a coordinator and N clients as real processes on 127.0.0.1, a
//! synthetic model of P parameters, clients with `--train none` (the round is transport and
//! aggregation only). Each process's peak RSS comes from the kernel when it is reaped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};
use serde::Serialize;

/// What one federation measured.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub params: u64,
    pub clients: usize,
    pub model_bytes: u64,
    pub rounds: usize,
    /// Median round time over rounds 2.. (round 1 also pays for joins and first-touch pages).
    pub round_s: f64,
    /// Bytes down and up per round (from metrics.jsonl), divided by `round_s`.
    pub effective_gbps: f64,
    pub coordinator_rss_bytes: u64,
    /// The largest of the clients' peak RSS.
    pub client_rss_bytes: u64,
    pub coordinator_cpu_s: f64,
    pub client_cpu_s: f64,
}

/// How the cells run.
#[derive(Clone)]
pub struct Setup {
    pub coordinator: PathBuf,
    pub client: PathBuf,
    pub work: PathBuf,
    pub rounds: usize,
    /// Extra `serve` flags (e.g. compression), the same for every cell.
    pub serve_args: Vec<String>,
}

/// A reaped process: its exit status, peak RSS and CPU seconds.
struct Reaped {
    ok: bool,
    max_rss_bytes: u64,
    cpu_s: f64,
}

/// Waits for `child` with wait4(2), which also returns its resource usage (std's `wait` does
/// not). The child is not reaped by std afterwards: `Child` does not reap on drop.
fn reap(child: &Child) -> anyhow::Result<Reaped> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `status` and `usage` are valid for writes for the call's duration.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("wait4");
        }
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Reaped {
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        // Linux reports ru_maxrss in KiB.
        max_rss_bytes: usage.ru_maxrss as u64 * 1024,
        cpu_s: secs(usage.ru_utime) + secs(usage.ru_stime),
    })
}

/// A cell's processes: killed and reaped if the cell ends before they were reaped (an error
/// starting one of them, or a failed coordinator), so no federation outlives its cell.
struct Procs(Vec<Child>);

impl Procs {
    fn kill_all(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.kill_all();
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Runs one federation of `params` × `clients` and measures it.
pub fn run(setup: &Setup, params: u64, clients: usize) -> anyhow::Result<Cell> {
    let dir = setup.work.join(format!("p{params}-n{clients}"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let port = free_port()?;
    let log = |name: &str| -> anyhow::Result<std::fs::File> {
        let path = dir.join(name);
        std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))
    };
    let out = dir.join("out");
    let coordinator = Command::new(&setup.coordinator)
        .args(["serve", "--insecure", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--model")
        .arg(format!("synthetic:{params}"))
        .args(["--rounds", &setup.rounds.to_string()])
        .args(["--min-clients", &clients.to_string()])
        // Clients that never come (they failed to start) end the cell in a minute, not 30.
        .args(["--available-timeout", "60s"])
        .arg("--out")
        .arg(&out)
        .args(&setup.serve_args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log("coordinator.log")?)
        .spawn()
        .with_context(|| format!("cannot start {}", setup.coordinator.display()))?;
    let mut procs = Procs(vec![coordinator]);
    for i in 1..=clients {
        let child = Command::new(&setup.client)
            .args(["run", "--insecure", "--coordinator"])
            .arg(format!("http://127.0.0.1:{port}"))
            .args(["--train", "none", "--no-progress", "--name"])
            .arg(format!("bench-{i}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log(&format!("client{i}.log"))?)
            .spawn()
            .with_context(|| format!("cannot start {}", setup.client.display()))?;
        procs.0.push(child);
    }
    let coord = reap(&procs.0[0])?;
    if !coord.ok {
        // Its clients would retry for minutes: the cell has failed already.
        procs.kill_all();
    }
    let reaped: Vec<Reaped> = procs.0[1..].iter().map(reap).collect::<Result<_, _>>()?;
    procs.0.clear();
    if !coord.ok {
        bail!(
            "the coordinator of synthetic:{params} × {clients} failed; its log ({}) ends:\n{}",
            dir.join("coordinator.log").display(),
            tail(&dir.join("coordinator.log"))
        );
    }
    if let Some(i) = reaped.iter().position(|r| !r.ok) {
        let path = dir.join(format!("client{}.log", i + 1));
        bail!(
            "client {} of synthetic:{params} × {clients} failed; its log ({}) ends:\n{}",
            i + 1,
            path.display(),
            tail(&path)
        );
    }
    let rounds = read_rounds(&out.join("metrics.jsonl"))?;
    // Rounds 2.. (round 1 pays for the joins and for touching every page for the first time).
    let steady: Vec<&(f64, u64)> = rounds.iter().skip(1).collect();
    let sample = if steady.is_empty() {
        rounds.iter().collect()
    } else {
        steady
    };
    let mut times: Vec<f64> = sample.iter().map(|(s, _)| *s).collect();
    times.sort_by(f64::total_cmp);
    let round_s = times[times.len() / 2];
    let moved = sample.iter().map(|(_, b)| *b).max().unwrap_or(0);
    std::fs::remove_dir_all(&out).ok();
    Ok(Cell {
        params,
        clients,
        model_bytes: params * 4,
        rounds: rounds.len(),
        round_s,
        effective_gbps: moved as f64 / round_s / 1e9,
        coordinator_rss_bytes: coord.max_rss_bytes,
        client_rss_bytes: reaped.iter().map(|r| r.max_rss_bytes).max().unwrap_or(0),
        coordinator_cpu_s: coord.cpu_s,
        client_cpu_s: reaped.iter().map(|r| r.cpu_s).sum(),
    })
}

/// Each round's (seconds, bytes down + up) from a run's metrics.jsonl.
fn read_rounds(path: &Path) -> anyhow::Result<Vec<(f64, u64)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let rows = text
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}: a line is not JSON", path.display()))?;
            let field = |k: &str| {
                v.get(k)
                    .and_then(|x| x.as_u64())
                    .with_context(|| format!("{}: a round has no `{k}`", path.display()))
            };
            Ok((
                field("round_ms")? as f64 / 1000.0,
                field("bytes_down")? + field("bytes_up")?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if rows.is_empty() {
        bail!("{}: no round was recorded", path.display());
    }
    Ok(rows)
}
