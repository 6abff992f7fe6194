//! Federated averaging.

use std::sync::Arc;

use super::{EvaluateSummary, Strategy};
use crate::aggregate::{ScalarMean, WeightedMean};
use crate::types::{
    Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar,
};

/// Settings of [`FedAvg`]; every knob has its home here.
#[derive(Debug, Clone)]
pub struct FedAvgConfig {
    /// Clients sampled for training each round.
    pub fit_clients: usize,
    /// Clients that must be connected before a round starts.
    pub min_available_clients: usize,
    /// Fraction of connected clients sampled for evaluation (0 disables it).
    pub fraction_evaluate: f64,
    /// Config sent with every fit instruction (`server_round` is added).
    pub fit_config: Config,
    /// Config sent with every evaluate instruction (`server_round` is added).
    pub evaluate_config: Config,
    /// Initial global model; `None` asks one client.
    pub initial_parameters: Option<Parameters>,
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
        }
    }
}

/// Federated averaging (McMahan et al., 2017): the new model is the mean
/// of the clients' models weighted by their number of training examples.
pub struct FedAvg {
    config: FedAvgConfig,
    fit_acc: WeightedMean,
    eval_loss: ScalarMean,
    eval_metrics: std::collections::BTreeMap<String, ScalarMean>,
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
            eval_loss: ScalarMean::default(),
            eval_metrics: Default::default(),
        })
    }
}

fn with_round(config: &Config, round: u64) -> Config {
    let mut c = config.clone();
    c.insert("server_round".into(), Scalar::I64(round as i64));
    c
}

impl Strategy for FedAvg {
    fn initialize_parameters(&mut self) -> Option<Parameters> {
        self.config.initial_parameters.take()
    }

    fn num_fit_clients(&self, _available: usize) -> (usize, usize) {
        (self.config.fit_clients, self.config.min_available_clients)
    }

    fn configure_fit(&mut self, round: u64, parameters: Arc<Parameters>) -> FitIns {
        FitIns {
            parameters,
            config: with_round(&self.config.fit_config, round),
        }
    }

    fn fold_fit(&mut self, _round: u64, _cid: &str, res: &FitRes) -> Result<(), CoreError> {
        if res.num_examples == 0 {
            return Err(CoreError::Invalid("fit result reports 0 examples".into()));
        }
        self.fit_acc.fold(&res.parameters, res.num_examples as f64)
    }

    fn aggregate_fit(&mut self, _round: u64) -> Option<Parameters> {
        std::mem::take(&mut self.fit_acc).finish()
    }

    fn num_evaluate_clients(&self, available: usize) -> (usize, usize) {
        let n = (available as f64 * self.config.fraction_evaluate).round() as usize;
        let n = if self.config.fraction_evaluate > 0.0 {
            n.max(1)
        } else {
            0
        };
        (n.min(available), self.config.min_available_clients)
    }

    fn configure_evaluate(&mut self, round: u64, parameters: Arc<Parameters>) -> EvaluateIns {
        EvaluateIns {
            parameters,
            config: with_round(&self.config.evaluate_config, round),
        }
    }

    fn fold_evaluate(
        &mut self,
        _round: u64,
        _cid: &str,
        res: &EvaluateRes,
    ) -> Result<(), CoreError> {
        if res.num_examples == 0 {
            return Err(CoreError::Invalid(
                "evaluate result reports 0 examples".into(),
            ));
        }
        if !res.loss.is_finite() {
            return Err(CoreError::NotFinite(format!("loss is {}", res.loss)));
        }
        let w = res.num_examples as f64;
        self.eval_loss.add(res.loss as f64, w);
        for (k, v) in &res.metrics {
            if let Some(x) = v.as_f64() {
                self.eval_metrics.entry(k.clone()).or_default().add(x, w);
            }
        }
        Ok(())
    }

    fn aggregate_evaluate(&mut self, _round: u64) -> EvaluateSummary {
        let loss = std::mem::take(&mut self.eval_loss).mean();
        let metrics = std::mem::take(&mut self.eval_metrics)
            .into_iter()
            .filter_map(|(k, m)| m.mean().map(|v| (k, v)))
            .collect();
        EvaluateSummary { loss, metrics }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Tensor;

    fn res(v: f32, n: u64) -> FitRes {
        FitRes {
            parameters: Parameters {
                tensors: vec![Tensor::new(vec![2], vec![v, -v]).unwrap()],
            },
            num_examples: n,
            metrics: Config::new(),
        }
    }

    #[test]
    fn fedavg_weights_by_examples() {
        let mut s = FedAvg::new(FedAvgConfig::default()).unwrap();
        s.fold_fit(1, "a", &res(1.0, 10)).unwrap();
        s.fold_fit(1, "b", &res(3.0, 30)).unwrap();
        assert!(s.fold_fit(1, "c", &res(f32::INFINITY, 5)).is_err());
        assert!(s.fold_fit(1, "d", &res(1.0, 0)).is_err());
        let p = s.aggregate_fit(1).unwrap();
        assert_eq!(p.tensors[0].data, vec![2.5, -2.5]);
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
        s.fold_evaluate(1, "a", &r(1.0, 0.5, 100)).unwrap();
        s.fold_evaluate(1, "b", &r(2.0, 1.0, 300)).unwrap();
        let sum = s.aggregate_evaluate(1);
        assert_eq!(sum.loss, Some(1.75));
        assert_eq!(sum.metrics["accuracy"], 0.875);
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

    #[test]
    fn fit_config_carries_round() {
        let mut s = FedAvg::new(FedAvgConfig::default()).unwrap();
        let ins = s.configure_fit(7, Arc::new(Parameters::default()));
        assert_eq!(ins.config["server_round"], Scalar::I64(7));
    }
}
