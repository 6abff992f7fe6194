//! Image data sets for Petal clients: Fashion-MNIST (idx), CIFAR-10 (binary
//! batches, with a verified download), and `synthetic` learnable images;
//! plus seeded IID partitioning.
//!
//! Images stay as `u8` pixels (channel-major, C×H×W per image) until a
//! learner turns a batch into tensors; this crate knows no ML framework.

mod cache;
mod cifar;
pub mod download;
mod files;
mod idx;
mod image_folder;
mod partition;
mod shares;
mod synthetic;

use std::path::{Path, PathBuf};

pub use cifar::{CIFAR10_ARCHIVE, cifar10_remote};
pub use files::{load_csv, load_npz};
pub use image_folder::load_image_folder;
pub use partition::{PartitionScheme, assign, assign_like, class_shares, partition_indices};
pub use shares::{Shares, Sharing};
pub use synthetic::SyntheticSpec;

/// Where Debian's `dataset-fashion-mnist` package installs Fashion-MNIST.
pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// Errors loading data; each names the file or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(
        "unknown dataset '{0}' (expected fashion-mnist, cifar10, synthetic, npz, csv or image-folder)"
    )]
    UnknownDataset(String),
    #[error("{what} not found (looked in {looked}){hint}")]
    Missing {
        what: String,
        looked: String,
        hint: String,
    },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("download of {url} failed: {reason}")]
    Download { url: String, reason: String },
    #[error("{path}: checksum mismatch (expected {expected}, got {actual})")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("--data-dir {0} does not exist")]
    NoDataDir(PathBuf),
    #[error("invalid partition: {0}")]
    Partition(String),
    #[error("invalid synthetic spec: {0}")]
    Synthetic(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether a test's input is present. Missing under CI (`CI` set) fails the
/// test with the reason; elsewhere the test says it is skipped.
#[cfg(test)]
pub(crate) fn test_input(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false") {
        panic!("missing test input under CI: {what}");
    }
    eprintln!("SKIPPED: {what} is not available");
    false
}

/// The values of a set's examples, as stored: raw pixels (scaled to
/// `[0, 1]` as torchvision's `ToTensor` does, then normalised) or numbers
/// taken as they are (then normalised).
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

impl Values {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Values::U8(v) => v.len(),
            Values::F32(v) => v.len(),
        }
    }

    /// True when there is no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Examples `indices` of `size` values each into `out`, reusing its
    /// buffer when it holds values of the same kind.
    fn select_into(&self, indices: &[u32], size: usize, out: &mut Values) {
        fn pick<T: Copy>(v: &[T], indices: &[u32], size: usize, out: &mut Vec<T>) {
            out.clear();
            out.reserve(indices.len() * size);
            for &i in indices {
                let i = i as usize;
                out.extend_from_slice(&v[i * size..(i + 1) * size]);
            }
        }
        match (self, out) {
            (Values::U8(v), Values::U8(o)) => pick(v, indices, size, o),
            (Values::F32(v), Values::F32(o)) => pick(v, indices, size, o),
            (Values::U8(v), o) => {
                let mut buf = Vec::new();
                pick(v, indices, size, &mut buf);
                *o = Values::U8(buf);
            }
            (Values::F32(v), o) => {
                let mut buf = Vec::new();
                pick(v, indices, size, &mut buf);
                *o = Values::F32(buf);
            }
        }
    }
}

/// Per-channel normalisation, part of a data set's description and of the
/// run's settings: a value `v` (a pixel first scaled to `[0, 1]`) becomes
/// `(v − mean[c]) / std[c]`, as torchvision's `Normalize`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalize {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalize {
    /// `Normalize(0.5, 0.5)` on every channel: pixels to `[-1, 1]`, what
    /// Petal's built-in data sets (and the seed example) use.
    pub fn half(channels: usize) -> Self {
        Normalize {
            mean: vec![0.5; channels],
            std: vec![0.5; channels],
        }
    }

    /// No change.
    pub fn identity(channels: usize) -> Self {
        Normalize {
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
        }
    }

    /// Per channel, `(divisor, shift)` with `normalised = v / divisor + shift`
    /// for values stored as `values` (pixels are divided by 255 too).
    pub fn affine(&self, values: &Values) -> Vec<(f32, f32)> {
        let scale = if matches!(values, Values::U8(_)) {
            255.0
        } else {
            1.0
        };
        self.mean
            .iter()
            .zip(&self.std)
            .map(|(&m, &s)| (scale * s, -m / s))
            .collect()
    }
}

