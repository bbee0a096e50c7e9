//! What this machine can do without fedtune: memory copy and TCP loopback bandwidth, the
//! yardsticks the federation's figures are compared with; and the FedAvg fold kernel alone.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::strategy::mean::fold_le;

/// Bytes per write in the TCP copy, as the issue that asked for it says (1 MiB).
const WRITE_BYTES: usize = 1 << 20;

/// Median of a few timed repetitions, in GB/s (10⁹ bytes per second).
fn median_gbps(bytes: usize, mut runs: Vec<Duration>) -> f64 {
    runs.sort();
    bytes as f64 / runs[runs.len() / 2].as_secs_f64() / 1e9
}

/// `memcpy` between two warm buffers of `bytes` (pages touched before timing).
pub fn memcpy_gbps(bytes: usize, repeats: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src);
    let runs = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            t.elapsed()
        })
        .collect();
    median_gbps(bytes, runs)
}

/// The FedAvg fold (`acc += w·delta`) over a model of `bytes`, delta arriving as little-endian
/// chunks of the wire's size, as the coordinator folds an upload: GB/s of delta folded.
pub fn fold_gbps(bytes: usize, chunk: usize, repeats: usize) -> f64 {
    let mut acc = vec![0.0f32; bytes / 4];
    let delta: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8 & 0x3f).collect();
    let fold_all = |acc: &mut [f32]| {
        for (a, d) in acc.chunks_mut(chunk / 4).zip(delta.chunks(chunk)) {
            fold_le(a, d, 0.5);
        }
    };
    fold_all(&mut acc);
    let runs = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            fold_all(std::hint::black_box(&mut acc));
            t.elapsed()
        })
        .collect();
    std::hint::black_box(&acc);
    median_gbps(bytes, runs)
}

/// A plain tokio TCP copy of `bytes` over 127.0.0.1 in 1 MiB writes, repeated: GB/s.
pub async fn loopback_gbps(bytes: usize, repeats: usize) -> anyhow::Result<f64> {
    let mut runs = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let reader = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await?;
            let mut buf = vec![0u8; WRITE_BYTES];
            let mut got = 0usize;
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<_, std::io::Error>(got);
                }
                got += n;
            }
        });
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let block = vec![7u8; WRITE_BYTES];
        let t = Instant::now();
        let mut sent = 0;
        while sent < bytes {
            let n = WRITE_BYTES.min(bytes - sent);
            stream.write_all(&block[..n]).await?;
            sent += n;
        }
        stream.shutdown().await?;
        let got = reader.await??;
        runs.push(t.elapsed());
        anyhow::ensure!(got == bytes, "loopback copy lost bytes: {got} of {bytes}");
    }
    Ok(median_gbps(bytes, runs))
}
