//! The [`Strategy`] trait (Flower's `server/strategy`) and [`FedAvg`].
//!
//! A strategy decides who takes part in each step and with what
//! instruction ([`Strategy::configure_fit`] returns one instruction per
//! sampled client), and how results combine. Results are *folded* into the
//! strategy as they arrive ([`Strategy::fold_fit`]); the aggregate is read
//! once the step's results are in ([`Strategy::aggregate_fit`]). A streaming
//! strategy (FedAvg) keeps a running sum, O(model) memory; a buffered one
//! (median, Krum) keeps the results it needs in `fold_fit` and combines them
//! in `aggregate_fit`. A new strategy is one new file here.

use std::sync::Arc;

use rand::RngCore;

mod fedavg;

pub use fedavg::{FedAvg, FedAvgConfig, MetricsFn};

use crate::client_manager::{ClientManager, ClientProxy};
use crate::types::{
    CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Metrics, NodeId, Parameters,
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
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvaluateSummary {
    /// Loss (example-weighted mean for federated evaluation).
    pub loss: Option<f64>,
    /// Every numeric metric (e.g. `accuracy`).
    pub metrics: Metrics,
}

/// A federated-learning algorithm: who takes part, with what instruction,
/// and how results combine. The round loop calls, in order:
/// `configure_fit` → `fold_fit`* → `aggregate_fit` → `evaluate` →
/// `configure_evaluate` → `fold_evaluate`* → `aggregate_evaluate`.
pub trait Strategy: Send {
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
    /// folded this round (`None` if nothing was folded); resets the aggregate.
    fn aggregate_fit(&mut self, round: u64) -> Option<(Parameters, Metrics)>;

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

    /// State to carry across a restart (saved in every checkpoint);
    /// `Null` for stateless strategies such as FedAvg.
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Restores what [`Strategy::state`] returned.
    fn restore_state(&mut self, _state: serde_json::Value) -> Result<(), CoreError> {
        Ok(())
    }
}
