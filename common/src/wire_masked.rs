//! Secure aggregation's masked update on the wire: one tensor `secagg.masked` of u32 words
//! (dtype U32), chunked and checked like any payload. Masked words are uniformly random to
//! anyone without the masks, so nothing about them is checked beyond their number.

use fedtune_proto as pb;

use crate::tensors::{NamedTensor, TensorSet};
use crate::wire::{Assembler, EncodedTensors, WireError, manifest_specs};

/// The one tensor of a masked upload.
pub const MASKED_TENSOR: &str = "secagg.masked";

/// Encodes masked words for upload (the manifest says U32; the bytes are little-endian).
pub fn encode_masked(
    words: &[u32],
    model_version: u64,
    chunk_size: usize,
) -> Result<EncodedTensors, WireError> {
    // The codec moves 4-byte little-endian values; reinterpreting the words as f32 bits keeps
    // them exact (no arithmetic touches them) and reuses one encoder.
    let bits: Vec<f32> = words.iter().map(|w| f32::from_bits(*w)).collect();
    let set = TensorSet::new(vec![NamedTensor::new(
        MASKED_TENSOR,
        vec![words.len()],
        bits,
    )?])?;
    let mut encoded = EncodedTensors::encode(&set, model_version, chunk_size)?;
    for t in &mut encoded.manifest.tensors {
        t.dtype = pb::DType::DtypeU32 as i32;
    }
    Ok(encoded)
}

/// An assembler for a masked upload of exactly `words` words; any other manifest is refused
/// before a byte is allocated.
pub fn masked_assembler(mut manifest: pb::Manifest, words: usize) -> Result<Assembler, WireError> {
    let [t] = manifest.tensors.as_slice() else {
        return Err(WireError::NotMasked(format!(
            "{} tensors; a masked update is one tensor `{MASKED_TENSOR}`",
            manifest.tensors.len()
        )));
    };
    if t.name != MASKED_TENSOR || t.dtype != pb::DType::DtypeU32 as i32 || t.shape != [words as u64]
    {
        return Err(WireError::NotMasked(format!(
            "tensor `{}` of dtype {} and shape {:?}; this round's masked update is `{MASKED_TENSOR}`, u32, [{words}]",
            t.name, t.dtype, t.shape
        )));
    }
    if crate::codec::Codec::from_proto(manifest.compression.as_ref())? != crate::codec::Codec::F32 {
        return Err(WireError::NotMasked(
            "a compressed payload; a masked update travels as raw u32 words".to_string(),
        ));
    }
    // From here on the 4-byte values are handled as opaque words.
    manifest.tensors[0].dtype = pb::DType::DtypeF32 as i32;
    manifest_specs(&manifest)?;
    Assembler::new(manifest, words as u64 * 4)
}

/// The words of an assembled masked payload.
pub fn masked_words(bytes: &[u8]) -> impl ExactSizeIterator<Item = u32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assemble(encoded: &EncodedTensors, words: usize) -> Result<Vec<u32>, WireError> {
        let mut a = masked_assembler(encoded.manifest.clone(), words)?;
        for c in &encoded.chunks {
            a.push(c)?;
        }
        Ok(masked_words(&a.finish()?.bytes).collect())
    }

    #[test]
    fn masked_words_round_trip_exactly_nan_patterns_included() {
        // 0x7fc0_0001 is a NaN payload: an f32 round trip through arithmetic would change it.
        let words = vec![0, 1, u32::MAX, 0x7fc0_0001, 0xff80_0000, 12345];
        let encoded = encode_masked(&words, 3, 8).unwrap();
        assert_eq!(assemble(&encoded, words.len()).unwrap(), words);
    }

    #[test]
    fn a_masked_upload_of_the_wrong_length_is_refused_naming_the_expected_one() {
        let encoded = encode_masked(&[1, 2, 3], 0, 1024).unwrap();
        let err = assemble(&encoded, 4).unwrap_err().to_string();
        assert!(err.contains("[4]") && err.contains("[3]"), "{err}");
    }

    #[test]
    fn a_float_update_is_not_taken_for_a_masked_one() {
        let set = TensorSet::new(vec![
            NamedTensor::new(MASKED_TENSOR, vec![2], vec![1.0, 2.0]).unwrap(),
        ])
        .unwrap();
        let encoded = EncodedTensors::encode(&set, 0, 1024).unwrap();
        assert!(matches!(
            assemble(&encoded, 2),
            Err(WireError::NotMasked(_))
        ));
    }
}
