//! `serve --upstream`: the settings of a tiered aggregator, a client of its parent coordinator
//! and a coordinator of its own clients. What to train and how comes from the parent's tasks,
//! so the flags that set it are refused here instead of being silently ignored.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use fedtune_client::tls::ClientSecurity;
use fedtune_client::upstream::UpstreamOptions;
use fedtune_settings::KitFile;

use super::ServeArgs;

/// Flags of an aggregator (command line only).
#[derive(Debug, Clone, Default, Args)]
pub struct UpstreamArgs {
    /// Run as a tiered aggregator under this parent coordinator (e.g.
    /// https://root.example.org:50051): fetch each round's model once, run the round among
    /// this coordinator's own clients, and send the parent one pre-aggregated update (their
    /// example-weighted mean and total examples). Model, training and strategy settings come
    /// from the parent [default: the --upstream-kit's URL; off without either].
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// A kit the parent provisioned for this aggregator (its client.toml: CA, certificate, key,
    /// name, URL).
    #[arg(long, value_name = "CLIENT_TOML")]
    pub upstream_kit: Option<PathBuf>,
    /// The CA that issued the parent's certificate (PEM) [default: the kit's].
    #[arg(long)]
    pub upstream_ca_cert: Option<PathBuf>,
    /// This aggregator's certificate for the parent's mutual TLS (PEM) [default: the kit's].
    #[arg(long)]
    pub upstream_cert: Option<PathBuf>,
    /// Its private key (PEM) [default: the kit's].
    #[arg(long)]
    pub upstream_key: Option<PathBuf>,
    /// Dial the parent over plaintext http:// (a parent serving --insecure): trusted local
    /// tests only.
    #[arg(long)]
    pub upstream_insecure: bool,
    /// This aggregator's name at the parent; under mutual TLS its certificate's name is used
    /// [default: the kit's, else the host name].
    #[arg(long)]
    pub upstream_name: Option<String>,
    /// Give up when the parent stays unreachable this long [default: 15m].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub upstream_give_up_after: Option<Duration>,
}

impl UpstreamArgs {
    /// Whether `serve` runs as an aggregator.
    pub fn is_set(&self) -> bool {
        self.upstream.is_some() || self.upstream_kit.is_some()
    }

    /// The parent's address and credentials, with flags over the kit; `serve`'s own flags
    /// checked for settings only the parent decides.
    pub fn resolve(&self, serve: &ServeArgs) -> anyhow::Result<UpstreamOptions> {
        let parents = parent_only_flags(serve);
        if !parents.is_empty() {
            bail!(
                "an aggregator (--upstream) trains what its parent coordinator says: {} {} set by the parent; remove {} here",
                parents.join(", "),
                if parents.len() == 1 { "is" } else { "are" },
                if parents.len() == 1 { "it" } else { "them" }
            );
        }
        let kit = match &self.upstream_kit {
            Some(path) => KitFile::read(path).context("--upstream-kit")?,
            None => KitFile::default(),
        };
        let coordinator = self.upstream.clone().or(kit.coordinator).context(
            "give the parent's URL with --upstream (or an --upstream-kit whose client.toml names it)",
        )?;
        let name =
            self.upstream_name.clone().or(kit.name).unwrap_or_else(|| {
                std::env::var("HOSTNAME").unwrap_or_else(|_| "aggregator".into())
            });
        Ok(UpstreamOptions {
            coordinator,
            security: ClientSecurity {
                insecure: self.upstream_insecure || kit.insecure,
                ca_cert: self.upstream_ca_cert.clone().or(kit.ca_cert),
                cert: self.upstream_cert.clone().or(kit.cert),
                key: self.upstream_key.clone().or(kit.key),
                server_name: kit.tls_server_name,
                token_file: kit.token_file,
            },
            name,
            give_up_after: self
                .upstream_give_up_after
                .unwrap_or(Duration::from_secs(15 * 60)),
        })
    }
}

/// The flags given that only a root coordinator may set (the model, the local recipe, the
/// strategy, privacy, the number of rounds, resuming).
fn parent_only_flags(a: &ServeArgs) -> Vec<&'static str> {
    let t = &a.text;
    let given = [
        ("--rounds", a.rounds.is_some()),
        ("--model", a.model.is_some()),
        ("--num-classes", a.num_classes.is_some()),
        ("--init", a.init.is_some()),
        ("--init-remap", !a.init_remap.is_empty()),
        ("--init-layout", a.init_layout.is_some()),
        ("--reset-head", a.reset_head),
        ("--export-pytorch", a.export_pytorch),
        ("--eval-data", a.eval_data.is_some()),
        ("--tokenizer", t.tokenizer.is_some()),
        ("--labels", !t.labels.is_empty()),
        ("--max-seq-len", t.max_seq_len.is_some()),
        ("--lora-rank", t.lora_rank.is_some()),
        ("--local-epochs", a.local_epochs.is_some()),
        ("--batch-size", a.batch_size.is_some()),
        ("--lr", a.lr.is_some()),
        ("--optimizer", a.optimizer.is_some()),
        ("--momentum", a.momentum.is_some()),
        ("--weight-decay", a.weight_decay.is_some()),
        ("--lr-schedule", a.lr_schedule.is_some()),
        ("--lr-round-decay", a.lr_round_decay.is_some()),
        ("--clip-norm", a.clip_norm.is_some()),
        ("--dropout", a.dropout.is_some()),
        ("--freeze", a.freeze.is_some()),
        ("--strategy", a.strategy.is_some()),
        ("--server-lr", a.server_lr.is_some()),
        ("--proximal-mu", a.proximal_mu.is_some()),
        ("--fraction-evaluate", a.fraction_evaluate.is_some()),
        ("--dp", a.privacy.dp.is_some()),
        ("--secure-aggregation", a.secure_agg.secure_aggregation),
        ("--resume", a.resume),
        ("--seed", a.seed.is_some()),
    ];
    given
        .into_iter()
        .filter_map(|(flag, set)| set.then_some(flag))
        .collect()
}
