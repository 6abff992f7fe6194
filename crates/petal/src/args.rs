//! Flags shared by several subcommands; each knob has one home here.

use std::path::PathBuf;

use clap::Args;
use petal_data::{DatasetSpec, SyntheticSpec};
use petal_ml::TrainOptions;
use petal_ml::burn_cnn::DeviceKind;

/// Which data a client trains on.
#[derive(Args, Debug, Clone)]
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
    /// Synthetic training images (whole data set, before partitioning).
    #[arg(long, default_value_t = 2000)]
    pub synthetic_train: usize,
    /// Synthetic test images (whole data set, before partitioning).
    #[arg(long, default_value_t = 500)]
    pub synthetic_test: usize,
    /// Seed of partitioning and synthetic data.
    #[arg(long, default_value_t = 42)]
    pub data_seed: u64,
}

fn parse_shape(s: &str) -> Result<[usize; 3], String> {
    let dims: Vec<usize> = s
        .split('x')
        .map(|d| d.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("'{s}' is not a shape like 3x32x32"))?;
    dims.try_into()
        .map_err(|_| format!("'{s}' needs three dimensions, like 3x32x32"))
}

impl DataArgs {
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

    /// The same flags as command-line arguments (for worker processes).
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--dataset".into(),
            self.dataset.clone(),
            "--synthetic-shape".into(),
            self.synthetic_shape.map(|d| d.to_string()).join("x"),
            "--synthetic-train".into(),
            self.synthetic_train.to_string(),
            "--synthetic-test".into(),
            self.synthetic_test.to_string(),
            "--data-seed".into(),
            self.data_seed.to_string(),
        ];
        if let Some(d) = &self.data_dir {
            v.push("--data-dir".into());
            v.push(d.display().to_string());
        }
        if self.download {
            v.push("--download".into());
        }
        v
    }
}

/// Local training hyper-parameters (the server's fit config overrides them).
#[derive(Args, Debug, Clone)]
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

    /// The same flags as command-line arguments.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--epochs".into(),
            self.epochs.to_string(),
            "--lr".into(),
            self.lr.to_string(),
            "--momentum".into(),
            self.momentum.to_string(),
            "--batch-size".into(),
            self.batch_size.to_string(),
        ]
    }
}

/// Which partition of the data a client holds, and the model it trains.
#[derive(Args, Debug, Clone)]
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
    /// Device: cpu (burn flex), cuda or cuda:N (needs the cuda feature).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceKind,
    /// Seed of model initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// File holding this partition, decoded (written by the first worker,
    /// read by the next ones); set by `petal client` for its workers.
    #[arg(long, hide = true)]
    pub partition_cache: Option<PathBuf>,
}

impl LearnerArgs {
    /// The same flags as command-line arguments.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = self.data.to_args();
        v.extend(self.train.to_args());
        let device = match self.device {
            DeviceKind::Flex => "cpu".to_string(),
            DeviceKind::Cuda(n) => format!("cuda:{n}"),
        };
        v.extend([
            "--partition-id".into(),
            self.partition_id.to_string(),
            "--num-partitions".into(),
            self.num_partitions.to_string(),
            "--device".into(),
            device,
            "--seed".into(),
            self.seed.to_string(),
        ]);
        if let Some(p) = &self.partition_cache {
            v.push("--partition-cache".into());
            v.push(p.display().to_string());
        }
        v
    }
}

/// Round settings shared by `petal server` and `petal run`.
#[derive(Args, Debug, Clone)]
pub struct RoundArgs {
    /// Number of rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: u64,
    /// Fraction of connected clients that evaluate each round (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub fraction_evaluate: f64,
    /// Seconds a client may take for one fit or evaluate before it counts as failed.
    #[arg(long)]
    pub round_timeout: Option<f64>,
    /// Seed of client sampling.
    #[arg(long, default_value_t = 0)]
    pub sample_seed: u64,
    /// Write the run's history as JSON to this file.
    #[arg(long)]
    pub history: Option<PathBuf>,
}

/// Server-side federation settings.
#[derive(Args, Debug, Clone)]
pub struct FederationArgs {
    #[command(flatten)]
    pub round: RoundArgs,
    /// Clients that must be connected before each round.
    #[arg(long, default_value_t = 2)]
    pub min_available_clients: usize,
    /// Clients sampled to train each round.
    #[arg(long, default_value_t = 2)]
    pub fit_clients: usize,
    /// Seconds to wait for enough clients before giving up (default: forever).
    #[arg(long)]
    pub wait_timeout: Option<f64>,
}
