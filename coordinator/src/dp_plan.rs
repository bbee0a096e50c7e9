//! `fedtune-coordinator dp-plan`: before a run, the noise multiplier that keeps a number of
//! rounds within a target ε, or the ε each round of a given multiplier spends, from the same
//! accountant the coordinator runs.

use std::io::Write;

use anyhow::bail;
use clap::Args;
use fedtune_common::dp::rdp::{Accountant, noise_multiplier_for};

use crate::strategy::dp::default_delta;

#[derive(Debug, Clone, Args)]
pub struct DpPlanArgs {
    /// Rounds the run will have.
    #[arg(long)]
    pub rounds: u64,
    /// q: the fraction of clients per round (`--fraction-fit` of a central-DP run; 1 for local
    /// DP, where the coordinator sees who takes part).
    #[arg(long, default_value_t = 1.0)]
    pub sample_rate: f64,
    /// δ of the guarantee; or give --clients for the default min(1/N², 1e-5).
    #[arg(long)]
    pub delta: Option<f64>,
    /// Number of clients N (δ = min(1/N², 1e-5) when --delta is not given).
    #[arg(long)]
    pub clients: Option<u64>,
    /// Find the smallest noise multiplier z that keeps all rounds within this ε.
    #[arg(long, conflicts_with = "noise_multiplier")]
    pub epsilon: Option<f64>,
    /// Print the ε after each round with this noise multiplier z.
    #[arg(long)]
    pub noise_multiplier: Option<f64>,
}

/// Prints the plan on stdout; a closed pipe (`dp-plan … | head`) ends it quietly.
pub fn run(args: DpPlanArgs) -> anyhow::Result<()> {
    match plan(&args, &mut std::io::stdout().lock()) {
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn plan(args: &DpPlanArgs, out: &mut impl Write) -> anyhow::Result<()> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if !(args.sample_rate > 0.0 && args.sample_rate <= 1.0) {
        bail!("--sample-rate must be in (0, 1], got {}", args.sample_rate);
    }
    let delta = match (args.delta, args.clients) {
        (Some(d), _) if d > 0.0 && d < 1.0 => d,
        (Some(d), _) => bail!("--delta must be in (0, 1), got {d}"),
        (None, Some(n)) if n > 0 => default_delta(n as usize),
        _ => bail!("give --delta, or --clients N for the default δ = min(1/N², 1e-5)"),
    };
    let (q, rounds) = (args.sample_rate, args.rounds);
    let z = match (args.epsilon, args.noise_multiplier) {
        (Some(e), _) => {
            if !(e > 0.0 && e.is_finite()) {
                bail!("--epsilon must be a positive number, got {e}");
            }
            let Some(z) = noise_multiplier_for(e, q, rounds, delta) else {
                bail!(
                    "no noise multiplier up to 10000 keeps {rounds} rounds at sample rate {q} within ε = {e} (δ = {delta:e}): allow more ε or fewer rounds"
                );
            };
            writeln!(
                out,
                "noise multiplier {z:.4} keeps {rounds} rounds at sample rate {q} within ε = {e} (δ = {delta:e}): --dp-noise-multiplier {z:.4}"
            )?;
            z
        }
        (None, Some(z)) if z > 0.0 && z.is_finite() => z,
        (None, Some(z)) => bail!("--noise-multiplier must be a positive number, got {z}"),
        (None, None) => bail!("give --epsilon (to find z) or --noise-multiplier (to see ε)"),
    };
    let mut acc = Accountant::default();
    writeln!(
        out,
        "round  epsilon  (delta {delta:e}, noise multiplier {z:.4}, sample rate {q})"
    )?;
    for round in 1..=rounds {
        acc.step(q, z);
        // Every round up to 20, then about 20 lines in all.
        if rounds <= 20 || round % rounds.div_ceil(20) == 0 || round == rounds {
            writeln!(out, "{round:>5}  {:.4}", acc.spent(delta).epsilon)?;
        }
    }
    Ok(())
}
