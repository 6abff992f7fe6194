//! Flags shared by several subcommands; each knob has one home here. The
//! learner's settings are also serializable: `petal run` hands them to its
//! client processes and a client to its workers as one JSON document
//! (`--learner-config`), never as flags rebuilt by hand.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use petal_core::strategy::{DpMode, DpSpec, StrategySpec};
use petal_data::{DatasetSpec, PartitionScheme, SyntheticSpec};
use petal_ml::{Backend, TrainOptions};
use serde::{Deserialize, Serialize};

/// Which data a client trains on.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct DataArgs {
    /// Data set: fashion-mnist, cifar10, synthetic, or your files in
    /// --data-dir: npz (train.npz and test.npz of x and y), csv (train.csv
    /// and test.csv; see --label-column) or image-folder (train/<class>/
    /// and test/<class>/ of PNG or JPEG images; see --image-size).
    #[arg(long, default_value = "fashion-mnist")]
    pub dataset: String,
    /// With --dataset csv: the column holding the labels.
    #[arg(long, default_value = "label")]
    #[serde(default = "default_label_column")]
    pub label_column: String,
    /// With --dataset image-folder: resize every image to HxW (without it,
    /// images of different sizes are refused).
    #[arg(long, value_parser = parse_size)]
    #[serde(default)]
    pub image_size: Option<[usize; 2]>,
    /// With --dataset npz or image-folder: per-channel normalisation `MEAN,...:STD,...`
    /// applied after uint8 pixels are scaled to [0, 1] (default: none),
    /// e.g. 0.5,0.5,0.5:0.5,0.5,0.5.
    #[arg(long, value_parser = parse_normalize)]
    #[serde(default)]
    pub normalize: Option<petal_data::Normalize>,
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
    /// How the data is cut among clients: iid, dirichlet:ALPHA (label
    /// skew), shards:K (K label-sorted shards each) or size-skew:ALPHA
    /// (Flower Datasets' partitioners; seeded by --data-seed).
    #[arg(long, default_value = "iid")]
    #[serde(default = "default_partition")]
    pub partition: PartitionScheme,
    /// Training examples per client: with iid, clients get disjoint shares
    /// of N when the data has N × clients examples, else each draws N
    /// without repeats (clients then share examples); other schemes cut
    /// each partition to N. Test shares scale alike. With --dataset
    /// synthetic: --synthetic-train.
    #[arg(long)]
    #[serde(default)]
    pub examples_per_client: Option<usize>,
}

fn parse_size(s: &str) -> Result<[usize; 2], String> {
    let (h, w) = s
        .split_once('x')
        .ok_or_else(|| format!("'{s}' is not HxW, like 32x32"))?;
    let side = |v: &str| {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| (1..=8192).contains(&n))
            .ok_or_else(|| format!("'{v}' is not a side of 1 to 8192 pixels"))
    };
    Ok([side(h)?, side(w)?])
}

fn default_label_column() -> String {
    "label".into()
}

fn parse_normalize(s: &str) -> Result<petal_data::Normalize, String> {
    let list = |part: &str| -> Result<Vec<f32>, String> {
        part.split(',')
            .map(|v| {
                v.trim()
                    .parse::<f32>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| format!("'{v}' is not a number"))
            })
            .collect()
    };
    let (mean, std) = s
        .split_once(':')
        .ok_or_else(|| format!("'{s}' is not MEAN,...:STD,..."))?;
    let n = petal_data::Normalize {
        mean: list(mean)?,
        std: list(std)?,
    };
    if n.mean.len() != n.std.len() {
        return Err(format!("{} means and {} stds", n.mean.len(), n.std.len()));
    }
    if n.std.iter().any(|&v| v <= 0.0) {
        return Err("every std must be positive".into());
    }
    Ok(n)
}

fn default_partition() -> PartitionScheme {
    PartitionScheme::Iid
}

