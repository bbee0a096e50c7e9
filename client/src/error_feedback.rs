//! How a client encodes its update for the wire, as the task asks (`TrainTask.upload`), and
//! top-k's error feedback: the values a top-k update did not send are kept and added to the
//! next round's update, so that every coordinate eventually counts (Stich et al. 2018;
//! Karimireddy et al. 2019). What is kept changes only once the coordinator has counted the
//! update that left it behind.

use anyhow::{Context, bail};
use fedtune_common::codec::Codec;
use fedtune_common::tensors::TensorSet;
use fedtune_common::wire::{Assembler, EncodedTensors, MAX_CHUNK_BYTES};
use tracing::info;

/// What top-k left unsent, across rounds.
#[derive(Default)]
pub struct ErrorFeedback {
    residual: Option<TensorSet>,
}

/// An update encoded for upload, and what top-k leaves behind if it is counted.
pub struct EncodedUpdate {
    pub encoded: EncodedTensors,
    pub codec: Codec,
    left_behind: Option<TensorSet>,
}

impl ErrorFeedback {
    /// Encodes `delta` with `codec` for model version `version`. Top-k adds what earlier rounds
    /// left unsent (when it has the same tensors) before choosing what to send.
    pub fn encode(
        &self,
        mut delta: TensorSet,
        codec: Codec,
        version: u64,
        who: &str,
    ) -> anyhow::Result<EncodedUpdate> {
        if codec == Codec::F32 {
            // The chunks are views of the delta itself: no second model-sized copy.
            let encoded = EncodedTensors::share(
                &std::sync::Arc::new(delta),
                |_| true,
                version,
                MAX_CHUNK_BYTES,
            )?;
            return Ok(EncodedUpdate {
                encoded,
                codec,
                left_behind: None,
            });
        }
        for t in delta.tensors() {
            if let Some((i, v)) = codec.cannot_carry(&t.data) {
                bail!(
                    "the update's value {v} (tensor `{}`, index {i}) is beyond what {codec} carries (±65504); the coordinator's --compress-up {codec} cannot send it: use bf16, or a lower learning rate",
                    t.name
                );
            }
        }
        let top_k = matches!(codec, Codec::TopK(_));
        if top_k && let Some(residual) = &self.residual {
            if residual.check_matches(&delta.specs()).is_ok() {
                delta
                    .add_scaled(residual, 1.0)
                    .context("adding the values earlier rounds left unsent")?;
            } else {
                info!(
                    "{who}: the model's tensors changed; the values top-k left unsent earlier are dropped"
                );
            }
        }
        let encoded = EncodedTensors::compress(&delta, |_| true, codec, version, MAX_CHUNK_BYTES)?;
        let left_behind = if top_k {
            // What the coordinator will hold, decoded as it decodes it.
            let sent = decode(&encoded)?;
            let mut left = delta;
            left.add_scaled(&sent, -1.0)?;
            Some(left)
        } else {
            None
        };
        Ok(EncodedUpdate {
            encoded,
            codec,
            left_behind,
        })
    }

    /// The coordinator counted `update`: what it left unsent is carried to the next round.
    pub fn counted(&mut self, update: EncodedUpdate) {
        self.residual = update.left_behind;
    }

    /// The norm of what is carried to the next round (0 when nothing is).
    pub fn carried_norm(&self) -> f64 {
        self.residual.as_ref().map_or(0.0, |r| {
            r.tensors()
                .iter()
                .flat_map(|t| &t.data)
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt()
        })
    }
}

/// Decodes an encoded payload as a receiver does.
fn decode(encoded: &EncodedTensors) -> anyhow::Result<TensorSet> {
    let mut asm = Assembler::new(encoded.manifest.clone(), u64::MAX)?;
    for c in &encoded.chunks {
        asm.push(c)?;
    }
    Ok(asm.finish()?.into_tensor_set()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedtune_common::tensors::NamedTensor;

    fn set(values: &[f32]) -> TensorSet {
        TensorSet::new(vec![
            NamedTensor::new("w", vec![values.len()], values.to_vec()).unwrap(),
        ])
        .unwrap()
    }

    fn sent(u: &EncodedUpdate) -> Vec<f32> {
        decode(&u.encoded).unwrap().tensors()[0].data.clone()
    }

    /// A quarter of 8 values (2 a round) under top-k.
    const CODEC: Codec = Codec::TopK(0.25);

    /// Error feedback after one counted round that sent 5 and -4 of
    /// [5, 1, -4, 0.5, 3, 0, 2, 0.1].
    fn after_one_round() -> ErrorFeedback {
        let mut ef = ErrorFeedback::default();
        let first = ef
            .encode(
                set(&[5.0, 1.0, -4.0, 0.5, 3.0, 0.0, 2.0, 0.1]),
                CODEC,
                1,
                "t",
            )
            .unwrap();
        assert_eq!(sent(&first), [5.0, 0.0, -4.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        ef.counted(first);
        ef
    }

    #[test]
    fn top_k_sends_over_two_rounds_what_one_round_left_behind() {
        let mut ef = after_one_round();
        let codec = CODEC;
        // The next update is small: what was left behind (3 and 2) goes first.
        let second = ef.encode(set(&[0.0; 8]), codec, 2, "t").unwrap();
        assert_eq!(sent(&second), [0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 2.0, 0.0]);
        ef.counted(second);
        let third = ef.encode(set(&[0.0; 8]), codec, 3, "t").unwrap();
        assert_eq!(sent(&third), [0.0, 1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn an_update_not_counted_leaves_what_is_carried_unchanged() {
        let ef = after_one_round();
        let codec = CODEC;
        let carried = ef.carried_norm();
        // Encoded but refused by the coordinator: never passed to `counted`.
        let _refused = ef.encode(set(&[9.0; 8]), codec, 2, "t").unwrap();
        assert_eq!(ef.carried_norm(), carried);
        let expected = (1.0f64 + 0.25 + 9.0 + 4.0 + 0.01).sqrt();
        assert!((carried - expected).abs() < 1e-6, "{carried} vs {expected}");
    }

    #[test]
    fn what_was_left_behind_is_dropped_when_the_tensors_change() {
        let ef = after_one_round();
        let other = ef.encode(set(&[0.0; 6]), CODEC, 2, "t").unwrap();
        assert_eq!(sent(&other), [0.0; 6]);
    }

    #[test]
    fn fp16_refuses_a_value_beyond_its_range_naming_it() {
        let ef = ErrorFeedback::default();
        let e = ef
            .encode(set(&[1.0, 1e6]), Codec::F16, 1, "t")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("1000000") && e.contains("tensor `w`, index 1") && e.contains("bf16"),
            "{e}"
        );
    }
}
