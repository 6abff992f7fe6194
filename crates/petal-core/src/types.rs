//! The values a round exchanges: tensors, parameters, config maps and the
//! fit/evaluate instructions and results (Flower's `common.typing`).

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

pub use crate::tensor::{DType, Tensor, TensorData, shape_len};

/// A client's identity within one run, assigned by the server when the
/// client joins and never reused (Flower's `node_id`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct NodeId(pub u64);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {}", self.0)
    }
}

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

/// Aggregated numeric metrics (`accuracy`, `train_loss`, ...).
pub type Metrics = BTreeMap<String, f64>;

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

/// Model parameters: an ordered list of tensors, as Flower's `Parameters`.
///
/// A transport may cache its encoding of the parameters here
/// ([`Parameters::encoded`]) so that one global model sent to a thousand
/// clients is encoded once, not a thousand times.
#[derive(Default)]
pub struct Parameters {
    pub tensors: Vec<Tensor>,
    /// One name per tensor (PyTorch `state_dict` keys) when the learner
    /// gave them; empty otherwise.
    pub names: Vec<String>,
    encoded: OnceLock<Arc<dyn Any + Send + Sync>>,
}

impl Parameters {
    /// Parameters holding `tensors`, unnamed.
    pub fn new(tensors: Vec<Tensor>) -> Self {
        Parameters {
            tensors,
            names: Vec::new(),
            encoded: OnceLock::new(),
        }
    }

    /// These parameters with a name per tensor (ignored unless there is
    /// exactly one per tensor).
    pub fn with_names(mut self, names: Vec<String>) -> Self {
        if names.len() == self.tensors.len() {
            self.names = names;
        }
        self
    }

    /// Total number of scalar values.
    pub fn num_values(&self) -> usize {
        self.tensors.iter().map(Tensor::len).sum()
    }

    /// Bytes the values take, in their dtypes.
    pub fn num_bytes(&self) -> usize {
        self.tensors.iter().map(Tensor::num_bytes).sum()
    }

    /// The transport's encoding of these parameters, computed by `encode`
    /// the first time and shared afterwards. One encoding type is cached;
    /// asking for another type encodes without caching.
    pub fn encoded<T: Any + Send + Sync>(&self, encode: impl FnOnce(&Self) -> T) -> Arc<T> {
        let mut encode = Some(encode);
        let cached = self.encoded.get_or_init(|| match encode.take() {
            Some(f) => Arc::new(f(self)) as Arc<dyn Any + Send + Sync>,
            None => Arc::new(()),
        });
        match (cached.clone().downcast::<T>(), encode) {
            (Ok(t), _) => t,
            (Err(_), Some(f)) => Arc::new(f(self)),
            // `encode` ran above, so the cached value has type `T`.
            (Err(_), None) => unreachable!("the cache holds the type just encoded"),
        }
    }

    /// Checks that `self` has the layout (tensor count and shapes) of
    /// `reference` and holds only finite values; the error names the first
    /// offending tensor. Dtypes may differ (a float64 update to a float32
    /// model is read as values, and the aggregate keeps the model's dtype).
    pub fn check_like(&self, reference: &Parameters) -> Result<(), CoreError> {
        if self.tensors.len() != reference.tensors.len() {
            return Err(CoreError::ShapeMismatch(format!(
                "expected {} tensors, got {}",
                reference.tensors.len(),
                self.tensors.len()
            )));
        }
        for (i, (t, r)) in self.tensors.iter().zip(&reference.tensors).enumerate() {
            if t.shape != r.shape {
                return Err(CoreError::ShapeMismatch(format!(
                    "tensor {i}: expected shape {:?}, got {:?}",
                    r.shape, t.shape
                )));
            }
            if let Some((pos, v)) = t.data.first_non_finite() {
                return Err(CoreError::NotFinite(format!(
                    "tensor {i} holds {v} at index {pos}"
                )));
            }
        }
        Ok(())
    }
}

impl Parameters {
    /// These parameters with each tensor in the dtype of `reference`'s
    /// tensor at the same place (tensors beyond it keep theirs).
    pub fn cast_like(self, reference: &Parameters) -> Parameters {
        let same = self
            .tensors
            .iter()
            .zip(&reference.tensors)
            .all(|(t, r)| t.dtype() == r.dtype());
        if same {
            return self;
        }
        let tensors = self
            .tensors
            .into_iter()
            .enumerate()
            .map(|(i, t)| match reference.tensors.get(i) {
                Some(r) if r.dtype() != t.dtype() => t.cast(r.dtype()),
                _ => t,
            })
            .collect();
        Parameters::new(tensors).with_names(self.names)
    }
}

impl Clone for Parameters {
    fn clone(&self) -> Self {
        Parameters::new(self.tensors.clone()).with_names(self.names.clone())
    }
}

impl PartialEq for Parameters {
    fn eq(&self, other: &Self) -> bool {
        self.tensors == other.tensors
    }
}

impl std::fmt::Debug for Parameters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parameters")
            .field("tensors", &self.tensors)
            .field("names", &self.names)
            .finish()
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
    #[error("{node}: {reason}")]
    Client { node: NodeId, reason: String },
    #[error("{0}")]
    Local(String),
    #[error("no client could provide initial parameters: {0}")]
    NoInitialParameters(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_shape_overflow_is_an_error() {
        let e = Tensor::new(vec![usize::MAX, 2], vec![]).unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
        assert!(Tensor::new(vec![2, 2], vec![0.0; 3]).is_err());
    }

    #[test]
    fn encoding_is_computed_once_and_shared() {
        let p = Parameters::new(vec![Tensor::new(vec![1], vec![1.0]).unwrap()]);
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let enc = |p: &Parameters| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            p.num_values()
        };
        let a = p.encoded(enc);
        let b = p.encoded(enc);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Another type is computed but not cached.
        assert_eq!(*p.encoded(|_| "other"), "other");
        assert_eq!(p.clone(), p, "clones compare by value and drop the cache");
    }

    #[test]
    fn check_like_names_the_problem() {
        let r = Parameters::new(vec![Tensor::new(vec![2], vec![0.0; 2]).unwrap()]);
        let bad_count = Parameters::new(vec![]);
        assert!(
            bad_count
                .check_like(&r)
                .unwrap_err()
                .to_string()
                .contains("expected 1 tensors")
        );
        let bad_shape = Parameters::new(vec![Tensor::new(vec![1, 2], vec![0.0; 2]).unwrap()]);
        assert!(
            bad_shape
                .check_like(&r)
                .unwrap_err()
                .to_string()
                .contains("tensor 0")
        );
        let nan = Parameters::new(vec![Tensor::new(vec![2], vec![0.0, f32::NAN]).unwrap()]);
        assert!(
            nan.check_like(&r)
                .unwrap_err()
                .to_string()
                .contains("NaN at index 1")
        );
        assert!(r.check_like(&r).is_ok());
    }
}