/// A listening address, host:port: an IP address or a name (`localhost`)
/// resolved now, IPv4 preferred, as clients resolve it.
pub fn listen_address(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    if s.rsplit_once(':')
        .is_none_or(|(_, port)| port.parse::<u16>().is_err())
    {
        return Err(format!("'{s}' is not host:port"));
    }
    let all: Vec<std::net::SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(s)
        .map_err(|e| format!("cannot resolve '{s}': {e}"))?
        .collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| format!("'{s}' resolves to no address"))
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

fn default_learner() -> String {
    "cnn".into()
}

fn default_python() -> PathBuf {
    "python3".into()
}

fn parse_learner(s: &str) -> Result<String, String> {
    if s == "cnn" {
        return Ok(s.into());
    }
    petal_python::PythonSpec::parse(s, "python3")
        .map(|_| s.to_string())
        .map_err(|e| format!("{e} (expected cnn or python:FILE:NAME)"))
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
        let (train, test) = self.synthetic_sizes();
        let synthetic = SyntheticSpec {
            shape: self.synthetic_shape,
            train,
            test,
            seed: self.data_seed,
            ..Default::default()
        };
        let spec = DatasetSpec::from_name(&self.dataset, self.download, synthetic)?;
        Ok(match spec {
            DatasetSpec::Npz { .. } => DatasetSpec::Npz {
                normalize: self.normalize.clone(),
            },
            DatasetSpec::Csv { .. } => DatasetSpec::Csv {
                label_column: self.label_column.clone(),
            },
            DatasetSpec::ImageFolder { .. } => DatasetSpec::ImageFolder {
                size: self.image_size,
                normalize: self.normalize.clone(),
            },
            other => other,
        })
    }

    /// True for data sets of the user's files (their shape is known once read).
    pub fn is_user_files(&self) -> bool {
        matches!(self.dataset.as_str(), "npz" | "csv" | "image-folder")
    }

    /// Synthetic images per client, train and test (`--examples-per-client`
    /// replaces --synthetic-train, the test split scaled alike).
    pub fn synthetic_sizes(&self) -> (usize, usize) {
        match self.examples_per_client {
            Some(n) => (
                n,
                petal_data::Sharing::test_per_client(n, self.synthetic_train, self.synthetic_test),
            ),
            None => (self.synthetic_train, self.synthetic_test),
        }
    }

    /// How the data set is shared among `clients` clients.
    pub fn sharing(&self, clients: usize) -> petal_data::Sharing {
        petal_data::Sharing {
            scheme: self.partition,
            clients,
            seed: self.data_seed,
            per_client: self.examples_per_client,
        }
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
    /// Optimizer: sgd (with --momentum) or adam (PyTorch's defaults; Petal's
    /// engine).
    #[arg(long, default_value = "sgd", value_parser = parse_optimizer)]
    #[serde(default = "default_optimizer")]
    pub optimizer: String,
    /// L2 weight decay, as PyTorch's optimizers' `weight_decay`.
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub weight_decay: f64,
}

fn default_optimizer() -> String {
    "sgd".into()
}

fn parse_optimizer(s: &str) -> Result<String, String> {
    s.parse::<petal_ml::OptimizerKind>()
        .map(|k| k.name().to_string())
}

impl TrainArgs {
    /// Refuses values training cannot use, naming the flag and its range.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=petal_ml::MAX_EPOCHS).contains(&self.epochs),
            "--epochs {} is outside 1..={}",
            self.epochs,
            petal_ml::MAX_EPOCHS
        );
        anyhow::ensure!(
            (1..=petal_ml::MAX_BATCH_SIZE).contains(&self.batch_size),
            "--batch-size {} is outside 1..={}",
            self.batch_size,
            petal_ml::MAX_BATCH_SIZE
        );
        anyhow::ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            "--lr {} must be a positive number",
            self.lr
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&self.momentum),
            "--momentum {} is outside [0, 1)",
            self.momentum
        );
        anyhow::ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "--weight-decay {} must be a non-negative number",
            self.weight_decay
        );
        Ok(())
    }

    /// As [`TrainOptions`].
    pub fn options(&self, seed: u64) -> TrainOptions {
        TrainOptions {
            epochs: self.epochs,
            lr: self.lr,
            momentum: self.momentum,
            batch_size: self.batch_size,
            seed,
            proximal_mu: 0.0,
            optimizer: self.optimizer.parse().unwrap_or_default(),
            weight_decay: self.weight_decay,
        }
    }
}

