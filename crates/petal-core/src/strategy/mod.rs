//! The [`Strategy`] trait (Flower's `server/strategy`) and Flower's
//! strategy set, one file each, with flwr 1.41's defaults and parameter
//! names (`flwr/serverapp/strategy`).
//!
//! A strategy decides who takes part in each step and with what
//! instruction ([`Strategy::configure_fit`] returns one instruction per
//! sampled client), and how results combine. Results are *folded* into the
//! strategy as they arrive ([`Strategy::fold_fit`]); the aggregate is read
//! once the step's results are in ([`Strategy::aggregate_fit`]).
//!
//! Most strategies differ only in how they combine models: they are an
//! [`Aggregator`] (one file each: `fedavg.rs`, `fedadam.rs`, `krum.rs`, …)
//! joined to the shared [`Base`] (sampling, configs, metrics, evaluation)
//! by [`Composed`]. A streaming aggregator (FedAvg, FedAvgM, FedOpt) keeps
//! a running sum, O(model) memory; a buffered one (median, trimmed mean,
//! Krum, Bulyan) keeps every result and says so
//! ([`Strategy::buffers_results`]) so the round loop can bound its memory.
//! The differential-privacy wrappers (`dp.rs`) wrap any strategy.
//! [`StrategySpec`] names a strategy and its parameters (the run's
//! settings) and [`build`] makes it.

use std::sync::Arc;

use rand::RngCore;

mod base;
mod bulyan;
mod dp;
mod fedadagrad;
mod fedadam;
mod fedavg;
mod fedavgm;
mod fedmedian;
mod fedopt;
mod fedprox;
mod fedtrimmedavg;
mod fedyogi;
mod krum;
mod math;
mod qfedavg;
mod spec;

pub use base::{Base, EvaluateFn, MetricsFn, StrategyConfig};
pub use dp::{ClippingClient, DpMode, DpSpec, DpWrapper, KEY_CLIPPING_NORM, KEY_NORM_BIT};
pub use fedavg::{FedAvg, WeightedAverage};
pub use spec::{StrategySpec, build};

/// The settings of FedAvg (every strategy shares them).
pub type FedAvgConfig = StrategyConfig;

use crate::client_manager::{ClientManager, ClientProxy};
use crate::types::{
    Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Metrics, NodeId, Parameters,
    Tensor,
};

/// Which step of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Training.
    Fit,
    /// Federated evaluation.
    Evaluate,
}

impl Phase {
    /// Lowercase name, as used in logs and the history.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Fit => "fit",
            Phase::Evaluate => "evaluate",
        }
    }
}

/// One client and the instruction it gets.
pub type Instruction<I> = (Arc<dyn ClientProxy>, I);

/// What an evaluation produced: a loss and named metrics.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EvaluateSummary {
    /// Loss (example-weighted mean for federated evaluation).
    pub loss: Option<f64>,
    /// Every numeric metric (e.g. `accuracy`), written beside the loss.
    #[serde(flatten)]
    pub metrics: crate::types::Metrics,
}

impl<'de> serde::Deserialize<'de> for EvaluateSummary {
    /// Reads `{"loss": …, "accuracy": …}`, and the older
    /// `{"loss": …, "metrics": {"accuracy": …}}`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map: std::collections::BTreeMap<String, serde_json::Value> =
            serde::Deserialize::deserialize(d)?;
        let mut out = EvaluateSummary::default();
        for (k, v) in map {
            match (k.as_str(), v) {
                ("loss", serde_json::Value::Null) => {}
                ("loss", v) => {
                    out.loss = Some(
                        v.as_f64()
                            .ok_or_else(|| serde::de::Error::custom("'loss' is not a number"))?,
                    );
                }
                ("metrics", serde_json::Value::Object(m)) => {
                    for (mk, mv) in m {
                        if let Some(x) = mv.as_f64() {
                            out.metrics.insert(mk, x);
                        }
                    }
                }
                (_, serde_json::Value::Null) => {}
                (k, v) => {
                    let x = v.as_f64().ok_or_else(|| {
                        serde::de::Error::custom(format!("metric '{k}' is not a number"))
                    })?;
                    out.metrics.insert(k.to_string(), x);
                }
            }
        }
        Ok(out)
    }
}

