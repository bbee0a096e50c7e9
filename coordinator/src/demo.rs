//! `fedtune-coordinator demo`: a whole federation on this machine in one command. It splits
//! the data across N clients (images: Fashion-MNIST non-IID by Dirichlet; text: Rotten Tomatoes
//! sentences, see `demo_text`), starts N `fedtune-client` processes against this coordinator on
//! 127.0.0.1, runs the rounds with server-side evaluation on the test set, and prints a summary.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use fedtune_common::data::DataFolder;
use fedtune_common::logging::{self, LogFormat};
use fedtune_common::models::ModelSpec;
use tokio::process::Command;

use crate::config::{SecurityArgs, ServeArgs};
use crate::partition_cmd::{Split, split};
use crate::round_record::human_bytes;

/// Where Debian's `dataset-fashion-mnist` package puts the full data set.
pub const SYSTEM_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";
/// The real subset committed with the sources (see its README for the licence).
pub const BUNDLED_SUBSET: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../data/fashion-mnist-subset");

/// What the demo federates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Task {
    /// Fashion-MNIST images, a CNN trained from scratch (or --init).
    Image,
    /// Rotten Tomatoes sentences, all-MiniLM-L6-v2 fine-tuned with LoRA adapters.
    Text,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// image: Fashion-MNIST with a CNN; text: Rotten Tomatoes with MiniLM + LoRA (run
    /// deploy/fetch-pretrained.sh minilm and deploy/fetch-text-data.sh first; deploy/demo.sh
    /// does).
    #[arg(long, value_enum, default_value_t = Task::Image)]
    pub task: Task,
    /// Number of client processes.
    #[arg(long, default_value_t = 3)]
    pub clients: usize,
    /// Federation rounds [default: 5 for images, 3 for text].
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Model: mlp or cnn for images [default: cnn]; text uses bert from the --init folder.
    #[arg(long, default_value = "cnn")]
    pub model: String,
    /// Dirichlet concentration of the non-IID split (smaller = more skewed).
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Images: IDX folder with train-* and t10k-* pairs [default: /usr/share/datasets/fashion-mnist
    /// if installed, else the subset bundled in data/fashion-mnist-subset]. Text: the folder
    /// deploy/fetch-text-data.sh wrote [default: ~/.cache/fedtune/text-data].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Text: training sentences per client, drawn IID from Rotten Tomatoes (keeps the demo to
    /// minutes on 2 cores; 0 = all).
    #[arg(long, default_value_t = 400)]
    pub examples_per_client: usize,
    /// Text: test sentences for server-side evaluation (0 = all 2,561).
    #[arg(long, default_value_t = 500)]
    pub eval_examples: usize,
    /// Text: LoRA rank (0 = full fine-tuning).
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    /// Text: LoRA mode, fedit or ffa (see `serve --lora-mode`).
    #[arg(long, default_value = "fedit")]
    pub lora_mode: String,
    /// Output folder (client data, global model, metrics).
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Local epochs per round [default: 2 for images, 1 for text].
    #[arg(long)]
    pub local_epochs: Option<u32>,
    /// Local batch size [default: 32 for images, 16 for text].
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Local learning rate (Adam) [default: 0.001 for images, 0.002 for text].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Aggregation strategy (see `serve --help`).
    #[arg(long, default_value = "fedavg")]
    pub strategy: String,
    /// Server learning rate of the strategy [default: the strategy's].
    #[arg(long)]
    pub server_lr: Option<f64>,
    /// Fraction of clients that evaluate the new global model on their validation data after
    /// every round (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub fraction_evaluate: f64,
    /// Images: few-shot, each client gets exactly K examples of every class (replaces the
    /// Dirichlet split of --alpha).
    #[arg(long)]
    pub shots: Option<usize>,
    /// Use only these labels, e.g. 5,6,7,8,9 (training and evaluation data).
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<u8>,
    /// Start from pre-trained weights (see `serve --init`), e.g. the output of `pretrain`; for
    /// text the Hugging Face folder [default: ~/.cache/fedtune/pretrained/minilm].
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Re-initialise the classifier head of the --init weights (see `serve --reset-head`).
    #[arg(long)]
    pub reset_head: bool,
    /// Frozen tensors: patterns, head-only or none (see `serve --freeze`).
    #[arg(long)]
    pub freeze: Option<String>,
    /// Fraction of clients that train each round (with --dp central: each client's chance
    /// to be drawn).
    #[arg(long, default_value_t = 1.0)]
    pub fraction_fit: f64,
    /// Differential privacy (see `serve --dp`).
    #[command(flatten)]
    pub privacy: crate::config::PrivacyArgs,
    /// Secure aggregation (see `serve --secure-aggregation`).
    #[command(flatten)]
    pub secure_agg: crate::config::SecureAggArgs,
    /// Update and broadcast compression (see `serve --compress-up`, `--compress-down`).
    #[command(flatten)]
    pub compression: crate::config::CompressionArgs,
    /// Device of the clients: flex, libtorch or cuda:N.
    #[arg(long, default_value = "flex")]
    pub device: String,
    /// Seed of the split, the initial model and the clients' shuffling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

fn default_data() -> PathBuf {
    let system = Path::new(SYSTEM_FASHION_MNIST);
    if system.join("train-images-idx3-ubyte.gz").is_file() {
        system.to_path_buf()
    } else {
        PathBuf::from(BUNDLED_SUBSET)
    }
}

/// The `fedtune-client` binary built beside this one.
fn client_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .context("cannot locate the folder of this binary")?;
    let client = dir.join(format!("fedtune-client{}", std::env::consts::EXE_SUFFIX));
    if !client.is_file() {
        bail!(
            "{} not found: build both binaries with `cargo build --release` (the demo script does this)",
            client.display()
        );
    }
    Ok(client)
}

