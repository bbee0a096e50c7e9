//! `fedtune-coordinator report RUN_DIR`: a run's rounds as pictures and a document, from its
//! `metrics.jsonl` — charts in PNG and SVG ([`charts`], plotters with an embedded DejaVu font,
//! so no system fonts are needed) and `report.html` / `report.md` with the table of rounds
//! ([`document`]).

mod charts;
mod document;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;

/// One round of `metrics.jsonl`, as the report reads it (fields a round did not record are
/// `None`).
#[derive(Debug, Clone)]
pub struct Round {
    pub round: u64,
    fields: Value,
}

impl Round {
    /// A numeric field of the round, if it recorded one.
    pub fn num(&self, key: &str) -> Option<f64> {
        self.fields.get(key)?.as_f64().filter(|v| v.is_finite())
    }

    /// The server-side evaluation's figure (`eval_*` when `eval_source` is `server`).
    pub fn server(&self, key: &str) -> Option<f64> {
        (self.fields.get("eval_source")?.as_str()? == "server")
            .then(|| self.num(key))
            .flatten()
    }

    /// The clients' own validation figure (`eval_*` without `--eval-data`).
    pub fn clients(&self, key: &str) -> Option<f64> {
        (self.fields.get("eval_source")?.as_str()? == "clients")
            .then(|| self.num(key))
            .flatten()
    }
}

/// The rounds of `RUN_DIR/metrics.jsonl`, in order; a damaged line (e.g. the torn last line of
/// a killed run) is skipped with a warning naming it.
pub fn read_rounds(run_dir: &Path) -> anyhow::Result<Vec<Round>> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {}: give the --out folder of a run (it holds metrics.jsonl)",
            path.display()
        )
    })?;
    let mut rounds = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let parsed: Option<Value> = serde_json::from_str(line).ok();
        match parsed.as_ref().and_then(|v| v.get("round")?.as_u64()) {
            Some(round) => rounds.push(Round {
                round,
                fields: parsed.unwrap_or_default(),
            }),
            None => tracing::warn!(
                "{} line {}: not a round record; left out of the report",
                path.display(),
                i + 1
            ),
        }
    }
    if rounds.is_empty() {
        bail!(
            "{} holds no completed round yet: a report needs at least one",
            path.display()
        );
    }
    Ok(rounds)
}

/// What a report wrote.
#[derive(Debug)]
pub struct Written {
    pub html: PathBuf,
    pub markdown: PathBuf,
    pub charts: Vec<PathBuf>,
}

/// Writes the charts, `report.html` and `report.md` for the run in `run_dir` into `out`.
pub fn write(run_dir: &Path, out: &Path) -> anyhow::Result<Written> {
    let rounds = read_rounds(run_dir)?;
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the report folder {}", out.display()))?;
    let drawn = charts::draw_all(&rounds, out)?;
    let settings = std::fs::read_to_string(run_dir.join("run.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok());
    let (html, markdown) = document::write(&rounds, &drawn, settings.as_ref(), run_dir, out)?;
    Ok(Written {
        html,
        markdown,
        charts: drawn
            .iter()
            .flat_map(|c| [out.join(c.png()), out.join(c.svg())])
            .collect(),
    })
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// A run's output folder (`serve --out`): its metrics.jsonl.
    pub run_dir: PathBuf,
    /// Where to write the report [default: RUN_DIR/report].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let out = args.out.unwrap_or_else(|| args.run_dir.join("report"));
    let written = write(&args.run_dir, &out)?;
    println!(
        "report: {} ({} charts, PNG and SVG; also {})",
        written.html.display(),
        written.charts.len() / 2,
        written.markdown.display()
    );
    Ok(())
}