/// Which partition of the data a client holds, and the model it trains.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct LearnerArgs {
    /// What trains: `cnn` (the example's CNN on Petal's engine or burn, see
    /// --device) or `python:FILE:NAME` (your Python code: NAME in FILE,
    /// called with partition_id and num_partitions, returns an object with
    /// Flower NumPyClient's get_parameters, fit and evaluate; it loads its
    /// own data, so the data flags do not apply).
    #[arg(long, default_value = "cnn", value_parser = parse_learner)]
    #[serde(default = "default_learner")]
    pub learner: String,
    /// Python interpreter of a python: learner (needs NumPy).
    #[arg(long, default_value = "python3")]
    #[serde(default = "default_python")]
    pub python: PathBuf,
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
    /// A network file (TOML; see examples/models) trained on Petal's engine
    /// instead of the example's CNN.
    #[arg(long)]
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// Seed of model initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// File holding this partition, decoded (written by the first worker,
    /// read by the next ones); set by `petal client` for its workers.
    #[arg(skip)]
    pub partition_cache: Option<PathBuf>,
}

/// Most threads a learner may use.
pub const MAX_THREADS: usize = 256;

/// Bytes of memory this machine has (`MemTotal`), when known.
fn total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Values in the seed CNN for images of `shape` (`None`: too small for
/// its two 5×5 convolutions and 2×2 pools, or too large to count).
pub fn seed_cnn_values(shape: [usize; 3], classes: usize) -> Option<usize> {
    let [c, h, w] = shape;
    let side = |x: usize| {
        x.checked_sub(4)
            .map(|x| x / 2)?
            .checked_sub(4)
            .map(|x| x / 2)
    };
    let (h2, w2) = (side(h).filter(|&v| v > 0)?, side(w).filter(|&v| v > 0)?);
    let conv = |cin: usize, cout: usize| cin.checked_mul(25)?.checked_mul(cout)?.checked_add(cout);
    let fc1_in = h2.checked_mul(w2)?.checked_mul(16)?;
    [
        conv(c, 6)?,
        conv(6, 16)?,
        fc1_in.checked_mul(120)?.checked_add(120)?,
        120 * 84 + 84,
        classes.checked_mul(85)?,
    ]
    .iter()
    .try_fold(0usize, |a, &b| a.checked_add(b))
}

impl LearnerArgs {
    /// The Python learner, when `--learner python:FILE:NAME`.
    pub fn python_spec(&self) -> Option<petal_python::PythonSpec> {
        petal_python::PythonSpec::parse(&self.learner, self.python.clone()).ok()
    }

    /// Refuses settings that cannot work or would exhaust memory, before
    /// anything starts, naming the flag and what is allowed.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.threads <= MAX_THREADS,
            "--threads {} is more than {MAX_THREADS}",
            self.threads
        );
        self.train.validate()?;
        anyhow::ensure!(
            self.data.examples_per_client != Some(0),
            "--examples-per-client must be at least 1"
        );
        anyhow::ensure!(
            self.num_partitions >= 1,
            "--num-partitions must be at least 1"
        );
        anyhow::ensure!(
            self.partition_id < self.num_partitions,
            "--partition-id {} does not exist: --num-partitions is {}",
            self.partition_id,
            self.num_partitions
        );
        if let Some(spec) = self.python_spec() {
            anyhow::ensure!(
                spec.file.is_file(),
                "--learner {}: {} is not a file",
                self.learner,
                spec.file.display()
            );
            return Ok(());
        }
        if self.data.dataset == "synthetic" {
            let [c, h, w] = self.data.synthetic_shape;
            anyhow::ensure!(
                c >= 1 && h >= 1 && w >= 1,
                "--synthetic-shape {c}x{h}x{w} has an empty dimension"
            );
        }
        let model_file = self.model_file()?;
        if model_file.is_some() {
            anyhow::ensure!(
                self.device()? == Backend::Native,
                "--model {}: a network file runs on Petal's engine (--device cpu)",
                self.model
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""))
                    .display()
            );
        }
        if self.data.normalize.is_some() {
            anyhow::ensure!(
                matches!(self.data.dataset.as_str(), "npz" | "image-folder"),
                "--normalize applies to --dataset npz and image-folder (the others have their own)"
            );
        }
        if self.data.is_user_files() || model_file.is_some() {
            // Shapes are known once the files are read; the model is
            // checked against them then.
            return Ok(());
        }
        let shape = self.data.shape();
        let shown = format!("{}x{}x{}", shape[0], shape[1], shape[2]);
        let model = match self.device()? {
            Backend::Noop => self.noop_values.unwrap_or(0),
            _ => seed_cnn_values(shape, 10).ok_or_else(|| {
                anyhow::anyhow!(
                    "images of {shown} do not fit the CNN: height and width must be at least 16"
                )
            })?,
        };
        // Weights, gradients, momentum and two copies in flight, in f32;
        // the client's images as bytes; activations of one batch.
        let pixels = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        let images = if self.data.dataset == "synthetic" {
            let (train, test) = self.data.synthetic_sizes();
            train.saturating_add(test) as u64
        } else {
            70_000
        };
        let need = pixels.and_then(|p| {
            let data = p.checked_mul(images)?;
            let acts = p
                .checked_mul(self.train.batch_size as u64)?
                .checked_mul(4 * 8)?;
            (model as u64)
                .checked_mul(20)?
                .checked_add(data)?
                .checked_add(acts)
        });
        if let Some(total) = total_memory() {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            match need {
                Some(n) if n <= total / 2 => {}
                _ => anyhow::bail!(
                    "images of {shown} ({images} per client, batches of {}) need about {} GiB per \
                     client; this machine has {:.1} GiB: use smaller --synthetic-shape, \
                     --synthetic-train or --batch-size",
                    self.train.batch_size,
                    need.map_or("more than 2^64 bytes".into(), |n| format!("{:.1}", gib(n))),
                    gib(total)
                ),
            }
        }
        Ok(())
    }

    /// The network file, read and checked (`None`: the example's CNN).
    pub fn model_file(&self) -> anyhow::Result<Option<petal_ml::model::ModelFile>> {
        self.model
            .as_deref()
            .map(|p| petal_ml::model::ModelFile::load(p).map_err(anyhow::Error::from))
            .transpose()
    }

    /// Parameter names of the model (PyTorch's `state_dict` names).
    pub fn parameter_names(&self) -> anyhow::Result<Vec<String>> {
        Ok(match self.model_file()? {
            Some(m) => m.parameter_names(),
            None => petal_ml::CNN_PARAMETER_NAMES
                .iter()
                .map(|s| s.to_string())
                .collect(),
        })
    }

    /// The learner for data of `shape` and `classes` classes.
    pub fn build_learner(
        &self,
        shape: [usize; 3],
        classes: usize,
    ) -> anyhow::Result<Box<dyn petal_ml::Learner>> {
        let model = self.model_file()?;
        Ok(petal_ml::build_learner(
            self.device()?,
            model.as_ref(),
            shape,
            classes,
            self.seed,
            self.threads(),
        )?)
    }

    /// The backend, if this build has it.
    pub fn device(&self) -> anyhow::Result<Backend> {
        let b: Backend = self
            .device
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--device {}: {e}", self.device))?;
        b.available()
            .map_err(|e| anyhow::anyhow!("--device {}: {e}", self.device))?;
        Ok(b)
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
    /// Fraction of connected clients that evaluate each round (0 disables;
    /// default 1, and for `petal simulate` 0 with server-side evaluation,
    /// else as many as train).
    #[arg(long)]
    pub fraction_evaluate: Option<f64>,
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
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub strategy: StrategyArgs,
    /// Evaluate the global model on the server, on the test split of the
    /// server's data set (--dataset, --data-dir), after round 0, every
    /// --server-eval-every rounds and after the last.
    #[arg(long)]
    pub server_eval: bool,
    /// Rounds between server-side evaluations (implies --server-eval; default 1).
    #[arg(long)]
    pub server_eval_every: Option<u64>,
}

