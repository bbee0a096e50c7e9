//! `--export-pytorch` for text models: every round, a Hugging Face model folder that
//! `transformers` loads as it is, and with LoRA the adapters alone as PEFT saves them.
//!
//! - `<out>/hf-model/`: `model.safetensors` (LoRA merged into the base, BERT names, PyTorch
//!   layout; the head as `classifier.*`, which `BertModel` ignores), `config.json` and
//!   `tokenizer.json` copied from the run's model folder.
//! - `<out>/hf-adapter/`: `adapter_model.safetensors` and `adapter_config.json` for the
//!   original checkpoint (`PeftModel.from_pretrained(BertModel.from_pretrained(base), dir)`).
//!
//! Each file is written to a temporary name and renamed, like every checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fedtune_common::checkpoint;
use fedtune_common::models::{ModelSpec, hf_bert, lora};
use fedtune_common::tensors::TensorSet;

pub const MODEL_DIR: &str = "hf-model";
pub const ADAPTER_DIR: &str = "hf-adapter";

/// Where the exported folders take their config and tokenizer from.
#[derive(Debug, Clone)]
pub struct HfSources {
    /// The `--init` folder (its `config.json`; named as the adapters' base model).
    pub model_dir: PathBuf,
    pub tokenizer: PathBuf,
}

fn copy_atomically(from: &Path, to: &Path) -> anyhow::Result<()> {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("cannot copy {} to {}", from.display(), tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("cannot write {}", to.display()))
}

fn write_json(value: &serde_json::Value, to: &Path) -> anyhow::Result<()> {
    let tmp = to.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("cannot write {}", to.display()))
}

/// Writes both folders under `out` for the global model `global` of round `round`.
pub fn write(
    out: &Path,
    global: &TensorSet,
    model: &ModelSpec,
    sources: &HfSources,
    round: u64,
) -> anyhow::Result<()> {
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("fedtune.round".to_string(), round.to_string()),
    ]);
    let dir = out.join(MODEL_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let merged = match &model.lora {
        Some(l) => lora::merge(global, l.scale()).map_err(anyhow::Error::msg)?,
        None => global.clone(),
    };
    let hf = hf_bert::to_hf(&merged).map_err(anyhow::Error::msg)?;
    checkpoint::save(&hf, meta.clone(), &dir.join("model.safetensors"))?;
    copy_atomically(
        &sources.model_dir.join("config.json"),
        &dir.join("config.json"),
    )?;
    copy_atomically(&sources.tokenizer, &dir.join("tokenizer.json"))?;
    if let Some(l) = &model.lora {
        let dir = out.join(ADAPTER_DIR);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let adapters = lora::to_peft(global).map_err(anyhow::Error::msg)?;
        checkpoint::save(&adapters, meta, &dir.join("adapter_model.safetensors"))?;
        let base = sources.model_dir.display().to_string();
        write_json(&l.peft_config(&base), &dir.join("adapter_config.json"))?;
    }
    Ok(())
}
