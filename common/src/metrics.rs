//! Classification metrics from a confusion matrix: accuracy and macro precision, recall, F1.

use serde::Serialize;

/// `counts[actual][predicted]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfusionMatrix {
    classes: usize,
    counts: Vec<u64>,
}

/// The summary a client reports and the coordinator logs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClassificationMetrics {
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub examples: u64,
}

impl ConfusionMatrix {
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            counts: vec![0; classes * classes],
        }
    }

    /// Records one prediction. Out-of-range classes are ignored (callers check labels up front).
    pub fn add(&mut self, actual: usize, predicted: usize) {
        if actual < self.classes && predicted < self.classes {
            self.counts[actual * self.classes + predicted] += 1;
        }
    }

    pub fn get(&self, actual: usize, predicted: usize) -> u64 {
        self.counts[actual * self.classes + predicted]
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// F1 of each class (0 for a class that never occurs as a label or a prediction).
    pub fn per_class_f1(&self) -> Vec<f64> {
        let k = self.classes;
        (0..k)
            .map(|c| {
                let tp = self.get(c, c) as f64;
                let actual: u64 = (0..k).map(|p| self.get(c, p)).sum();
                let predicted: u64 = (0..k).map(|a| self.get(a, c)).sum();
                if actual + predicted == 0 {
                    0.0
                } else {
                    2.0 * tp / (actual + predicted) as f64
                }
            })
            .collect()
    }

    /// The matrix as rows: `rows()[actual][predicted]`.
    pub fn rows(&self) -> Vec<Vec<u64>> {
        self.counts
            .chunks(self.classes.max(1))
            .map(<[u64]>::to_vec)
            .collect()
    }

    /// Accuracy, and precision / recall / F1 averaged over the classes that occur (as a label or
    /// a prediction); a class with no predictions has precision 0 (as scikit-learn's
    /// `zero_division=0`).
    pub fn metrics(&self) -> ClassificationMetrics {
        let k = self.classes;
        let total = self.total();
        let correct: u64 = (0..k).map(|c| self.get(c, c)).sum();
        let (mut p_sum, mut r_sum, mut f_sum, mut n) = (0.0, 0.0, 0.0, 0usize);
        for c in 0..k {
            let tp = self.get(c, c) as f64;
            let actual: u64 = (0..k).map(|p| self.get(c, p)).sum();
            let predicted: u64 = (0..k).map(|a| self.get(a, c)).sum();
            if actual == 0 && predicted == 0 {
                continue;
            }
            let precision = if predicted > 0 {
                tp / predicted as f64
            } else {
                0.0
            };
            let recall = if actual > 0 { tp / actual as f64 } else { 0.0 };
            let f1 = if precision + recall > 0.0 {
                2.0 * precision * recall / (precision + recall)
            } else {
                0.0
            };
            p_sum += precision;
            r_sum += recall;
            f_sum += f1;
            n += 1;
        }
        let mean = |s: f64| if n > 0 { s / n as f64 } else { 0.0 };
        ClassificationMetrics {
            accuracy: if total > 0 {
                correct as f64 / total as f64
            } else {
                0.0
            },
            precision: mean(p_sum),
            recall: mean(r_sum),
            f1: mean(f_sum),
            examples: total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_hand_computation() {
        // actual:    0 0 0 1 1 2
        // predicted: 0 0 1 1 2 2
        let mut m = ConfusionMatrix::new(3);
        for (a, p) in [(0, 0), (0, 0), (0, 1), (1, 1), (1, 2), (2, 2)] {
            m.add(a, p);
        }
        let r = m.metrics();
        assert!((r.accuracy - 4.0 / 6.0).abs() < 1e-12);
        // precision: c0 2/2, c1 1/2, c2 1/2 -> 2/3; recall: c0 2/3, c1 1/2, c2 1/1 -> 13/18
        assert!((r.precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.recall - 13.0 / 18.0).abs() < 1e-12);
        // f1: c0 0.8, c1 0.5, c2 2/3
        assert!((r.f1 - (0.8 + 0.5 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        assert_eq!(r.examples, 6);
        let per_class = m.per_class_f1();
        for (got, want) in per_class.iter().zip([0.8, 0.5, 2.0 / 3.0]) {
            assert!((got - want).abs() < 1e-12, "{per_class:?}");
        }
        assert_eq!(m.rows(), vec![vec![2, 1, 0], vec![0, 1, 1], vec![0, 0, 1]]);
    }
}
