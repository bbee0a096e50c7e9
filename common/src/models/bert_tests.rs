//! BERT and LoRA on a tiny random BERT (no files needed): names, loading, adapters, merging,
//! and what travels.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use super::*;
use crate::checkpoint;
use crate::data::{Examples, TokenizedText};
use crate::optim::OptimizerSettings;
use crate::tensors::TensorSet;
use crate::train::{self, OptimizerKind, TrainSettings};

const TINY: &str = "bert:v50,h16,l2,a4,i32,p16,t2,eps1e-12";

fn lora(mode: LoraMode) -> LoraSpec {
    LoraSpec::new(4, 8.0, vec!["query".into(), "value".into()], mode).unwrap()
}

fn spec(lora: Option<LoraSpec>) -> ModelSpec {
    ModelSpec::parse(TINY, 3).unwrap().with_lora(lora).unwrap()
}

/// A batch of three token sequences of different lengths (padding masked).
fn batch(device: &Device) -> (Tensor<2, Int>, Tensor<2, Bool>) {
    let ids = vec![1i64, 5, 7, 9, 2, 1, 3, 2, 0, 0, 1, 44, 11, 2, 0];
    let pad: Vec<bool> = ids.iter().map(|&v| v == 0).collect();
    (
        Tensor::from_data(TensorData::new(ids, [3, 5]), device),
        Tensor::from_data(TensorData::new(pad, [3, 5]), device),
    )
}

