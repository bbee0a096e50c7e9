//! `fedtune-coordinator bench`: the machine's yardsticks (memory copy, TCP loopback), the
//! FedAvg fold kernel, and federations of synthetic models as real processes, in one table
//! with pass / short of each target, and the same figures as JSON.

mod federation;
mod host;

use std::path::PathBuf;

use anyhow::{Context, bail};
use fedtune_common::models::ModelKind;
use serde::Serialize;

pub use federation::Cell;

/// Bytes the memory-copy and fold yardsticks work on: well past the caches, as a model is.
const KERNEL_BYTES: usize = 256 << 20;
/// The wire's chunk: the fold kernel folds the delta in blocks of this size, as it arrives.
const CHUNK_BYTES: usize = 1 << 20;
const MIB: f64 = (1u64 << 20) as f64;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Federations to run, PARAMSxCLIENTS (comma-separated): synthetic models of that many
    /// parameters (k, M, G suffixes) with that many `--train none` clients.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1Mx2,1Mx8,10Mx2,10Mx8,100Mx2,100Mx8"
    )]
    pub cells: Vec<String>,
    /// Rounds per federation; the round time is the median over rounds 2 and later.
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// Where the JSON of every figure is written.
    #[arg(long, default_value = "bench.json")]
    pub json: PathBuf,
    /// Folder for the federations' run folders and logs [default: a temporary folder, removed
    /// afterwards].
    #[arg(long)]
    pub work: Option<PathBuf>,
    /// The client binary [default: `fedtune-client` beside this binary].
    #[arg(long)]
    pub client: Option<PathBuf>,
    /// A flag passed to every federation's `serve` (repeatable), e.g. --serve-arg=--strategy=fedadam.
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    pub serve_args: Vec<String>,
}

/// The machine's yardsticks and the kernel.
#[derive(Debug, Serialize)]
pub struct Host {
    pub memcpy_gbps: f64,
    pub fold_gbps: f64,
    /// Plain TCP loopback throughput by model size (bytes), 1 MiB writes.
    pub loopback_gbps: Vec<(u64, f64)>,
}

/// One target and whether this run met it.
#[derive(Debug, Serialize)]
pub struct Target {
    pub what: String,
    pub measured: f64,
    pub limit: f64,
    pub met: bool,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    host: &'a Host,
    cells: &'a [Cell],
    targets: &'a [Target],
}

fn parse_cell(text: &str) -> anyhow::Result<(u64, usize)> {
    let bad = || {
        format!(
            "--cells: `{text}` is not PARAMSxCLIENTS (e.g. 10Mx8: 10 million parameters, 8 clients)"
        )
    };
    let (params, clients) = text.trim().split_once(['x', 'X']).with_context(bad)?;
    let params = match format!("synthetic:{params}").parse::<ModelKind>() {
        Ok(ModelKind::Synthetic { params }) => params,
        _ => bail!(bad()),
    };
    let clients: usize = clients.parse().ok().filter(|&n| n > 0).with_context(bad)?;
    Ok((params, clients))
}

/// The binary named `name` beside this one.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .context("cannot locate the folder of this binary")?
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        bail!(
            "{} not found: build both binaries with `cargo build --release`",
            path.display()
        );
    }
    Ok(path)
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let cells = args
        .cells
        .iter()
        .map(|c| parse_cell(c))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let temp;
    let work = match &args.work {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir().context("cannot create a temporary folder")?;
            temp.path().to_path_buf()
        }
    };
    let setup = federation::Setup {
        coordinator: std::env::current_exe()?,
        client: match &args.client {
            Some(path) => path.clone(),
            None => sibling("fedtune-client")?,
        },
        work,
        rounds: args.rounds,
        serve_args: args.serve_args.clone(),
    };

    let mut measured = Vec::new();
    for &(params, clients) in &cells {
        eprintln!(
            "federation: synthetic:{params} × {clients} clients, {} rounds…",
            args.rounds
        );
        let s = setup.clone();
        let cell =
            tokio::task::spawn_blocking(move || federation::run(&s, params, clients)).await??;
        measured.push(cell);
    }
    // After the federations: a child's peak RSS counts this process's own at the time it
    // was started, and these buffers are large.
    eprintln!(
        "measuring memory copy and the fold kernel ({} MiB)…",
        KERNEL_BYTES >> 20
    );
    let memcpy_gbps = host::memcpy_gbps(KERNEL_BYTES, 7);
    let fold_gbps = host::fold_gbps(KERNEL_BYTES, CHUNK_BYTES, 7);
    let mut sizes: Vec<u64> = cells.iter().map(|&(p, _)| p * 4).collect();
    sizes.sort();
    sizes.dedup();
    let mut loopback_gbps = Vec::new();
    for &bytes in &sizes {
        // Small models are copied several times over so the figure is not all start-up.
        let copied = bytes.max(256 << 20) as usize;
        eprintln!("measuring TCP loopback ({} MiB)…", copied >> 20);
        loopback_gbps.push((bytes, host::loopback_gbps(copied, 5).await?));
    }
    let host = Host {
        memcpy_gbps,
        fold_gbps,
        loopback_gbps,
    };

    let targets = targets(&host, &measured);
    print_table(&host, &measured, &targets);
    let json = serde_json::to_string_pretty(&Report {
        host: &host,
        cells: &measured,
        targets: &targets,
    })?;
    std::fs::write(&args.json, json + "\n")
        .with_context(|| format!("cannot write {}", args.json.display()))?;
    eprintln!("figures written to {}", args.json.display());
    Ok(())
}