/// Fashion-MNIST split non-IID (Dirichlet) into one IDX folder per client.
fn image_plan(args: &DemoArgs) -> anyhow::Result<Plan> {
    let data_dir = args.data.clone().unwrap_or_else(default_data);
    let folder = DataFolder::open(&data_dir)
        .with_context(|| format!("cannot open demo data {}", data_dir.display()))?;
    if folder.test.is_none() {
        bail!(
            "{}: the demo needs a train-* and a t10k-* pair (the test pair is the server-side evaluation set)",
            data_dir.display()
        );
    }
    let model = ModelSpec::parse(&args.model, 10)?;
    folder.train.check_labels(model.num_classes)?;
    // With --classes, both splits keep only those labels; the evaluation pair is written out.
    let keep = |labels: &[u8]| -> Vec<usize> {
        (0..labels.len())
            .filter(|&i| args.classes.is_empty() || args.classes.contains(&labels[i]))
            .collect()
    };
    let train = folder.train.subset(&keep(&folder.train.labels));
    let eval_dir = if args.classes.is_empty() {
        data_dir.clone()
    } else {
        let test = folder.test.as_ref().map(|t| t.subset(&keep(&t.labels)));
        let dir = args.out.join("eval");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        if let Some(test) = test {
            test.write_pair(&dir, "t10k-")
                .with_context(|| format!("cannot write {}", dir.display()))?;
        }
        dir
    };
    if train.is_empty() {
        bail!("no training examples with labels {:?}", args.classes);
    }
    let folder = DataFolder { train, test: None };

    // Split the training set non-IID and give each client its own folder.
    let how = match args.shots {
        Some(k) => Split::Shots(k),
        None => Split::Dirichlet(args.alpha),
    };
    let parts = split(&folder.train.labels, args.clients, how, args.seed)?;
    let clients_dir = args.out.join("clients");
    let mut client_dirs = Vec::new();
    println!(
        "fedtune demo: {} training examples from {} split across {} clients ({}):",
        parts.iter().map(Vec::len).sum::<usize>(),
        data_dir.display(),
        args.clients,
        match how {
            Split::Dirichlet(a) => format!("Dirichlet alpha {a}"),
            Split::Shots(k) => format!("{k} examples of each class each"),
        }
    );
    for (i, part) in parts.iter().enumerate() {
        let dir = clients_dir.join(format!("client-{}", i + 1));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let subset = folder.train.subset(part);
        subset
            .write_pair(&dir, "train-")
            .with_context(|| format!("cannot write client data to {}", dir.display()))?;
        let counts = crate::partition_cmd::class_counts(&subset.labels);
        println!(
            "  client-{}: {:>6} examples, per class {:?}",
            i + 1,
            subset.len(),
            counts
        );
        client_dirs.push(dir);
    }

    let serve = ServeArgs {
        model: Some(args.model.clone()),
        num_classes: Some(model.num_classes),
        eval_data: Some(eval_dir),
        init: args.init.clone(),
        reset_head: args.reset_head,
        ..serve_args(args, Recipe::IMAGE)?
    };
    Ok(Plan {
        client_data: client_dirs,
        serve,
        client_flags: Vec::new(),
        model_name: args.model.clone(),
    })
}