fn logits(net: &Model, device: &Device) -> Vec<f32> {
    let (ids, padding) = batch(device);
    net.valid()
        .forward(ModelInput::Tokens { ids, padding })
        .unwrap()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

/// A model of `spec` with the weights `set`, on flex.
fn with_weights(spec: &ModelSpec, set: &TensorSet) -> Model {
    spec.build(&Device::flex()).unwrap().inject(set).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn hugging_face_export_loads_back_bit_identically() {
    let plain = spec(None);
    let weights = plain.init_weights(7).unwrap();
    let hf = hf_bert::to_hf(&weights).unwrap();
    assert!(
        hf.get("encoder.layer.1.attention.self.query.weight")
            .is_some()
    );
    // Linear weights travel as PyTorch's [out, in].
    assert_eq!(
        hf.get("encoder.layer.0.intermediate.dense.weight")
            .unwrap()
            .shape,
        [32, 16]
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    checkpoint::save(&hf, Default::default(), &path).unwrap();
    let fresh = plain.init_weights(8).unwrap();
    let (loaded, report) = hf_bert::load(&path, &fresh).unwrap();
    assert_eq!(loaded, weights);
    assert!(
        report.missing.is_empty() && report.unused.is_empty(),
        "{report:?}"
    );
    assert_eq!(report.applied.len(), weights.len());
}

#[test]
fn a_checkpoint_that_is_not_bert_or_does_not_fit_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let init = spec(None).init_weights(1).unwrap();
    // An image model's file.
    let cnn = ModelSpec::parse("cnn", 10)
        .unwrap()
        .init_weights(1)
        .unwrap();
    checkpoint::save(&cnn, Default::default(), &path).unwrap();
    let e = hf_bert::load(&path, &init).unwrap_err().to_string();
    assert!(
        e.contains("not a BERT checkpoint") && e.contains("conv1.bias"),
        "{e}"
    );
    // A BERT of another width.
    let wide = ModelSpec::parse("bert:v50,h32,l2,a4,i32,p16,t2,eps1e-12", 3)
        .unwrap()
        .init_weights(1)
        .unwrap();
    checkpoint::save(&hf_bert::to_hf(&wide).unwrap(), Default::default(), &path).unwrap();
    let e = hf_bert::load(&path, &init).unwrap_err().to_string();
    assert!(e.contains("has shape") && e.contains("config.json"), "{e}");
    // A BERT with a layer missing.
    let hf = hf_bert::to_hf(&init).unwrap();
    let short = hf.select(|n| !n.starts_with("encoder.layer.1."));
    checkpoint::save(&short, Default::default(), &path).unwrap();
    let e = hf_bert::load(&path, &init).unwrap_err().to_string();
    assert!(
        e.contains("missing") && e.contains("encoder.layer.1."),
        "{e}"
    );
}

#[test]
fn adding_lora_leaves_the_logits_bit_identical() {
    let device = Device::flex();
    let base = spec(None).init_weights(3).unwrap();
    let before = logits(&with_weights(&spec(None), &base), &device);
    let adapted = spec(Some(lora(LoraMode::FedIt)));
    // The adapted model's weights: the same base, fresh factors (b = 0).
    let fresh = adapted.init_weights(4).unwrap();
    let set = TensorSet::new(
        fresh
            .tensors()
            .iter()
            .map(|t| base.get(&t.name).cloned().unwrap_or_else(|| t.clone()))
            .collect(),
    )
    .unwrap();
    assert!(
        set.get("bert.encoder.layers.0.attention.query.lora.a")
            .is_some()
    );
    let after = logits(&with_weights(&adapted, &set), &device);
    assert_eq!(
        before.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        after.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}

fn tiny_text() -> TokenizedText {
    TokenizedText {
        ids: (0..12)
            .map(|i| vec![1, 3 + i as u32 % 40, 10 + (i * 7) as u32 % 30, 2])
            .collect(),
        labels: (0..12).map(|i| (i % 3) as u8).collect(),
        pad_id: 0,
        source: "tiny".into(),
    }
}

/// Two Adam steps (full batch) of `spec` from `start` on the tiny text; returns the new
/// weights. (In the first step only `b` and the head get gradients: `b` starts at zero.)
fn two_steps(spec: &ModelSpec, start: &TensorSet) -> TensorSet {
    let device = Device::flex().autodiff();
    let model = spec
        .build_with_dropout(&device, 0.0)
        .unwrap()
        .inject(start)
        .unwrap();
    let data = tiny_text();
    let settings = TrainSettings {
        batch_size: data.len(),
        epochs: 2,
        lr: 1e-2,
        optimizer: OptimizerSettings {
            kind: OptimizerKind::Adam,
            ..Default::default()
        },
        frozen: spec.lora_frozen(),
        ..Default::default()
    };
    let idx: Vec<usize> = (0..data.len()).collect();
    let out = train::train(model, &data, &idx, &[], &settings, &device, &mut |_| {}).unwrap();
    out.model.extract().unwrap()
}

#[test]
fn lora_steps_move_only_adapters_and_head() {
    for mode in [LoraMode::FedIt, LoraMode::Ffa] {
        let s = spec(Some(lora(mode)));
        let start = s.init_weights(5).unwrap();
        let after = two_steps(&s, &start);
        for t in start.tensors() {
            let moved = after.get(&t.name).unwrap().data != t.data;
            assert_eq!(
                moved,
                s.lora.as_ref().unwrap().is_trainable(&t.name),
                "{mode}: {}",
                t.name
            );
        }
    }
}

#[test]
fn merged_model_computes_what_the_adapted_one_does() {
    let device = Device::flex();
    let s = spec(Some(lora(LoraMode::FedIt)));
    let trained = two_steps(&s, &s.init_weights(6).unwrap());
    let adapted = logits(&with_weights(&s, &trained), &device);
    let merged = lora::merge(&trained, s.lora.as_ref().unwrap().scale()).unwrap();
    let plain = logits(&with_weights(&spec(None), &merged), &device);
    assert!(
        max_diff(&adapted, &plain) < 1e-5,
        "{}",
        max_diff(&adapted, &plain)
    );
    assert!(adapted.iter().any(|v| v.abs() > 1e-3));
}

#[test]
fn ffa_averaging_is_exact_and_fedit_is_not() {
    let s = spec(Some(lora(LoraMode::Ffa)));
    let scale = s.lora.as_ref().unwrap().scale();
    let start = s.init_weights(9).unwrap();
    // Two clients' results: the same a (FFA), different b.
    let client = |seed: f32, move_a: bool| {
        let mut set = start.clone();
        for (name, values) in set.values_mut() {
            if name.ends_with(".lora.b") || (move_a && name.ends_with(".lora.a")) {
                for (i, v) in values.iter_mut().enumerate() {
                    *v += seed * ((i % 7) as f32 - 3.0) * 0.01;
                }
            }
        }
        set
    };
    let mean = |x: &TensorSet, y: &TensorSet| {
        let mut m = x.clone();
        m.add_scaled(&y.delta_from(x).unwrap(), 0.5).unwrap();
        m
    };
    let name = "bert.encoder.layers.0.attention.query.weight";
    for (move_a, exact) in [(false, true), (true, false)] {
        let (c1, c2) = (client(1.0, move_a), client(-2.0, move_a));
        let averaged_then_merged = lora::merge(&mean(&c1, &c2), scale).unwrap();
        let merged_then_averaged = mean(
            &lora::merge(&c1, scale).unwrap(),
            &lora::merge(&c2, scale).unwrap(),
        );
        let gap = max_diff(
            &averaged_then_merged.get(name).unwrap().data,
            &merged_then_averaged.get(name).unwrap().data,
        );
        if exact {
            assert!(gap < 1e-6, "FFA: mean(a·b_k) = a·mean(b_k), off by {gap}");
        } else {
            assert!(gap > 1e-6, "FedIT averages a and b separately: approximate");
        }
    }
}

#[test]
fn lora_sends_only_adapters_and_head_computed_from_the_shapes() {
    // all-MiniLM-L6-v2's architecture, r = 8 on query and value, 2 classes.
    let minilm = "bert:v30522,h384,l6,a12,i1536,p512,t2,eps1e-12";
    let bytes = |mode: Option<LoraMode>| {
        let s =
            ModelSpec::parse(minilm, 2)
                .unwrap()
                .with_lora(mode.map(|m| {
                    LoraSpec::new(8, 16.0, vec!["query".into(), "value".into()], m).unwrap()
                }))
                .unwrap();
        let frozen = s.lora_frozen();
        s.specs()
            .iter()
            .filter(|t| !frozen.contains(&t.name))
            .map(|t| t.num_elements() * 4)
            .sum::<usize>()
    };
    // Per layer: q and v each a [384, 8] + b [8, 384]; head [384, 2] + [2].
    let adapters = 6 * 2 * (384 * 8 + 8 * 384);
    let head = 384 * 2 + 2;
    assert_eq!(bytes(Some(LoraMode::FedIt)), (adapters + head) * 4);
    assert_eq!(bytes(Some(LoraMode::FedIt)), 297_992);
    assert_eq!(bytes(Some(LoraMode::Ffa)), (adapters / 2 + head) * 4);
    assert_eq!(bytes(Some(LoraMode::Ffa)), 150_536);
    // Full fine-tuning sends the whole encoder (MiniLM without its pooler) and the head.
    assert_eq!(bytes(None), 90_261_504 + head * 4);
}

#[test]
fn text_batches_pad_to_the_longest_and_mask_it() {
    let data = TokenizedText {
        ids: vec![vec![1, 5, 2], vec![1, 2], vec![1, 7, 8, 9, 2]],
        labels: vec![0, 1, 0],
        pad_id: 0,
        source: "t".into(),
    };
    let device = Device::flex();
    let (input, labels) = data.batch(&[0, 1], &device, None);
    let ModelInput::Tokens { ids, padding } = input else {
        panic!("text gives tokens");
    };
    assert_eq!(ids.dims(), [2, 3], "padded to the longest in the batch");
    assert_eq!(
        ids.into_data().iter::<i64>().collect::<Vec<_>>(),
        [1, 5, 2, 1, 2, 0]
    );
    assert_eq!(
        padding.into_data().iter::<bool>().collect::<Vec<_>>(),
        [false, false, false, false, false, true]
    );
    assert_eq!(labels.into_data().iter::<i64>().collect::<Vec<_>>(), [0, 1]);
}

/// BERT drops out the embeddings, the attention probabilities and each sub-layer's output;
/// LoRA dropout drops only the adapters' inputs, at its own probability.
#[test]
fn training_dropouts_are_berts_and_peft_s() {
    let adapted = spec(Some(lora(LoraMode::FedIt).with_dropout(0.05).unwrap()));
    let net = TextClassifier::build(&adapted, &Device::flex(), 0.1).unwrap();
    assert_eq!(net.bert.embeddings.dropout.prob, 0.1);
    for layer in &net.bert.encoder.layers {
        assert_eq!(layer.attention.dropout.prob, 0.1);
        assert_eq!(layer.dropout.prob, 0.1);
        let adapter = |p: &LoraLinear| p.lora.as_ref().map(|l| l.dropout.prob);
        assert_eq!(adapter(&layer.attention.query), Some(0.05));
        assert_eq!(adapter(&layer.attention.value), Some(0.05));
        assert_eq!(adapter(&layer.attention.key), None, "not a target");
        assert_eq!(adapter(&layer.intermediate), None, "not a target");
    }
}
