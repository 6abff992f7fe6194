//! Federated averaging.

use std::sync::Arc;

use rand::RngCore;

use super::{EvaluateSummary, Instruction, Phase, Strategy};
use crate::aggregate::{MetricsMean, ScalarMean, WeightedMean};
use crate::client_manager::ClientManager;
use crate::types::{
    Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Metrics, NodeId, Parameters,
    Scalar,
};

/// Aggregates clients' `(num_examples, metrics)` into round metrics
/// (Flower's `fit_metrics_aggregation_fn`).
pub type MetricsFn = Box<dyn Fn(&[(u64, Config)]) -> Metrics + Send>;

/// Server-side evaluation of a global model after a round (0: the initial one).
pub type EvaluateFn = Box<dyn FnMut(u64, &Parameters) -> Option<EvaluateSummary> + Send>;

/// Settings of [`FedAvg`]; every knob has its home here.
pub struct FedAvgConfig {
    /// Clients sampled for training each round.
    pub fit_clients: usize,
    /// Clients that must be connected before a step starts.
    pub min_available_clients: usize,
    /// Fraction of connected clients sampled for evaluation (0 disables it).
    pub fraction_evaluate: f64,
    /// Config sent with every fit instruction (`server_round` is added).
    pub fit_config: Config,
    /// Config sent with every evaluate instruction (`server_round` is added).
    pub evaluate_config: Config,
    /// Initial global model; `None` asks one client.
    pub initial_parameters: Option<Parameters>,
    /// Fit metrics aggregation; `None`: example-weighted mean of every number.
    pub fit_metrics_fn: Option<MetricsFn>,
    /// Evaluate metrics aggregation; `None`: example-weighted mean.
    pub evaluate_metrics_fn: Option<MetricsFn>,
    /// Centralized evaluation of each new global model.
    pub evaluate_fn: Option<EvaluateFn>,
}

impl Default for FedAvgConfig {
    fn default() -> Self {
        FedAvgConfig {
            fit_clients: 2,
            min_available_clients: 2,
            fraction_evaluate: 1.0,
            fit_config: Config::new(),
            evaluate_config: Config::new(),
            initial_parameters: None,
            fit_metrics_fn: None,
            evaluate_metrics_fn: None,
            evaluate_fn: None,
        }
    }
}

/// Metrics folded as they arrive: a streaming weighted mean, or the list a
/// custom aggregation function needs.
#[derive(Default)]
struct MetricsAcc {
    mean: MetricsMean,
    buffered: Vec<(u64, Config)>,
}

impl MetricsAcc {
    fn add(&mut self, custom: bool, n: u64, metrics: Config) {
        if custom {
            self.buffered.push((n, metrics));
        } else {
            self.mean.add(&metrics, n as f64);
        }
    }

    fn finish(&mut self, custom: Option<&MetricsFn>) -> Metrics {
        let acc = std::mem::take(self);
        match custom {
            Some(f) => f(&acc.buffered),
            None => acc.mean.finish(),
        }
    }
}

/// Federated averaging (McMahan et al., 2017): the new model is the mean
/// of the clients' models weighted by their number of training examples.
/// Updates are folded as they arrive, so memory stays O(model).
pub struct FedAvg {
    config: FedAvgConfig,
    fit_acc: WeightedMean,
    fit_metrics: MetricsAcc,
    eval_loss: ScalarMean,
    eval_metrics: MetricsAcc,
}

impl FedAvg {
    /// A FedAvg strategy with the given settings.
    pub fn new(config: FedAvgConfig) -> Result<Self, CoreError> {
        if config.fit_clients == 0 {
            return Err(CoreError::Invalid("fit_clients must be at least 1".into()));
        }
        if config.fit_clients > config.min_available_clients {
            return Err(CoreError::Invalid(format!(
                "cannot train {} clients per round when only {} must be connected",
                config.fit_clients, config.min_available_clients
            )));
        }
        if !(0.0..=1.0).contains(&config.fraction_evaluate) {
            return Err(CoreError::Invalid(format!(
                "fraction_evaluate must be in [0, 1], got {}",
                config.fraction_evaluate
            )));
        }
        Ok(FedAvg {
            config,
            fit_acc: WeightedMean::new(),
            fit_metrics: MetricsAcc::default(),
            eval_loss: ScalarMean::default(),
            eval_metrics: MetricsAcc::default(),
        })
    }

