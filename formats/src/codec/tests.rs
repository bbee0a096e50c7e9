use super::*;
use crate::tensors::NamedTensor;
use crate::wire::Assembler;

/// Deterministic values over several magnitudes, both signs, some exact zeros.
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if i % 97 == 0 {
                return 0.0;
            }
            let unit = (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
            unit * 10f32.powi((x % 5) as i32 - 3)
        })
        .collect()
}

/// A small CNN's tensors (the shapes of the built-in `cnn`), biases and all.
fn cnn_like() -> TensorSet {
    let shapes: [(&str, Vec<usize>); 8] = [
        ("conv1.weight", vec![32, 1, 3, 3]),
        ("conv1.bias", vec![32]),
        ("conv2.weight", vec![64, 32, 3, 3]),
        ("conv2.bias", vec![64]),
        ("fc1.weight", vec![128, 3136]),
        ("fc1.bias", vec![128]),
        ("fc2.weight", vec![10, 128]),
        ("fc2.bias", vec![10]),
    ];
    let tensors = shapes
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            NamedTensor::new(*name, shape.clone(), values(n, i as u32 + 7)).unwrap()
        })
        .collect();
    TensorSet::new(tensors).unwrap()
}

/// Encodes `set` with `codec` and decodes it through the assembler, as a receiver does.
fn round_trip(set: &TensorSet, codec: Codec, chunk: usize) -> (EncodedTensors, TensorSet) {
    let enc = EncodedTensors::compress(set, |_| true, codec, 1, chunk).unwrap();
    let mut asm = Assembler::new(enc.manifest.clone(), set.byte_len() as u64).unwrap();
    for c in &enc.chunks {
        asm.push(c).unwrap();
    }
    let back = asm.finish().unwrap().into_tensor_set().unwrap();
    (enc, back)
}

#[test]
fn each_codec_stays_within_its_error_bound() {
    let set = cnn_like();
    let chunk = 4096;
    for codec in [Codec::F32, Codec::F16, Codec::Bf16, Codec::Int8] {
        let (_, back) = round_trip(&set, codec, chunk);
        for (a, b) in set.tensors().iter().zip(back.tensors()) {
            for (values, decoded) in a.data.chunks(chunk / 4).zip(b.data.chunks(chunk / 4)) {
                let scale = values.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                for (x, y) in values.iter().zip(decoded) {
                    let err = (x - y).abs();
                    let bound = match codec {
                        Codec::F32 => 0.0,
                        // Round to nearest: half an ulp, relative (subnormals: absolute).
                        Codec::F16 => (x.abs() * 2f32.powi(-11)).max(2f32.powi(-25)),
                        Codec::Bf16 => x.abs() * 2f32.powi(-8),
                        Codec::Int8 => scale / 2.0 * (1.0 + 1e-5),
                        Codec::TopK(_) => unreachable!(),
                    };
                    assert!(err <= bound, "{codec} on `{}`: {x} -> {y}", a.name);
                }
            }
        }
    }
}

#[test]
fn top_k_sends_exactly_the_largest_values_of_each_chunk_and_zeros_the_rest() {
    let set = cnn_like();
    let chunk = 4096;
    let (_, back) = round_trip(&set, Codec::TopK(0.1), chunk);
    for (a, b) in set.tensors().iter().zip(back.tensors()) {
        for (values, decoded) in a.data.chunks(chunk / 4).zip(b.data.chunks(chunk / 4)) {
            let k = (values.len() as f64 * f64::from(0.1f32)).ceil() as usize;
            let sent = decoded.iter().filter(|v| **v != 0.0).count();
            // A value that is itself 0 may be among the kept ones.
            assert!(sent <= k, "`{}`: {sent} values sent, k = {k}", a.name);
            let smallest_sent = values
                .iter()
                .zip(decoded)
                .filter(|(_, y)| **y != 0.0)
                .map(|(x, y)| {
                    assert_eq!(x.to_bits(), y.to_bits(), "a kept value is exact");
                    x.abs()
                })
                .fold(f32::INFINITY, f32::min);
            let largest_dropped = values
                .iter()
                .zip(decoded)
                .filter(|(_, y)| **y == 0.0)
                .map(|(x, _)| x.abs())
                .fold(0f32, f32::max);
            assert!(largest_dropped <= smallest_sent, "`{}`", a.name);
        }
    }
}

