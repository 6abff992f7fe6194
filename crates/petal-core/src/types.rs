//! The values a round exchanges: tensors, parameters, config maps and the
//! fit/evaluate instructions and results (Flower's `common.typing`).

use std::collections::BTreeMap;
use std::sync::Arc;

/// A config or metrics value, as Flower's `Scalar`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Bool(bool),
    I64(i64),
    U64(u64),
    Double(f64),
    Str(String),
    Bytes(Vec<u8>),
}

impl Scalar {
    /// The value as a float, when it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Scalar::Double(v) => Some(v),
            Scalar::I64(v) => Some(v as f64),
            Scalar::U64(v) => Some(v as f64),
            _ => None,
        }
    }
}

/// Config sent to clients, or metrics they send back.
pub type Config = BTreeMap<String, Scalar>;

/// Reads a numeric config value, falling back to `default` when absent.
pub fn config_f64(config: &Config, key: &str, default: f64) -> Result<f64, CoreError> {
    match config.get(key) {
        None => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| CoreError::BadConfig {
            key: key.to_string(),
            reason: format!("expected a number, got {v:?}"),
        }),
    }
}

/// A dense `f32` array in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// Builds a tensor, checking that `data` fills `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, CoreError> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(CoreError::ShapeMismatch(format!(
                "shape {shape:?} holds {n} values, got {}",
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }
}

/// Model parameters: an ordered list of tensors, as Flower's `Parameters`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parameters {
    pub tensors: Vec<Tensor>,
}

impl Parameters {
    /// Total number of scalar values.
    pub fn num_values(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }
}

/// Instruction to train: global parameters and config (epochs, lr, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct FitIns {
    /// Shared, so sending one model to many clients copies nothing.
    pub parameters: Arc<Parameters>,
    pub config: Config,
}

/// A client's training result.
#[derive(Debug, Clone, PartialEq)]
pub struct FitRes {
    pub parameters: Parameters,
    pub num_examples: u64,
    pub metrics: Config,
}

/// Instruction to evaluate the given parameters on local test data.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluateIns {
    pub parameters: Arc<Parameters>,
    pub config: Config,
}

/// A client's evaluation result.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluateRes {
    pub loss: f32,
    pub num_examples: u64,
    pub metrics: Config,
}

/// Errors of the FL core.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    #[error("update is not finite: {0}")]
    NotFinite(String),
    #[error("config key '{key}': {reason}")]
    BadConfig { key: String, reason: String },
    #[error("client {cid}: {reason}")]
    Client { cid: String, reason: String },
    #[error("no client could provide initial parameters: {0}")]
    NoInitialParameters(String),
    #[error("{0}")]
    Invalid(String),
}
