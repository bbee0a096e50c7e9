//! The model part of `serve` settings that needs more than a name: a Hugging Face BERT folder
//! (`--model bert --init DIR`), its tokenizer, the label names, and LoRA adapters.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use fedtune_common::data::TextTokenizer;
use fedtune_common::data::tokenizer::tokenizer_file;
use fedtune_common::models::{BertArch, Input, LoraMode, LoraSpec, ModelSpec, TextInput};
use fedtune_common::spec_wire::MAX_SEQ_LEN;

pub const DEFAULT_MAX_SEQ_LEN: usize = 128;

/// Flags for text models and adapters (TOML keys: the same with `_`).
#[derive(Debug, Clone, Default, Args)]
pub struct TextModelArgs {
    /// Text models: the tokenizer.json (or a folder holding one) every client must also hold
    /// [default: the --init folder's tokenizer.json].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Class names in class-number order, e.g. neg,pos: clients' label columns may hold these
    /// names (or the numbers); sets --num-classes [default: none: labels are numbers].
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Text models: truncate texts to this many tokens; batches pad to their longest text
    /// [default: 128].
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// LoRA adapters of this rank on the transformer; 0 = off (full fine-tuning or --freeze)
    /// [default: 0].
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA scaling numerator: adapters add (alpha / rank)·A·B [default: 2 × rank].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Projections that get adapters: query, key, value, attention_output, intermediate, output
    /// [default: query,value].
    #[arg(long, value_delimiter = ',')]
    pub lora_targets: Vec<String>,
    /// fedit: A and B train and are averaged (approximate); ffa: A fixed by the coordinator,
    /// only B trains and travels (exact averaging) [default: fedit].
    #[arg(long)]
    pub lora_mode: Option<String>,
    /// Probability of dropping each element of an adapter's input while training, as PEFT's
    /// lora_dropout; the frozen path is never dropped [default: 0].
    #[arg(long)]
    pub lora_dropout: Option<f64>,
}

/// The same keys from the TOML file.
#[derive(Debug, Clone, Default)]
pub struct TextModelFile {
    pub tokenizer: Option<PathBuf>,
    pub labels: Vec<String>,
    pub max_seq_len: Option<usize>,
    pub lora_rank: Option<usize>,
    pub lora_alpha: Option<f64>,
    pub lora_targets: Vec<String>,
    pub lora_mode: Option<String>,
    pub lora_dropout: Option<f64>,
}

/// What the model settings resolve to.
pub struct ResolvedModel {
    pub spec: ModelSpec,
    /// The tokenizer file of a text model.
    pub tokenizer: Option<PathBuf>,
    /// A Hugging Face folder to load (`--model bert --init DIR`).
    pub hf_dir: Option<PathBuf>,
}

/// Builds the model spec from its name, class count, init path and the text/LoRA settings.
pub fn resolve(
    name: &str,
    num_classes: Option<u32>,
    init: Option<&Path>,
    args: &TextModelArgs,
    file: &TextModelFile,
) -> anyhow::Result<ResolvedModel> {
    let labels = if args.labels.is_empty() {
        file.labels.clone()
    } else {
        args.labels.clone()
    };
    let labels: Vec<String> = labels.iter().map(|l| l.trim().to_string()).collect();
    if let Some(dup) = labels
        .iter()
        .enumerate()
        .find(|(i, l)| labels[..*i].contains(l) || l.is_empty())
    {
        bail!(
            "`labels`: `{}` is empty or given twice; list each class name once, e.g. --labels neg,pos",
            dup.1
        );
    }
    let num_classes = match (num_classes, labels.len()) {
        (Some(n), l) if l > 0 && n as usize != l => bail!(
            "`num_classes` is {n} but `labels` names {l} classes ({}); give one of them",
            labels.join(", ")
        ),
        (Some(n), _) => n,
        (None, 0) => 10,
        (None, l) => l as u32,
    };
    // `bert` alone takes its architecture from the init folder's config.json.
    let hf_dir = init.filter(|p| p.is_dir()).map(Path::to_path_buf);
    let name = match (name, &hf_dir) {
        ("bert", Some(dir)) => BertArch::from_hf_dir(dir)
            .map_err(anyhow::Error::msg)?
            .to_string(),
        _ => name.to_string(),
    };
    let spec = ModelSpec::parse(&name, num_classes).context("invalid `model` / `num_classes`")?;
    if hf_dir.is_some() && !spec.is_text() {
        bail!(
            "`init`: {} is a folder; a folder (Hugging Face) is for --model bert, other models take a safetensors or .pt file",
            init.map(|p| p.display().to_string()).unwrap_or_default()
        );
    }
    let rank = args.lora_rank.or(file.lora_rank).unwrap_or(0);
    let lora = if rank == 0 {
        None
    } else {
        let targets = if !args.lora_targets.is_empty() {
            args.lora_targets.clone()
        } else if !file.lora_targets.is_empty() {
            file.lora_targets.clone()
        } else {
            vec!["query".into(), "value".into()]
        };
        let mode: LoraMode = args
            .lora_mode
            .clone()
            .or(file.lora_mode.clone())
            .as_deref()
            .unwrap_or("fedit")
            .parse()
            .map_err(anyhow::Error::msg)
            .context("invalid `lora_mode`")?;
        let alpha = args
            .lora_alpha
            .or(file.lora_alpha)
            .unwrap_or(2.0 * rank as f64);
        let dropout = args.lora_dropout.or(file.lora_dropout).unwrap_or(0.0);
        Some(
            LoraSpec::new(rank, alpha, targets, mode)
                .and_then(|l| l.with_dropout(dropout))
                .map_err(anyhow::Error::msg)
                .context("invalid LoRA settings")?,
        )
    };
    let mut spec = spec.with_lora(lora).context("`lora_rank`")?;
    let mut tokenizer = None;
    if let Some(Input::Text {
        vocab_size,
        max_positions,
    }) = spec.kind.input()
    {
        let max_seq_len = args
            .max_seq_len
            .or(file.max_seq_len)
            .unwrap_or(DEFAULT_MAX_SEQ_LEN);
        if !(2..=MAX_SEQ_LEN.min(max_positions)).contains(&max_seq_len) {
            bail!(
                "`max_seq_len` {max_seq_len} must be in 2..={} (the model has {max_positions} positions)",
                MAX_SEQ_LEN.min(max_positions),
            );
        }
        let path = args
            .tokenizer
            .clone()
            .or(file.tokenizer.clone())
            .or(hf_dir.clone())
            .context(
                "a text model needs a tokenizer: give --tokenizer FILE (tokenizer.json) or --init DIR with a tokenizer.json",
            )?;
        let tok = TextTokenizer::open(&path, max_seq_len)?;
        tok.check_fits(vocab_size)?;
        spec.text = Some(TextInput {
            labels,
            tokenizer_sha256: tok.sha256().to_string(),
            max_seq_len,
        });
        tokenizer = Some(tokenizer_file(&path));
    } else if !labels.is_empty() {
        bail!(
            "`labels` name the classes of text data; model `{}` does not read text",
            spec.kind
        );
    }
    Ok(ResolvedModel {
        spec,
        tokenizer,
        hf_dir,
    })
}