impl RoundArgs {
    /// Whether the server evaluates the global model, and every how many rounds.
    pub fn server_eval_every(&self) -> Option<u64> {
        match (self.server_eval, self.server_eval_every) {
            (_, Some(n)) => Some(n),
            (true, None) => Some(1),
            (false, None) => None,
        }
    }
}

/// What a peer may make the server hold: every limit of the transport.
#[derive(Args, Debug, Clone)]
pub struct LimitArgs {
    /// Largest message accepted from a client, in MiB (a bigger one drops
    /// the client). A fit result is also at most twice the model plus 16 MiB.
    #[arg(long, default_value_t = 512)]
    pub max_message_mb: usize,
    /// Metrics one reply may carry (keys of at most 256 bytes, string
    /// values of at most 64 KiB); more drop the client.
    #[arg(long, default_value_t = 1024)]
    pub max_metrics: usize,
    /// Tensors one reply may carry (a fit result must match the model's).
    #[arg(long, default_value_t = 100_000)]
    pub max_tensors: usize,
    /// Clients (HTTP/2 streams) one connection may carry.
    #[arg(long, default_value_t = 4096)]
    pub max_streams_per_connection: u32,
    /// Connections one IP address may open; more are closed at once.
    #[arg(long, default_value_t = 128)]
    pub max_connections_per_ip: usize,
    /// Seconds a new connection has to start HTTP/2.
    #[arg(long, default_value_t = 10.0)]
    pub handshake_timeout: f64,
    /// Seconds between HTTP/2 keepalive pings to each client (0: none).
    #[arg(long, default_value_t = 30.0)]
    pub keepalive_interval: f64,
    /// Seconds a client has to answer a ping; one that does not (a dead
    /// link) is dropped from the federation.
    #[arg(long, default_value_t = 20.0)]
    pub keepalive_timeout: f64,
}

