//! Measuring a model on labelled examples: loss and confusion matrix, in inference mode.

use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::Device;

use crate::data::Examples;
use crate::metrics::{ClassificationMetrics, ConfusionMatrix};
use crate::models::{InputMismatch, Model};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("reading predictions back from the device failed: {0}")]
    Read(String),
    #[error(transparent)]
    Input(#[from] InputMismatch),
}

/// Loss and confusion matrix of a model on some examples.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub loss: f64,
    pub confusion: ConfusionMatrix,
}

impl Evaluation {
    pub fn metrics(&self) -> ClassificationMetrics {
        self.confusion.metrics()
    }
}

/// Evaluates `model` on the examples at `indices`. `device` is a plain (non-autodiff) device;
/// the model is switched to inference mode (no dropout, no gradients).
pub fn evaluate(
    model: &Model,
    data: &dyn Examples,
    indices: &[usize],
    batch_size: usize,
    num_classes: usize,
    device: &Device,
) -> Result<Evaluation, EvalError> {
    let model = model.valid();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut confusion = ConfusionMatrix::new(num_classes);
    let mut loss_sum = 0.0;
    for chunk in indices.chunks(batch_size.max(1)) {
        let (input, labels) = data.batch(chunk, device, None);
        let logits = model.forward(input)?;
        let loss = loss_fn.forward(logits.clone(), labels);
        loss_sum += f64::from(loss.into_scalar::<f32>()) * chunk.len() as f64;
        let predicted = logits
            .argmax(1)
            .into_data()
            .try_into_vec_as::<i64>()
            .map_err(|e| EvalError::Read(format!("{e:?}")))?;
        for (&i, &p) in chunk.iter().zip(&predicted) {
            confusion.add(data.label(i), p.max(0) as usize);
        }
    }
    let loss = if indices.is_empty() {
        f64::NAN
    } else {
        loss_sum / indices.len() as f64
    };
    Ok(Evaluation { loss, confusion })
}