/// A task's defaults for what the user did not set.
pub(crate) struct Recipe {
    pub rounds: u64,
    pub local_epochs: u32,
    pub batch_size: u32,
    pub lr: f64,
}

impl Recipe {
    const IMAGE: Recipe = Recipe {
        rounds: 5,
        local_epochs: 2,
        batch_size: 32,
        lr: 0.001,
    };
}

/// The coordinator settings every demo task shares: this machine, the user's recipe and
/// strategy over the task's defaults, Adam, text logs.
pub(crate) fn serve_args(args: &DemoArgs, recipe: Recipe) -> anyhow::Result<ServeArgs> {
    Ok(ServeArgs {
        listen: Some("127.0.0.1:0".parse()?),
        rounds: Some(args.rounds.unwrap_or(recipe.rounds)),
        min_available_clients: Some(args.clients),
        out: Some(args.out.clone()),
        freeze: args.freeze.clone(),
        local_epochs: Some(args.local_epochs.unwrap_or(recipe.local_epochs)),
        batch_size: Some(args.batch_size.unwrap_or(recipe.batch_size)),
        lr: Some(args.lr.unwrap_or(recipe.lr)),
        optimizer: Some("adam".into()),
        round_timeout: Some(Duration::from_secs(1800)),
        strategy: Some(args.strategy.clone()),
        server_lr: args.server_lr,
        fraction_evaluate: Some(args.fraction_evaluate),
        fraction_fit: Some(args.fraction_fit),
        privacy: args.privacy.clone(),
        secure_agg: args.secure_agg.clone(),
        compression: args.compression.clone(),
        log_format: Some(LogFormat::Text),
        seed: Some(args.seed),
        // Each demo is a new federation; an earlier one in `--out` is moved aside.
        fresh: true,
        ..Default::default()
    })
}

/// What a demo task sets up: one data path per client, the coordinator's settings and the
/// clients' extra flags.
pub(crate) struct Plan {
    pub client_data: Vec<PathBuf>,
    pub serve: ServeArgs,
    pub client_flags: Vec<String>,
    pub model_name: String,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    logging::init(LogFormat::Text);
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let client_bin = client_binary()?;
    let mut plan = match args.task {
        Task::Image => image_plan(&args)?,
        Task::Text => crate::demo_text::plan(&args)?,
    };
    let kits = throwaway_kits(&args.out, plan.client_data.len())?;
    plan.serve.security = SecurityArgs {
        tls_cert: Some(kits.join("coordinator/server.pem")),
        tls_key: Some(kits.join("coordinator/server.key")),
        client_ca: Some(kits.join("coordinator/ca.pem")),
        ..Default::default()
    };
    let cfg = plan.serve.resolve()?;
    let listener = crate::bind(&cfg).await?;
    let url = format!("https://{}", listener.local_addr()?);

    let mut children = Vec::new();
    for (i, data) in plan.client_data.iter().enumerate() {
        let kit = kits.join(format!("clients/client-{}/client.toml", i + 1));
        let child = Command::new(&client_bin)
            .args(["run", "--coordinator", &url, "--config"])
            .arg(kit)
            .arg("--data")
            .arg(data)
            .args([
                "--name",
                &format!("client-{}", i + 1),
                "--device",
                &args.device,
                "--no-progress",
            ])
            .args(&plan.client_flags)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", client_bin.display()))?;
        children.push(child);
    }

