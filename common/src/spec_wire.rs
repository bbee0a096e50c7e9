//! [`ModelSpec`] to and from its wire form. Beside [`crate::wire`], the only module of
//! `common` that sees protocol types. What arrives comes from a peer: every value is checked.

use fedtune_proto as pb;

use crate::models::{Input, LoraSpec, ModelError, ModelSpec, TextInput};

/// The most tokens a text model is asked to read (BERT-family position tables stop at 512;
/// larger would only allocate for nothing).
pub const MAX_SEQ_LEN: usize = 8192;

pub fn to_pb(spec: &ModelSpec) -> pb::ModelSpec {
    pb::ModelSpec {
        name: spec.kind.to_string(),
        num_classes: spec.num_classes,
        lora: spec.lora.as_ref().map(|l| pb::LoraSpec {
            rank: l.rank as u32,
            alpha: l.alpha,
            targets: l.targets.clone(),
            mode: l.mode.to_string(),
            dropout: l.dropout,
        }),
        text: spec.text.as_ref().map(|t| pb::TextInput {
            labels: t.labels.clone(),
            tokenizer_sha256: t.tokenizer_sha256.clone(),
            max_seq_len: t.max_seq_len as u32,
        }),
    }
}

pub fn from_pb(spec: &pb::ModelSpec) -> Result<ModelSpec, ModelError> {
    let lora = match &spec.lora {
        Some(l) => Some(
            LoraSpec::new(
                l.rank as usize,
                l.alpha,
                l.targets.clone(),
                l.mode.parse().map_err(ModelError::BadLora)?,
            )
            .and_then(|s| s.with_dropout(l.dropout))
            .map_err(ModelError::BadLora)?,
        ),
        None => None,
    };
    let mut out = ModelSpec::parse(&spec.name, spec.num_classes)?.with_lora(lora)?;
    if let Some(t) = &spec.text {
        let max_seq_len = t.max_seq_len as usize;
        if !(2..=MAX_SEQ_LEN).contains(&max_seq_len) {
            return Err(ModelError::BadBert(format!(
                "max sequence length {max_seq_len} is outside 2..={MAX_SEQ_LEN}"
            )));
        }
        if let Some(Input::Text { max_positions, .. }) = out.kind.input()
            && max_seq_len > max_positions
        {
            return Err(ModelError::BadBert(format!(
                "max sequence length {max_seq_len} exceeds the model's {max_positions} positions"
            )));
        }
        if !t.labels.is_empty() && t.labels.len() != spec.num_classes as usize {
            return Err(ModelError::BadBert(format!(
                "{} label names for {} classes",
                t.labels.len(),
                spec.num_classes
            )));
        }
        out.text = Some(TextInput {
            labels: t.labels.clone(),
            tokenizer_sha256: t.tokenizer_sha256.clone(),
            max_seq_len,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::LoraMode;

    #[test]
    fn a_text_spec_with_lora_round_trips() {
        let spec = ModelSpec::parse("bert:v100,h32,l2,a4,i64,p64,t2,eps1e-12", 2)
            .unwrap()
            .with_lora(Some(
                LoraSpec::new(4, 8.0, vec!["query".into(), "value".into()], LoraMode::Ffa)
                    .and_then(|l| l.with_dropout(0.1))
                    .unwrap(),
            ))
            .unwrap();
        let spec = ModelSpec {
            text: Some(TextInput {
                labels: vec!["neg".into(), "pos".into()],
                tokenizer_sha256: "ab".into(),
                max_seq_len: 64,
            }),
            ..spec
        };
        assert_eq!(from_pb(&to_pb(&spec)).unwrap(), spec);
        let mut bad = to_pb(&spec);
        bad.lora.as_mut().unwrap().rank = 0;
        assert!(from_pb(&bad).unwrap_err().to_string().contains("rank 0"));
        let mut bad = to_pb(&spec);
        bad.lora.as_mut().unwrap().dropout = 1.5;
        assert!(
            from_pb(&bad)
                .unwrap_err()
                .to_string()
                .contains("LoRA dropout 1.5")
        );
        let mut bad = to_pb(&spec);
        bad.text.as_mut().unwrap().max_seq_len = 65;
        assert!(
            from_pb(&bad)
                .unwrap_err()
                .to_string()
                .contains("64 positions")
        );
        let mut bad = to_pb(&spec);
        bad.text.as_mut().unwrap().labels.push("meh".into());
        assert!(
            from_pb(&bad)
                .unwrap_err()
                .to_string()
                .contains("3 label names")
        );
    }
}
