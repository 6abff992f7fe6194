//! The client runtime: connects to a Flower-protocol server (Petal's or
//! Flower's own), answers its instructions with a local [`Client`], and
//! reconnects (exponential backoff with jitter) whenever the connection is
//! lost, until the server ends the run. [`isolation::SubprocessClient`]
//! runs every fit and evaluate in a short-lived worker process so that the
//! memory a training step takes is returned to the system when it ends.
//!
//! Knows nothing about ML frameworks: `petal-ml` provides the [`Client`].

pub mod isolation;
mod runtime;

pub use petal_core::Client;
pub use runtime::{ClientTls, ConnectOptions, run_client, run_clients};

/// Errors of the client runtime.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach server {addr} after {attempts} attempts: {reason}")]
    Unreachable {
        addr: String,
        attempts: u32,
        reason: String,
    },
    #[error("invalid server address '{0}': expected host:port")]
    BadAddress(String),
    #[error("TLS settings: {0}")]
    Tls(String),
    #[error("the server refused this client: {0}")]
    Refused(String),
    #[error("worker process: {0}")]
    Worker(String),
    #[error(transparent)]
    Proto(#[from] petal_proto::ProtoError),
}
