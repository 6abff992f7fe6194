//! Training throughput of the burn CNN: images per second for one epoch.
//!
//! `cargo run --release -p petal-ml --example train_throughput -- [C H W] [IMAGES]`
//! Thread count follows `RAYON_NUM_THREADS`.

use std::time::Instant;

use petal_data::SyntheticSpec;
use petal_ml::burn_cnn::{BurnCnn, DeviceKind};
use petal_ml::{Learner, TrainOptions};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let shape = match args.as_slice() {
        [c, h, w, ..] => [*c, *h, *w],
        _ => [3, 32, 32],
    };
    let images = args.get(3).copied().unwrap_or(4096);
    let data = SyntheticSpec {
        shape,
        train: images,
        test: 1024,
        ..Default::default()
    }
    .generate()
    .expect("synthetic data");
    let mut model = BurnCnn::new(shape, 10, DeviceKind::Flex, 0).expect("model");
    let opts = TrainOptions::default();
    // Warm-up on a slice, then time a full epoch.
    let warm = data.train.select(&(0..256.min(images)).collect::<Vec<_>>());
    model.fit(&warm, &opts).expect("warm-up");
    let t = Instant::now();
    model.fit(&data.train, &opts).expect("fit");
    let train = t.elapsed().as_secs_f64();
    let t = Instant::now();
    model.evaluate(&data.test, 256).expect("evaluate");
    let eval = t.elapsed().as_secs_f64();
    println!(
        "shape {shape:?} batch 32: train {:.0} images/s ({images} in {train:.2}s), evaluate {:.0} images/s",
        images as f64 / train,
        data.test.len() as f64 / eval
    );
}
