//! A client that does no work: it returns the model it receives and a
//! fixed example count. Measures the framework itself (what Flower's
//! benchmarks call a no-op client), and lets a thousand clients take part
//! without data or models.

use petal_core::{
    Client, Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar, Tensor,
};

use crate::CNN_PARAMETER_NAMES;

/// A no-op client.
pub struct NoopClient {
    shapes: Vec<Vec<usize>>,
    examples: u64,
}

impl NoopClient {
    /// A client whose model has the seed CNN's layout for `input` images
    /// (zeros), or, with `values`, one tensor of that many values, and
    /// which reports `examples` examples.
    pub fn new(input: [usize; 3], classes: usize, values: Option<usize>, examples: u64) -> Self {
        let shapes = match values {
            Some(n) => vec![vec![n]],
            None => {
                let [c, h, w] = input;
                let side = |s: usize| (s.saturating_sub(4) / 2).saturating_sub(4) / 2;
                let flat = 16 * side(h) * side(w);
                vec![
                    vec![6, c, 5, 5],
                    vec![6],
                    vec![16, 6, 5, 5],
                    vec![16],
                    vec![120, flat],
                    vec![120],
                    vec![84, 120],
                    vec![84],
                    vec![classes, 84],
                    vec![classes],
                ]
            }
        };
        debug_assert!(values.is_some() || shapes.len() == CNN_PARAMETER_NAMES.len());
        NoopClient {
            shapes,
            examples: examples.max(1),
        }
    }
}

impl Client for NoopClient {
    fn get_parameters(&mut self, _: &Config) -> Result<Parameters, CoreError> {
        let tensors = self
            .shapes
            .iter()
            .map(|s| Tensor::new(s.clone(), vec![0.0; s.iter().product()]))
            .collect::<Result<_, _>>()?;
        Ok(Parameters::new(tensors))
    }

    fn fit(&mut self, ins: FitIns) -> Result<FitRes, CoreError> {
        let parameters =
            std::sync::Arc::try_unwrap(ins.parameters).unwrap_or_else(|p| (*p).clone());
        Ok(FitRes {
            parameters,
            num_examples: self.examples,
            metrics: Config::new(),
        })
    }

    fn evaluate(&mut self, _: EvaluateIns) -> Result<EvaluateRes, CoreError> {
        Ok(EvaluateRes {
            loss: 0.0,
            num_examples: self.examples,
            metrics: [("accuracy".to_string(), Scalar::Double(0.0))].into(),
        })
    }
}