/// HTTP/2 keepalive from its two flags: `None` when the interval is 0.
pub fn keepalive(interval: f64, timeout: f64) -> anyhow::Result<(Option<Duration>, Duration)> {
    let check = |v: f64, flag: &str| {
        anyhow::ensure!(
            v.is_finite() && (0.0..=86_400.0).contains(&v),
            "{flag} must be between 0 and 86400 seconds, not {v}"
        );
        Ok(Duration::from_secs_f64(v))
    };
    let interval = check(interval, "--keepalive-interval")?;
    let timeout = check(timeout, "--keepalive-timeout")?;
    anyhow::ensure!(
        timeout >= Duration::from_millis(100),
        "--keepalive-timeout must be at least 0.1 seconds"
    );
    Ok(((!interval.is_zero()).then_some(interval), timeout))
}

/// The strategy and its parameters (Flower's names; a parameter the
/// chosen strategy does not take is refused).
#[derive(Args, Debug, Clone, Default)]
pub struct StrategyArgs {
    /// Aggregation strategy: fedavg, fedprox, fedavgm, fedadagrad, fedadam,
    /// fedyogi, fedmedian, fedtrimmedavg, krum, multikrum, bulyan, qfedavg.
    #[arg(long, default_value = "fedavg")]
    pub strategy: String,
    /// FedProx: the proximal term's weight sent to clients (0).
    #[arg(long, allow_negative_numbers = true)]
    pub proximal_mu: Option<f64>,
    /// FedAvgM: server learning rate (1.0).
    #[arg(long, allow_negative_numbers = true)]
    pub server_learning_rate: Option<f64>,
    /// FedAvgM: server momentum (0.0).
    #[arg(long, allow_negative_numbers = true)]
    pub server_momentum: Option<f64>,
    /// FedAdagrad/FedAdam/FedYogi: server learning rate (0.1, 0.1, 0.01).
    #[arg(long, allow_negative_numbers = true)]
    pub eta: Option<f64>,
    /// FedAdagrad/FedAdam/FedYogi: client learning rate (0.1, 0.1, 0.0316).
    #[arg(long, allow_negative_numbers = true)]
    pub eta_l: Option<f64>,
    /// FedAdam/FedYogi: first-moment decay (0.9).
    #[arg(long, allow_negative_numbers = true)]
    pub beta_1: Option<f64>,
    /// FedAdam/FedYogi: second-moment decay (0.99).
    #[arg(long, allow_negative_numbers = true)]
    pub beta_2: Option<f64>,
    /// FedAdagrad/FedAdam/FedYogi: adaptivity (0.001).
    #[arg(long, allow_negative_numbers = true)]
    pub tau: Option<f64>,
    /// FedTrimmedAvg: fraction cut from each end (0.2).
    #[arg(long, allow_negative_numbers = true)]
    pub beta: Option<f64>,
    /// Krum/MultiKrum/Bulyan: malicious clients tolerated (0).
    #[arg(long)]
    pub num_malicious_nodes: Option<usize>,
    /// MultiKrum: results kept (1).
    #[arg(long)]
    pub num_nodes_to_select: Option<usize>,
    /// q-FedAvg: the clients' learning rate (0.1).
    #[arg(long, allow_negative_numbers = true)]
    pub client_learning_rate: Option<f64>,
    /// q-FedAvg: fairness exponent q (0.1).
    #[arg(long, allow_negative_numbers = true)]
    pub q: Option<f64>,
    /// q-FedAvg: the fit metric holding a client's training loss (train_loss).
    #[arg(long)]
    pub train_loss_key: Option<String>,
    /// Central differential privacy around the strategy: server-fixed,
    /// client-fixed, server-adaptive or client-adaptive clipping.
    #[arg(long)]
    pub dp: Option<String>,
    /// DP: noise standard deviation over the clipping norm (required with --dp).
    #[arg(long, allow_negative_numbers = true)]
    pub noise_multiplier: Option<f64>,
    /// DP, fixed clipping: the clipping norm (required).
    #[arg(long, allow_negative_numbers = true)]
    pub clipping_norm: Option<f64>,
    /// DP, adaptive clipping: the first clipping norm (0.1).
    #[arg(long, allow_negative_numbers = true)]
    pub initial_clipping_norm: Option<f64>,
    /// DP, adaptive clipping: the fraction of updates to clip (0.5).
    #[arg(long, allow_negative_numbers = true)]
    pub target_clipped_quantile: Option<f64>,
    /// DP, adaptive clipping: the norm's learning rate (0.2).
    #[arg(long, allow_negative_numbers = true)]
    pub clip_norm_lr: Option<f64>,
    /// DP, adaptive clipping: noise on the clipped count (clients / 20).
    #[arg(long, allow_negative_numbers = true)]
    pub clipped_count_stddev: Option<f64>,
}

