//! `fedtune-coordinator embed`: sentence embeddings and their cosine similarities with a
//! Hugging Face BERT folder, so a user can check by hand that fedtune computes the published
//! model (all-MiniLM-L6-v2's quickstart: 0.6660 / 0.1046 / 0.1411).

use std::path::PathBuf;

use clap::Args;
use fedtune_common::device::DeviceChoice;
use fedtune_common::embed::{SentenceEncoder, cosine};

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// A Hugging Face BERT folder: config.json, model.safetensors, tokenizer.json (e.g. the
    /// folder deploy/fetch-pretrained.sh minilm prints).
    #[arg(long)]
    pub model_dir: PathBuf,
    /// Compute device: flex, libtorch or cuda:N (the last two need --features tch).
    #[arg(long, default_value = "flex")]
    pub device: DeviceChoice,
    /// Longest input in tokens; longer sentences are truncated.
    #[arg(long, default_value_t = 256)]
    pub max_seq_len: usize,
    /// Dimensions of each embedding to print.
    #[arg(long, default_value_t = 5)]
    pub show_dims: usize,
    /// The sentences (two or more for similarities).
    #[arg(required = true)]
    pub sentences: Vec<String>,
}

pub fn run(args: EmbedArgs) -> anyhow::Result<()> {
    let device = args.device.device()?;
    let encoder = SentenceEncoder::open(&args.model_dir, &device, args.max_seq_len)?;
    println!(
        "{}: {} tensors loaded, {} unused ({}) on {}",
        args.model_dir.display(),
        encoder.report.applied.len(),
        encoder.report.unused.len(),
        encoder.report.unused.join(", "),
        args.device
    );
    let embeddings = encoder.encode(&args.sentences, 32)?;
    for (i, (s, e)) in args.sentences.iter().zip(&embeddings).enumerate() {
        let head: Vec<String> = e
            .iter()
            .take(args.show_dims)
            .map(|v| format!("{v:.6}"))
            .collect();
        println!("[{i}] dim {} [{} …] {s}", e.len(), head.join(", "));
    }
    if embeddings.len() > 1 {
        println!("cosine similarities:");
        for i in 0..embeddings.len() {
            for j in i + 1..embeddings.len() {
                println!(
                    "  [{i}] vs [{j}]: {:.4}",
                    cosine(&embeddings[i], &embeddings[j])
                );
            }
        }
    }
    Ok(())
}