/// A labelled set of examples of one shape (`[C, H, W]`; tabular data is
/// `[D, 1, 1]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    /// Channels, height, width of every example.
    pub shape: [usize; 3],
    /// Number of classes; labels are `0..num_classes`.
    pub num_classes: usize,
    /// `len() * C*H*W` values, example after example, each channel-major.
    pub values: Values,
    /// One label per example.
    pub labels: Vec<u8>,
    /// How values are normalised before a model sees them.
    pub normalize: Normalize,
}

impl ImageSet {
    /// An empty set of raw-pixel images normalised to `[-1, 1]`.
    pub fn pixels(shape: [usize; 3], num_classes: usize) -> ImageSet {
        ImageSet {
            shape,
            num_classes,
            values: Values::U8(Vec::new()),
            labels: Vec::new(),
            normalize: Normalize::half(shape[0]),
        }
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the set holds no example.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per example.
    pub fn image_size(&self) -> usize {
        self.shape.iter().product()
    }

    /// Raw pixels of all images (`None` for sets of numbers).
    pub fn raw_pixels(&self) -> Option<&[u8]> {
        match &self.values {
            Values::U8(v) => Some(v),
            Values::F32(_) => None,
        }
    }

    /// Pixels of image `i` (empty for sets of numbers).
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_size();
        self.raw_pixels().map_or(&[], |p| &p[i * n..(i + 1) * n])
    }

    /// Example `i`, normalised, channel-major.
    pub fn normalized(&self, i: usize) -> Vec<f32> {
        let n = self.image_size();
        let plane = (self.shape[1] * self.shape[2]).max(1);
        let affine = self.normalize.affine(&self.values);
        (0..n)
            .map(|j| {
                let v = match &self.values {
                    Values::U8(p) => p[i * n + j] as f32,
                    Values::F32(f) => f[i * n + j],
                };
                let (div, shift) = affine.get(j / plane).copied().unwrap_or((1.0, 0.0));
                v / div + shift
            })
            .collect()
    }

    /// The examples at `indices` into `out`, reusing its buffers.
    pub fn select_into(&self, indices: &[u32], out: &mut ImageSet) {
        out.shape = self.shape;
        out.num_classes = self.num_classes;
        out.normalize.clone_from(&self.normalize);
        self.values
            .select_into(indices, self.image_size(), &mut out.values);
        out.labels.clear();
        out.labels
            .extend(indices.iter().map(|&i| self.labels[i as usize]));
    }

    /// The examples at `indices`, in that order.
    pub fn select(&self, indices: &[u32]) -> ImageSet {
        let mut out = ImageSet::pixels([1, 1, 1], 1);
        self.select_into(indices, &mut out);
        out
    }
}

/// Where Fashion-MNIST is looked for: `--data-dir` (and its
/// `fashion-mnist` folder) when given, never anything else; else Debian's
/// package.
fn fashion_dirs(data_dir: Option<&Path>) -> Vec<PathBuf> {
    match data_dir {
        Some(d) => vec![d.to_path_buf(), d.join("fashion-mnist")],
        None => vec![PathBuf::from(DEBIAN_FASHION_MNIST)],
    }
}

fn cifar_dir(data_dir: Option<&Path>) -> PathBuf {
    data_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("data"))
}

/// A train and a test split.
#[derive(Debug, Clone, PartialEq)]
pub struct Splits {
    pub train: ImageSet,
    pub test: ImageSet,
}

impl Splits {
    /// Partition `id` of `num` of both splits (seeded, IID).
    pub fn partition(&self, id: usize, num: usize, seed: u64) -> Result<Splits, DataError> {
        self.partition_by(&Sharing::new(PartitionScheme::Iid, num, seed), id)
    }

