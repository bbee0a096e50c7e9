//! The `fedtune-coordinator` command line.

use crate::config::ServeArgs;
use crate::demo::{self, DemoArgs};
use crate::embed_cmd::{self, EmbedArgs};
use crate::pretrain::PretrainArgs;
use clap::{Parser, Subcommand};

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
    /// Run a whole local federation on real data: this coordinator plus client processes on
    /// 127.0.0.1, Fashion-MNIST split non-IID across the clients.
    Demo(DemoArgs),
    /// Train a built-in model centrally on a public data set: the starting point (`--init`) of
    /// a federated fine-tuning run.
    Pretrain(PretrainArgs),
    /// Print sentence embeddings and their cosine similarities with a Hugging Face BERT
    /// folder: check by hand that fedtune computes the published model.
    Embed(EmbedArgs),
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
            runtime.block_on(async {
                let listener = crate::bind(&cfg).await?;
                tokio::select! {
                    summary = crate::serve(cfg, listener) => {
                        let summary = summary?;
                        tracing::info!("run complete: {} rounds; global model in {}, metrics in {}", summary.records.len(), summary.global_path.display(), summary.metrics_path.display());
                        Ok(())
                    }
                    _ = tokio::signal::ctrl_c() => {
                        anyhow::bail!("interrupted; the last completed round's model and metrics are in the output folder")
                    }
                }
            })
        }
        Command::Demo(args) => runtime.block_on(demo::run(args)),
        Command::Pretrain(args) => {
            fedtune_common::logging::init(fedtune_common::logging::LogFormat::Text);
            crate::pretrain::run(args)
        }
        Command::Embed(args) => embed_cmd::run(args),
    }
}
