//! SecAgg+'s neighbours (Bell et al. 2020): instead of every pair of participants, each one
//! masks with and shares its secrets among k neighbours on a ring laid out in a random order,
//! so each participant's work grows with k = O(log n), not n.

use std::collections::HashMap;

use rand::RngCore;
use rand::seq::SliceRandom;

/// Each participant's neighbours: `ids` on a ring in a random order, each linked to the k/2
/// nearest on either side (every other participant when k ≥ n − 1). Symmetric: v is u's
/// neighbour exactly when u is v's. `k` is rounded up to an even number.
pub fn ring_neighbours(ids: &[u32], k: usize, rng: &mut impl RngCore) -> HashMap<u32, Vec<u32>> {
    let mut order = ids.to_vec();
    order.sort_unstable();
    order.dedup();
    order.shuffle(rng);
    let n = order.len();
    let half = k.div_ceil(2);
    let mut out: HashMap<u32, Vec<u32>> = HashMap::with_capacity(n);
    for (i, &id) in order.iter().enumerate() {
        let mut mine: Vec<u32> = if 2 * half >= n.saturating_sub(1) {
            order.iter().copied().filter(|&o| o != id).collect()
        } else {
            (1..=half)
                .flat_map(|d| [order[(i + d) % n], order[(i + n - d) % n]])
                .collect()
        };
        mine.sort_unstable();
        mine.dedup();
        out.insert(id, mine);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn neighbours_are_symmetric_and_k_of_them() {
        let ids: Vec<u32> = (1..=20).collect();
        let g = ring_neighbours(&ids, 6, &mut StdRng::seed_from_u64(1));
        for (u, ns) in &g {
            assert_eq!(ns.len(), 6, "{u}: {ns:?}");
            assert!(!ns.contains(u));
            for v in ns {
                assert!(g[v].contains(u), "{u} -> {v} but not back");
            }
        }
        let small = ring_neighbours(&[1, 2, 3, 4], 6, &mut StdRng::seed_from_u64(2));
        assert!(small.values().all(|ns| ns.len() == 3), "{small:?}");
    }
}
