//! `petal bench train`: local training and evaluation speed of the seed CNN
//! (or a network file) on random images of a given shape, as
//! `bench/torch_train.py` measures PyTorch (the same data, net, optimizer
//! and batch size).

use std::time::Instant;

use anyhow::Context;
use petal_data::ImageSet;
use petal_ml::{Backend, TrainOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `petal bench train` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchTrainArgs {
    /// Image shape, CxHxW.
    #[arg(long, default_value = "3x32x32", value_parser = crate::args::parse_shape)]
    pub shape: [usize; 3],
    /// Images per epoch.
    #[arg(long, default_value_t = 6400)]
    pub images: usize,
    /// Threads (native engine; burn follows RAYON_NUM_THREADS).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Mini-batch size.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// cpu (native engine) or burn.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// A network file (examples/models) instead of the seed CNN.
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
}

/// Trains one epoch to warm up, then times one epoch of training and one
/// pass of evaluation; prints one line.
pub fn train(args: &BenchTrainArgs) -> anyhow::Result<()> {
    let backend: Backend = args
        .device
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    anyhow::ensure!(
        args.images > 0 && args.batch_size > 0,
        "--images and --batch-size must be positive"
    );
    let size: usize = args.shape.iter().product();
    let mut rng = StdRng::seed_from_u64(0);
    let data = ImageSet {
        values: petal_data::Values::U8((0..args.images * size).map(|_| rng.random()).collect()),
        labels: (0..args.images).map(|_| rng.random_range(0..10)).collect(),
        ..ImageSet::pixels(args.shape, 10)
    };
    let model = args
        .model
        .as_deref()
        .map(petal_ml::model::ModelFile::load)
        .transpose()?;
    let mut learner =
        petal_ml::build_learner(backend, model.as_ref(), args.shape, 10, 0, args.threads)
            .context("building the network")?;
    let opts = TrainOptions {
        batch_size: args.batch_size,
        ..TrainOptions::default()
    };
    learner.fit(&data, &opts)?;
    let t = Instant::now();
    learner.fit(&data, &opts)?;
    let train = args.images as f64 / t.elapsed().as_secs_f64();
    learner.evaluate(&data, args.batch_size)?;
    let t = Instant::now();
    learner.evaluate(&data, args.batch_size)?;
    let evaluate = args.images as f64 / t.elapsed().as_secs_f64();
    let mut detail = format!(
        "{}, {} threads, {}x{}x{}, batch {}",
        args.device, args.threads, args.shape[0], args.shape[1], args.shape[2], args.batch_size
    );
    if backend == Backend::Native {
        // The data path alone: normalising images into the engine's layout.
        let norm = data.normalize.affine(&data.values);
        let images = petal_ml::native_cnn::images_of(&data, &norm);
        let lanes = args.batch_size.div_ceil(16) * 16;
        let mut buf = vec![0.0f32; size * lanes];
        let order: Vec<usize> = (0..args.images).collect();
        let t = Instant::now();
        for idx in order.chunks(args.batch_size) {
            images.fill(idx, lanes, &mut buf);
        }
        let batching = args.images as f64 / t.elapsed().as_secs_f64();
        detail = format!(
            "native {:?}, {detail}; batching alone {batching:.0} images/s",
            petal_nn::Isa::detect()
        );
    }
    println!("petal train {train:.0} images/s evaluate {evaluate:.0} images/s ({detail})");
    Ok(())
}
