//! Flower's legacy bidirectional gRPC protocol (`flwr.proto.FlowerService/Join`)
//! and the conversions between its messages and `petal-core` types.
//!
//! Arrays travel as NumPy `.npy` bytes ([`npy`]) with tensor type
//! `"numpy.ndarray"`, as in Flower. This crate holds no networking logic.

pub mod frames;
pub mod limits;
pub mod npy;
pub mod serde;

/// Code generated from `proto/flwr/proto/transport.proto`.
#[allow(missing_docs, clippy::all)]
pub mod flwr {
    tonic::include_proto!("flwr.proto");
}

pub use flwr::{ClientMessage, ServerMessage};

/// The `tensor_type` Flower uses for `.npy`-encoded arrays.
pub const TENSOR_TYPE_NUMPY: &str = "numpy.ndarray";

/// Largest gRPC message Petal sends or accepts (Flower's default: 512 MiB).
pub const MAX_MESSAGE_BYTES: usize = 536_870_912;

/// Errors turning wire messages into core types.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("invalid .npy array: {0}")]
    Npy(String),
    #[error("tensor {index}: {source}")]
    Tensor {
        index: usize,
        #[source]
        source: Box<ProtoError>,
    },
    #[error("unsupported tensor_type '{0}' (expected \"numpy.ndarray\")")]
    TensorType(String),
    #[error("message is missing field '{0}'")]
    Missing(&'static str),
    #[error("negative num_examples {0}")]
    NegativeExamples(i64),
    #[error("{0}")]
    Core(#[from] petal_core::CoreError),
}