    fn num_evaluate_clients(&self, available: usize) -> usize {
        if self.config.fraction_evaluate <= 0.0 {
            return 0;
        }
        let n = (available as f64 * self.config.fraction_evaluate).round() as usize;
        n.max(1).min(available)
    }
}

/// `config` with `server_round` set.
pub(crate) fn with_round(config: &Config, round: u64) -> Config {
    let mut c = config.clone();
    c.insert(
        "server_round".into(),
        Scalar::I64(i64::try_from(round).unwrap_or(i64::MAX)),
    );
    c
}

impl Strategy for FedAvg {
    fn initialize_parameters(&mut self) -> Option<Parameters> {
        self.config.initial_parameters.take()
    }

    fn min_available_clients(&self, phase: Phase) -> usize {
        match phase {
            Phase::Evaluate if self.config.fraction_evaluate <= 0.0 => 0,
            _ => self.config.min_available_clients,
        }
    }

    fn configure_fit(
        &mut self,
        round: u64,
        parameters: &Arc<Parameters>,
        clients: &dyn ClientManager,
        rng: &mut dyn RngCore,
    ) -> Vec<Instruction<FitIns>> {
        let ins = FitIns {
            parameters: parameters.clone(),
            config: with_round(&self.config.fit_config, round),
        };
        clients
            .sample(self.config.fit_clients, rng)
            .into_iter()
            .map(|c| (c, ins.clone()))
            .collect()
    }

    fn fold_fit(&mut self, _round: u64, _node: NodeId, res: FitRes) -> Result<(), CoreError> {
        if res.num_examples == 0 {
            return Err(CoreError::Invalid("fit result reports 0 examples".into()));
        }
        self.fit_acc
            .fold(&res.parameters, res.num_examples as f64)?;
        let custom = self.config.fit_metrics_fn.is_some();
        self.fit_metrics.add(custom, res.num_examples, res.metrics);
        Ok(())
    }

    fn aggregate_fit(&mut self, _round: u64) -> Option<(Parameters, Metrics)> {
        let metrics = self.fit_metrics.finish(self.config.fit_metrics_fn.as_ref());
        std::mem::take(&mut self.fit_acc)
            .finish()
            .map(|p| (p, metrics))
    }

    fn evaluate(&mut self, round: u64, parameters: &Parameters) -> Option<EvaluateSummary> {
        self.config.evaluate_fn.as_mut()?(round, parameters)
    }

    fn configure_evaluate(
        &mut self,
        round: u64,
        parameters: &Arc<Parameters>,
        clients: &dyn ClientManager,
        rng: &mut dyn RngCore,
    ) -> Vec<Instruction<EvaluateIns>> {
        let n = self.num_evaluate_clients(clients.num_available());
        if n == 0 {
            return Vec::new();
        }
        let ins = EvaluateIns {
            parameters: parameters.clone(),
            config: with_round(&self.config.evaluate_config, round),
        };
        clients
            .sample(n, rng)
            .into_iter()
            .map(|c| (c, ins.clone()))
            .collect()
    }

    fn fold_evaluate(
        &mut self,
        _round: u64,
        _node: NodeId,
        res: EvaluateRes,
    ) -> Result<(), CoreError> {
        if res.num_examples == 0 {
            return Err(CoreError::Invalid(
                "evaluate result reports 0 examples".into(),
            ));
        }
        if !res.loss.is_finite() {
            return Err(CoreError::NotFinite(format!("loss is {}", res.loss)));
        }
        self.eval_loss.add(res.loss as f64, res.num_examples as f64);
        let custom = self.config.evaluate_metrics_fn.is_some();
        self.eval_metrics.add(custom, res.num_examples, res.metrics);
        Ok(())
    }

    fn aggregate_evaluate(&mut self, _round: u64) -> EvaluateSummary {
        let loss = std::mem::take(&mut self.eval_loss).mean();
        let metrics = self
            .eval_metrics
            .finish(self.config.evaluate_metrics_fn.as_ref());
        EvaluateSummary { loss, metrics }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Tensor;

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
        let (p, metrics) = s.aggregate_fit(1).unwrap();
        assert_eq!(p.tensors[0].data, vec![2.5, -2.5]);
        assert_eq!(
            metrics["train_loss"], 2.5,
            "fit metrics are example-weighted"
        );
        assert!(s.aggregate_fit(2).is_none(), "aggregate resets each round");
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
        assert_eq!(s.aggregate_fit(1).unwrap().1["clients"], 2.0);
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
