//! Real pre-trained transformer, real text: all-MiniLM-L6-v2 computes the published
//! similarities in burn, and a federation fine-tunes it with LoRA over gRPC between real
//! processes on Rotten Tomatoes sentences.

use std::path::Path;
use std::time::Duration;

use burn::tensor::Device;
use fedtune_common::embed::SentenceEncoder;
use fedtune_common::models::{BertArch, LoraMode, LoraSpec, ModelSpec, hf_bert};
use fedtune_coordinator::hf_export::{self, HfSources};
use fedtune_tests::{
    Proc, client_args, free_port, head_csv, minilm_dir, minilm_reference, text_data_dir,
    transformers_python, workspace_root,
};

fedtune_tests::test_binaries!();

#[test]
fn minilm_gives_the_published_similarities_on_flex() {
    let Some(dir) = minilm_dir() else { return };
    let encoder = SentenceEncoder::open(&dir, &Device::flex(), 256).unwrap();
    // 101 encoder tensors; the pooler and the integer position ids are not used.
    assert_eq!(encoder.report.applied.len(), 101, "{:?}", encoder.report);
    assert_eq!(
        encoder.report.unused,
        [
            "embeddings.position_ids",
            "pooler.dense.bias",
            "pooler.dense.weight"
        ]
    );
    minilm_reference::check(|s| encoder.encode(s, 8).unwrap(), "flex");
}

#[test]
fn embed_command_prints_similarities_for_a_user_to_check() {
    let Some(dir) = minilm_dir() else { return };
    let out = std::process::Command::new(coordinator_bin())
        .args(["embed", "--model-dir", dir.to_str().unwrap()])
        .args(minilm_reference::QUICKSTART)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("[0] vs [1]: 0.666"), "{text}");
    assert!(
        text.contains("[0] vs [2]: 0.104") || text.contains("[0] vs [2]: 0.105"),
        "{text}"
    );
}

struct Federation {
    metrics: Vec<serde_json::Value>,
    coordinator: String,
    clients: Vec<String>,
}

/// One coordinator (MiniLM + `extra`) and one client per data file; waits for the end.
fn federate(
    dir: &Path,
    minilm: &Path,
    eval: &Path,
    data: &[(&Path, &[&str])],
    min_clients: usize,
    extra: &[&str],
) -> Federation {
    let port = free_port();
    let out = dir.join("out");
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--model",
        "bert",
        "--init",
        minilm.to_str().unwrap(),
        "--labels",
        "rotten,fresh",
        "--max-seq-len",
        "64",
        "--eval-data",
        eval.to_str().unwrap(),
        "--min-available-clients",
        &min_clients.to_string(),
        "--batch-size",
        "16",
        "--out",
        out.to_str().unwrap(),
        "--round-timeout",
        "5m",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut coordinator = Proc::spawn("coordinator", coordinator_bin(), &args, dir);
    let tokenizer = minilm.join("tokenizer.json");
    let mut clients: Vec<Proc> = data
        .iter()
        .enumerate()
        .map(|(i, (d, more))| {
            let mut flags = vec!["--tokenizer", tokenizer.to_str().unwrap()];
            flags.extend_from_slice(more);
            let args = client_args(port, d, &format!("site-{i}"), &flags);
            Proc::spawn(&format!("client{i}"), client_bin(), &args, dir)
        })
        .collect();
    let status = coordinator.wait(Duration::from_secs(600));
    assert!(
        status.is_some_and(|s| s.success()),
        "{}",
        coordinator.output()
    );
    for c in &mut clients {
        c.wait(Duration::from_secs(60));
    }
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    Federation {
        metrics: text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
        coordinator: coordinator.output(),
        clients: clients.iter().map(Proc::output).collect(),
    }
}

