//! `fedtune-coordinator partition`: an image data set split across simulated clients, one IDX
//! folder each, for experiments and for trying a federation by hand: non-IID by a Dirichlet
//! draw per class (`--alpha`), or few-shot with k examples of every class per client
//! (`--shots`). Also writes the test images (`test/`) and the union of the clients' data with
//! them (`union/`), the centralised baseline's data. The demo splits the same way.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fedtune_common::data::{DataFolder, ImageDataset, dirichlet_partition, shots_partition};

#[derive(clap::Args, Debug)]
pub struct PartitionArgs {
    /// An IDX folder with a train-* pair (and a t10k-* pair for the test set).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value_t = 3)]
    pub clients: usize,
    /// Dirichlet concentration of each class's split across clients (small: skewed).
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Few-shot: each client gets exactly K examples of every class (replaces --alpha).
    #[arg(long)]
    pub shots: Option<usize>,
    /// Split the first N x clients training images (after --classes) instead of all of them.
    #[arg(long)]
    pub examples_per_client: Option<usize>,
    /// Use only these labels, e.g. 5,6,7,8,9.
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<u8>,
    /// Test images written to test/ and union/ (the first N of the t10k pair) [default: all].
    #[arg(long)]
    pub test_examples: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Folder of the split: clients/client-1..N, test/, union/.
    #[arg(long)]
    pub out: PathBuf,
}

/// How the examples are split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Split {
    Dirichlet(f64),
    Shots(usize),
}

/// Each client's indices into `labels`.
pub fn split(
    labels: &[u8],
    clients: usize,
    how: Split,
    seed: u64,
) -> anyhow::Result<Vec<Vec<usize>>> {
    if clients == 0 {
        bail!("--clients must be at least 1");
    }
    match how {
        Split::Dirichlet(alpha) if !(alpha.is_finite() && alpha > 0.0) => {
            bail!("--alpha must be a positive number, got {alpha}")
        }
        Split::Dirichlet(alpha) => Ok(dirichlet_partition(labels, clients, alpha, seed)),
        Split::Shots(0) => bail!("--shots must be at least 1"),
        Split::Shots(k) => shots_partition(labels, clients, k, seed)
            .map_err(|e| anyhow::anyhow!("--shots {k}: {e}; lower --shots or --clients")),
    }
}

/// `labels`' class counts, for the per-client line.
pub fn class_counts(labels: &[u8]) -> [usize; 10] {
    let mut counts = [0usize; 10];
    labels
        .iter()
        .for_each(|&l| counts[(l as usize).min(9)] += 1);
    counts
}

pub fn run(args: PartitionArgs) -> anyhow::Result<()> {
    let folder =
        DataFolder::open(&args.data).with_context(|| format!("--data {}", args.data.display()))?;
    let keep = |d: &ImageDataset| -> ImageDataset {
        let idx: Vec<usize> = (0..d.len())
            .filter(|&i| args.classes.is_empty() || args.classes.contains(&d.labels[i]))
            .collect();
        d.subset(&idx)
    };
    let mut train = keep(&folder.train);
    if let Some(per) = args.examples_per_client {
        if args.shots.is_some() {
            bail!(
                "--examples-per-client and --shots both set the size of each client's share; give one"
            );
        }
        let n = (per * args.clients).min(train.len());
        train = train.subset(&(0..n).collect::<Vec<_>>());
    }
    if train.is_empty() {
        bail!("no training examples with labels {:?}", args.classes);
    }
    let how = match args.shots {
        Some(k) => Split::Shots(k),
        None => Split::Dirichlet(args.alpha),
    };
    let parts = split(&train.labels, args.clients, how, args.seed)?;
    let write = |set: &ImageDataset, dir: &Path, prefix: &str| -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        set.write_pair(dir, prefix)
            .with_context(|| format!("cannot write {}", dir.display()))
    };
    let mut union = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let share = train.subset(part);
        write(
            &share,
            &args.out.join("clients").join(format!("client-{}", i + 1)),
            "train-",
        )?;
        println!(
            "client-{}: {:>6} examples, per class {:?}",
            i + 1,
            share.len(),
            class_counts(&share.labels)
        );
        union.extend_from_slice(part);
    }
    union.sort_unstable();
    write(&train.subset(&union), &args.out.join("union"), "train-")?;
    if let Some(test) = &folder.test {
        let mut test = keep(test);
        if let Some(n) = args.test_examples {
            test = test.subset(&(0..n.min(test.len())).collect::<Vec<_>>());
        }
        write(&test, &args.out.join("test"), "t10k-")?;
        write(&test, &args.out.join("union"), "t10k-")?;
        println!(
            "test: {} examples, per class {:?}",
            test.len(),
            class_counts(&test.labels)
        );
    }
    println!(
        "{} training examples split across {} clients ({}) into {}",
        union.len(),
        args.clients,
        match how {
            Split::Dirichlet(a) => format!("Dirichlet alpha {a}"),
            Split::Shots(k) => format!("{k} per class each"),
        },
        args.out.display()
    );
    Ok(())
}