/// What a strategy carries across a restart: small values as JSON, and
/// model-sized state (momentum, Adam's moments) as named tensors, saved
/// beside the checkpoint bit for bit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StrategyState {
    pub json: serde_json::Value,
    pub tensors: Vec<(String, Tensor)>,
}

/// A federated-learning algorithm: who takes part, with what instruction,
/// and how results combine. The round loop calls, in order:
/// `configure_fit` → `fold_fit`* → `aggregate_fit` → `evaluate` →
/// `configure_evaluate` → `fold_evaluate`* → `aggregate_evaluate`.
pub trait Strategy: Send {
    /// Its name (`fedavg`, `fedadam`, …) for logs.
    fn name(&self) -> String {
        "custom".into()
    }

    /// Initial global parameters; `None` asks one client for its own.
    fn initialize_parameters(&mut self) -> Option<Parameters> {
        None
    }

    /// Clients that must be connected before `phase` starts (0: don't wait).
    fn min_available_clients(&self, phase: Phase) -> usize;

    /// The clients that train in `round`, each with its instruction,
    /// sampled from the clients connected now with `rng` (seeded per round,
    /// so a run is reproducible). Empty skips the step.
    fn configure_fit(
        &mut self,
        round: u64,
        parameters: &Arc<Parameters>,
        clients: &dyn ClientManager,
        rng: &mut dyn RngCore,
    ) -> Vec<Instruction<FitIns>>;

    /// Folds one client's result into the running aggregate. The round loop
    /// has already checked that the update has the global model's layout
    /// and finite values. An error makes the result a failure and must
    /// leave the aggregate untouched.
    fn fold_fit(&mut self, round: u64, node: NodeId, res: FitRes) -> Result<(), CoreError>;

    /// The new global parameters and aggregated fit metrics from everything
    /// folded this round, given the `current` global model (`None` if
    /// nothing could be aggregated); resets the aggregate.
    fn aggregate_fit(&mut self, round: u64, current: &Parameters) -> Option<(Parameters, Metrics)>;

    /// True when the strategy keeps every result of a step until
    /// `aggregate_fit` (median, Krum, …): the round loop then checks that
    /// the sampled results fit in the memory it may use.
    fn buffers_results(&self) -> bool {
        false
    }

    /// Centralized (server-side) evaluation of the global model after
    /// `round` (0: the initial model); `None` when the strategy has none.
    fn evaluate(&mut self, _round: u64, _parameters: &Parameters) -> Option<EvaluateSummary> {
        None
    }

    /// The clients that evaluate in `round`, each with its instruction.
    fn configure_evaluate(
        &mut self,
        round: u64,
        parameters: &Arc<Parameters>,
        clients: &dyn ClientManager,
        rng: &mut dyn RngCore,
    ) -> Vec<Instruction<EvaluateIns>>;

    /// Folds one evaluation result; an error makes it a failure.
    fn fold_evaluate(
        &mut self,
        round: u64,
        node: NodeId,
        res: EvaluateRes,
    ) -> Result<(), CoreError>;

    /// The round's federated evaluation; resets the running aggregate.
    fn aggregate_evaluate(&mut self, round: u64) -> EvaluateSummary;

    /// State to carry across a restart (saved with every checkpoint);
    /// empty for stateless strategies such as FedAvg.
    fn state(&self) -> StrategyState {
        StrategyState::default()
    }

    /// Restores what [`Strategy::state`] returned.
    fn restore_state(&mut self, _state: StrategyState) -> Result<(), CoreError> {
        Ok(())
    }
}

/// How one family of strategies combines models; joined to [`Base`] by
/// [`Composed`] to make a [`Strategy`].
pub trait Aggregator: Send {
    /// Its name (`fedavg`, `krum`, …).
    fn name(&self) -> &'static str;

    /// Keys added to every fit config (FedProx's `proximal_mu`).
    fn fit_config(&self, _round: u64) -> Config {
        Config::new()
    }