impl StrategyArgs {
    /// The strategy these flags describe: Flower's defaults, then each
    /// given parameter (refused when the strategy does not take it).
    pub fn spec(&self) -> anyhow::Result<StrategySpec> {
        let spec = StrategySpec::defaults(&self.strategy)
            .map_err(|e| anyhow::anyhow!("--strategy: {e}"))?;
        let mut value = serde_json::to_value(&spec)?;
        let given: [(&str, Option<serde_json::Value>); 14] = [
            ("proximal_mu", self.proximal_mu.map(Into::into)),
            (
                "server_learning_rate",
                self.server_learning_rate.map(Into::into),
            ),
            ("server_momentum", self.server_momentum.map(Into::into)),
            ("eta", self.eta.map(Into::into)),
            ("eta_l", self.eta_l.map(Into::into)),
            ("beta_1", self.beta_1.map(Into::into)),
            ("beta_2", self.beta_2.map(Into::into)),
            ("tau", self.tau.map(Into::into)),
            ("beta", self.beta.map(Into::into)),
            (
                "num_malicious_nodes",
                self.num_malicious_nodes.map(Into::into),
            ),
            (
                "num_nodes_to_select",
                self.num_nodes_to_select.map(Into::into),
            ),
            (
                "client_learning_rate",
                self.client_learning_rate.map(Into::into),
            ),
            ("q", self.q.map(Into::into)),
            (
                "train_loss_key",
                self.train_loss_key.clone().map(Into::into),
            ),
        ];
        for (key, v) in given {
            let Some(v) = v else { continue };
            match value.get_mut(key) {
                Some(slot) => *slot = v,
                None => anyhow::bail!(
                    "--{} does not apply to --strategy {}",
                    key.replace('_', "-"),
                    self.strategy
                ),
            }
        }
        Ok(serde_json::from_value(value)?)
    }

