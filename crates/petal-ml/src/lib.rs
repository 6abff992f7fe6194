//! Local training behind a small trait: a [`Learner`] exposes its weights as
//! named `f32` tensors, trains on an [`ImageSet`] and evaluates on one
//! (Flower's `NumPyClient`, minus the networking). [`LearnerClient`] turns
//! any learner plus a data partition into a `petal_core::Client`.
//!
//! Two backends train the seed CNN: [`native_cnn::NativeCnn`] on Petal's
//! own engine (`petal-nn`, the default on CPU) and [`burn_cnn::BurnCnn`] on
//! burn (its `flex` CPU backend, and CUDA behind the `cuda` feature).
//! Another backend is a new implementation of [`Learner`], nothing else
//! changes. The FL core never depends on this crate.

pub mod burn_cnn;
mod client;
pub mod model;
pub mod native_cnn;
pub mod noop;

pub use client::{
    LearnerClient, LearnerPool, MakeLearner, PartitionData, PooledClient, evaluate_on, fit_on,
    learner_parameters,
};

use burn_cnn::DeviceKind;

use petal_core::{Config, CoreError, Tensor, config_f64};
use petal_data::ImageSet;

/// The seed CNN's tensors, in order, under PyTorch's `state_dict` names:
/// every backend sends and receives them in this order and layout.
pub const CNN_PARAMETER_NAMES: [&str; 10] = [
    "conv1.weight",
    "conv1.bias",
    "conv2.weight",
    "conv2.bias",
    "fc1.weight",
    "fc1.bias",
    "fc2.weight",
    "fc2.bias",
    "fc3.weight",
    "fc3.bias",
];

/// Which implementation trains the CNN, as named by `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Petal's engine on the CPU (`cpu`, the default).
    Native,
    /// burn on the CPU (`burn`) or on a CUDA GPU (`cuda`, `cuda:N`).
    Burn(DeviceKind),
    /// No training at all (`noop`): see [`noop::NoopClient`].
    Noop,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" | "native" => Ok(Backend::Native),
            "noop" => Ok(Backend::Noop),
            "burn" | "burn-cpu" => Ok(Backend::Burn(DeviceKind::Flex)),
            other => other.parse::<DeviceKind>().map(Backend::Burn).map_err(|_| {
                format!("unknown device '{other}' (expected cpu, burn, cuda, cuda:N or noop)")
            }),
        }
    }
}

impl Backend {
    /// Whether this build can run the backend (`cuda` needs `--features cuda`).
    pub fn available(self) -> Result<(), String> {
        match self {
            #[cfg(not(feature = "cuda"))]
            Backend::Burn(DeviceKind::Cuda(_)) => Err(
                "this build has no CUDA support: rebuild with `cargo build --release -p petal \
                 --features cuda`, or use --device cpu"
                    .into(),
            ),
            _ => Ok(()),
        }
    }
}

/// The seed CNN for images of `input` shape on `backend`, initialised from
/// `seed`; the native backend splits each batch across `threads` threads.
pub fn seed_cnn(
    backend: Backend,
    input: [usize; 3],
    num_classes: usize,
    seed: u64,
    threads: usize,
) -> Result<Box<dyn Learner>, MlError> {
    Ok(match backend {
        Backend::Native => Box::new(native_cnn::NativeCnn::new(
            input,
            num_classes,
            seed,
            threads,
        )?),
        Backend::Burn(device) => {
            Box::new(burn_cnn::BurnCnn::new(input, num_classes, device, seed)?)
        }
        Backend::Noop => {
            return Err(MlError::Backend(
                "the noop device has no learner: use noop::NoopClient".into(),
            ));
        }
    })
}

/// The learner of `model` (a network file; `None`: the seed CNN) for
/// inputs of `input` shape and `num_classes` classes, on `backend`.
pub fn build_learner(
    backend: Backend,
    model: Option<&model::ModelFile>,
    input: [usize; 3],
    num_classes: usize,
    seed: u64,
    threads: usize,
) -> Result<Box<dyn Learner>, MlError> {
    match (model, backend) {
        (None, _) => seed_cnn(backend, input, num_classes, seed, threads),
        (Some(m), Backend::Native) => Ok(Box::new(native_cnn::NativeCnn::from_spec(
            &m.spec(input, num_classes)?,
            seed,
            threads,
        )?)),
        (Some(_), _) => Err(MlError::Backend(
            "a network file (--model) runs on Petal's engine: use --device cpu".into(),
        )),
    }
}

impl Learner for Box<dyn Learner> {
    fn get_weights(&self) -> Result<Vec<NamedTensor>, MlError> {
        (**self).get_weights()
    }
    fn set_weights(&mut self, weights: &[Tensor]) -> Result<(), MlError> {
        (**self).set_weights(weights)
    }
    fn fit(&mut self, data: &ImageSet, opts: &TrainOptions) -> Result<FitStats, MlError> {
        (**self).fit(data, opts)
    }
    fn evaluate(&mut self, data: &ImageSet, batch_size: usize) -> Result<EvalStats, MlError> {
        (**self).evaluate(data, batch_size)
    }
}