    // A client that dies (bad device, bad data) must end the demo, not leave it waiting.
    let summary = tokio::select! {
        summary = crate::serve(cfg, listener) => summary?,
        (i, status) = first_failure(&mut children) => {
            bail!("client-{} exited with {status} before the federation finished; its error is above", i + 1)
        }
    };

    let mut failed = Vec::new();
    for (i, mut child) in children.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => failed.push(format!("client-{} exited with {status}", i + 1)),
            Ok(Err(e)) => failed.push(format!("client-{}: {e}", i + 1)),
            Err(_) => failed.push(format!(
                "client-{} did not exit within 30 s of the end",
                i + 1
            )),
        }
    }

    println!(
        "\nfedtune demo: {} rounds, {} clients, model {} — server-side test accuracy per round:",
        summary.records.len(),
        args.clients,
        plan.model_name
    );
    println!(
        "  round  accuracy  macro-F1  eval loss  train loss  fed-eval acc  round time  uploaded (full model)"
    );
    for r in &summary.records {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        let fed = r
            .fed_eval_accuracy
            .map_or("-".to_string(), |a| format!("{:.2}%", a * 100.0));
        println!(
            "  {:>5}  {:>7.2}%  {:>8}  {:>9}  {:>10}  {:>12}  {:>8.1} s  {:>9} ({})",
            r.round,
            r.eval_accuracy.unwrap_or(f64::NAN) * 100.0,
            f(r.eval_f1),
            f(r.eval_loss),
            f(r.train_loss),
            fed,
            r.round_ms as f64 / 1000.0,
            human_bytes(r.bytes_up),
            human_bytes(r.bytes_up_full)
        );
    }
    if let Some(p) = summary.records.last().and_then(|r| r.privacy.as_ref()) {
        let curve: Vec<String> = summary
            .records
            .iter()
            .filter_map(|r| r.privacy.as_ref().map(|p| format!("{:.3}", p.epsilon)))
            .collect();
        println!(
            "privacy ({} DP): ε per round {} at δ = {:e}",
            p.mode,
            curve.join(", "),
            p.delta
        );
    }
    if let Some(why) = &summary.ended_early {
        println!("the run ended early: {why}");
    }
    println!("global model: {}", summary.global_path.display());
    println!("metrics:      {}", summary.metrics_path.display());
    if let Some(run_dir) = summary.metrics_path.parent() {
        match crate::report::write(run_dir, &run_dir.join("report")) {
            Ok(written) => println!("report:       {}", written.html.display()),
            Err(e) => println!("report:       not written: {e:#}"),
        }
    }
    if !failed.is_empty() {
        bail!("some clients did not finish cleanly: {}", failed.join("; "));
    }
    Ok(())
}

/// A fresh certificate authority and kits for this run's coordinator and clients in
/// `<out>/kits`, so that even the demo runs over mutual TLS.
fn throwaway_kits(out: &Path, clients: usize) -> anyhow::Result<PathBuf> {
    let kits = out.join("kits");
    if kits.exists() {
        std::fs::remove_dir_all(&kits)
            .with_context(|| format!("cannot remove the previous run's {}", kits.display()))?;
    }
    crate::provision::provision(&crate::provision::ProvisionPlan {
        out: kits.clone(),
        sans: vec!["127.0.0.1".into(), "localhost".into()],
        clients: (1..=clients).map(|i| format!("client-{i}")).collect(),
        url: "https://127.0.0.1:50051".into(),
        // Past the coordinator's 14-day expiry warning: a throwaway kit is not to be renewed.
        days: 30,
    })?;
    Ok(kits)
}

/// Resolves when a child exits unsuccessfully (index and status); pends while all run or
/// succeed.
async fn first_failure(
    children: &mut [tokio::process::Child],
) -> (usize, std::process::ExitStatus) {
    loop {
        for (i, child) in children.iter_mut().enumerate() {
            if let Ok(Some(status)) = child.try_wait()
                && !status.success()
            {
                return (i, status);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