    /// Partition `id` under `sharing`.
    pub fn partition_by(&self, sharing: &Sharing, id: usize) -> Result<Splits, DataError> {
        Ok(self
            .partitions_by(sharing, id..id + 1)?
            .pop()
            .unwrap_or_else(|| self.clone()))
    }

    /// Partitions `ids` under `sharing`, the assignment computed once.
    pub fn partitions_by(
        &self,
        sharing: &Sharing,
        ids: std::ops::Range<usize>,
    ) -> Result<Vec<Splits>, DataError> {
        if ids.end > sharing.clients {
            return Err(DataError::Partition(format!(
                "partition id {} is out of range for {} partitions (0..{})",
                ids.end - 1,
                sharing.clients,
                sharing.clients.saturating_sub(1)
            )));
        }
        let shares = Shares::compute(self, sharing)?;
        ids.map(|id| self.share(&shares, id)).collect()
    }
}

/// Which data set to load and where from.
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetSpec {
    /// Fashion-MNIST idx files (`*-idx?-ubyte[.gz]`).
    FashionMnist,
    /// CIFAR-10 binary batches (`cifar-10-batches-bin/`).
    Cifar10 {
        /// Archive to download when the files are missing (see [`cifar10_remote`]).
        download: Option<download::Remote>,
    },
    /// Generated images.
    Synthetic(SyntheticSpec),
    /// `train.npz` and `test.npz` (see [`load_npz`]), with this
    /// normalisation instead of the identity.
    Npz { normalize: Option<Normalize> },
    /// `train.csv` and `test.csv` (see [`load_csv`]), labels in this column.
    Csv { label_column: String },
    /// `train/<class>/*` and `test/<class>/*` images (see
    /// [`load_image_folder`]), resized to `size` (height, width) when given.
    ImageFolder {
        size: Option<[usize; 2]>,
        normalize: Option<Normalize>,
    },
}

impl DatasetSpec {
    /// Parses a data set name: `fashion-mnist`, `cifar10` or `synthetic`.
    pub fn from_name(
        name: &str,
        download: bool,
        synthetic: SyntheticSpec,
    ) -> Result<Self, DataError> {
        match name {
            "fashion-mnist" | "fashion_mnist" | "fmnist" => Ok(DatasetSpec::FashionMnist),
            "cifar10" | "cifar-10" => Ok(DatasetSpec::Cifar10 {
                download: download.then(cifar10_remote),
            }),
            "synthetic" => Ok(DatasetSpec::Synthetic(synthetic)),
            "npz" => Ok(DatasetSpec::Npz { normalize: None }),
            "csv" => Ok(DatasetSpec::Csv {
                label_column: "label".into(),
            }),
            "image-folder" => Ok(DatasetSpec::ImageFolder {
                size: None,
                normalize: None,
            }),
            other => Err(DataError::UnknownDataset(other.to_string())),
        }
    }

    /// Loads both splits from `data_dir`; without one, Fashion-MNIST comes
    /// from [`DEBIAN_FASHION_MNIST`] and CIFAR-10 from `./data`.
    pub fn load(&self, data_dir: Option<&Path>) -> Result<Splits, DataError> {
        match self {
            DatasetSpec::FashionMnist => idx::load_fashion_mnist(&fashion_dirs(data_dir)),
            DatasetSpec::Cifar10 { download } => {
                cifar::load_cifar10(&cifar_dir(data_dir), download.as_ref())
            }
            DatasetSpec::Synthetic(spec) => spec.generate(),
            DatasetSpec::Npz { normalize } => {
                load_npz(self.files_dir(data_dir)?, normalize.as_ref())
            }
            DatasetSpec::Csv { label_column } => load_csv(self.files_dir(data_dir)?, label_column),
            DatasetSpec::ImageFolder { size, normalize } => {
                load_image_folder(self.files_dir(data_dir)?, *size, normalize.as_ref())
            }
        }
    }

