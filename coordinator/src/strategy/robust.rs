//! Byzantine-robust combine steps. Unlike the weighted mean they must see every update before
//! combining, so they buffer the round's updates ([`UpdateBuffer`]: memory up to a budget,
//! then disk) and combine block by block when the round closes.
//!
//! - coordinate-wise **median** (Yin et al. 2018), unweighted; an even count averages the two
//!   middle values;
//! - coordinate-wise **trimmed mean** with fraction β: the ⌊β·n⌋ largest and smallest values of
//!   each coordinate are dropped and the rest averaged, unweighted;
//! - **Krum** / **multi-Krum** (Blanchard et al. 2017) with f assumed attackers: each update is
//!   scored by the sum of squared distances to its n − f − 2 nearest neighbours; the m best
//!   scored are averaged, weighted by examples (m = 1 is Krum).

use super::buffer::UpdateBuffer;
use super::{AggregateError, Aggregator, UpdateWeight};
use fedtune_common::blocks::Blocks;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    Median,
    TrimmedMean { beta: f64 },
    Krum { f: usize, m: usize },
}

pub struct Robust {
    rule: Rule,
    buffer: UpdateBuffer,
    /// Who sent each buffered update, for the log.
    sources: Vec<String>,
}

impl Robust {
    pub fn new(rule: Rule, buffer: UpdateBuffer) -> Self {
        Self {
            rule,
            buffer,
            sources: Vec::new(),
        }
    }
}

impl Aggregator for Robust {
    fn accept(
        &mut self,
        source: &str,
        delta: &dyn Blocks,
        weight: UpdateWeight,
    ) -> Result<(), AggregateError> {
        self.buffer.push(delta, weight.examples)?;
        self.sources.push(source.to_string());
        Ok(())
    }

    fn accepted(&self) -> usize {
        self.buffer.len()
    }

    fn finish(self: Box<Self>) -> Result<Option<Vec<f32>>, AggregateError> {
        let n = self.buffer.len();
        if n == 0 {
            return Ok(None);
        }
        match self.rule {
            Rule::Median => coordinate_wise(&self.buffer, |vals| {
                let mid = vals.len() / 2;
                let (_, hi, _) = vals.select_nth_unstable_by(mid, f32::total_cmp);
                let hi = *hi;
                if vals.len() % 2 == 1 {
                    hi
                } else {
                    let lo = vals[..mid].iter().copied().fold(f32::MIN, f32::max);
                    (lo + hi) / 2.0
                }
            })
            .map(Some),
            Rule::TrimmedMean { beta } => {
                let k = (beta * n as f64).floor() as usize;
                if n <= 2 * k {
                    return Err(AggregateError::TooFewUpdates {
                        strategy: format!("trimmed-mean (beta {beta})"),
                        needed: 2 * k + 1,
                        got: n,
                    });
                }
                coordinate_wise(&self.buffer, |vals| {
                    vals.sort_unstable_by(f32::total_cmp);
                    let kept = &vals[k..vals.len() - k];
                    (kept.iter().map(|&v| f64::from(v)).sum::<f64>() / kept.len() as f64) as f32
                })
                .map(Some)
            }
            Rule::Krum { f, m } => {
                let keep = krum_select(&self.buffer, f, m)?;
                let names = |pick: bool| {
                    (0..n)
                        .filter(|i| keep.contains(i) == pick)
                        .map(|i| self.sources[i].as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                tracing::info!(
                    "krum kept the update(s) of {}; left out {}",
                    names(true),
                    names(false)
                );
                average_of(&self.buffer, &keep).map(Some)
            }
        }
    }
}

/// Applies `combine` to each coordinate's values across updates.
fn coordinate_wise(
    buffer: &UpdateBuffer,
    mut combine: impl FnMut(&mut [f32]) -> f32,
) -> Result<Vec<f32>, AggregateError> {
    let mut out = vec![0.0; buffer.layout().len()];
    let mut vals = vec![0.0f32; buffer.len()];
    for range in buffer.blocks() {
        let blocks = buffer.read_all(range.clone())?;
        for (j, dst) in out[range].iter_mut().enumerate() {
            for (v, b) in vals.iter_mut().zip(&blocks) {
                *v = b[j];
            }
            *dst = combine(&mut vals);
        }
    }
    Ok(out)
}

/// Indices of the updates multi-Krum keeps, best score first.
pub fn krum_select(
    buffer: &UpdateBuffer,
    f: usize,
    m: usize,
) -> Result<Vec<usize>, AggregateError> {
    let n = buffer.len();
    if n < f + 3 {
        return Err(AggregateError::TooFewUpdates {
            strategy: format!("krum (f = {f})"),
            needed: f + 3,
            got: n,
        });
    }
    let mut dist = vec![vec![0.0f64; n]; n];
    for range in buffer.blocks() {
        let blocks = buffer.read_all(range)?;
        for i in 0..n {
            for j in i + 1..n {
                let d: f64 = blocks[i]
                    .iter()
                    .zip(&blocks[j])
                    .map(|(a, b)| f64::from(a - b).powi(2))
                    .sum();
                dist[i][j] += d;
                dist[j][i] += d;
            }
        }
    }
    let neighbours = n - f - 2;
    let mut scored: Vec<(f64, usize)> = (0..n)
        .map(|i| {
            let mut d: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| dist[i][j]).collect();
            d.sort_unstable_by(f64::total_cmp);
            (d[..neighbours].iter().sum(), i)
        })
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    Ok(scored
        .into_iter()
        .take(m.clamp(1, n))
        .map(|(_, i)| i)
        .collect())
}

/// The example-weighted mean of the updates at `keep`.
fn average_of(buffer: &UpdateBuffer, keep: &[usize]) -> Result<Vec<f32>, AggregateError> {
    let weights = buffer.weights();
    let total: f64 = keep.iter().map(|&i| weights[i] as f64).sum();
    let mut out = vec![0.0; buffer.layout().len()];
    for range in buffer.blocks() {
        for &i in keep {
            let w = (weights[i] as f64 / total) as f32;
            let block = buffer.read(i, range.clone())?;
            for (dst, v) in out[range.clone()].iter_mut().zip(&block) {
                *dst += w * v;
            }
        }
    }
    Ok(out)
}
