//! [`LearnerClient`]: a learner and its data partition as a federated client.

use petal_core::{
    Client, Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar, Tensor,
};
use petal_data::Splits;

use crate::{Learner, MlError, TrainOptions};

/// Answers fit/evaluate by training `learner` on a local partition.
pub struct LearnerClient<L> {
    learner: L,
    data: Splits,
    defaults: TrainOptions,
}

impl<L: Learner> LearnerClient<L> {
    /// A client training `learner` on `data`, with `defaults` unless the server's config overrides them.
    pub fn new(learner: L, data: Splits, defaults: TrainOptions) -> Self {
        LearnerClient {
            learner,
            data,
            defaults,
        }
    }

    fn parameters(&self) -> Result<Parameters, MlError> {
        Ok(Parameters::new(
            self.learner
                .get_weights()?
                .into_iter()
                .map(|n| n.tensor)
                .collect(),
        ))
    }

    fn set(&mut self, p: &Parameters) -> Result<(), MlError> {
        self.learner.set_weights(&p.tensors)
    }
}

fn err(e: MlError) -> CoreError {
    CoreError::Local(e.to_string())
}

impl<L: Learner> Client for LearnerClient<L> {
    fn get_parameters(&mut self, _config: &Config) -> Result<Parameters, CoreError> {
        self.parameters().map_err(err)
    }

    fn fit(&mut self, ins: FitIns) -> Result<FitRes, CoreError> {
        let opts = self.defaults.with_config(&ins.config).map_err(err)?;
        self.set(&ins.parameters).map_err(err)?;
        let stats = self.learner.fit(&self.data.train, &opts).map_err(err)?;
        Ok(FitRes {
            parameters: self.parameters().map_err(err)?,
            num_examples: stats.num_examples as u64,
            metrics: [("train_loss".to_string(), Scalar::Double(stats.train_loss))].into(),
        })
    }

    fn evaluate(&mut self, ins: EvaluateIns) -> Result<EvaluateRes, CoreError> {
        let opts = self.defaults.with_config(&ins.config).map_err(err)?;
        self.set(&ins.parameters).map_err(err)?;
        let stats = self
            .learner
            .evaluate(&self.data.test, opts.batch_size)
            .map_err(err)?;
        Ok(EvaluateRes {
            loss: stats.loss as f32,
            num_examples: stats.num_examples as u64,
            metrics: [("accuracy".to_string(), Scalar::Double(stats.accuracy))].into(),
        })
    }
}

/// Checks that `weights` match `expected` names and shapes, naming the first mismatch.
pub(crate) fn check_shapes(
    expected: &[(String, Vec<usize>)],
    weights: &[Tensor],
) -> Result<(), MlError> {
    if expected.len() != weights.len() {
        return Err(MlError::Weights(format!(
            "expected {} tensors, got {}",
            expected.len(),
            weights.len()
        )));
    }
    for ((name, shape), t) in expected.iter().zip(weights) {
        if &t.shape != shape {
            return Err(MlError::Weights(format!(
                "{name}: expected shape {shape:?}, got {:?}",
                t.shape
            )));
        }
    }
    Ok(())
}
