//! What every strategy shares (Flower's FedAvg minus the averaging):
//! sampling clients, the configs sent to them, aggregating their metrics
//! and losses, and centralized evaluation.

use std::sync::Arc;

use rand::RngCore;

use super::{EvaluateSummary, Instruction, Phase};
use crate::aggregate::{MetricsMean, ScalarMean};
use crate::client_manager::ClientManager;
use crate::types::{
    Config, CoreError, EvaluateIns, EvaluateRes, FitIns, Metrics, Parameters, Scalar,
};

/// Aggregates clients' `(num_examples, metrics)` into round metrics
/// (Flower's `fit_metrics_aggregation_fn`).
pub type MetricsFn = Box<dyn Fn(&[(u64, Config)]) -> Metrics + Send>;

/// Server-side evaluation of a global model after a round (0: the initial one).
pub type EvaluateFn = Box<dyn FnMut(u64, &Parameters) -> Option<EvaluateSummary> + Send>;

/// Settings every strategy shares; every knob has its home here.
pub struct StrategyConfig {
    /// Clients sampled for training each round (at least; Flower's
    /// `min_train_nodes`).
    pub fit_clients: usize,
    /// Fraction of connected clients sampled for training, when more than
    /// `fit_clients` (Flower's `fraction_train`; 0: exactly `fit_clients`).
    pub fraction_fit: f64,
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

impl Default for StrategyConfig {
    fn default() -> Self {
        StrategyConfig {
            fit_clients: 2,
            fraction_fit: 0.0,
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

/// The shared part of a strategy (see the module).
pub struct Base {
    config: StrategyConfig,
    fit_metrics: MetricsAcc,
    eval_loss: ScalarMean,
    eval_metrics: MetricsAcc,
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

impl Base {
    /// Checks the settings.
    pub fn new(config: StrategyConfig) -> Result<Self, CoreError> {
        if config.fit_clients == 0 {
            return Err(CoreError::Invalid("fit_clients must be at least 1".into()));
        }
        if config.fit_clients > config.min_available_clients {
            return Err(CoreError::Invalid(format!(
                "cannot train {} clients per round when only {} must be connected",
                config.fit_clients, config.min_available_clients
            )));
        }
        for (name, f) in [
            ("fraction_evaluate", config.fraction_evaluate),
            ("fraction_fit", config.fraction_fit),
        ] {
            if !(0.0..=1.0).contains(&f) {
                return Err(CoreError::Invalid(format!(
                    "{name} must be in [0, 1], got {f}"
                )));
            }
        }
        Ok(Base {
            config,
            fit_metrics: MetricsAcc::default(),
            eval_loss: ScalarMean::default(),
            eval_metrics: MetricsAcc::default(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &StrategyConfig {
        &self.config
    }

    /// The initial model given in the settings (once).
    pub fn initialize_parameters(&mut self) -> Option<Parameters> {
        self.config.initial_parameters.take()
    }

    /// Clients that must be connected before `phase`.
    pub fn min_available_clients(&self, phase: Phase) -> usize {
        match phase {
            Phase::Evaluate if self.config.fraction_evaluate <= 0.0 => 0,
            _ => self.config.min_available_clients,
        }
    }

    /// Clients to sample for training out of `available` (Flower's
    /// `max(int(available × fraction), min)`).
    pub fn num_fit_clients(&self, available: usize) -> usize {
        let by_fraction = (available as f64 * self.config.fraction_fit) as usize;
        by_fraction.max(self.config.fit_clients)
    }

    fn num_evaluate_clients(&self, available: usize) -> usize {
        if self.config.fraction_evaluate <= 0.0 {
            return 0;
        }
        let n = (available as f64 * self.config.fraction_evaluate).round() as usize;
        n.max(1).min(available)
    }

    /// Samples the round's trainers, each with the fit config (plus `extra`).
    pub fn configure_fit(
        &mut self,
        round: u64,
        parameters: &Arc<Parameters>,
        clients: &dyn ClientManager,
        rng: &mut dyn RngCore,
        extra: Config,
    ) -> Vec<Instruction<FitIns>> {
        let mut config = with_round(&self.config.fit_config, round);
        config.extend(extra);
        let ins = FitIns {
            parameters: parameters.clone(),
            config,
        };
        let n = self.num_fit_clients(clients.num_available());
        clients
            .sample(n, rng)
            .into_iter()
            .map(|c| (c, ins.clone()))
            .collect()
    }

    /// Folds one trainer's metrics.
    pub fn fold_fit_metrics(&mut self, n: u64, metrics: Config) {
        let custom = self.config.fit_metrics_fn.is_some();
        self.fit_metrics.add(custom, n, metrics);
    }

    /// The round's fit metrics; resets.
    pub fn finish_fit_metrics(&mut self) -> Metrics {
        self.fit_metrics.finish(self.config.fit_metrics_fn.as_ref())
    }

    /// Centralized evaluation, when configured.
    pub fn evaluate(&mut self, round: u64, parameters: &Parameters) -> Option<EvaluateSummary> {
        self.config.evaluate_fn.as_mut()?(round, parameters)
    }

    /// Samples the round's evaluators.
    pub fn configure_evaluate(
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

    /// Folds one evaluation.
    pub fn fold_evaluate(&mut self, res: EvaluateRes) -> Result<(), CoreError> {
        if res.num_examples == 0 {
            return Err(CoreError::Invalid(
                "evaluate result reports 0 examples".into(),
            ));
        }
        if !res.loss.is_finite() {
            return Err(CoreError::NotFinite(format!("loss is {}", res.loss)));
        }
        self.eval_loss
            .add(f64::from(res.loss), res.num_examples as f64);
        let custom = self.config.evaluate_metrics_fn.is_some();
        self.eval_metrics.add(custom, res.num_examples, res.metrics);
        Ok(())
    }

    /// The round's federated evaluation; resets.
    pub fn aggregate_evaluate(&mut self) -> EvaluateSummary {
        let loss = std::mem::take(&mut self.eval_loss).mean();
        let metrics = self
            .eval_metrics
            .finish(self.config.evaluate_metrics_fn.as_ref());
        EvaluateSummary { loss, metrics }
    }
}