#[test]
fn wire_bytes_against_fp32_are_within_each_codecs_bound() {
    let set = cnn_like();
    let fp32 = set.byte_len() as f64;
    for (codec, bound) in [
        (Codec::F16, 0.51),
        (Codec::Bf16, 0.51),
        (Codec::Int8, 0.26),
        (Codec::TopK(0.1), 0.21),
        (Codec::TopK(0.01), 0.03),
    ] {
        let enc = EncodedTensors::compress(&set, |_| true, codec, 1, MAX_CHUNK_BYTES).unwrap();
        let ratio = enc.total_bytes() as f64 / fp32;
        assert!(
            ratio <= bound,
            "{codec}: {ratio:.4} of fp32 (bound {bound})"
        );
        assert!(enc.chunks.iter().all(|c| c.data.len() <= MAX_CHUNK_BYTES));
    }
}

#[test]
fn a_compressed_chunk_never_spans_two_tensors() {
    let set = cnn_like();
    let chunk = 1024;
    let enc = EncodedTensors::compress(&set, |_| true, Codec::Int8, 1, chunk).unwrap();
    let want: usize = set
        .tensors()
        .iter()
        .map(|t| t.data.len().div_ceil(chunk / 4))
        .sum();
    assert_eq!(enc.chunks.len(), want);
}

#[test]
fn a_subset_is_compressed_alone() {
    let set = cnn_like();
    let enc = EncodedTensors::compress(&set, |n| n.ends_with("bias"), Codec::F16, 1, 4096).unwrap();
    let names: Vec<_> = enc
        .manifest
        .tensors
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(names, ["conv1.bias", "conv2.bias", "fc1.bias", "fc2.bias"]);
}

#[test]
fn nan_and_out_of_range_values_are_not_hidden_by_encoding() {
    let mut v = values(100, 3);
    v[10] = f32::NAN;
    for codec in [Codec::F16, Codec::Bf16, Codec::Int8, Codec::TopK(0.05)] {
        let mut enc = Vec::new();
        codec.encode_chunk(&v, &mut enc);
        let mut out = Vec::new();
        match codec.decode_chunk(&enc, v.len(), &mut out) {
            // int8: a NaN makes the chunk's scale NaN, which the decoder refuses.
            Err(why) => assert!(why.contains("scale"), "{codec}: {why}"),
            Ok(()) => assert!(out[10].is_nan(), "{codec} kept the NaN at its place"),
        }
    }
    let big = [1.0, 70000.0, -3.0];
    assert_eq!(Codec::F16.cannot_carry(&big), Some((1, 70000.0)));
    assert_eq!(Codec::Bf16.cannot_carry(&big), None);
}

#[test]
fn codec_names_parse_and_print_back() {
    for (text, codec) in [
        ("fp32", Codec::F32),
        ("fp16", Codec::F16),
        ("BF16", Codec::Bf16),
        ("int8", Codec::Int8),
        ("topk:0.1", Codec::TopK(0.1)),
        ("topk:0.5", Codec::TopK(0.5)),
    ] {
        let parsed: Codec = text.parse().unwrap();
        assert_eq!(parsed, codec, "{text}");
        assert_eq!(parsed.to_string().parse::<Codec>().unwrap(), codec);
        assert_eq!(Codec::from_proto(codec.to_proto().as_ref()).unwrap(), codec);
    }
}

#[test]
fn bad_codec_names_are_refused_saying_what_is_accepted() {
    for (text, says) in [
        ("int4", "use fp32, fp16, bf16, int8 or topk:FRACTION"),
        ("topk", "use fp32, fp16, bf16, int8 or topk:FRACTION"),
        ("topk:0", "not a number in (0, 0.5]"),
        ("topk:0.7", "not a number in (0, 0.5]"),
        ("topk:x", "not a number in (0, 0.5]"),
        ("topk:NaN", "not a number in (0, 0.5]"),
    ] {
        let e = text.parse::<Codec>().unwrap_err().to_string();
        assert!(e.contains(says), "{text}: {e}");
    }
}

