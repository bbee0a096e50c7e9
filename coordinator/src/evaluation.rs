//! Server-side evaluation of the global model on a held-out set (`--eval-data`), on flex.

use std::path::Path;

use anyhow::Context;
use burn::tensor::Device;
use fedtune_common::data::{DataFolder, ImageDataset};
use fedtune_common::models::ModelSpec;
use fedtune_common::params;
use fedtune_common::tensors::TensorSet;
use fedtune_common::train::{self, Evaluation};

const EVAL_BATCH: usize = 500;

pub struct ServerEval {
    data: ImageDataset,
    indices: Vec<usize>,
    spec: ModelSpec,
}

impl ServerEval {
    pub fn open(dir: &Path, spec: ModelSpec) -> anyhow::Result<Self> {
        let data = DataFolder::open(dir)
            .context("cannot open `eval_data`")?
            .evaluation_set();
        spec.check_data(&data)
            .context("`eval_data` does not fit the model")?;
        let indices = (0..data.len()).collect();
        Ok(Self {
            data,
            indices,
            spec,
        })
    }

    pub fn examples(&self) -> usize {
        self.indices.len()
    }

    pub fn evaluate(&self, global: &TensorSet) -> anyhow::Result<Evaluation> {
        let device = Device::flex();
        let model = self.spec.build(&device)?;
        let model = params::inject(model, global)?;
        Ok(train::evaluate(
            &model,
            &self.data,
            &self.indices,
            EVAL_BATCH,
            self.spec.num_classes as usize,
            &device,
        )?)
    }
}
