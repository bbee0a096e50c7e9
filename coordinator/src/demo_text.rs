//! The text task of `demo`: all-MiniLM-L6-v2 fine-tuned with LoRA on Rotten Tomatoes sentences,
//! split IID across the clients (a sample per client, so the demo takes minutes on 2 cores).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::config::{ServeArgs, TextModelArgs};
use crate::demo::{DemoArgs, Plan, Recipe, serve_args};

fn cache(sub: &str) -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
        .join(".cache/fedtune")
        .join(sub)
}

/// The rows of a `text,label` CSV file the fetch script wrote (header dropped).
fn rows(path: &Path) -> anyhow::Result<Vec<csv::StringRecord>> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("cannot open {}", path.display()))?;
    reader
        .records()
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("cannot read {}", path.display()))
}

fn write(path: &Path, rows: &[csv::StringRecord]) -> anyhow::Result<()> {
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("cannot write {}", path.display()))?;
    w.write_record(["text", "label"])?;
    for r in rows {
        w.write_record(r)?;
    }
    w.flush()?;
    Ok(())
}

pub(crate) fn plan(args: &DemoArgs) -> anyhow::Result<Plan> {
    let data = args.data.clone().unwrap_or_else(|| cache("text-data"));
    let model_dir = args
        .init
        .clone()
        .unwrap_or_else(|| cache("pretrained/minilm"));
    let train_file = data.join("rt/train.csv");
    if !train_file.is_file() {
        bail!(
            "{} not found: run deploy/fetch-text-data.sh {} first (deploy/demo.sh --task text does)",
            train_file.display(),
            data.display()
        );
    }
    if !model_dir.join("config.json").is_file() {
        bail!(
            "{}: no Hugging Face model there: run deploy/fetch-pretrained.sh minilm first (deploy/demo.sh --task text does)",
            model_dir.display()
        );
    }
    let train = rows(&train_file)?;
    let mut test = rows(&data.join("rt/test.csv"))?;
    if args.eval_examples > 0 {
        test.truncate(args.eval_examples);
    }
    let dir = args.out.join("clients");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let eval = args.out.join("test.csv");
    write(&eval, &test)?;
    println!(
        "fedtune demo (text): Rotten Tomatoes from {}, MiniLM from {}, {} clients:",
        data.display(),
        model_dir.display(),
        args.clients
    );
    let mut client_data = Vec::new();
    for c in 0..args.clients {
        // IID: every client takes every `clients`-th sentence of the (shuffled) training set.
        let mut mine: Vec<csv::StringRecord> = train
            .iter()
            .skip(c)
            .step_by(args.clients)
            .cloned()
            .collect();
        if args.examples_per_client > 0 {
            mine.truncate(args.examples_per_client);
        }
        let path = dir.join(format!("client-{}.csv", c + 1));
        write(&path, &mine)?;
        let fresh = mine.iter().filter(|r| r.get(1) == Some("fresh")).count();
        println!(
            "  client-{}: {:>6} sentences ({fresh} fresh, {} rotten)",
            c + 1,
            mine.len(),
            mine.len() - fresh
        );
        client_data.push(path);
    }
    println!("  server-side evaluation: {} test sentences", test.len());
    let serve = ServeArgs {
        model: Some("bert".into()),
        init: Some(model_dir.clone()),
        text: TextModelArgs {
            labels: vec!["rotten".into(), "fresh".into()],
            max_seq_len: Some(64),
            lora_rank: Some(args.lora_rank),
            lora_mode: Some(args.lora_mode.clone()),
            ..Default::default()
        },
        eval_data: Some(eval),
        ..serve_args(
            args,
            Recipe {
                rounds: 3,
                local_epochs: 1,
                batch_size: 16,
                lr: 0.002,
            },
        )?
    };
    Ok(Plan {
        client_data,
        serve,
        client_flags: vec![
            "--tokenizer".into(),
            model_dir.join("tokenizer.json").display().to_string(),
        ],
        model_name: format!("all-MiniLM-L6-v2 + LoRA r={}", args.lora_rank),
    })
}
