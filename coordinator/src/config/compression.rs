//! The update-compression part of `serve` settings (`--compress-up`, `--compress-down`): how
//! updates and broadcasts travel, announced in every task so that clients comply.

use anyhow::{Context, bail};
use clap::Args;
use fedtune_common::codec::Codec;

/// Flags for compression (TOML keys: the same with `_`).
#[derive(Debug, Clone, Default, Args)]
pub struct CompressionArgs {
    /// How clients encode their updates: fp32 (none), fp16, bf16, int8 (one scale per chunk of
    /// 262,144 values) or topk:FRACTION (the largest FRACTION of each chunk's values, with their
    /// positions; each client keeps what it did not send and adds it to its next update). The
    /// coordinator decodes each chunk as it arrives; an update encoded otherwise is refused
    /// [default: fp32].
    #[arg(long, value_name = "CODEC")]
    pub compress_up: Option<String>,
    /// How the global model is sent to clients: fp32, fp16 or bf16. Clients train from the
    /// rounded model; the coordinator keeps and checkpoints it in f32 [default: fp32].
    #[arg(long, value_name = "CODEC")]
    pub compress_down: Option<String>,
}

/// Validated compression settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Compression {
    pub up: Codec,
    pub down: Codec,
}

impl Default for Compression {
    fn default() -> Self {
        Self {
            up: Codec::F32,
            down: Codec::F32,
        }
    }
}

/// Flags over the file (`compress_up`, `compress_down`).
pub fn resolve(
    args: &CompressionArgs,
    file_up: Option<&str>,
    file_down: Option<&str>,
    secure_aggregation: bool,
) -> anyhow::Result<Compression> {
    let parse = |flag: &Option<String>, file: Option<&str>, key: &str| -> anyhow::Result<Codec> {
        match flag.as_deref().or(file) {
            Some(text) => text
                .parse::<Codec>()
                .with_context(|| format!("invalid `{key}`")),
            None => Ok(Codec::F32),
        }
    };
    let up = parse(&args.compress_up, file_up, "compress_up")?;
    let down = parse(&args.compress_down, file_down, "compress_down")?;
    if !matches!(down, Codec::F32 | Codec::F16 | Codec::Bf16) {
        bail!(
            "invalid `compress_down`: `{down}` is for updates; the global model travels as fp32, fp16 or bf16 (int8 and top-k lose too much of a model, as opposed to a delta)"
        );
    }
    if secure_aggregation && up != Codec::F32 {
        bail!(
            "--compress-up {up} cannot combine with --secure-aggregation: masked updates are already quantised words that only their sum decodes; use --secagg-bits for fewer bits per value"
        );
    }
    Ok(Compression { up, down })
}
