use super::*;

fn odd_set() -> TensorSet {
    // Over 8 MiB in total, with sizes that do not divide the chunk size.
    let sizes = [
        (vec![1031usize, 1513], "big"),
        (vec![7], "tiny"),
        (vec![999, 3, 337], "odd"),
        (vec![1], "one"),
    ];
    let mut x = 0x9E3779B9u32;
    let tensors = sizes
        .iter()
        .map(|(shape, name)| {
            let n = shape.iter().product();
            let data = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    f32::from_bits(x & 0x7F7F_FFFF) // finite, any exponent, both signs not needed
                })
                .collect();
            NamedTensor::new(*name, shape.clone(), data).unwrap()
        })
        .collect();
    TensorSet::new(tensors).unwrap()
}

#[test]
fn chunked_round_trip_is_bit_exact_over_8_mib() {
    let set = odd_set();
    assert!(set.byte_len() > 8 << 20);
    let enc = EncodedTensors::encode(&set, 3, MAX_CHUNK_BYTES).unwrap();
    assert!(enc.chunks.iter().all(|c| c.data.len() <= MAX_CHUNK_BYTES));
    let mut asm = Assembler::new(enc.manifest.clone(), set.byte_len() as u64).unwrap();
    for c in &enc.chunks {
        asm.push(c).unwrap();
    }
    let back = asm.finish().unwrap().into_tensor_set().unwrap();
    for (a, b) in set.tensors().iter().zip(back.tensors()) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.shape, b.shape);
        assert!(
            a.data
                .iter()
                .zip(&b.data)
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
    }
}

#[test]
fn a_shared_set_is_the_same_payload_as_an_encoded_one_whatever_the_chunk_size() {
    let set = Arc::new(odd_set());
    for chunk in [MAX_CHUNK_BYTES, 1 << 16, 4096, 28, 5] {
        let enc = EncodedTensors::encode(&set, 3, chunk).unwrap();
        let shared = EncodedTensors::share(&set, |_| true, 3, chunk).unwrap();
        assert_eq!(shared.manifest, enc.manifest, "chunk {chunk}");
        let mut asm = Assembler::new(shared.manifest.clone(), u64::MAX).unwrap();
        for c in &shared.chunks {
            assert!(c.data.len() <= chunk);
            asm.push(c).unwrap();
        }
        let payload = asm.finish().unwrap();
        let want: Vec<u8> = enc.chunks.iter().flat_map(|c| c.data.to_vec()).collect();
        assert_eq!(payload.bytes, want, "chunk {chunk}");
    }
}

#[test]
fn a_shared_subset_holds_only_the_kept_tensors() {
    let set = Arc::new(odd_set());
    let shared = EncodedTensors::share(&set, |n| n != "big", 1, 1 << 12).unwrap();
    let want = set.select(|n| n != "big");
    let enc = EncodedTensors::encode(&want, 1, 1 << 12).unwrap();
    assert_eq!(shared.manifest, enc.manifest);
}

#[test]
fn corrupted_chunk_is_refused() {
    let set = odd_set();
    let enc = EncodedTensors::encode(&set, 1, 1 << 16).unwrap();
    let mut asm = Assembler::new(enc.manifest.clone(), u64::MAX).unwrap();
    asm.push(&enc.chunks[0]).unwrap();
    let mut bad = enc.chunks[1].clone();
    let mut data = bad.data.to_vec();
    data[17] ^= 0x01;
    bad.data = Bytes::from(data);
    assert_eq!(
        asm.push(&bad),
        Err(WireError::ChunkChecksum { offset: 1 << 16 })
    );
}

#[test]
fn stream_faults_are_refused() {
    let set = odd_set();
    let enc = EncodedTensors::encode(&set, 1, 1 << 20).unwrap();
    // Too large for the receiver: refused before allocating.
    assert!(matches!(
        Assembler::new(enc.manifest.clone(), 1024),
        Err(WireError::TooLarge { .. })
    ));
    // Out of order.
    let mut asm = Assembler::new(enc.manifest.clone(), u64::MAX).unwrap();
    assert!(matches!(
        asm.push(&enc.chunks[1]),
        Err(WireError::OutOfOrder { .. })
    ));
    // Truncated.
    asm.push(&enc.chunks[0]).unwrap();
    assert!(matches!(asm.finish(), Err(WireError::Truncated { .. })));
    // A manifest whose sizes lie.
    let mut lying = enc.manifest.clone();
    lying.total_bytes -= 4;
    assert!(matches!(
        Assembler::new(lying, u64::MAX),
        Err(WireError::SizeMismatch { .. })
    ));
    // Consistent chunks but a wrong whole-payload checksum.
    let mut wrong = enc.manifest.clone();
    wrong.checksum ^= 1;
    let mut asm = Assembler::new(wrong, u64::MAX).unwrap();
    enc.chunks.iter().for_each(|c| {
        asm.push(c).unwrap();
    });
    assert!(matches!(asm.finish(), Err(WireError::PayloadChecksum)));
}
