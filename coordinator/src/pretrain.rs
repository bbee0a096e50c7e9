//! `fedtune-coordinator pretrain`: trains a built-in model centrally on a public data set — the
//! starting point (`serve --init`) for users who have no checkpoint. Same trainer as the
//! clients (`fedtune_common::train`), a progress bar on a terminal, validation metrics after
//! every epoch, and the test split's figures at the end when the folder has one.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use fedtune_common::checkpoint;
use fedtune_common::data::{DataFolder, validation_split};
use fedtune_common::device::DeviceChoice;
use fedtune_common::models::{DROPOUT, ModelSpec};
use fedtune_common::optim::OptimizerSettings;
use fedtune_common::pretrained::{self, InitOptions};
use fedtune_common::train::{self, TrainSettings};
use indicatif::{ProgressBar, ProgressStyle};
use tracing::info;

#[derive(Debug, Clone, Args)]
pub struct PretrainArgs {
    /// Model: mlp or cnn.
    #[arg(long, default_value = "cnn")]
    pub model: String,
    /// Output classes of the model.
    #[arg(long, default_value_t = 10)]
    pub num_classes: u32,
    /// The public training data: an IDX folder (train-* pair; t10k-* is used for a final test),
    /// an image folder (<class>/<file>.png|jpg) or a CSV file.
    #[arg(long)]
    pub data: PathBuf,
    /// CSV data: the column holding the class number.
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// Train only on these labels, e.g. 0,1,2,3,4 (the rest of the folder is left out).
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<u8>,
    /// Epochs over the training data.
    #[arg(long, default_value_t = 3)]
    pub epochs: u32,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0.001)]
    pub lr: f64,
    /// sgd, adam or adamw.
    #[arg(long, default_value = "adam")]
    pub optimizer: String,
    /// Share of the training data held out for validation after every epoch.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Device: flex, libtorch or cuda:N.
    #[arg(long, default_value = "flex")]
    pub device: DeviceChoice,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Start from these weights (safetensors with the model's tensor names), e.g. to fine-tune
    /// centrally as a baseline for a federated run.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Where to write the weights (safetensors, the model's tensor names).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: PretrainArgs) -> anyhow::Result<()> {
    let spec = ModelSpec::parse(&args.model, args.num_classes)?;
    if args.epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    if !(0.0..1.0).contains(&args.val_fraction) {
        bail!(
            "--val-fraction must be in [0, 1), got {}",
            args.val_fraction
        );
    }
    let folder = DataFolder::open_with(&args.data, &args.label_column)
        .with_context(|| format!("cannot load {}", args.data.display()))?;
    let keep = |label: u8| args.classes.is_empty() || args.classes.contains(&label);
    let picked: Vec<usize> = (0..folder.train.len())
        .filter(|&i| keep(folder.train.labels[i]))
        .collect();
    if picked.len() < 2 {
        bail!(
            "{}: only {} training examples with labels {:?}",
            args.data.display(),
            picked.len(),
            args.classes
        );
    }
    let data = folder.train.subset(&picked);
    spec.check_data(&data)?;
    let (train_idx, val_idx) = validation_split(data.len(), args.val_fraction, args.seed);
    info!(
        "pre-training {} on {} examples ({} for validation) from {}{}, {} epochs on {}",
        spec.kind,
        train_idx.len(),
        val_idx.len(),
        data.source,
        if args.classes.is_empty() {
            String::new()
        } else {
            format!(", labels {:?}", args.classes)
        },
        args.epochs,
        args.device
    );

    let plain = args.device.device()?;
    let autodiff = plain.clone().autodiff();
    autodiff.seed(args.seed);
    let mut model = spec.build_with_dropout(&autodiff, DROPOUT)?;
    if let Some(init) = &args.init {
        let (weights, report, _) =
            pretrained::load(init, &model.extract()?, &InitOptions::default())?;
        info!(
            "starting from {}: {} tensors applied, {} missing",
            init.display(),
            report.applied.len(),
            report.missing.len()
        );
        model = model.inject(&weights)?;
    }
    let settings = TrainSettings {
        epochs: args.epochs,
        batch_size: args.batch_size.max(1),
        lr: args.lr,
        optimizer: OptimizerSettings {
            kind: args.optimizer.parse().map_err(anyhow::Error::msg)?,
            ..Default::default()
        },
        seed: args.seed,
        ..Default::default()
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb
    });
    let outcome = train::train(
        model,
        &data,
        &train_idx,
        &val_idx,
        &settings,
        &autodiff,
        &mut |p| match (&bar, p.epoch_line()) {
            (_, Some(line)) => match &bar {
                Some(pb) => pb.println(line),
                None => info!("{line}"),
            },
            (Some(pb), None) => {
                pb.set_length((p.epochs as usize * p.steps_per_epoch) as u64);
                pb.set_position(((p.epoch as usize - 1) * p.steps_per_epoch + p.step) as u64);
                pb.set_message(format!("epoch {}/{} loss {:.4}", p.epoch, p.epochs, p.loss));
            }
            (None, None) => {}
        },
    )?;
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    let mut meta = HashMap::from([
        ("fedtune.model".to_string(), spec.kind.to_string()),
        (
            "fedtune.num_classes".to_string(),
            spec.num_classes.to_string(),
        ),
        ("fedtune.pretrained_on".to_string(), data.source.clone()),
        ("fedtune.epochs".to_string(), outcome.epochs_run.to_string()),
    ]);
    if !args.classes.is_empty() {
        meta.insert("fedtune.classes".to_string(), format!("{:?}", args.classes));
    }
    if let Some(test) = folder.test {
        let picked: Vec<usize> = (0..test.len()).filter(|&i| keep(test.labels[i])).collect();
        let test = test.subset(&picked);
        let e = train::evaluate(
            &outcome.model,
            &test,
            &(0..test.len()).collect::<Vec<_>>(),
            256,
            spec.num_classes as usize,
            &plain,
        )?;
        let m = e.metrics();
        info!(
            "test split ({} examples): loss {:.4} acc {:.2}% f1 {:.4}",
            m.examples,
            e.loss,
            m.accuracy * 100.0,
            m.f1
        );
        meta.insert(
            "fedtune.test_accuracy".to_string(),
            format!("{:.4}", m.accuracy),
        );
    }
    let weights = outcome.model.extract()?;
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    checkpoint::save(&weights, meta, &args.out)?;
    info!(
        "wrote {} ({} tensors); start a federation from it with `serve --init {}`",
        args.out.display(),
        weights.len(),
        args.out.display()
    );
    Ok(())
}
