//! The `fedtune-coordinator` command line.

use crate::config::ServeArgs;
use crate::demo::{self, DemoArgs};
use crate::dp_plan::{self, DpPlanArgs};
use crate::embed_cmd::{self, EmbedArgs};
use crate::pretrain::PretrainArgs;
use crate::provision::{self, ProvisionPlan};
use crate::report::{self, ReportArgs};
use crate::status_cmd::{self, StatusArgs};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// fedtune coordinator: runs federated fine-tuning rounds and merges client updates.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a federation: wait for clients, run the rounds, write the global model and metrics.
    Serve(Box<ServeArgs>),
    /// Federated hyper-parameter search: short federations on the connected clients, cut by
    /// successive halving on the clients' validation loss; writes tune.jsonl and best.toml.
    Tune(Box<crate::tune::TuneArgs>),
    /// Split an image data set across simulated clients (Dirichlet or k shots per class), one
    /// IDX folder each, with the test set and the union for centralised baselines.
    Partition(crate::partition_cmd::PartitionArgs),
    /// Run a whole local federation on real data: this coordinator plus client processes on
    /// 127.0.0.1, Fashion-MNIST split non-IID across the clients.
    Demo(Box<DemoArgs>),
    /// Train a built-in model centrally on a public data set: the starting point (`--init`) of
    /// a federated fine-tuning run.
    Pretrain(PretrainArgs),
    /// Print sentence embeddings and their cosine similarities with a Hugging Face BERT
    /// folder: check by hand that fedtune computes the published model.
    Embed(EmbedArgs),
    /// Create a certificate authority, the coordinator's TLS certificate and one kit per client
    /// (certificate, key, CA, client.toml) for a federation over mutual TLS; re-run to add
    /// clients.
    Provision(ProvisionArgs),
    /// Plan a differentially private run: the noise multiplier for a target ε over a number of
    /// rounds, or the ε each round spends at a given multiplier.
    DpPlan(DpPlanArgs),
    /// Where a running coordinator's run is and what every client is doing (its Admin
    /// service); --watch keeps it on screen.
    Status(StatusArgs),
    /// Charts (PNG and SVG) and report.html / report.md of a run's rounds, from its
    /// metrics.jsonl.
    Report(ReportArgs),
    /// Measure this machine (memory copy, TCP loopback), the FedAvg fold kernel and federations
    /// of synthetic models as real processes: round time, throughput, peak memory, against
    /// the targets; a table and a JSON file.
    Bench(crate::bench::BenchArgs),
    /// Succeed only when a coordinator's metrics endpoint answers 200 at URL (e.g.
    /// http://127.0.0.1:9464/readyz): a container health check without a shell.
    Probe(crate::probe::ProbeArgs),
    /// Client tokens, for devices that cannot hold a client certificate.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Issue a token for client NAME: printed once, only its hash is kept in --file.
    Add {
        /// The client's name (its identity in logs and allow-lists).
        name: String,
        /// The token file `serve --client-tokens` reads (created 0600 if missing).
        #[arg(long)]
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct ProvisionArgs {
    /// Folder of the kits: ca/ (keep it with you), coordinator/, clients/NAME/.
    #[arg(long)]
    out: PathBuf,
    /// DNS name or IP address clients dial the coordinator by (repeatable or comma-separated);
    /// the certificate is valid for these only.
    #[arg(long, value_delimiter = ',')]
    san: Vec<String>,
    /// Client names, e.g. site-a,site-b: each becomes a certificate's common name, the
    /// client's identity in logs and allow-lists.
    #[arg(long, value_delimiter = ',')]
    clients: Vec<String>,
    /// The coordinator URL written into the clients' client.toml [default: https://<first
    /// --san>:50051].
    #[arg(long)]
    url: Option<String>,
    /// Validity of the server and client certificates, in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

/// Parses the command line and runs the command: the whole `fedtune-coordinator` binary. A program
/// built on this library calls it after registering its own architectures
/// ([`fedtune_common::models::register`]).
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Serve(args) => {
            let cfg = args.resolve()?;
            fedtune_common::logging::init(cfg.log_format);
            if args.upstream.is_set() {
                let upstream = args.upstream.resolve(&args)?;
                return runtime.block_on(async {
                    let listener = crate::bind(&cfg).await?;
                    crate::tier::aggregate_until(cfg, upstream, listener, stop_signal()?).await
                });
            }
            runtime.block_on(async {
                let listener = crate::bind(&cfg).await?;
                let summary = crate::serve_until(cfg, listener, stop_signal()?).await?;
                if summary.stopped {
                    tracing::info!(
                        "stopped; the last completed round's model and metrics are in {} and {}: run the same command to continue the run",
                        summary.global_path.display(),
                        summary.metrics_path.display()
                    );
                    return Ok(());
                }
                let how = match &summary.ended_early {
                    Some(why) => format!("run ended early ({why})"),
                    None => "run complete".to_string(),
                };
                tracing::info!(
                    "{how}: {} rounds; global model in {}, metrics in {}",
                    summary.records.len(),
                    summary.global_path.display(),
                    summary.metrics_path.display()
                );
                Ok(())
            })
        }
        Command::Demo(args) => runtime.block_on(demo::run(*args)),
        Command::Pretrain(args) => {
            fedtune_common::logging::init(fedtune_common::logging::LogFormat::Text);
            crate::pretrain::run(args)
        }
        Command::Tune(args) => {
            fedtune_common::logging::init(fedtune_common::logging::LogFormat::Text);
            runtime.block_on(async { crate::tune::tune_until(*args, stop_signal()?).await })?;
            Ok(())
        }
        Command::Partition(args) => crate::partition_cmd::run(args),
        Command::Embed(args) => embed_cmd::run(args),
        Command::Status(args) => runtime.block_on(status_cmd::run(args)),
        Command::Report(args) => report::run(args),
        Command::Probe(args) => crate::probe::probe(&args),
        Command::Bench(args) => runtime.block_on(crate::bench::run(args)),
        Command::DpPlan(args) => dp_plan::run(args),
        Command::Token(TokenCommand::Add { name, file }) => {
            let token = crate::tokens::add(&file, &name)?;
            eprintln!(
                "client `{name}` added to {}; its token (shown only now; give it to the device, e.g. in a file for --token-file):",
                file.display()
            );
            println!("{token}");
            Ok(())
        }
        Command::Provision(args) => {
            let url = args.url.clone().unwrap_or_else(|| {
                let host = args.san.first().map(String::as_str).unwrap_or("localhost");
                match host.parse::<std::net::Ipv6Addr>() {
                    Ok(_) => format!("https://[{host}]:50051"),
                    Err(_) => format!("https://{host}:50051"),
                }
            });
            let done = provision::provision(&ProvisionPlan {
                out: args.out.clone(),
                sans: args.san.clone(),
                clients: args.clients.clone(),
                url,
                days: args.days,
            })?;
            let out = args.out.display();
            if done.created_ca {
                println!(
                    "created the certificate authority in {out}/ca (keep ca.key private; it issues every certificate)"
                );
            }
            if done.created_server {
                println!(
                    "created the coordinator's kit {out}/coordinator: serve --config {out}/coordinator/coordinator.toml"
                );
            }
            for c in &done.new_clients {
                println!(
                    "created client kit {out}/clients/{c}: copy it to the device, then fedtune-client run --config clients/{c}/client.toml --data DIR"
                );
            }
            for c in &done.kept_clients {
                println!("kept the existing kit of client {c}");
            }
            Ok(())
        }
    }
}

/// The first SIGTERM or SIGINT (Ctrl-C) stops the run gracefully: the future completes with
/// the signal's name. A second one exits at once, which is safe too: every file is written to
/// a temporary name and renamed, so the output folder always holds whole files.
fn stop_signal() -> anyhow::Result<impl Future<Output = String>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut next = async || {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        };
        let first = next().await;
        tracing::warn!(
            "{first}: stopping — no new work; the round in progress is abandoned and runs again when the coordinator is started again with the same command (send another signal to exit at once)"
        );
        let _ = tx.send(first.to_string());
        let second = next().await;
        tracing::warn!("{second} again: exiting at once");
        std::process::exit(130);
    });
    Ok(async move {
        rx.await
            .unwrap_or_else(|_| "the signal handler ended".into())
    })
}
