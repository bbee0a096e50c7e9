//! A "model" of a chosen size with no architecture: ~10 tensors whose sizes add up to the
//! requested parameter count. For protocol and memory benchmarks (clients run `--train none`).

use crate::tensors::{NamedTensor, TensorSet, TensorSpec};

const TENSORS: u64 = 10;

/// Names and shapes: nine equal 2-D tensors and a tenth that takes the remainder.
pub fn specs(params: u64) -> Vec<TensorSpec> {
    let params = params.max(1);
    let per = params / TENSORS;
    let mut out = Vec::new();
    if per > 0 {
        // Roughly square-ish 2-D tensors, cols fixed so shapes look like real layers.
        let cols = (per as f64).sqrt().max(1.0) as u64;
        let rows = per / cols;
        for i in 0..TENSORS - 1 {
            out.push(TensorSpec {
                name: format!("layer{i}.weight"),
                shape: vec![rows as usize, cols as usize],
            });
        }
    }
    let used: u64 = out.iter().map(|s| s.num_elements() as u64).sum();
    out.push(TensorSpec {
        name: "head.weight".into(),
        shape: vec![(params - used) as usize],
    });
    out
}

/// Deterministic small values (no RNG cost at hundreds of millions of parameters).
pub fn init(params: u64) -> TensorSet {
    let tensors = specs(params)
        .into_iter()
        .map(|s| {
            let n = s.num_elements();
            let data = (0..n).map(|i| ((i % 1024) as f32 - 512.0) * 1e-5).collect();
            NamedTensor {
                name: s.name,
                shape: s.shape,
                data,
            }
        })
        .collect();
    TensorSet::new(tensors).expect("synthetic tensor names are distinct")
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_add_up() {
        for p in [1u64, 9, 10, 1_000, 1_234_567, 600_000_000] {
            let s = super::specs(p);
            assert_eq!(s.iter().map(|s| s.num_elements() as u64).sum::<u64>(), p);
            assert!(s.len() <= 10);
        }
    }
}