/// Most local epochs one instruction may ask for: a server cannot make a
/// client train forever.
pub const MAX_EPOCHS: usize = 1000;

/// Largest mini-batch one instruction may ask for.
pub const MAX_BATCH_SIZE: usize = 1 << 20;

/// A tensor with a stable name (PyTorch-style, e.g. `conv1.weight`).
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub tensor: Tensor,
}

/// Hyper-parameters of local training; fit config keys of the same names override them.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// Passes over the local training data (`epochs`).
    pub epochs: usize,
    /// SGD learning rate (`lr`).
    pub lr: f64,
    /// SGD momentum (`momentum`).
    pub momentum: f64,
    /// Mini-batch size (`batch_size`).
    pub batch_size: usize,
    /// Seed of the shuffling order (`seed`; the server round is added to it).
    pub seed: u64,
    /// FedProx's proximal term `mu` (`proximal_mu`): the loss gains
    /// `mu/2 · ||w − w_global||²`; 0 is plain SGD.
    pub proximal_mu: f64,
    /// The optimizer (`optimizer`): SGD with `momentum`, or Adam (PyTorch's
    /// defaults: betas 0.9, 0.999, eps 1e-8).
    pub optimizer: OptimizerKind,
    /// L2 weight decay added to the gradient, as PyTorch's `weight_decay`
    /// (`weight_decay`).
    pub weight_decay: f64,
}

/// Which optimizer local training uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptimizerKind {
    #[default]
    Sgd,
    Adam,
}

impl std::str::FromStr for OptimizerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sgd" => Ok(OptimizerKind::Sgd),
            "adam" => Ok(OptimizerKind::Adam),
            other => Err(format!(
                "unknown optimizer '{other}' (expected sgd or adam)"
            )),
        }
    }
}

impl OptimizerKind {
    /// Its name, as `--optimizer` and the fit config spell it.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adam => "adam",
        }
    }
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            epochs: 1,
            lr: 0.001,
            momentum: 0.9,
            batch_size: 32,
            seed: 0,
            proximal_mu: 0.0,
            optimizer: OptimizerKind::Sgd,
            weight_decay: 0.0,
        }
    }
}

/// The config keys a Petal learner reads (Flower's names, and Petal's
/// older `epochs`); others are logged once.
pub const KNOWN_CONFIG_KEYS: [&str; 12] = [
    "optimizer",
    "weight_decay",
    "server_round",
    "local_epochs",
    "epochs",
    "lr",
    "momentum",
    "batch_size",
    "proximal_mu",
    "seed",
    "clipping_norm",
    "eta_l",
];

/// Logs each config key a learner does not use, once per process: a
/// server's setting must never be dropped without a word.
fn warn_unknown_keys(config: &Config) {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    for k in config.keys() {
        if KNOWN_CONFIG_KEYS.contains(&k.as_str()) || k.contains('-') {
            continue;
        }
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.iter().any(|s| s == k) {
            tracing::warn!("the server's config key '{k}' is not used by this learner");
            seen.push(k.clone());
        }
    }
}

impl TrainOptions {
    /// These options with the keys present in `config` applied.
    pub fn with_config(&self, config: &Config) -> Result<Self, MlError> {
        warn_unknown_keys(config);
        let positive_int = |key: &str, default: usize, max: usize| -> Result<usize, MlError> {
            let v = config_f64(config, key, default as f64)?;
            if v < 1.0 || v.fract() != 0.0 {
                return Err(MlError::Config(format!(
                    "{key} must be a positive integer, got {v}"
                )));
            }
            if v > max as f64 {
                return Err(MlError::Config(format!(
                    "{key} {v} is more than {max}, the most a client accepts"
                )));
            }
            Ok(v as usize)
        };
        let lr = config_f64(config, "lr", self.lr)?;
        if !(lr.is_finite() && lr > 0.0) {
            return Err(MlError::Config(format!("lr must be positive, got {lr}")));
        }
        let momentum = config_f64(config, "momentum", self.momentum)?;
        if !(0.0..1.0).contains(&momentum) {
            return Err(MlError::Config(format!(
                "momentum must be in [0, 1), got {momentum}"
            )));
        }
        let round = config_f64(config, "server_round", 0.0)? as u64;
        let proximal_mu = config_f64(config, "proximal_mu", self.proximal_mu)?;
        if !(proximal_mu.is_finite() && proximal_mu >= 0.0) {
            return Err(MlError::Config(format!(
                "proximal_mu must be a non-negative number, got {proximal_mu}"
            )));
        }
        // Flower's `local_epochs`, or Petal's `epochs` when it is the one given.
        let epochs_key = if config.contains_key("local_epochs") {
            "local_epochs"
        } else {
            "epochs"
        };
        let weight_decay = config_f64(config, "weight_decay", self.weight_decay)?;
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(MlError::Config(format!(
                "weight_decay must be a non-negative number, got {weight_decay}"
            )));
        }
        let optimizer = match config.get("optimizer") {
            None => self.optimizer,
            Some(petal_core::Scalar::Str(s)) => s.parse().map_err(MlError::Config)?,
            Some(other) => {
                return Err(MlError::Config(format!(
                    "optimizer must be a string (sgd or adam), got {other:?}"
                )));
            }
        };
        Ok(TrainOptions {
            optimizer,
            weight_decay,
            epochs: positive_int(epochs_key, self.epochs, MAX_EPOCHS)?,
            lr,
            momentum,
            batch_size: positive_int("batch_size", self.batch_size, MAX_BATCH_SIZE)?,
            seed: (config_f64(config, "seed", self.seed as f64)? as u64).wrapping_add(round),
            proximal_mu,
        })
    }
}

