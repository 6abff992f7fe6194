//! The client runtime: connects to a Flower-protocol server (Petal's or
//! Flower's own), answers its instructions with a local [`Client`], and
//! optionally runs every fit and evaluate in a short-lived worker process
//! ([`isolation::SubprocessClient`]) so that the memory a training step takes
//! is returned to the system when the step ends.
//!
//! Knows nothing about ML frameworks: `petal-ml` provides the [`Client`].

pub mod isolation;
mod runtime;

pub use runtime::{ConnectOptions, run_client};

use petal_core::{Config, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters};

/// What a federated client does (Flower's `Client`). Calls block: they run
/// on a blocking thread of the runtime.
pub trait Client: Send {
    /// Current local parameters.
    fn get_parameters(&mut self, config: &Config) -> Result<Parameters, ClientError>;
    /// Train from the given parameters on local data.
    fn fit(&mut self, ins: FitIns) -> Result<FitRes, ClientError>;
    /// Evaluate the given parameters on local test data.
    fn evaluate(&mut self, ins: EvaluateIns) -> Result<EvaluateRes, ClientError>;
}

/// Errors of the client runtime.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach server {addr} after {attempts} attempts: {reason}")]
    Unreachable {
        addr: String,
        attempts: u32,
        reason: String,
    },
    #[error("invalid server address '{0}'")]
    BadAddress(String),
    #[error("connection to the server failed: {0}")]
    Stream(String),
    #[error("worker process: {0}")]
    Worker(String),
    #[error("{0}")]
    Learner(String),
    #[error(transparent)]
    Proto(#[from] petal_proto::ProtoError),
}