    /// The folder of a data set of the user's files: `--data-dir`, which must be given.
    fn files_dir<'a>(&self, data_dir: Option<&'a Path>) -> Result<&'a Path, DataError> {
        let name = match self {
            DatasetSpec::Npz { .. } => "npz",
            _ => "csv",
        };
        data_dir.ok_or_else(|| DataError::Missing {
            what: format!("--dataset {name} data"),
            looked: "nowhere".into(),
            hint: format!(
                "; --dataset {name} needs --data-dir DIR holding train.{name} and test.{name}"
            ),
        })
    }

    /// Checks, without decoding the images, that the data is there and can
    /// be shared as `sharing` says, no client without examples; returns
    /// the sizes of the splits when they are known (CIFAR-10 still to be
    /// downloaded is not).
    pub fn check(
        &self,
        data_dir: Option<&Path>,
        sharing: &Sharing,
    ) -> Result<Option<(usize, usize)>, DataError> {
        let downloads = matches!(self, DatasetSpec::Cifar10 { download: Some(_) });
        if let Some(d) = data_dir
            && !d.is_dir()
            && !downloads
            && !matches!(self, DatasetSpec::Synthetic(_))
        {
            return Err(DataError::NoDataDir(d.to_path_buf()));
        }
        let sizes = match self {
            DatasetSpec::FashionMnist => Some(idx::count_fashion_mnist(&fashion_dirs(data_dir))?),
            DatasetSpec::Cifar10 { download } => {
                let dir = cifar_dir(data_dir);
                match cifar::count_cifar10(&dir)? {
                    Some(s) => Some(s),
                    None if download.is_some() => None,
                    None => {
                        // Reports what is missing, as loading would.
                        cifar::load_cifar10(&dir, None)?;
                        None
                    }
                }
            }
            // Generated per partition: any number of partitions works.
            DatasetSpec::Synthetic(spec) => {
                spec.validate()?;
                None
            }
            // The user's files are read whole: small enough to check by loading.
            DatasetSpec::Npz { .. } | DatasetSpec::Csv { .. } | DatasetSpec::ImageFolder { .. } => {
                let s = self.load(data_dir)?;
                Some((s.train.len(), s.test.len()))
            }
        };
        if let Some((train, test)) = sizes {
            sharing.check(train, test)?;
        }
        Ok(sizes)
    }

    /// Fetches what `--download` asks for and is missing, so that a run
    /// downloads once, before its clients start, and a failed download
    /// fails the run before anything is written.
    pub fn fetch_missing(&self, data_dir: Option<&Path>) -> Result<(), DataError> {
        if let DatasetSpec::Cifar10 {
            download: Some(remote),
        } = self
        {
            cifar::ensure_cifar10(&cifar_dir(data_dir), Some(remote))?;
        }
        Ok(())
    }

    /// Partition `id` under `sharing`. Synthetic data generates just that
    /// partition; real data sets are loaded, then cut.
    pub fn load_partition(
        &self,
        data_dir: Option<&Path>,
        sharing: &Sharing,
        id: usize,
    ) -> Result<Splits, DataError> {
        if let DatasetSpec::Synthetic(spec) = self {
            if id >= sharing.clients {
                return Err(DataError::Partition(format!(
                    "partition id {id} is out of range for {} partitions",
                    sharing.clients
                )));
            }
            return spec.generate_partition_by(sharing.scheme, id, sharing.clients, sharing.seed);
        }
        self.load(data_dir)?.partition_by(sharing, id)
    }

    /// Partitions `ids` under `sharing`, loading a real data set once for
    /// all of them (as a process hosting many clients does).
    pub fn load_partitions(
        &self,
        data_dir: Option<&Path>,
        sharing: &Sharing,
        ids: std::ops::Range<usize>,
    ) -> Result<Vec<Splits>, DataError> {
        if let DatasetSpec::Synthetic(_) = self {
            return ids
                .map(|id| self.load_partition(data_dir, sharing, id))
                .collect();
        }
        self.load(data_dir)?.partitions_by(sharing, ids)
    }
}
