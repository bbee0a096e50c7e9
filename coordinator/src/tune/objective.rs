//! What ranks a search's trials: one federated validation figure of the global model, measured
//! by every client on its own held-out data (never a test set the server holds). The loss
//! is the default; accuracy or macro F1 when the figure a user will judge the model by is
//! that one, which on strongly skewed data the loss can disagree with.

use serde::{Deserialize, Serialize};

#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// The federated validation loss (lower is better).
    #[default]
    Loss,
    /// The federated validation accuracy (higher is better).
    Accuracy,
    /// The federated validation macro F1 (higher is better).
    F1,
}

impl Objective {
    /// The `metrics.jsonl` field it reads.
    pub fn metric(self) -> &'static str {
        match self {
            Self::Loss => "fed_eval_loss",
            Self::Accuracy => "fed_eval_accuracy",
            Self::F1 => "fed_eval_f1",
        }
    }

    /// How logs and the table name it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Loss => "federated validation loss",
            Self::Accuracy => "federated validation accuracy",
            Self::F1 => "federated validation macro F1",
        }
    }

    /// `value` as a score where lower is better, for ranking; a trial without a value (it
    /// diverged or failed) ranks last.
    pub fn score(self, value: Option<f64>) -> f64 {
        match value.filter(|v| v.is_finite()) {
            Some(v) if self == Self::Loss => v,
            Some(v) => -v,
            None => f64::INFINITY,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_scores_are_better_whichever_way_the_figure_points() {
        assert!(Objective::Loss.score(Some(0.3)) < Objective::Loss.score(Some(0.9)));
        assert!(Objective::Accuracy.score(Some(0.9)) < Objective::Accuracy.score(Some(0.3)));
        assert!(Objective::F1.score(Some(0.5)) < Objective::F1.score(Some(0.1)));
        for o in [Objective::Loss, Objective::Accuracy, Objective::F1] {
            assert_eq!(o.score(None), f64::INFINITY, "{o:?}");
            assert_eq!(o.score(Some(f64::NAN)), f64::INFINITY, "{o:?}");
        }
    }
}
