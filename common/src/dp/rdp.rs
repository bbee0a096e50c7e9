//! The privacy accountant: Rényi DP of the sampled Gaussian mechanism (Mironov 2017; Mironov,
//! Talwar and Zhang 2019) at integer orders, composed over rounds by adding, and converted to
//! (ε, δ) with the improved conversion of Balle et al. 2020 (Theorem 21), as Opacus'
//! `get_privacy_spent` does.
//!
//! Only integer orders are used: the fractional-order series is skipped, which makes ε slightly
//! larger (never smaller) than an accountant that also tries fractional orders.

/// The orders α at which RDP is tracked: 2..=64, 128 and 256.
pub fn default_orders() -> Vec<u32> {
    (2..=64).chain([128, 256]).collect()
}

/// RDP ε_α of one step of the Gaussian mechanism with noise multiplier `z` (noise standard
/// deviation over L2 sensitivity), applied to a Poisson subsample of rate `q`, for integer
/// `alpha >= 2`.
///
/// For 0 < q < 1: ε_α = ln A_α / (α − 1) with
/// A_α = Σ_{i=0..α} C(α, i) (1 − q)^(α−i) q^i exp((i² − i) / (2z²)), summed in log space.
pub fn sampled_gaussian_rdp(q: f64, z: f64, alpha: u32) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if z <= 0.0 {
        return f64::INFINITY;
    }
    let a = f64::from(alpha);
    if q >= 1.0 {
        return a / (2.0 * z * z);
    }
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    // ln C(α, i) built incrementally: ln C(α, i+1) = ln C(α, i) + ln(α − i) − ln(i + 1).
    let mut ln_binom = 0.0;
    let mut terms = Vec::with_capacity(alpha as usize + 1);
    for i in 0..=alpha {
        let fi = f64::from(i);
        terms.push(ln_binom + (a - fi) * ln_1mq + fi * ln_q + (fi * fi - fi) / (2.0 * z * z));
        ln_binom += (a - fi).ln() - (fi + 1.0).ln();
    }
    log_sum_exp(&terms) / (a - 1.0)
}

fn log_sum_exp(terms: &[f64]) -> f64 {
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    max + terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln()
}

/// (ε, δ) from an RDP curve, and the order that gave it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spent {
    pub epsilon: f64,
    pub delta: f64,
    pub order: u32,
}

/// The improved conversion (Balle et al. 2020, Theorem 21):
/// ε = min_α [ rdp_α + ln((α − 1)/α) − (ln δ + ln α)/(α − 1) ], at least 0.
pub fn epsilon(orders: &[u32], rdp: &[f64], delta: f64) -> Spent {
    let mut best = Spent {
        epsilon: f64::INFINITY,
        delta,
        order: orders.first().copied().unwrap_or(2),
    };
    for (&order, &r) in orders.iter().zip(rdp) {
        let a = f64::from(order);
        let eps = r + ((a - 1.0) / a).ln() - (delta.ln() + a.ln()) / (a - 1.0);
        if eps < best.epsilon {
            best = Spent {
                epsilon: eps.max(0.0),
                delta,
                order,
            };
        }
    }
    best
}

/// The classic conversion (Mironov 2017): ε = min_α [ rdp_α + ln(1/δ)/(α − 1) ]; looser, kept
/// to compare with published figures that use it.
pub fn epsilon_classic(orders: &[u32], rdp: &[f64], delta: f64) -> Spent {
    let mut best = Spent {
        epsilon: f64::INFINITY,
        delta,
        order: orders.first().copied().unwrap_or(2),
    };
    for (&order, &r) in orders.iter().zip(rdp) {
        let eps = r + (1.0 / delta).ln() / (f64::from(order) - 1.0);
        if eps < best.epsilon {
            best = Spent {
                epsilon: eps,
                delta,
                order,
            };
        }
    }
    best
}

/// RDP composed over the rounds released so far: each round adds its own curve (rounds may
/// differ in sampling rate and noise).
#[derive(Debug, Clone, PartialEq)]
pub struct Accountant {
    orders: Vec<u32>,
    rdp: Vec<f64>,
    rounds: u64,
}

impl Default for Accountant {
    fn default() -> Self {
        Self::new(default_orders())
    }
}

impl Accountant {
    pub fn new(orders: Vec<u32>) -> Self {
        Self {
            rdp: vec![0.0; orders.len()],
            orders,
            rounds: 0,
        }
    }

    /// An accountant that already holds `rdp` (a checkpoint's), one value per order.
    pub fn restored(rdp: Vec<f64>, rounds: u64) -> Result<Self, String> {
        let orders = default_orders();
        if rdp.len() != orders.len() {
            return Err(format!(
                "the saved privacy accountant has {} orders, this version tracks {}",
                rdp.len(),
                orders.len()
            ));
        }
        if rdp.iter().any(|r| !r.is_finite() || *r < 0.0) {
            return Err("the saved privacy accountant holds a negative or non-finite value".into());
        }
        Ok(Self {
            orders,
            rdp,
            rounds,
        })
    }

