//! Federated averaging (McMahan et al., 2017): the new model is the mean
//! of the clients' models weighted by their number of training examples.
//! Updates are folded as they arrive, so memory stays O(model).

use super::{Aggregator, Composed, StrategyConfig};
use crate::aggregate::WeightedMean;
use crate::types::{CoreError, FitRes, Metrics, Parameters};

/// FedAvg's aggregation: a streaming example-weighted mean.
#[derive(Default)]
pub struct WeightedAverage {
    acc: WeightedMean,
}

impl WeightedAverage {
    /// Folds a result.
    pub fn add(&mut self, res: &FitRes) -> Result<(), CoreError> {
        self.acc.fold(&res.parameters, res.num_examples as f64)
    }

    /// The weighted mean of what was folded; resets.
    pub fn take(&mut self) -> Option<Parameters> {
        std::mem::take(&mut self.acc).finish()
    }
}

impl Aggregator for WeightedAverage {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn fold(&mut self, res: FitRes) -> Result<(), CoreError> {
        self.add(&res)
    }

    fn aggregate(
        &mut self,
        _round: u64,
        _current: &Parameters,
    ) -> Option<(Parameters, Option<Metrics>)> {
        self.take().map(|p| (p, None))
    }
}

/// Federated averaging.
pub type FedAvg = Composed<WeightedAverage>;

impl FedAvg {
    /// A FedAvg strategy with the given settings.
    pub fn new(config: StrategyConfig) -> Result<Self, CoreError> {
        Composed::with(config, WeightedAverage::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::{FedAvgConfig, Strategy};
    use crate::types::{Config, EvaluateRes, NodeId, Scalar, Tensor};

    fn res(v: f32, n: u64) -> FitRes {
        FitRes {
            parameters: Parameters::new(vec![Tensor::new(vec![2], vec![v, -v]).unwrap()]),
            num_examples: n,
            metrics: [("train_loss".to_string(), Scalar::Double(v as f64))].into(),
        }
    }

    #[test]
    fn fedavg_weights_by_examples() {
        let mut s = FedAvg::new(FedAvgConfig::default()).unwrap();
        s.fold_fit(1, NodeId(1), res(1.0, 10)).unwrap();
        s.fold_fit(1, NodeId(2), res(3.0, 30)).unwrap();
        assert!(s.fold_fit(1, NodeId(3), res(f32::INFINITY, 5)).is_err());
        assert!(s.fold_fit(1, NodeId(4), res(1.0, 0)).is_err());
        let (p, metrics) = s.aggregate_fit(1, &Parameters::default()).unwrap();
        assert_eq!(p.tensors[0].data, vec![2.5, -2.5]);
        assert_eq!(
            metrics["train_loss"], 2.5,
            "fit metrics are example-weighted"
        );
        assert!(
            s.aggregate_fit(2, &Parameters::default()).is_none(),
            "aggregate resets each round"
        );
    }

    #[test]
    fn fedavg_evaluation_is_example_weighted() {
        let mut s = FedAvg::new(FedAvgConfig::default()).unwrap();
        let r = |loss: f32, acc: f64, n| EvaluateRes {
            loss,
            num_examples: n,
            metrics: [("accuracy".to_string(), Scalar::Double(acc))].into(),
        };
        s.fold_evaluate(1, NodeId(1), r(1.0, 0.5, 100)).unwrap();
        s.fold_evaluate(1, NodeId(2), r(2.0, 1.0, 300)).unwrap();
        let sum = s.aggregate_evaluate(1);
        assert_eq!(sum.loss, Some(1.75));
        assert_eq!(sum.metrics["accuracy"], 0.875);
    }

    #[test]
    fn custom_metrics_function_sees_every_result() {
        let mut s = FedAvg::new(FedAvgConfig {
            fit_metrics_fn: Some(Box::new(|all: &[(u64, Config)]| {
                [("clients".to_string(), all.len() as f64)].into()
            })),
            ..Default::default()
        })
        .unwrap();
        s.fold_fit(1, NodeId(1), res(1.0, 10)).unwrap();
        s.fold_fit(1, NodeId(2), res(2.0, 10)).unwrap();
        assert_eq!(
            s.aggregate_fit(1, &Parameters::default()).unwrap().1["clients"],
            2.0
        );
    }

    #[test]
    fn fedavg_rejects_impossible_sampling() {
        let cfg = FedAvgConfig {
            fit_clients: 5,
            min_available_clients: 3,
            ..Default::default()
        };
        let err = FedAvg::new(cfg).err().unwrap().to_string();
        assert!(err.contains("cannot train 5 clients"), "{err}");
    }
}
