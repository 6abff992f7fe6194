//! The [`Strategy`] trait (Flower's `server/strategy`) and [`FedAvg`].
//!
//! Results are *folded* into the strategy as they arrive
//! ([`Strategy::fold_fit`]) and the aggregate is read once the round's
//! results are in ([`Strategy::aggregate_fit`]), so a strategy never needs to
//! hold every client's update at once.

use std::sync::Arc;

mod fedavg;

pub use fedavg::{FedAvg, FedAvgConfig};

use crate::types::{CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters};

/// What a federated-evaluation step produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvaluateSummary {
    /// Example-weighted mean loss.
    pub loss: Option<f64>,
    /// Example-weighted mean of every numeric metric (e.g. `accuracy`).
    pub metrics: std::collections::BTreeMap<String, f64>,
}

/// A federated-learning algorithm: who trains, with what, and how results combine.
pub trait Strategy: Send {
    /// Initial global parameters; `None` asks one client for its own.
    fn initialize_parameters(&mut self) -> Option<Parameters> {
        None
    }
    /// `(sample size, minimum connected clients)` for training, given `available`.
    fn num_fit_clients(&self, available: usize) -> (usize, usize);
    /// The instruction sent to every sampled client in `round`.
    fn configure_fit(&mut self, round: u64, parameters: Arc<Parameters>) -> FitIns;
    /// Folds one client's result into the running aggregate. An error makes
    /// the result a failure and leaves the aggregate untouched.
    fn fold_fit(&mut self, round: u64, cid: &str, res: &FitRes) -> Result<(), CoreError>;
    /// The new global parameters from everything folded this round (`None`
    /// if nothing was folded); resets the running aggregate.
    fn aggregate_fit(&mut self, round: u64) -> Option<Parameters>;
    /// `(sample size, minimum connected clients)` for evaluation; a sample of 0 skips it.
    fn num_evaluate_clients(&self, available: usize) -> (usize, usize);
    /// The instruction sent to every client sampled for evaluation.
    fn configure_evaluate(&mut self, round: u64, parameters: Arc<Parameters>) -> EvaluateIns;
    /// Folds one evaluation result.
    fn fold_evaluate(&mut self, round: u64, cid: &str, res: &EvaluateRes) -> Result<(), CoreError>;
    /// The round's evaluation summary; resets the running aggregate.
    fn aggregate_evaluate(&mut self, round: u64) -> EvaluateSummary;
}