    /// Adds one release of the sampled Gaussian mechanism with rate `q` and multiplier `z`.
    pub fn step(&mut self, q: f64, z: f64) {
        for (r, &a) in self.rdp.iter_mut().zip(&self.orders) {
            *r += sampled_gaussian_rdp(q, z, a);
        }
        self.rounds += 1;
    }

    /// What (ε, δ) would be after one more release with `q`, `z`, without recording it.
    pub fn after_step(&self, q: f64, z: f64, delta: f64) -> Spent {
        let mut next = self.clone();
        next.step(q, z);
        next.spent(delta)
    }

    /// (ε, δ) of everything released so far.
    pub fn spent(&self, delta: f64) -> Spent {
        epsilon(&self.orders, &self.rdp, delta)
    }

    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// The RDP curve, one value per order of [`default_orders`] (for checkpoints).
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    pub fn orders(&self) -> &[u32] {
        &self.orders
    }
}

/// The smallest noise multiplier z (to 1e-4 relative) for which `rounds` releases at sampling
/// rate `q` stay within `target_epsilon` at `delta`; `None` when even z = 1e4 does not.
pub fn noise_multiplier_for(target_epsilon: f64, q: f64, rounds: u64, delta: f64) -> Option<f64> {
    let orders = default_orders();
    let eps_at = |z: f64| {
        let rdp: Vec<f64> = orders
            .iter()
            .map(|&a| rounds as f64 * sampled_gaussian_rdp(q, z, a))
            .collect();
        epsilon(&orders, &rdp, delta).epsilon
    };
    let (mut lo, mut hi) = (1e-3, 1e4);
    if eps_at(hi) > target_epsilon {
        return None;
    }
    if eps_at(lo) <= target_epsilon {
        return Some(lo);
    }
    while hi / lo > 1.0 + 1e-5 {
        let mid = (lo * hi).sqrt();
        if eps_at(mid) > target_epsilon {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn composed(parts: &[(f64, f64, u64)], orders: &[u32]) -> Vec<f64> {
        orders
            .iter()
            .map(|&a| {
                parts
                    .iter()
                    .map(|&(q, z, t)| t as f64 * sampled_gaussian_rdp(q, z, a))
                    .sum()
            })
            .collect()
    }

    fn close(got: f64, want: f64) {
        let rel = ((got - want) / want).abs();
        assert!(
            rel < 1e-3,
            "ε = {got}, published {want} (relative error {rel:.2e})"
        );
    }

    #[test]
    fn matches_the_opacus_docstring_example() {
        // Opacus `analysis/rdp.py`: 10 steps of SGM(q=1e-5, z=1) then 4 of SGM(q=1e-4, z=3),
        // orders 2..32, δ = 1e-5: ε = 0.3363 at α = 23 (classic conversion 0.5233).
        let orders: Vec<u32> = (2..=32).collect();
        let rdp = composed(&[(1e-5, 1.0, 10), (1e-4, 3.0, 4)], &orders);
        let spent = epsilon(&orders, &rdp, 1e-5);
        close(spent.epsilon, 0.3363);
        assert_eq!(spent.order, 23);
        close(epsilon_classic(&orders, &rdp, 1e-5).epsilon, 0.5233);
    }

    #[test]
    fn matches_reference_values_over_the_default_orders() {
        let orders = default_orders();
        for (q, z, t, want) in [
            (0.1, 1.0, 100, 7.973),
            (0.1, 1.1, 100, 6.745),
            (0.01, 1.0, 1000, 2.108),
            (1.0, 1.0, 10, 19.80),
            (1.0, 2.0, 20, 12.30),
            (0.5, 1.0, 20, 17.27),
        ] {
            let spent = epsilon(&orders, &composed(&[(q, z, t)], &orders), 1e-5);
            close(spent.epsilon, want);
        }
    }

    #[test]
    fn full_participation_is_the_closed_form() {
        for alpha in [2, 7, 64] {
            let got = sampled_gaussian_rdp(1.0, 1.5, alpha);
            assert!((got - f64::from(alpha) / (2.0 * 1.5 * 1.5)).abs() < 1e-12);
        }
        // q → 1 from below meets the closed form.
        let near = sampled_gaussian_rdp(1.0 - 1e-9, 1.5, 8);
        assert!((near - 8.0 / 4.5).abs() < 1e-6, "{near}");
    }

    #[test]
    fn epsilon_never_decreases_round_after_round() {
        let mut acc = Accountant::default();
        let mut last = 0.0;
        for _ in 0..50 {
            acc.step(0.2, 1.3);
            let eps = acc.spent(1e-5).epsilon;
            assert!(eps >= last, "ε went from {last} to {eps}");
            last = eps;
        }
        assert_eq!(acc.rounds(), 50);
    }

    #[test]
    fn the_planned_noise_multiplier_meets_its_target() {
        let z = noise_multiplier_for(4.0, 0.5, 20, 1e-5).expect("reachable");
        let mut acc = Accountant::default();
        (0..20).for_each(|_| acc.step(0.5, z));
        let eps = acc.spent(1e-5).epsilon;
        assert!(eps <= 4.0 && eps > 3.99, "ε = {eps} with z = {z}");
    }
}
