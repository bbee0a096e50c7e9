//! A verified update read in blocks, wherever it is kept: in memory ([`Payload`]) or staged on
//! disk while it arrived. Aggregators fold block by block, so an update never has to be in
//! memory whole; and the finite check runs over the bytes as they stream in.

use crate::tensors::{TensorError, TensorSpec};
use crate::wire::{Payload, decode_le};

/// Little-endian f32 tensors in manifest order, visited in blocks.
pub trait Blocks {
    /// The tensors, in the order their bytes come.
    fn specs(&self) -> &[TensorSpec];

    /// Calls `f(tensor, first element, bytes)` for consecutive blocks of each tensor, in
    /// order; every block holds whole values and lies within one tensor.
    fn for_each_block(
        &self,
        f: &mut dyn FnMut(&TensorSpec, usize, &[u8]),
    ) -> Result<(), std::io::Error>;
}

impl Blocks for Payload {
    fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    fn for_each_block(
        &self,
        f: &mut dyn FnMut(&TensorSpec, usize, &[u8]),
    ) -> Result<(), std::io::Error> {
        for (spec, bytes) in self.tensors() {
            f(spec, 0, bytes);
        }
        Ok(())
    }
}

/// Checks that every value of a stream of little-endian f32 tensors is finite, fed in pieces
/// of any length (a value may straddle two pieces); names the first tensor and index that is
/// not.
pub struct FiniteCheck {
    specs: Vec<TensorSpec>,
    tensor: usize,
    /// Values of `specs[tensor]` already checked.
    index: usize,
    carry: [u8; 4],
    carried: usize,
}

impl FiniteCheck {
    pub fn new(specs: &[TensorSpec]) -> Self {
        Self {
            specs: specs.to_vec(),
            tensor: 0,
            index: 0,
            carry: [0; 4],
            carried: 0,
        }
    }

    /// Checks the next bytes of the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), TensorError> {
        if self.carried > 0 {
            let take = (4 - self.carried).min(bytes.len());
            self.carry[self.carried..self.carried + take].copy_from_slice(&bytes[..take]);
            self.carried += take;
            bytes = &bytes[take..];
            if self.carried < 4 {
                return Ok(());
            }
            self.carried = 0;
            let carry = self.carry;
            self.values(&carry)?;
        }
        let whole = bytes.len() / 4 * 4;
        self.values(&bytes[..whole])?;
        let rest = &bytes[whole..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carried = rest.len();
        Ok(())
    }

    /// Checks whole values, advancing through the tensors.
    fn values(&mut self, mut bytes: &[u8]) -> Result<(), TensorError> {
        while !bytes.is_empty() {
            let Some(spec) = self.specs.get(self.tensor) else {
                // More bytes than tensors: the assembler refuses such a stream by its size.
                return Ok(());
            };
            let left = spec.num_elements() - self.index;
            if left == 0 {
                self.tensor += 1;
                self.index = 0;
                continue;
            }
            let take = left.min(bytes.len() / 4);
            let (now, later) = bytes.split_at(take * 4);
            if !all_finite(now)
                && let Some((i, value)) = decode_le(now).enumerate().find(|(_, v)| !v.is_finite())
            {
                return Err(TensorError::NonFinite {
                    name: spec.name.clone(),
                    index: self.index + i,
                    value,
                });
            }
            self.index += take;
            bytes = later;
        }
        Ok(())
    }
}

/// Whether every little-endian f32 in `bytes` is finite: NaN and ±∞ are the values whose
/// exponent bits are all ones. Branch-free over blocks so it vectorises; runs at memory speed.
pub fn all_finite(bytes: &[u8]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    let mut blocks = bytes.chunks_exact(64);
    for block in &mut blocks {
        let mut bad = 0u32;
        for v in block.chunks_exact(4) {
            let bits = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
            bad |= u32::from(bits & EXPONENT == EXPONENT);
        }
        if bad != 0 {
            return false;
        }
    }
    blocks
        .remainder()
        .chunks_exact(4)
        .all(|v| u32::from_le_bytes([v[0], v[1], v[2], v[3]]) & EXPONENT != EXPONENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Vec<TensorSpec> {
        vec![
            TensorSpec {
                name: "a".into(),
                shape: vec![3],
            },
            TensorSpec {
                name: "b".into(),
                shape: vec![2, 2],
            },
        ]
    }

    fn bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn a_non_finite_value_is_named_by_tensor_and_index_whatever_the_piece_sizes() {
        let mut values = vec![1.0f32; 7];
        values[5] = f32::NAN;
        let all = bytes(&values);
        for piece in [1usize, 3, 4, 5, 28] {
            let mut check = FiniteCheck::new(&specs());
            let err = all
                .chunks(piece)
                .map(|p| check.feed(p))
                .find_map(Result::err)
                .expect("the NaN is found");
            match err {
                TensorError::NonFinite { name, index, .. } => {
                    assert_eq!((name.as_str(), index), ("b", 2), "pieces of {piece}")
                }
                other => panic!("unexpected {other}"),
            }
        }
    }

    #[test]
    fn all_finite_finds_each_kind_of_non_finite_value_at_every_position() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
            for at in [0usize, 15, 16, 17, 40] {
                let mut values = vec![f32::MAX; 41];
                values[at] = bad;
                assert!(!all_finite(&bytes(&values)), "{bad} at {at}");
            }
        }
        assert!(all_finite(&bytes(&[
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            0.0,
            -0.0
        ])));
    }

    #[test]
    fn finite_streams_pass_in_any_pieces() {
        let all = bytes(&[0.5, -1.0, 3.0, 1e30, -1e-30, 0.0, 7.0]);
        for piece in [1usize, 2, 7, 28] {
            let mut check = FiniteCheck::new(&specs());
            for p in all.chunks(piece) {
                check.feed(p).expect("finite");
            }
        }
    }
}
