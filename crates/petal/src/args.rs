//! Flags shared by several subcommands; each knob has one home here. The
//! learner's settings are also serializable: `petal run` hands them to its
//! client processes and a client to its workers as one JSON document
//! (`--learner-config`), never as flags rebuilt by hand.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use petal_data::{DatasetSpec, SyntheticSpec};
use petal_ml::{Backend, TrainOptions};
use serde::{Deserialize, Serialize};

/// Which data a client trains on.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct DataArgs {
    /// Data set: fashion-mnist, cifar10 or synthetic.
    #[arg(long, default_value = "fashion-mnist")]
    pub dataset: String,
    /// Folder searched first for data files (Fashion-MNIST then falls back
    /// to /usr/share/datasets/fashion-mnist; CIFAR-10 defaults to ./data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Download CIFAR-10 into --data-dir when it is missing.
    #[arg(long)]
    pub download: bool,
    /// Shape of synthetic images, CxHxW.
    #[arg(long, default_value = "1x28x28", value_parser = parse_shape)]
    pub synthetic_shape: [usize; 3],
    /// Synthetic training images per client (each partition is generated on its own).
    #[arg(long, default_value_t = 500)]
    pub synthetic_train: usize,
    /// Synthetic test images per client.
    #[arg(long, default_value_t = 100)]
    pub synthetic_test: usize,
    /// Seed of partitioning and synthetic data.
    #[arg(long, default_value_t = 42)]
    pub data_seed: u64,
}

pub fn parse_shape(s: &str) -> Result<[usize; 3], String> {
    let dims: Vec<usize> = s
        .split('x')
        .map(|d| d.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("'{s}' is not a shape like 3x32x32"))?;
    dims.try_into()
        .map_err(|_| format!("'{s}' needs three dimensions, like 3x32x32"))
}

fn parse_device(s: &str) -> Result<String, String> {
    s.parse::<Backend>()?;
    Ok(s.to_string())
}

impl DataArgs {
    /// The shape of the data set's images, without loading it.
    pub fn shape(&self) -> [usize; 3] {
        match self.dataset.as_str() {
            "cifar10" | "cifar-10" => [3, 32, 32],
            "synthetic" => self.synthetic_shape,
            _ => [1, 28, 28],
        }
    }

    /// The data set these flags describe (validates the name).
    pub fn spec(&self) -> Result<DatasetSpec, petal_data::DataError> {
        let synthetic = SyntheticSpec {
            shape: self.synthetic_shape,
            train: self.synthetic_train,
            test: self.synthetic_test,
            seed: self.data_seed,
            ..Default::default()
        };
        DatasetSpec::from_name(&self.dataset, self.download, synthetic)
    }
}

/// Local training hyper-parameters (the server's fit config overrides them).
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct TrainArgs {
    /// Local epochs per round.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// SGD learning rate.
    #[arg(long, default_value_t = 0.001)]
    pub lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Mini-batch size.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

impl TrainArgs {
    /// As [`TrainOptions`].
    pub fn options(&self, seed: u64) -> TrainOptions {
        TrainOptions {
            epochs: self.epochs,
            lr: self.lr,
            momentum: self.momentum,
            batch_size: self.batch_size,
            seed,
        }
    }
}

/// Which partition of the data a client holds, and the model it trains.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct LearnerArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub train: TrainArgs,
    /// This client's partition, 0-based.
    #[arg(long, default_value_t = 0)]
    pub partition_id: usize,
    /// Number of partitions the data set is cut into.
    #[arg(long, default_value_t = 1)]
    pub num_partitions: usize,
    /// Device: cpu (Petal's native engine), burn (burn's CPU backend), cuda
    /// or cuda:N (burn on a GPU; needs the cuda feature).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: String,
    /// Threads of the native engine per client (0: RAYON_NUM_THREADS, else
    /// every core shared by the clients training at once).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// With `--device noop`: the model is one tensor of this many values
    /// (default: the CNN's layout). For measuring the framework.
    #[arg(long)]
    pub noop_values: Option<usize>,
    /// Seed of model initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// File holding this partition, decoded (written by the first worker,
    /// read by the next ones); set by `petal client` for its workers.
    #[arg(skip)]
    pub partition_cache: Option<PathBuf>,
}

