//! The seed CNN on Petal's own engine (`petal-nn`): pure Rust, no
//! framework, AVX-512/AVX2 kernels chosen at run time, PyTorch's layouts,
//! names, initialisation and optimizer semantics. The default CPU learner.

use petal_data::{ImageSet, Values};
use petal_nn::{Images, NetSpec, Network, Pixels};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::client::check_shapes;
use crate::{EvalStats, FitStats, Learner, MlError, NamedTensor, TrainOptions};

/// [`Learner`] over a `petal_nn::Network` holding the seed CNN.
pub struct NativeCnn {
    net: Network,
}

fn nn(e: petal_nn::NnError) -> MlError {
    MlError::Backend(e.to_string())
}

impl NativeCnn {
    /// A new model for images of `input` shape, initialised from `seed`,
    /// splitting each batch across `threads` threads.
    pub fn new(
        input: [usize; 3],
        num_classes: usize,
        seed: u64,
        threads: usize,
    ) -> Result<Self, MlError> {
        Self::from_spec(&NetSpec::seed_cnn(input, num_classes), seed, threads)
    }

    /// The network `spec` (e.g. from a network file), initialised from `seed`.
    pub fn from_spec(spec: &NetSpec, seed: u64, threads: usize) -> Result<Self, MlError> {
        let mut net = Network::new(spec, seed).map_err(|e| MlError::Shape(e.to_string()))?;
        net.set_threads(threads);
        tracing::debug!(isa = ?net.isa(), threads, "native CNN");
        Ok(NativeCnn { net })
    }

    fn check_shape(&self, data: &ImageSet) -> Result<(), MlError> {
        let input = self.net.spec().input;
        if data.shape != input {
            return Err(MlError::Shape(format!(
                "model expects examples of shape {input:?}, data has {:?}",
                data.shape
            )));
        }
        Ok(())
    }
}

/// `data` as the engine reads it, normalised by `norm` (from
/// `data.normalize.affine(&data.values)`).
pub fn images_of<'a>(data: &'a ImageSet, norm: &'a [(f32, f32)]) -> Images<'a> {
    Images {
        shape: data.shape,
        pixels: match &data.values {
            Values::U8(v) => Pixels::U8(v),
            Values::F32(v) => Pixels::F32(v),
        },
        labels: &data.labels,
        norm,
    }
}

impl Learner for NativeCnn {
    fn get_weights(&self) -> Result<Vec<NamedTensor>, MlError> {
        Ok(self
            .net
            .params()
            .iter()
            .map(|p| NamedTensor {
                name: p.name.clone(),
                tensor: petal_core::Tensor {
                    shape: p.shape.clone(),
                    data: p.data.clone().into(),
                },
            })
            .collect())
    }

    fn set_weights(&mut self, weights: &[petal_core::Tensor]) -> Result<(), MlError> {
        let layout: Vec<(String, Vec<usize>)> = self
            .net
            .params()
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect();
        check_shapes(&layout, weights)?;
        let values: Vec<std::borrow::Cow<'_, [f32]>> = weights
            .iter()
            .map(|t| match t.data.as_f32() {
                Some(v) => std::borrow::Cow::Borrowed(v),
                None => std::borrow::Cow::Owned(t.data.to_f32_vec()),
            })
            .collect();
        let values: Vec<&[f32]> = values.iter().map(|v| v.as_ref()).collect();
        self.net
            .set_params(&values)
            .map_err(|e| MlError::Weights(e.to_string()))
    }

    fn fit(&mut self, data: &ImageSet, opts: &TrainOptions) -> Result<FitStats, MlError> {
        self.check_shape(data)?;
        let norm = data.normalize.affine(&data.values);
        let images = images_of(data, &norm);
        if data.is_empty() {
            return Err(MlError::Empty("no training images"));
        }
        // A new optimizer for every local fit, as the seed's `train()`.
        self.net.reset_momentum();
        self.net.set_proximal(opts.proximal_mu as f32);
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let mut order: Vec<usize> = (0..data.len()).collect();
        let mut last_epoch_loss = 0.0;
        for _ in 0..opts.epochs {
            order.shuffle(&mut rng);
            let optimizer = match opts.optimizer {
                crate::OptimizerKind::Sgd => petal_nn::Optimizer::Sgd {
                    lr: opts.lr as f32,
                    momentum: opts.momentum as f32,
                    weight_decay: opts.weight_decay as f32,
                },
                crate::OptimizerKind::Adam => {
                    petal_nn::Optimizer::adam(opts.lr as f32, opts.weight_decay as f32)
                }
            };
            let losses = self
                .net
                .train_epoch_with(&images, &order, opts.batch_size, &optimizer)
                .map_err(nn)?;
            let mut sum = 0.0f64;
            for (loss, idx) in losses.iter().zip(order.chunks(opts.batch_size)) {
                if !loss.is_finite() {
                    return Err(MlError::Diverged(format!(
                        "loss became {loss} (lr {})",
                        opts.lr
                    )));
                }
                sum += loss * idx.len() as f64;
            }
            last_epoch_loss = sum / data.len() as f64;
        }
        self.net.set_proximal(0.0);
        Ok(FitStats {
            num_examples: data.len(),
            train_loss: last_epoch_loss,
        })
    }