    /// The round's global model, before any result arrives.
    fn begin(&mut self, _round: u64, _current: &Arc<Parameters>) {}

    /// Folds one result (already checked against the model's layout).
    fn fold(&mut self, res: FitRes) -> Result<(), CoreError>;

    /// The new model from what was folded, given the `current` global
    /// model, and the fit metrics when the aggregator picks which results
    /// count (Krum, Bulyan); resets. `None`: no update this round.
    fn aggregate(
        &mut self,
        round: u64,
        current: &Parameters,
    ) -> Option<(Parameters, Option<Metrics>)>;

    /// True when it keeps every result until `aggregate`.
    fn buffers_results(&self) -> bool {
        false
    }

    /// State to carry across a restart.
    fn state(&self) -> StrategyState {
        StrategyState::default()
    }

    /// Restores what [`Aggregator::state`] returned.
    fn restore_state(&mut self, _state: StrategyState) -> Result<(), CoreError> {
        Ok(())
    }
}

/// An [`Aggregator`] with the shared [`Base`]: a whole [`Strategy`].
pub struct Composed<A> {
    base: Base,
    agg: A,
}

impl<A: Aggregator> Composed<A> {
    /// The strategy of `agg` with the settings in `config`.
    pub fn with(config: StrategyConfig, agg: A) -> Result<Self, CoreError> {
        Ok(Composed {
            base: Base::new(config)?,
            agg,
        })
    }

    /// The aggregator.
    pub fn aggregator(&self) -> &A {
        &self.agg
    }
}

impl<A: Aggregator> Strategy for Composed<A> {
    fn name(&self) -> String {
        self.agg.name().to_string()
    }

    fn initialize_parameters(&mut self) -> Option<Parameters> {
        self.base.initialize_parameters()
    }

    fn min_available_clients(&self, phase: Phase) -> usize {
        self.base.min_available_clients(phase)
    }

    fn configure_fit(
        &mut self,
        round: u64,
        parameters: &Arc<Parameters>,
        clients: &dyn ClientManager,
        rng: &mut dyn RngCore,
    ) -> Vec<Instruction<FitIns>> {
        self.agg.begin(round, parameters);
        let extra = self.agg.fit_config(round);
        self.base
            .configure_fit(round, parameters, clients, rng, extra)
    }

    fn fold_fit(&mut self, _round: u64, _node: NodeId, res: FitRes) -> Result<(), CoreError> {
        if res.num_examples == 0 {
            return Err(CoreError::Invalid("fit result reports 0 examples".into()));
        }
        let (n, metrics) = (res.num_examples, res.metrics.clone());
        self.agg.fold(res)?;
        self.base.fold_fit_metrics(n, metrics);
        Ok(())
    }

    fn aggregate_fit(&mut self, round: u64, current: &Parameters) -> Option<(Parameters, Metrics)> {
        let metrics = self.base.finish_fit_metrics();
        let (p, picked) = self.agg.aggregate(round, current)?;
        Some((p, picked.unwrap_or(metrics)))
    }

    fn buffers_results(&self) -> bool {
        self.agg.buffers_results()
    }

    fn evaluate(&mut self, round: u64, parameters: &Parameters) -> Option<EvaluateSummary> {
        self.base.evaluate(round, parameters)
    }

    fn configure_evaluate(
        &mut self,
        round: u64,
        parameters: &Arc<Parameters>,
        clients: &dyn ClientManager,
        rng: &mut dyn RngCore,
    ) -> Vec<Instruction<EvaluateIns>> {
        self.base
            .configure_evaluate(round, parameters, clients, rng)
    }

    fn fold_evaluate(
        &mut self,
        _round: u64,
        _node: NodeId,
        res: EvaluateRes,
    ) -> Result<(), CoreError> {
        self.base.fold_evaluate(res)
    }

    fn aggregate_evaluate(&mut self, _round: u64) -> EvaluateSummary {
        self.base.aggregate_evaluate()
    }

    fn state(&self) -> StrategyState {
        self.agg.state()
    }

    fn restore_state(&mut self, state: StrategyState) -> Result<(), CoreError> {
        self.agg.restore_state(state)
    }
}