#[test]
fn lora_federation_learns_and_later_rounds_move_only_adapters_and_head() {
    let (Some(minilm), Some(data)) = (minilm_dir(), text_data_dir()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = head_csv(&data.join("rt/clients/client-0.csv"), 240, &d.join("a.csv"));
    let b = head_csv(&data.join("rt/clients/client-1.csv"), 240, &d.join("b.csv"));
    let test = head_csv(&data.join("rt/test.csv"), 200, &d.join("test.csv"));
    let run = federate(
        d,
        &minilm,
        &test,
        &[(&a, &[]), (&b, &[])],
        2,
        &[
            "--rounds",
            "2",
            "--lora-rank",
            "8",
            "--lora-dropout",
            "0.05",
            "--lr",
            "0.002",
            "--export-pytorch",
        ],
    );
    let m = &run.metrics;
    assert_eq!(m.len(), 2, "{}", run.coordinator);
    let acc = |r: &serde_json::Value| r["eval_accuracy"].as_f64().unwrap();
    // The majority class of these sentences is about 0.58; a random head sits near 0.5.
    assert!(
        acc(&m[1]) > 0.65,
        "accuracy after 2 rounds {}: {}",
        acc(&m[1]),
        run.coordinator
    );
    // LoRA r=8 on query and value of 6 layers plus a 2-class head: 74,498 floats per update.
    let update = 74_498 * 4;
    for r in m {
        assert_eq!(r["bytes_up"].as_u64().unwrap(), 2 * update, "{r}");
        assert!(r["bytes_up_full"].as_u64().unwrap() > 2 * 90_000_000, "{r}");
    }
    // Round 1 sends the frozen base once; round 2 only the adapters and the head.
    assert!(
        m[0]["bytes_down"].as_u64().unwrap() > 2 * 90_000_000,
        "{}",
        m[0]
    );
    assert_eq!(m[1]["bytes_down"].as_u64().unwrap(), 2 * update, "{}", m[1]);
    // Every round leaves a folder `transformers` loads, and the adapters as PEFT saves them.
    for f in [
        "hf-model/model.safetensors",
        "hf-model/config.json",
        "hf-model/tokenizer.json",
        "hf-adapter/adapter_model.safetensors",
        "hf-adapter/adapter_config.json",
    ] {
        assert!(d.join("out").join(f).is_file(), "{f}");
    }
    let adapter_config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(d.join("out/hf-adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(adapter_config["lora_dropout"], 0.05, "{adapter_config}");
    for c in &run.clients {
        // Once per run: the 216 training and 24 validation sentences, before round 1.
        assert_eq!(c.matches("tokenised 240 texts").count(), 1, "{c}");
    }
}

#[test]
fn a_client_with_a_wrong_column_or_an_unknown_label_is_told_and_the_round_goes_on() {
    let (Some(minilm), Some(data)) = (minilm_dir(), text_data_dir()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = head_csv(
        &data.join("rt/clients/client-0.csv"),
        64,
        &d.join("good.csv"),
    );
    let test = head_csv(&data.join("rt/test.csv"), 32, &d.join("test.csv"));
    let unknown = d.join("unknown.csv");
    std::fs::write(&unknown, "text,label\nfine film,fresh\nodd one,meh\n").unwrap();
    let run = federate(
        d,
        &minilm,
        &test,
        &[
            (&good, &[]),
            (&good, &["--text-column", "review"]),
            (&unknown, &[]),
        ],
        // The client with the wrong column never joins; the other two are selected.
        2,
        &[
            "--rounds",
            "1",
            "--lora-rank",
            "4",
            "--min-fit-clients",
            "1",
            "--grace-period",
            "20s",
        ],
    );
    assert_eq!(run.metrics.len(), 1, "{}", run.coordinator);
    assert!(
        run.clients[1].contains("no column named `review`")
            && run.clients[1].contains("--text-column"),
        "{}",
        run.clients[1]
    );
    assert!(
        run.clients[2].contains("line 3") && run.clients[2].contains("unknown label `meh`"),
        "{}",
        run.clients[2]
    );
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn exported_folders_load_in_transformers_and_peft_with_the_same_embeddings() {
    let (Some(minilm), Some(python)) = (minilm_dir(), transformers_python()) else {
        return;
    };
    // MiniLM with LoRA adapters that moved (b ≠ 0), as after some rounds.
    let arch = BertArch::from_hf_dir(&minilm).unwrap();
    // Dropout is a training setting: PEFT records it and computes without it at inference.
    let lora = LoraSpec::new(
        8,
        16.0,
        vec!["query".into(), "value".into()],
        LoraMode::FedIt,
    )
    .and_then(|l| l.with_dropout(0.1));
    let spec = ModelSpec::parse(&arch.to_string(), 2)
        .unwrap()
        .with_lora(Some(lora.unwrap()))
        .unwrap();
    let weights = hf_bert::weights_path(&minilm).unwrap();
    let (mut global, _) = hf_bert::load(&weights, &spec.init_weights(1).unwrap()).unwrap();
    for (name, values) in global.values_mut() {
        if name.ends_with(".lora.b") {
            for (i, v) in values.iter_mut().enumerate() {
                *v = ((i % 13) as f32 - 6.0) * 0.004;
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let sources = HfSources {
        model_dir: minilm.clone(),
        tokenizer: minilm.join("tokenizer.json"),
    };
    hf_export::write(dir.path(), &global, &spec, &sources, 1).unwrap();

    let sentences: Vec<String> = minilm_reference::QUICKSTART.map(String::from).to_vec();
    let model_dir = dir.path().join(hf_export::MODEL_DIR);
    let ours = SentenceEncoder::open(&model_dir, &Device::flex(), 256)
        .unwrap()
        .encode(&sentences, 8)
        .unwrap();
    let original = SentenceEncoder::open(&minilm, &Device::flex(), 256)
        .unwrap()
        .encode(&sentences, 8)
        .unwrap();
    assert!(
        max_diff(&ours, &original) > 1e-3,
        "the adapters must change the model"
    );

    let out = std::process::Command::new(python)
        .arg(workspace_root().join("deploy/check_hf_export.py"))
        .arg(&model_dir)
        .arg("--adapter")
        .arg(dir.path().join(hf_export::ADAPTER_DIR))
        .args(&sentences)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let read = |key: &str| -> Vec<Vec<f32>> { serde_json::from_value(json[key].clone()).unwrap() };
    let (theirs, peft) = (read("embeddings"), read("adapter_embeddings"));
    assert!(
        max_diff(&ours, &theirs) < 1e-4,
        "transformers: {}",
        max_diff(&ours, &theirs)
    );
    assert!(
        max_diff(&ours, &peft) < 1e-4,
        "peft: {}",
        max_diff(&ours, &peft)
    );
}
