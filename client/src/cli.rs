//! The `fedtune-client` command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::attack::Attack;
use crate::session::{self, ClientOptions, TrainMode};
use crate::task_config::Caps;
use crate::tls::ClientSecurity;
use clap::{Parser, Subcommand, ValueEnum};
use fedtune_common::device::DeviceChoice;
use fedtune_common::logging::{self, LogFormat};
use fedtune_settings::KitFile;

/// fedtune edge client: fine-tunes locally on private data and sends weight deltas to the
/// coordinator.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join a coordinator and work until it says the federation is finished.
    Run(Box<RunArgs>),
    /// List the compute devices this binary can use.
    Devices,
    /// Time the local training step of a built-in model (forward, backward, Adam step).
    BenchStep(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// IDX folder with the images to train on (image models).
    #[arg(long, required_unless_present = "bert")]
    data: Option<PathBuf>,
    /// Model: mlp, cnn or a registered image architecture.
    #[arg(long, default_value = "cnn")]
    model: String,
    /// Time a BERT from this Hugging Face folder's config.json instead (random weights, random
    /// token ids of --seq-len tokens: the step costs the same).
    #[arg(long)]
    bert: Option<PathBuf>,
    /// BERT: tokens per sequence.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// BERT: LoRA rank on query and value (0 = full fine-tuning).
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// Batch sizes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    batch_sizes: Vec<usize>,
    /// Device: flex, libtorch or cuda:N.
    #[arg(long, default_value = "flex")]
    device: DeviceChoice,
    /// Timed steps per batch size (after 5 warm-up steps).
    #[arg(long, default_value_t = 50)]
    steps: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum Train {
    /// Fine-tune with burn on the local data.
    Full,
    /// Send a small fixed delta without training (protocol benchmarks).
    None,
}

#[derive(clap::Args)]
struct RunArgs {
    /// A provisioned kit's client.toml: coordinator URL, name, CA, certificate and key
    /// (`fedtune-coordinator provision`); flags given here win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Coordinator URL, e.g. https://coordinator.example.org:50051 (http:// only with
    /// --insecure) [default: the --config file's].
    #[arg(long)]
    coordinator: Option<String>,
    /// The CA that issued the coordinator's certificate (PEM) [default: the --config file's].
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// This client's certificate (PEM), for a coordinator that requires mutual TLS.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Check the coordinator's certificate for this name instead of the URL's host.
    #[arg(long)]
    tls_server_name: Option<String>,
    /// A file holding this client's token (`fedtune-coordinator token add`), for a coordinator
    /// with --client-tokens (devices without a client certificate); TLS only.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Connect with plaintext http:// (the coordinator serves --insecure): trusted local tests
    /// only.
    #[arg(long)]
    insecure: bool,
    /// Local data: a folder of IDX files (images-idx3-ubyte + labels-idx1-ubyte, gzipped or
    /// not), an image folder (<class>/<file>.png|jpg), a CSV table, or text: a TSV or JSONL
    /// file, or a CSV file with a --text-column.
    #[arg(long)]
    data: Option<PathBuf>,
    /// CSV and text data: the column holding the label (a class number, or for text one of the
    /// coordinator's --labels names).
    #[arg(long, default_value = "label")]
    label_column: String,
    /// Text data: the column holding the text.
    #[arg(long, default_value = "text")]
    text_column: String,
    /// Text models: this client's copy of the coordinator's tokenizer.json (or a Hugging Face
    /// folder holding it); checked against the coordinator's by SHA-256.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// A local test set in the same formats as --data: federated evaluation measures the
    /// global model on all of it instead of on the validation split.
    #[arg(long)]
    test_data: Option<PathBuf>,
    /// Compute device: flex (pure Rust), libtorch (CPU) or cuda:N (the last two need a build
    /// with --features tch).
    #[arg(long, default_value = "flex")]
    device: DeviceChoice,
    /// Name shown in the coordinator's logs; under mutual TLS the certificate's name is used
    /// [default: the --config file's, else the host name].
    #[arg(long)]
    name: Option<String>,
    /// Local training mode.
    #[arg(long, value_enum, default_value_t = Train::Full)]
    train: Train,
    /// Fraction of the local data held out for validation (never trained on).
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Seed of the validation split and local shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Never draw a progress bar (log one line per epoch instead).
    #[arg(long)]
    no_progress: bool,
    /// Give up when the coordinator stays unreachable this long (e.g. 10m, 2h).
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    give_up_after: Duration,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
    /// Never train with batches larger than this, whatever the coordinator asks (memory).
    #[arg(long)]
    max_batch_size: Option<usize>,
    /// Never run more local epochs than this per round, whatever the coordinator asks.
    #[arg(long)]
    max_epochs: Option<u32>,
    /// Where this client keeps what outlives a round (SCAFFOLD's control variate) [default:
    /// $STATE_DIRECTORY (systemd), else $XDG_STATE_HOME/fedtune/NAME, else
    /// ~/.local/state/fedtune/NAME].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// TEST TOOL for robustness experiments: tamper with every update this client sends
    /// (sign-flip, scale:K, noise:SIGMA). Never use it in a real federation.
    #[arg(long)]
    simulate_attack: Option<Attack>,
    /// TEST TOOL for fault tests: abort the process after a secure-aggregation step, as a
    /// crash would (shared-keys, masked).
    #[arg(long, hide = true, value_enum)]
    die_after: Option<crate::secure_agg::DieAfter>,
}

/// Parses the command line and runs the command: the whole `fedtune-client` binary. A program
/// built on this library calls it after registering its own architectures
/// ([`fedtune_common::models::register`]).
pub fn main() -> anyhow::Result<()> {
    let args = match Cli::parse().command {
        Command::Run(args) => *args,
        Command::Devices => {
            println!("{}", fedtune_common::device::describe());
            return Ok(());
        }
        Command::BenchStep(args) => return bench_step(args),
    };
    logging::init(args.log_format);
    let kit = match &args.config {
        Some(path) => KitFile::read(path)?,
        None => KitFile::default(),
    };
    let name = args
        .name
        .or(kit.name)
        .unwrap_or_else(|| std::env::var("HOSTNAME").unwrap_or_else(|_| "client".into()));
    let coordinator = args.coordinator.or(kit.coordinator).context(
        "give --coordinator URL (e.g. https://10.0.0.5:50051) or --config with a kit's client.toml",
    )?;
    let security = ClientSecurity {
        insecure: args.insecure || kit.insecure,
        ca_cert: args.ca_cert.or(kit.ca_cert),
        cert: args.cert.or(kit.cert),
        key: args.key.or(kit.key),
        server_name: args.tls_server_name.or(kit.tls_server_name),
        token_file: args.token_file.or(kit.token_file),
    };
    let state_dir = args.state_dir.unwrap_or_else(|| default_state_dir(&name));
    let opts = ClientOptions {
        coordinator,
        security,
        data: args.data,
        device: args.device,
        name,
        train: match args.train {
            Train::Full => TrainMode::Full,
            Train::None => TrainMode::None,
        },
        val_fraction: args.val_fraction,
        seed: args.seed,
        progress_bar: !args.no_progress && session::stderr_is_terminal(),
        give_up_after: args.give_up_after,
        attack: args.simulate_attack,
        die_after: args.die_after,
        label_column: args.label_column,
        text_column: args.text_column,
        tokenizer: args.tokenizer,
        test_data: args.test_data,
        state_dir,
        caps: Caps {
            max_batch_size: args.max_batch_size.filter(|&n| n > 0),
            max_epochs: args.max_epochs.filter(|&n| n > 0),
        },
    };
    if let Some(attack) = opts.attack {
        tracing::warn!(
            "{}: --simulate-attack {attack}: this client will send tampered updates (a test tool for robustness experiments)",
            opts.name
        );
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(session::run(opts))?;
    Ok(())
}

/// `--state-dir` when none is given: systemd's `StateDirectory=`, else the XDG state folder,
/// one folder per client name.
fn default_state_dir(name: &str) -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = env("STATE_DIRECTORY") {
        return dir;
    }
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let base = env("XDG_STATE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".local/state")))
        .unwrap_or_else(|| PathBuf::from(".fedtune-state"));
    base.join("fedtune").join(safe)
}

fn bench_step(args: BenchArgs) -> anyhow::Result<()> {
    use crate::bench;
    let device = args.device.device()?;
    let (name, spec, data): (String, _, Box<dyn fedtune_common::data::Examples>) =
        match (&args.bert, &args.data) {
            (Some(dir), _) => {
                let (spec, tokens) = bench::bert_setup(dir, args.lora_rank, args.seq_len)?;
                let name = format!("bert-lora{}-seq{}", args.lora_rank, args.seq_len);
                (name, spec, Box::new(tokens))
            }
            (None, Some(data)) => (
                args.model.clone(),
                fedtune_common::models::ModelSpec::parse(&args.model, 10)?,
                Box::new(fedtune_common::data::DataFolder::open(data)?.train),
            ),
            (None, None) => anyhow::bail!("give --data DIR (image models) or --bert DIR"),
        };
    for &batch in &args.batch_sizes {
        let t = bench::time_steps(&spec, data.as_ref(), batch, 5, args.steps, &device)?;
        println!(
            "bench-step model={name} device={} batch={} steps={} mean_ms={:.3}",
            args.device, t.batch_size, t.steps, t.mean_ms
        );
    }
    Ok(())
}