impl LearnerArgs {
    /// The backend, already validated by the flag parser.
    pub fn device(&self) -> anyhow::Result<Backend> {
        self.device.parse().map_err(|e: String| anyhow::anyhow!(e))
    }

    /// Threads of the native engine: `--threads`, else `RAYON_NUM_THREADS`, else every core.
    pub fn threads(&self) -> usize {
        resolve_threads(self.threads)
    }

    /// These settings as one JSON document (for `--learner-config`).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Settings from [`LearnerArgs::to_json`].
    pub fn from_json(json: &str) -> anyhow::Result<Self> {
        serde_json::from_str(json).context("invalid --learner-config")
    }
}

/// Round and output settings shared by `petal server` and `petal run`.
#[derive(Args, Debug, Clone)]
pub struct RoundArgs {
    /// Number of rounds (skipped rounds count).
    #[arg(long, default_value_t = 3)]
    pub rounds: u64,
    /// Fraction of connected clients that evaluate each round (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub fraction_evaluate: f64,
    /// Seconds one fit, evaluate or get_parameters call may take before it
    /// counts as failed and the client is dropped (0: no limit).
    #[arg(long, default_value_t = 1800.0)]
    pub call_timeout: f64,
    /// Stop with an error after this many skipped rounds in a row (default: never).
    #[arg(long)]
    pub max_skipped_rounds: Option<u64>,
    /// Calls in flight at once in one step; the others wait their turn
    /// (default: 512 for `petal server`; `petal run` with worker processes:
    /// 16 per core, as each call in flight is a worker).
    #[arg(long)]
    pub max_in_flight: Option<usize>,
    /// Memory for model copies in flight, in MiB: calls in flight are also
    /// at most this divided by the model's size (0: no such bound).
    #[arg(long, default_value_t = 1024)]
    pub in_flight_memory_mb: usize,
    /// Seed of client sampling.
    #[arg(long, default_value_t = 0)]
    pub sample_seed: u64,
    /// Folder for history.json, history.csv and checkpoint.safetensors
    /// (default: runs/<UTC date and time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run saved in this folder at its next round.
    #[arg(long, conflicts_with = "out")]
    pub resume: Option<PathBuf>,
    /// Largest message accepted from a client, in MiB (a bigger one drops the client).
    #[arg(long, default_value_t = 512)]
    pub max_message_mb: usize,
}

/// Server-side federation settings.
#[derive(Args, Debug, Clone)]
pub struct FederationArgs {
    #[command(flatten)]
    pub round: RoundArgs,
    /// Clients that must be connected before each step.
    #[arg(long, default_value_t = 2)]
    pub min_available_clients: usize,
    /// Clients sampled to train each round.
    #[arg(long, default_value_t = 2)]
    pub fit_clients: usize,
    /// Seconds a step waits for enough clients before the round is skipped
    /// (default: forever).
    #[arg(long)]
    pub wait_timeout: Option<f64>,
}

/// Seconds as a duration; `None` for `None`, and for 0 when `zero_is_none`.
pub fn secs(s: Option<f64>, zero_is_none: bool) -> anyhow::Result<Option<Duration>> {
    match s {
        None => Ok(None),
        Some(v) if zero_is_none && v == 0.0 => Ok(None),
        Some(v) => Duration::try_from_secs_f64(v)
            .map(Some)
            .with_context(|| format!("invalid duration {v} s")),
    }
}

/// `n`, or when 0: `RAYON_NUM_THREADS`, else every core.
pub fn resolve_threads(n: usize) -> usize {
    if n > 0 {
        return n;
    }
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