    fn evaluate(&mut self, data: &ImageSet, batch_size: usize) -> Result<EvalStats, MlError> {
        self.check_shape(data)?;
        let norm = data.normalize.affine(&data.values);
        let images = images_of(data, &norm);
        if data.is_empty() {
            return Err(MlError::Empty("no test images"));
        }
        let all: Vec<usize> = (0..data.len()).collect();
        let (loss, correct) = self
            .net
            .evaluate(&images, &all, batch_size.max(1))
            .map_err(nn)?;
        Ok(EvalStats {
            num_examples: data.len(),
            loss: loss / data.len() as f64,
            accuracy: correct as f64 / data.len() as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use petal_data::SyntheticSpec;
    use petal_nn::{NetSpec, Network};

    #[test]
    fn names_and_layout_are_pytorchs() {
        let m = NativeCnn::new([3, 32, 32], 10, 1, 1).unwrap();
        let w = m.get_weights().unwrap();
        let names: Vec<_> = w.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, crate::CNN_PARAMETER_NAMES);
        assert_eq!(w[4].tensor.shape, vec![120, 400], "fc1 is [out, in]");
        let mut other = NativeCnn::new([3, 32, 32], 10, 2, 1).unwrap();
        let e = other
            .set_weights(&[w[0].tensor.clone()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected 10 tensors"), "{e}");
    }

    /// One SGD step of burn (lr 1, no momentum) moves the weights by their
    /// gradient; burn's autodiff and the native engine must agree on it.
    #[test]
    fn gradients_match_burns_autodiff() {
        use crate::burn_cnn::{BurnCnn, DeviceKind};
        for shape in [[3, 32, 32], [1, 28, 28]] {
            let data = SyntheticSpec {
                shape,
                train: 32,
                test: 1,
                ..Default::default()
            }
            .generate()
            .unwrap()
            .train;
            let mut burn = BurnCnn::new(shape, 10, DeviceKind::Flex, 5).unwrap();
            let before: Vec<petal_core::Tensor> = burn
                .get_weights()
                .unwrap()
                .into_iter()
                .map(|n| n.tensor)
                .collect();
            let opts = TrainOptions {
                lr: 1.0,
                momentum: 0.0,
                batch_size: 32,
                ..Default::default()
            };
            burn.fit(&data, &opts).unwrap();
            let after = burn.get_weights().unwrap();

            let mut net = Network::new(&NetSpec::seed_cnn(shape, 10), 0).unwrap();
            let values: Vec<&[f32]> = before.iter().map(|t| t.data.as_f32().unwrap()).collect();
            net.set_params(&values).unwrap();
            let norm = data.normalize.affine(&data.values);
            let images = images_of(&data, &norm);
            let (_, grads) = net
                .gradients(&images, &(0..32).collect::<Vec<_>>())
                .unwrap();
            for ((b, a), g) in before.iter().zip(&after).zip(&grads) {
                let scale = g.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(
                    scale > 1e-4,
                    "{}: a gradient that is not trivially zero",
                    a.name
                );
                for (i, ((&w0, &w1), &gi)) in b
                    .data
                    .as_f32()
                    .unwrap()
                    .iter()
                    .zip(a.tensor.data.as_f32().unwrap())
                    .zip(g)
                    .enumerate()
                {
                    let burn_grad = w0 - w1;
                    assert!(
                        (burn_grad - gi).abs() <= 1e-3 * scale,
                        "{shape:?} {}[{i}]: burn {burn_grad} vs native {gi}",
                        a.name
                    );
                }
            }
        }
    }

    #[test]
    fn training_improves_accuracy_on_synthetic_data() {
        let data = SyntheticSpec {
            shape: [1, 16, 16],
            train: 600,
            test: 200,
            ..Default::default()
        }
        .generate()
        .unwrap();
        let mut m = NativeCnn::new([1, 16, 16], 10, 3, 2).unwrap();
        let before = m.evaluate(&data.test, 64).unwrap();
        let opts = TrainOptions {
            epochs: 10,
            lr: 0.02,
            ..Default::default()
        };
        let fit = m.fit(&data.train, &opts).unwrap();
        assert_eq!(fit.num_examples, 600);
        let after = m.evaluate(&data.test, 64).unwrap();
        assert!(after.loss < before.loss, "{before:?} -> {after:?}");
        assert!(after.accuracy > 0.5, "{after:?}");
    }

    /// FedProx: with `proximal_mu` > 0 the trained model stays closer to
    /// the global model it started from than without, on both backends.
    #[test]
    fn the_proximal_term_keeps_updates_near_the_global_model() {
        use crate::burn_cnn::{BurnCnn, DeviceKind};
        let data = SyntheticSpec {
            shape: [1, 16, 16],
            train: 300,
            test: 10,
            ..Default::default()
        }
        .generate()
        .unwrap();
        let distance = |a: &[NamedTensor], b: &[NamedTensor]| -> f64 {
            a.iter()
                .zip(b)
                .flat_map(|(x, y)| {
                    x.tensor
                        .data
                        .to_f64_vec()
                        .into_iter()
                        .zip(y.tensor.data.to_f64_vec())
                        .map(|(p, q)| (p - q) * (p - q))
                        .collect::<Vec<_>>()
                })
                .sum::<f64>()
                .sqrt()
        };
        let learners: Vec<Box<dyn Fn() -> Box<dyn Learner>>> = vec![
            Box::new(|| Box::new(NativeCnn::new([1, 16, 16], 10, 3, 1).unwrap())),
            Box::new(|| Box::new(BurnCnn::new([1, 16, 16], 10, DeviceKind::Flex, 3).unwrap())),
        ];
        for make in learners {
            let moved = |mu: f64| {
                let mut m = make();
                let start = m.get_weights().unwrap();
                let opts = TrainOptions {
                    epochs: 3,
                    lr: 0.05,
                    proximal_mu: mu,
                    ..Default::default()
                };
                m.fit(&data.train, &opts).unwrap();
                distance(&m.get_weights().unwrap(), &start)
            };
            let (plain, prox) = (moved(0.0), moved(1.0));
            assert!(prox < 0.9 * plain, "mu 1: {prox} vs mu 0: {plain}");
        }
    }
}
