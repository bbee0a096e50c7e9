//! What the training loop and evaluation read: labelled examples that turn into model input one
//! batch at a time, whatever they are (images, table rows, tokenised text).

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use rand::rngs::StdRng;

use super::ImageDataset;
use super::tokens::TokenizedText;
use crate::augment::Augment;
use crate::models::ModelInput;

/// Fashion-MNIST's pixel mean and standard deviation (of x / 255).
const PIXEL_MEAN: f32 = 0.2860;
const PIXEL_STD: f32 = 0.3530;

/// Labelled examples, batched on demand.
pub trait Examples {
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The class of example `i`.
    fn label(&self, i: usize) -> usize;

    /// The examples at `indices` as model input and their labels. `augment` (images only)
    /// perturbs each example with the given generator.
    fn batch(
        &self,
        indices: &[usize],
        device: &Device,
        augment: Option<(&Augment, &mut StdRng)>,
    ) -> (ModelInput, Tensor<1, Int>);

    fn labels_tensor(&self, indices: &[usize], device: &Device) -> Tensor<1, Int> {
        let y: Vec<i64> = indices.iter().map(|&i| self.label(i) as i64).collect();
        Tensor::from_data(TensorData::new(y, [indices.len()]), device)
    }
}

impl Examples for ImageDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn label(&self, i: usize) -> usize {
        usize::from(self.labels[i])
    }

    /// A normalised `[batch, 1, rows, cols]` tensor (table rows as they are).
    fn batch(
        &self,
        indices: &[usize],
        device: &Device,
        augment: Option<(&Augment, &mut StdRng)>,
    ) -> (ModelInput, Tensor<1, Int>) {
        let mut augment = augment.filter(|(a, _)| !a.is_off() && !self.is_tabular());
        let mut x = Vec::with_capacity(indices.len() * self.rows * self.cols);
        for &i in indices {
            match self.features(i) {
                Some(f) => x.extend_from_slice(f),
                None => {
                    let pixels: Vec<f32> = match augment.as_mut() {
                        Some((a, rng)) => a.apply(self.image(i), self.rows, self.cols, *rng),
                        None => self
                            .image(i)
                            .iter()
                            .map(|&p| f32::from(p) / 255.0)
                            .collect(),
                    };
                    x.extend(pixels.into_iter().map(|p| (p - PIXEL_MEAN) / PIXEL_STD));
                }
            }
        }
        let images = Tensor::from_data(
            TensorData::new(x, [indices.len(), 1, self.rows, self.cols]),
            device,
        );
        (
            ModelInput::Images(images),
            self.labels_tensor(indices, device),
        )
    }
}

impl Examples for TokenizedText {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn label(&self, i: usize) -> usize {
        usize::from(self.labels[i])
    }

    /// Token ids padded (id 0) to the longest text of the batch, with the padding mask.
    fn batch(
        &self,
        indices: &[usize],
        device: &Device,
        _augment: Option<(&Augment, &mut StdRng)>,
    ) -> (ModelInput, Tensor<1, Int>) {
        let seq = indices
            .iter()
            .map(|&i| self.ids[i].len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut ids = vec![self.pad_id as i64; indices.len() * seq];
        let mut padding = vec![true; indices.len() * seq];
        for (row, &i) in indices.iter().enumerate() {
            for (col, &id) in self.ids[i].iter().enumerate() {
                ids[row * seq + col] = i64::from(id);
                padding[row * seq + col] = false;
            }
        }
        let shape = [indices.len(), seq];
        let input = ModelInput::Tokens {
            ids: Tensor::from_data(TensorData::new(ids, shape), device),
            padding: Tensor::<2, Bool>::from_data(TensorData::new(padding, shape), device),
        };
        (input, self.labels_tensor(indices, device))
    }
}