    /// The DP wrapper these flags describe, if any; `sampled` clients per
    /// round, the noise seeded by `seed`.
    pub fn dp(&self, sampled: usize, seed: u64) -> anyhow::Result<Option<DpSpec>> {
        let Some(mode) = &self.dp else {
            for (flag, given) in [
                ("--noise-multiplier", self.noise_multiplier.is_some()),
                ("--clipping-norm", self.clipping_norm.is_some()),
                (
                    "--initial-clipping-norm",
                    self.initial_clipping_norm.is_some(),
                ),
                (
                    "--target-clipped-quantile",
                    self.target_clipped_quantile.is_some(),
                ),
                ("--clip-norm-lr", self.clip_norm_lr.is_some()),
                (
                    "--clipped-count-stddev",
                    self.clipped_count_stddev.is_some(),
                ),
            ] {
                anyhow::ensure!(!given, "{flag} needs --dp");
            }
            return Ok(None);
        };
        let mode: DpMode = mode.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        let noise = self
            .noise_multiplier
            .ok_or_else(|| anyhow::anyhow!("--dp needs --noise-multiplier"))?;
        let mut d = DpSpec::new(mode, noise, sampled);
        d.seed = seed;
        let adaptive = matches!(mode, DpMode::ServerAdaptive | DpMode::ClientAdaptive);
        if adaptive {
            anyhow::ensure!(
                self.clipping_norm.is_none(),
                "--clipping-norm is for fixed clipping; adaptive clipping starts at --initial-clipping-norm"
            );
            if let Some(v) = self.initial_clipping_norm {
                d.initial_clipping_norm = v;
            }
            if let Some(v) = self.target_clipped_quantile {
                d.target_clipped_quantile = v;
            }
            if let Some(v) = self.clip_norm_lr {
                d.clip_norm_lr = v;
            }
            d.clipped_count_stddev = self.clipped_count_stddev;
        } else {
            d.clipping_norm = self.clipping_norm.ok_or_else(|| {
                anyhow::anyhow!(
                    "--dp {} needs --clipping-norm",
                    self.dp.as_deref().unwrap_or("")
                )
            })?;
            for (flag, given) in [
                (
                    "--initial-clipping-norm",
                    self.initial_clipping_norm.is_some(),
                ),
                (
                    "--target-clipped-quantile",
                    self.target_clipped_quantile.is_some(),
                ),
                ("--clip-norm-lr", self.clip_norm_lr.is_some()),
                (
                    "--clipped-count-stddev",
                    self.clipped_count_stddev.is_some(),
                ),
            ] {
                anyhow::ensure!(!given, "{flag} is for adaptive clipping");
            }
        }
        Ok(Some(d))
    }
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

/// TLS of `petal server` (Flower's flag names).
#[derive(Args, Debug, Clone, Default)]
pub struct ServerTlsArgs {
    /// PEM certificate chain of this server: clients then connect with TLS.
    #[arg(long, requires = "ssl_keyfile")]
    pub ssl_certfile: Option<PathBuf>,
    /// PEM private key of --ssl-certfile.
    #[arg(long, requires = "ssl_certfile")]
    pub ssl_keyfile: Option<PathBuf>,
    /// PEM CA certificate: clients must present a certificate it signed
    /// (mutual TLS).
    #[arg(long, requires = "ssl_certfile")]
    pub ssl_ca_certfile: Option<PathBuf>,
    /// Serve plaintext on an address other than loopback (without it such
    /// a server refuses to start, as flower-superlink does).
    #[arg(long, conflicts_with = "ssl_certfile")]
    pub insecure: bool,
}

impl ServerTlsArgs {
    /// The TLS configuration for a server on `addr`; refuses plaintext
    /// beyond loopback without --insecure.
    pub fn config(
        &self,
        addr: std::net::SocketAddr,
    ) -> anyhow::Result<Option<std::sync::Arc<petal_server::tls::ServerConfig>>> {
        match (&self.ssl_certfile, &self.ssl_keyfile) {
            (Some(cert), Some(key)) => {
                let files = petal_server::tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.ssl_ca_certfile.clone(),
                };
                Ok(Some(petal_server::tls::server_config(&files)?))
            }
            _ => {
                anyhow::ensure!(
                    addr.ip().is_loopback() || self.insecure,
                    "--address {addr} is reachable from other machines: give --ssl-certfile and \
                     --ssl-keyfile for TLS, or --insecure to serve plaintext anyway"
                );
                Ok(None)
            }
        }
    }
}

