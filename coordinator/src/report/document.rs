//! `report.md` and `report.html`: what the run was, the table of its rounds, and its charts
//! (the Markdown shows the PNGs, the HTML the SVGs; both next to the files they name).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

use super::Round;
use super::charts::Chart;
use crate::round_record::human_bytes;

/// The table's columns: heading, and the cell of a round.
type Column = (&'static str, fn(&Round) -> String);

fn pct(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.2}%", v * 100.0))
}

fn num(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.4}"))
}

const COLUMNS: [Column; 9] = [
    ("round", |r| r.round.to_string()),
    ("clients ok / selected", |r| {
        format!(
            "{} / {}",
            r.num("clients_reported").unwrap_or(0.0),
            r.num("clients_selected").unwrap_or(0.0)
        )
    }),
    ("train loss", |r| num(r.num("train_loss"))),
    ("eval accuracy", |r| pct(r.num("eval_accuracy"))),
    ("eval macro F1", |r| num(r.num("eval_f1"))),
    ("federated accuracy", |r| pct(r.num("fed_eval_accuracy"))),
    ("down", |r| {
        human_bytes(r.num("bytes_down").unwrap_or(0.0) as u64)
    }),
    ("up", |r| {
        human_bytes(r.num("bytes_up").unwrap_or(0.0) as u64)
    }),
    ("round time", |r| {
        format!("{:.2} s", r.num("round_ms").unwrap_or(0.0) / 1000.0)
    }),
];

/// `model mlp · strategy fedavg · …` from run.json's settings, when it is there.
fn describe(settings: Option<&Value>) -> String {
    let Some(s) = settings.and_then(|v| v.get("settings")) else {
        return String::new();
    };
    [
        "model",
        "strategy",
        "rounds",
        "local_epochs",
        "lr",
        "optimizer",
    ]
    .iter()
    .filter_map(|k| Some(format!("{k} {}", s.get(*k)?.as_str()?)))
    .collect::<Vec<_>>()
    .join(" · ")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn write(
    rounds: &[Round],
    charts: &[Chart],
    settings: Option<&Value>,
    run_dir: &Path,
    out: &Path,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let title = format!("fedtune run {}", run_dir.display());
    let about = describe(settings);
    let evaluated = rounds
        .iter()
        .rev()
        .find_map(|r| Some((r.round, r.num("eval_accuracy")?)));

    let mut md = format!("# {title}\n\n");
    if !about.is_empty() {
        md += &format!("{about}\n\n");
    }
    if let Some((round, acc)) = evaluated {
        md += &format!(
            "{} rounds; accuracy after round {round}: {}.\n\n",
            rounds.len(),
            pct(Some(acc))
        );
    }
    md += &format!(
        "| {} |\n|{}\n",
        COLUMNS.map(|c| c.0).join(" | "),
        "---|".repeat(COLUMNS.len())
    );
    for r in rounds {
        md += &format!("| {} |\n", COLUMNS.map(|c| (c.1)(r)).join(" | "));
    }
    for c in charts {
        let _ = write!(md, "\n## {}\n\n![{}]({})\n", c.title, c.title, c.png());
    }

    let mut html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}img{{max-width:100%}}</style></head><body>\n<h1>{}</h1>\n",
        escape(&title),
        escape(&title)
    );
    if !about.is_empty() {
        let _ = writeln!(html, "<p>{}</p>", escape(&about));
    }
    html += "<table>\n<tr>";
    for c in COLUMNS {
        let _ = write!(html, "<th>{}</th>", escape(c.0));
    }
    html += "</tr>\n";
    for r in rounds {
        html += "<tr>";
        for c in COLUMNS {
            let _ = write!(html, "<td>{}</td>", escape(&(c.1)(r)));
        }
        html += "</tr>\n";
    }
    html += "</table>\n";
    for c in charts {
        let _ = writeln!(
            html,
            "<h2>{}</h2>\n<img src=\"{}\" alt=\"{}\">",
            escape(c.title),
            c.svg(),
            escape(c.title)
        );
    }
    html += "</body></html>\n";

    let (html_path, md_path) = (out.join("report.html"), out.join("report.md"));
    std::fs::write(&html_path, html)
        .with_context(|| format!("cannot write {}", html_path.display()))?;
    std::fs::write(&md_path, md).with_context(|| format!("cannot write {}", md_path.display()))?;
    Ok((html_path, md_path))
}