/// What local training reports.
#[derive(Debug, Clone, PartialEq)]
pub struct FitStats {
    pub num_examples: usize,
    /// Mean training loss over the last epoch.
    pub train_loss: f64,
}

/// What local evaluation reports.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalStats {
    pub num_examples: usize,
    /// Mean cross-entropy loss.
    pub loss: f64,
    /// Fraction of correct predictions.
    pub accuracy: f64,
}

/// A trainable model, as the FL client sees it.
pub trait Learner: Send {
    /// Current weights, in a fixed order with stable names.
    fn get_weights(&self) -> Result<Vec<NamedTensor>, MlError>;
    /// Replaces the weights; `weights` follow the order of [`Learner::get_weights`].
    fn set_weights(&mut self, weights: &[Tensor]) -> Result<(), MlError>;
    /// Trains on `data`.
    fn fit(&mut self, data: &ImageSet, opts: &TrainOptions) -> Result<FitStats, MlError>;
    /// Evaluates on `data`.
    fn evaluate(&mut self, data: &ImageSet, batch_size: usize) -> Result<EvalStats, MlError>;
}

/// Errors of local training.
#[derive(Debug, thiserror::Error)]
pub enum MlError {
    #[error("model does not fit the data: {0}")]
    Shape(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("bad training config: {0}")]
    Config(String),
    #[error("empty data set: {0}")]
    Empty(&'static str),
    #[error("backend: {0}")]
    Backend(String),
    #[error("training diverged: {0}")]
    Diverged(String),
    #[error("network file: {0}")]
    Model(String),
}

impl From<CoreError> for MlError {
    fn from(e: CoreError) -> Self {
        MlError::Config(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use petal_core::Scalar;

    #[test]
    fn config_overrides_and_validates() {
        let base = TrainOptions::default();
        let cfg: Config = [
            ("epochs".to_string(), Scalar::I64(3)),
            ("lr".to_string(), Scalar::Double(0.1)),
            ("server_round".to_string(), Scalar::I64(2)),
        ]
        .into();
        let o = base.with_config(&cfg).unwrap();
        assert_eq!((o.epochs, o.lr, o.batch_size, o.seed), (3, 0.1, 32, 2));
        let bad: Config = [("batch_size".to_string(), Scalar::Double(0.5))].into();
        let e = base.with_config(&bad).unwrap_err().to_string();
        assert!(e.contains("batch_size must be a positive integer"), "{e}");
        let huge: Config = [("epochs".to_string(), Scalar::I64(1 << 62))].into();
        let e = base.with_config(&huge).unwrap_err().to_string();
        assert!(e.contains("the most a client accepts"), "{e}");
        let bad: Config = [("lr".to_string(), Scalar::Str("fast".into()))].into();
        assert!(
            base.with_config(&bad)
                .unwrap_err()
                .to_string()
                .contains("'lr'")
        );
    }

    #[test]
    fn the_optimizer_and_weight_decay_come_from_the_config() {
        let base = TrainOptions::default();
        assert_eq!(
            (base.optimizer, base.weight_decay),
            (OptimizerKind::Sgd, 0.0)
        );
        let cfg: Config = [
            ("optimizer".to_string(), Scalar::Str("adam".into())),
            ("weight_decay".to_string(), Scalar::Double(1e-4)),
        ]
        .into();
        let o = base.with_config(&cfg).unwrap();
        assert_eq!((o.optimizer, o.weight_decay), (OptimizerKind::Adam, 1e-4));
        let bad: Config = [("optimizer".to_string(), Scalar::Str("rmsprop".into()))].into();
        let e = base.with_config(&bad).unwrap_err().to_string();
        assert!(e.contains("unknown optimizer 'rmsprop'"), "{e}");
        let bad: Config = [("optimizer".to_string(), Scalar::I64(1))].into();
        assert!(base.with_config(&bad).is_err());
        let bad: Config = [("weight_decay".to_string(), Scalar::Double(-1.0))].into();
        let e = base.with_config(&bad).unwrap_err().to_string();
        assert!(
            e.contains("weight_decay must be a non-negative number"),
            "{e}"
        );
    }
}