fn loopback_for(host: &Host, model_bytes: u64) -> f64 {
    host.loopback_gbps
        .iter()
        .find(|(b, _)| *b == model_bytes)
        .map_or(f64::NAN, |(_, g)| *g)
}

/// The targets, for the cells this run has.
pub fn targets(host: &Host, cells: &[Cell]) -> Vec<Target> {
    let mut out = vec![Target {
        what: "fold kernel ≥ 70% of memcpy".into(),
        measured: host.fold_gbps / host.memcpy_gbps,
        limit: 0.70,
        met: host.fold_gbps >= 0.70 * host.memcpy_gbps,
    }];
    for c in cells {
        let name = format!("{}×{}", human(c.params), c.clients);
        if (c.params, c.clients) == (10_000_000, 8) || (c.params, c.clients) == (100_000_000, 2) {
            let ratio = c.effective_gbps / loopback_for(host, c.model_bytes);
            out.push(Target {
                what: format!("{name}: effective throughput ≥ 50% of loopback"),
                measured: ratio,
                limit: 0.5,
                met: ratio >= 0.5,
            });
        }
        let rss = |who: &str, factor: f64, peak: u64| {
            let limit = (factor * c.model_bytes as f64) / MIB + 100.0;
            let measured = peak as f64 / MIB;
            Target {
                what: format!("{name}: {who} peak RSS ≤ {factor} × model + 100 MiB (MiB)"),
                measured,
                limit,
                met: measured <= limit,
            }
        };
        out.push(rss("coordinator", 2.0, c.coordinator_rss_bytes));
        out.push(rss("client", 2.5, c.client_rss_bytes));
    }
    out
}

fn human(params: u64) -> String {
    match params {
        p if p >= 1_000_000_000 && p % 1_000_000_000 == 0 => format!("{}G", p / 1_000_000_000),
        p if p >= 1_000_000 && p % 1_000_000 == 0 => format!("{}M", p / 1_000_000),
        p if p >= 1_000 && p % 1_000 == 0 => format!("{}k", p / 1_000),
        p => p.to_string(),
    }
}

fn print_table(host: &Host, cells: &[Cell], targets: &[Target]) {
    println!(
        "memcpy {:.2} GB/s; fold kernel {:.2} GB/s ({:.0}% of memcpy)",
        host.memcpy_gbps,
        host.fold_gbps,
        100.0 * host.fold_gbps / host.memcpy_gbps
    );
    println!();
    println!(
        "| model × clients | s/round | effective GB/s | loopback GB/s | of loopback | coordinator peak RSS | × model | client peak RSS | × model |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for c in cells {
        let loopback = loopback_for(host, c.model_bytes);
        let model = c.model_bytes as f64;
        println!(
            "| {}×{} | {:.3} | {:.2} | {:.2} | {:.0}% | {:.0} MiB | {:.2} | {:.0} MiB | {:.2} |",
            human(c.params),
            c.clients,
            c.round_s,
            c.effective_gbps,
            loopback,
            100.0 * c.effective_gbps / loopback,
            c.coordinator_rss_bytes as f64 / MIB,
            c.coordinator_rss_bytes as f64 / model,
            c.client_rss_bytes as f64 / MIB,
            c.client_rss_bytes as f64 / model,
        );
    }
    println!();
    for t in targets {
        println!(
            "{} {}: {:.2} (limit {:.2})",
            if t.met { "PASS " } else { "SHORT" },
            t.what,
            t.measured,
            t.limit
        );
    }
}

#[cfg(test)]
mod tests {
    use super::parse_cell;

    #[test]
    fn cells_parse_with_suffixes_and_bad_ones_are_named() {
        assert_eq!(parse_cell("10Mx8").unwrap(), (10_000_000, 8));
        assert_eq!(
            parse_cell("1k X 2".replace(' ', "").as_str()).unwrap(),
            (1_000, 2)
        );
        for bad in ["10M", "x8", "10Mx0", "tenx8", "10Mx-1"] {
            let e = parse_cell(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("PARAMSxCLIENTS"), "{e}");
        }
    }
}
