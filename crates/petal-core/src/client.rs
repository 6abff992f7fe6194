//! What a federated client does, whatever carries its messages (Flower's
//! `Client`): the gRPC runtime, a worker process and the simulation engine
//! all drive a [`Client`].

use crate::types::{Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters};

/// A federated client. Calls block (they train), so runtimes run them on
/// blocking threads. An error becomes a failure the server records.
pub trait Client: Send {
    /// Current local parameters.
    fn get_parameters(&mut self, config: &Config) -> Result<Parameters, CoreError>;
    /// Trains from the given parameters on local data.
    fn fit(&mut self, ins: FitIns) -> Result<FitRes, CoreError>;
    /// Evaluates the given parameters on local test data.
    fn evaluate(&mut self, ins: EvaluateIns) -> Result<EvaluateRes, CoreError>;
}

impl<C: Client + ?Sized> Client for Box<C> {
    fn get_parameters(&mut self, config: &Config) -> Result<Parameters, CoreError> {
        (**self).get_parameters(config)
    }
    fn fit(&mut self, ins: FitIns) -> Result<FitRes, CoreError> {
        (**self).fit(ins)
    }
    fn evaluate(&mut self, ins: EvaluateIns) -> Result<EvaluateRes, CoreError> {
        (**self).evaluate(ins)
    }
}