/// An int8 payload of one tensor in two chunks of 2 values, chunk by chunk.
fn tiny_int8() -> EncodedTensors {
    let set = TensorSet::new(vec![
        NamedTensor::new("w", vec![4], vec![1.0, -2.0, 3.0, 4.0]).unwrap(),
    ])
    .unwrap();
    EncodedTensors::compress(&set, |_| true, Codec::Int8, 1, 8).unwrap()
}

fn with_data(enc: &EncodedTensors, index: usize, data: Vec<u8>) -> pb::Chunk {
    pb::Chunk {
        offset: enc.chunks[index].offset,
        checksum: xxh3_64(&data),
        data: Bytes::from(data),
    }
}

#[test]
fn malformed_compressed_chunks_are_refused_naming_the_fault() {
    let enc = tiny_int8();
    let first = enc.chunks[0].data.to_vec();
    let mut nan_scale = first.clone();
    nan_scale[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let mut negative_scale = first.clone();
    negative_scale[..4].copy_from_slice(&(-1f32).to_le_bytes());
    for (data, says) in [
        (
            first[..5].to_vec(),
            "has 5 bytes; its int8 encoding is 6 bytes",
        ),
        (nan_scale, "int8 scale is NaN"),
        (negative_scale, "int8 scale is -1"),
    ] {
        let mut asm = Assembler::new(enc.manifest.clone(), u64::MAX).unwrap();
        let e = asm.push(&with_data(&enc, 0, data)).unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
    }
}

#[test]
fn top_k_positions_out_of_order_or_range_are_refused() {
    let set = TensorSet::new(vec![
        NamedTensor::new("w", vec![8], vec![1.0, -9.0, 3.0, 4.0, 0.5, 7.0, 0.1, 0.2]).unwrap(),
    ])
    .unwrap();
    let enc = EncodedTensors::compress(&set, |_| true, Codec::TopK(0.25), 1, 32).unwrap();
    let good = enc.chunks[0].data.to_vec();
    assert_eq!(good.len(), 16, "two positions and two values");
    let position = |data: &mut Vec<u8>, i: usize, p: u32| {
        data[4 * i..4 * i + 4].copy_from_slice(&p.to_le_bytes())
    };
    let mut swapped = good.clone();
    position(&mut swapped, 0, 5);
    position(&mut swapped, 1, 1);
    let mut repeated = good.clone();
    position(&mut repeated, 1, 1);
    let mut outside = good.clone();
    position(&mut outside, 1, 8);
    for data in [swapped, repeated, outside] {
        let mut asm = Assembler::new(enc.manifest.clone(), u64::MAX).unwrap();
        let e = asm.push(&with_data(&enc, 0, data)).unwrap_err().to_string();
        assert!(e.contains("not strictly increasing within 0..8"), "{e}");
    }
}

#[test]
fn a_compressed_manifest_that_does_not_add_up_is_refused() {
    let enc = tiny_int8();
    let mut lying = enc.manifest.clone();
    lying.total_bytes += 1;
    assert!(matches!(
        Assembler::new(lying, u64::MAX),
        Err(WireError::SizeMismatch { .. })
    ));
    let mut odd_chunk = enc.manifest.clone();
    odd_chunk.chunk_size = 12;
    assert!(matches!(
        Assembler::new(odd_chunk, u64::MAX),
        Err(WireError::BadEncodedChunkSize(12))
    ));
    let mut unknown = enc.manifest.clone();
    unknown.compression = Some(pb::Compression {
        encoding: 99,
        topk_fraction: 0.0,
    });
    let e = Assembler::new(unknown, u64::MAX).err().unwrap().to_string();
    assert!(e.contains("encoding 99"), "{e}");
    let mut wide = enc.manifest.clone();
    wide.compression = Some(pb::Compression {
        encoding: pb::Encoding::Topk as i32,
        topk_fraction: 0.9,
    });
    assert!(Assembler::new(wide, u64::MAX).is_err());
}

#[test]
fn the_receivers_limit_bounds_the_decoded_bytes() {
    let enc = tiny_int8();
    // 16 bytes of f32 arrive as 12 encoded bytes: a 12-byte limit is too small.
    assert!(matches!(
        Assembler::new(enc.manifest.clone(), 12),
        Err(WireError::TooLarge {
            declared: 16,
            limit: 12
        })
    ));
}
