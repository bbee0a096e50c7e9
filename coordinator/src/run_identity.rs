//! What makes a run the same run: the settings that shape its model — the model and its
//! starting weights, what is frozen, the strategy, the clients' training recipe, privacy,
//! secure aggregation, the seed. They are written to `run.json` in the output folder when a
//! run starts; a later `serve` on that folder resumes only with the same ones, and otherwise
//! names each that changed. Settings that only say how to run (rounds, timeouts, the
//! address, TLS files, limits, evaluation, logging, the privacy budget, the secure-aggregation
//! step timeout) may change between a run and its resumption.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::config::ServeConfig;

pub const RUN_FILE: &str = "run.json";
const FORMAT: &str = "fedtune-run/1";

/// The settings of a run, by their config key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIdentity {
    settings: BTreeMap<String, String>,
}

/// `run.json` as written: the settings and a checksum over them, so a damaged file is told
/// apart from a changed configuration.
#[derive(Serialize, Deserialize)]
struct RunFile {
    format: String,
    settings: BTreeMap<String, String>,
    checksum: String,
}

impl RunIdentity {
    pub fn of(cfg: &ServeConfig) -> Self {
        let mut s = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            s.insert(k.to_string(), v);
        };
        let m = &cfg.model;
        put("model", m.kind.to_string());
        put("num_classes", m.num_classes.to_string());
        put(
            "lora",
            m.lora.as_ref().map_or("off".into(), ToString::to_string),
        );
        if let Some(text) = &m.text {
            put("tokenizer_sha256", text.tokenizer_sha256.clone());
            put("max_seq_len", text.max_seq_len.to_string());
            put("labels", text.labels.join(","));
        }
        let init = cfg.hf_init.as_ref().or(cfg.init.as_ref());
        put(
            "init",
            init.map_or("none (random weights)".into(), |p| p.display().to_string()),
        );
        put("init_options", format!("{:?}", cfg.init_options));
        put("freeze", cfg.frozen.join(","));
        let st = &cfg.strategy;
        put("strategy", st.kind.to_string());
        put("server_lr", st.server_lr.to_string());
        put("server_momentum", st.server_momentum.to_string());
        put("beta1", st.beta1.to_string());
        put("beta2", st.beta2.to_string());
        put("tau", st.tau.to_string());
        put("proximal_mu", st.proximal_mu.to_string());
        put("trim_fraction", st.trim_fraction.to_string());
        put("krum_f", st.krum_f.to_string());
        put("krum_m", st.krum_m.to_string());
        put("fraction_fit", st.fraction_fit.to_string());
        put("min_fit_clients", st.min_fit_clients.to_string());
        put("local_epochs", cfg.local_epochs.to_string());
        put("batch_size", cfg.batch_size.to_string());
        put("lr", cfg.lr.to_string());
        put("optimizer", format!("{:?}", cfg.optimizer));
        put("lr_schedule", format!("{:?}", cfg.lr_schedule));
        put("warmup_steps", cfg.warmup_steps.to_string());
        put("lr_round_decay", cfg.lr_round_decay.to_string());
        put("clip_norm", cfg.clip_norm.to_string());
        put("dropout", cfg.dropout.to_string());
        put("augment", format!("{:?}", cfg.augment));
        put("seed", cfg.seed.to_string());
        match &cfg.privacy {
            None => put("dp", "off".into()),
            Some(dp) => {
                put("dp", dp.mode.name().to_string());
                put("dp_clip", format!("{:?}", dp.clip));
                put("dp_noise_multiplier", dp.noise_multiplier.to_string());
                put("dp_sample_rate", dp.sample_rate.to_string());
                put("dp_delta", format!("{:?}", dp.delta));
            }
        }
        match &cfg.secure_agg {
            None => put("secure_aggregation", "off".into()),
            Some(sa) => {
                put("secure_aggregation", "on".into());
                put("secagg_threshold", format!("{:?}", sa.threshold));
                put("secagg_neighbours", format!("{:?}", sa.neighbours));
                put("secagg_clip", sa.quantizer.clip.to_string());
                put("secagg_bits", sa.quantizer.bits.to_string());
            }
        }
        Self { settings: s }
    }

    /// Each setting that differs, as `key: then → now`.
    pub fn changes(&self, now: &RunIdentity) -> Vec<String> {
        let keys: std::collections::BTreeSet<&String> =
            self.settings.keys().chain(now.settings.keys()).collect();
        let missing = "(not set)".to_string();
        keys.into_iter()
            .filter_map(|k| {
                let (a, b) = (
                    self.settings.get(k).unwrap_or(&missing),
                    now.settings.get(k).unwrap_or(&missing),
                );
                (a != b).then(|| format!("{k}: {a} → {b}"))
            })
            .collect()
    }

    /// Names this run to its clients (the key under which SCAFFOLD clients keep their control
    /// variate): the same across resumptions of the run in `out`, another for another run's
    /// settings or folder.
    pub fn federation_key(&self, out: &Path) -> String {
        let folder = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
        let text = serde_json::to_string(&self.settings).unwrap_or_default();
        format!(
            "{:016x}",
            xxhash_rust::xxh3::xxh3_64(format!("{}\n{text}", folder.display()).as_bytes())
        )
    }

    fn checksum(settings: &BTreeMap<String, String>) -> anyhow::Result<String> {
        let text = serde_json::to_string(settings)?;
        Ok(format!(
            "xxh3:{:016x}",
            xxhash_rust::xxh3::xxh3_64(text.as_bytes())
        ))
    }

    /// Writes `run.json` into `dir` atomically and durably.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join(RUN_FILE);
        let file = RunFile {
            format: FORMAT.into(),
            settings: self.settings.clone(),
            checksum: Self::checksum(&self.settings)?,
        };
        let tmp = dir.join(format!("{RUN_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            serde_json::to_writer_pretty(&mut f, &file)?;
            std::io::Write::write_all(&mut f, b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            fedtune_common::checkpoint::sync_parent(&path)
        };
        write().with_context(|| format!("cannot write {}", path.display()))
    }

    /// Reads `dir/run.json`: `None` when there is none; an error naming the file when it is
    /// damaged.
    pub fn read(dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = dir.join(RUN_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let file: RunFile = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is damaged (not the JSON fedtune writes)",
                path.display()
            )
        })?;
        if file.format != FORMAT {
            bail!(
                "{} is of format `{}`, this coordinator reads `{FORMAT}`",
                path.display(),
                file.format
            );
        }
        if Self::checksum(&file.settings)? != file.checksum {
            bail!(
                "{} is damaged: its settings do not match its checksum",
                path.display()
            );
        }
        Ok(Some(Self {
            settings: file.settings,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(pairs: &[(&str, &str)]) -> RunIdentity {
        RunIdentity {
            settings: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn changes_name_each_key_with_both_values() {
        let then = identity(&[("lr", "0.01"), ("strategy", "fedavg"), ("seed", "1")]);
        let now = identity(&[("lr", "0.02"), ("strategy", "fedavg"), ("dp", "local")]);
        assert_eq!(
            then.changes(&now),
            vec![
                "dp: (not set) → local",
                "lr: 0.01 → 0.02",
                "seed: 1 → (not set)"
            ]
        );
        assert!(then.changes(&then).is_empty());
    }

    #[test]
    fn written_identity_reads_back_and_a_edited_one_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let id = identity(&[("lr", "0.01"), ("model", "cnn")]);
        assert_eq!(RunIdentity::read(dir.path()).unwrap(), None);
        id.write(dir.path()).unwrap();
        assert_eq!(RunIdentity::read(dir.path()).unwrap(), Some(id));
        let path = dir.path().join(RUN_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("0.01", "0.02")).unwrap();
        let err = RunIdentity::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
        std::fs::write(&path, &text[..text.len() / 2]).unwrap();
        let err = format!("{:#}", RunIdentity::read(dir.path()).unwrap_err());
        assert!(err.contains("damaged"), "{err}");
    }
}