/// TLS of `petal client`.
#[derive(Args, Debug, Clone, Default)]
pub struct ClientTlsArgs {
    /// PEM CA certificate that signed the server's: connect with TLS.
    #[arg(long)]
    pub root_certificates: Option<PathBuf>,
    /// This client's PEM certificate, for a server that asks for one
    /// (--ssl-ca-certfile).
    #[arg(long = "ssl-certfile", requires_all = ["root_certificates", "client_keyfile"])]
    pub client_certfile: Option<PathBuf>,
    /// PEM private key of --ssl-certfile.
    #[arg(long = "ssl-keyfile", requires = "client_certfile")]
    pub client_keyfile: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The client's TLS settings, the files read now.
    pub fn load(&self) -> anyhow::Result<Option<petal_client::ClientTls>> {
        let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("{}", p.display()));
        let Some(ca) = &self.root_certificates else {
            return Ok(None);
        };
        let ca_pem = read(ca)?;
        petal_server::tls::read_certs(ca)?;
        let identity = match (&self.client_certfile, &self.client_keyfile) {
            (Some(c), Some(k)) => {
                petal_server::tls::read_certs(c)?;
                Some((read(c)?, read(k)?))
            }
            _ => None,
        };
        Ok(Some(petal_client::ClientTls {
            ca: ca_pem,
            identity,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_sizes_and_normalisations_parse_or_say_why_not() {
        assert_eq!(parse_size("32x28"), Ok([32, 28]));
        for bad in ["32", "0x4", "4x99999", "ax4"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        let n = parse_normalize("0.5,0.4:0.25,0.2").unwrap();
        assert_eq!((n.mean, n.std), (vec![0.5, 0.4], vec![0.25, 0.2]));
        assert!(parse_normalize("0.5").unwrap_err().contains("not MEAN"));
        assert!(
            parse_normalize("0.5,0.5:1")
                .unwrap_err()
                .contains("2 means and 1 stds")
        );
        assert!(parse_normalize("0.5:0").unwrap_err().contains("positive"));
        assert!(
            parse_normalize("x:1")
                .unwrap_err()
                .contains("'x' is not a number")
        );
    }
}
