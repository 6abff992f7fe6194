//! Quick training/evaluation speed check: `cargo run --release -p petal-nn --example speed -- [threads] [isa]`.
use petal_nn::{Images, Isa, NetSpec, Network};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1);
    let isa = match args.get(1).map(String::as_str) {
        Some("portable") => Isa::Portable,
        Some("avx2") => Isa::Avx2,
        _ => Isa::detect(),
    };
    let shape = [3, 32, 32];
    let n = 6400;
    let size = 3 * 32 * 32;
    let mut seed = 1u32;
    let mut next = || {
        seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
        (seed >> 24) as u8
    };
    let pixels: Vec<u8> = (0..n * size).map(|_| next()).collect();
    let labels: Vec<u8> = (0..n).map(|_| next() % 10).collect();
    let data = Images::new(shape, &pixels, &labels);
    let mut net = Network::with_isa(&NetSpec::seed_cnn(shape, 10), 0, isa).unwrap();
    net.set_threads(threads);
    let idx: Vec<usize> = (0..n).collect();
    for pass in 0..2 {
        let t = Instant::now();
        let mut loss = 0.0;
        for b in idx.chunks(32) {
            loss += net.train_batch(&data, b, 0.001, 0.9).unwrap();
        }
        let train = n as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for b in idx.chunks(32) {
            net.evaluate_batch(&data, b).unwrap();
        }
        let eval = n as f64 / t.elapsed().as_secs_f64();
        if pass == 1 {
            println!(
                "{isa:?} threads {threads}: train {train:.0} images/s evaluate {eval:.0} images/s (loss {:.3})",
                loss / 200.0
            );
        }
    }
}
