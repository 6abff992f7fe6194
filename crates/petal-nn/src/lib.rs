//! `petal-nn`: training and evaluation of small sequential conv nets on the
//! CPU, fast. Activations are stored batch-innermost (one SIMD lane per
//! image), so every layer is a broadcast weight times a vector of images;
//! the kernels are compiled for AVX-512, AVX2 + FMA and plain Rust, and the
//! best one this CPU runs is chosen at run time ([`Isa::detect`]). The
//! semantics are PyTorch's: its layer layouts and parameter names, its
//! default initialisation, first-maximum max-pooling, mean cross-entropy
//! and SGD's momentum rule.
//!
//! This crate knows nothing of federated learning: `petal-ml` wraps a
//! [`Network`] as a `Learner`.

mod kernels;
mod net;
mod simd;

pub use kernels::Kernels;
pub use net::{HALF, Images, LayerSpec, NetSpec, Network, Optimizer, Param, Pixels};
pub use simd::Isa;

/// Errors building or feeding a network.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    #[error("invalid network: {0}")]
    Spec(String),
    #[error("parameters: {0}")]
    Params(String),
    #[error("data: {0}")]
    Data(String),
}
