//! The seed's CIFAR CNN in burn: conv 5x5 (C→6), max-pool 2, conv 5x5
//! (6→16), max-pool 2, fc 120, fc 84, fc 10, ReLU; SGD with momentum and
//! cross-entropy. Weights travel in PyTorch's layout and names
//! (`conv1.weight`, ..., `fc3.bias`; linear weights `[out, in]`), so Petal
//! and PyTorch clients can share one global model.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::prelude::*;
use burn::tensor::TensorData;
use petal_data::ImageSet;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::client::check_shapes;
use crate::{EvalStats, FitStats, Learner, MlError, NamedTensor, TrainOptions};

/// Where tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// burn's pure-Rust CPU backend.
    Flex,
    /// CUDA GPU `n` (needs the `cuda` feature).
    Cuda(usize),
}

impl std::str::FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" | "flex" => Ok(DeviceKind::Flex),
            "cuda" => Ok(DeviceKind::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceKind::Cuda)
                .ok_or_else(|| format!("unknown device '{other}' (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl DeviceKind {
    fn device(self) -> Result<Device, MlError> {
        match self {
            DeviceKind::Flex => Ok(Device::flex()),
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda(n) => Ok(Device::cuda(n)),
            #[cfg(not(feature = "cuda"))]
            DeviceKind::Cuda(_) => Err(MlError::Backend(
                "this build has no CUDA support: rebuild with `--features cuda`".into(),
            )),
        }
    }
}

/// The network.
#[derive(Module, Debug)]
pub struct Cnn {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
    relu: Relu,
}

/// Side after a valid 5x5 conv and a 2x2 pool, twice.
fn feature_side(side: usize) -> Option<usize> {
    let a = side.checked_sub(4)? / 2;
    let b = a.checked_sub(4)? / 2;
    (b > 0).then_some(b)
}

impl Cnn {
    /// A freshly initialised network for `[channels, height, width]` inputs.
    pub fn new(input: [usize; 3], num_classes: usize, device: &Device) -> Result<Self, MlError> {
        let [c, h, w] = input;
        let (fh, fw) = feature_side(h).zip(feature_side(w)).ok_or_else(|| {
            MlError::Shape(format!(
                "images of {h}x{w} are too small: the CNN needs at least 14x14"
            ))
        })?;
        Ok(Cnn {
            conv1: Conv2dConfig::new([c, 6], [5, 5]).init(device),
            conv2: Conv2dConfig::new([6, 16], [5, 5]).init(device),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            fc1: LinearConfig::new(16 * fh * fw, 120).init(device),
            fc2: LinearConfig::new(120, 84).init(device),
            fc3: LinearConfig::new(84, num_classes).init(device),
            relu: Relu::new(),
        })
    }

    /// FedProx's `||w − anchor||²` over every parameter (the anchor detached).
    fn squared_distance(&self, anchor: &Cnn) -> Tensor<1> {
        fn sq<const D: usize>(a: &Param<Tensor<D>>, b: &Param<Tensor<D>>) -> Tensor<1> {
            (a.val() - b.val().detach()).powi_scalar(2).sum()
        }
        fn bias(a: &Option<Param<Tensor<1>>>, b: &Option<Param<Tensor<1>>>) -> Option<Tensor<1>> {
            Some(sq(a.as_ref()?, b.as_ref()?))
        }
        let mut total = sq(&self.conv1.weight, &anchor.conv1.weight)
            + sq(&self.conv2.weight, &anchor.conv2.weight)
            + sq(&self.fc1.weight, &anchor.fc1.weight)
            + sq(&self.fc2.weight, &anchor.fc2.weight)
            + sq(&self.fc3.weight, &anchor.fc3.weight);
        for b in [
            bias(&self.conv1.bias, &anchor.conv1.bias),
            bias(&self.conv2.bias, &anchor.conv2.bias),
            bias(&self.fc1.bias, &anchor.fc1.bias),
            bias(&self.fc2.bias, &anchor.fc2.bias),
            bias(&self.fc3.bias, &anchor.fc3.bias),
        ]
        .into_iter()
        .flatten()
        {
            total = total + b;
        }
        total
    }

    /// Logits `[batch, classes]` for images `[batch, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.pool.forward(self.relu.forward(self.conv1.forward(x)));
        let x = self.pool.forward(self.relu.forward(self.conv2.forward(x)));
        let x: Tensor<2> = x.flatten(1, 3);
        let x = self.relu.forward(self.fc1.forward(x));
        let x = self.relu.forward(self.fc2.forward(x));
        self.fc3.forward(x)
    }
}

/// [`Learner`] over [`Cnn`] with burn.
pub struct BurnCnn {
    model: Option<Cnn>,
    device: Device,
    input: [usize; 3],
}

fn to_vec(t: Tensor<1>) -> Result<Vec<f32>, MlError> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| MlError::Backend(format!("{e:?}")))
}

impl BurnCnn {
    /// A new model for images of `input` shape, initialised from `seed`.
    pub fn new(
        input: [usize; 3],
        num_classes: usize,
        device: DeviceKind,
        seed: u64,
    ) -> Result<Self, MlError> {
        let device = device.device()?.autodiff();
        device.seed(seed);
        let model = Cnn::new(input, num_classes, &device)?;
        Ok(BurnCnn {
            model: Some(model),
            device,
            input,
        })
    }

    fn model(&self) -> &Cnn {
        self.model.as_ref().expect("model is present between calls")
    }

    /// Names and shapes (PyTorch layout) of the weights.
    fn layout(&self) -> Vec<(String, Vec<usize>)> {
        self.get_weights()
            .map(|w| w.into_iter().map(|n| (n.name, n.tensor.shape)).collect())
            .unwrap_or_default()
    }

    fn batch(
        &self,
        data: &ImageSet,
        idx: &[usize],
        device: &Device,
    ) -> (Tensor<4>, Tensor<1, Int>) {
        let size = data.image_size();
        let mut pixels = Vec::with_capacity(idx.len() * size);
        for &i in idx {
            // The data set's normalisation (torchvision's Normalize).
            pixels.extend(data.normalized(i));
        }
        let [c, h, w] = data.shape;
        let x = Tensor::from_data(TensorData::new(pixels, [idx.len(), c, h, w]), device);
        let labels: Vec<i64> = idx.iter().map(|&i| data.labels[i] as i64).collect();
        let y = Tensor::from_data(TensorData::new(labels, [idx.len()]), device);
        (x, y)
    }

    fn check_data(&self, data: &ImageSet) -> Result<(), MlError> {
        if data.shape != self.input {
            return Err(MlError::Shape(format!(
                "model expects images of shape {:?}, data has {:?}",
                self.input, data.shape
            )));
        }
        Ok(())
    }
}

impl Learner for BurnCnn {
    fn get_weights(&self) -> Result<Vec<NamedTensor>, MlError> {
        let m = self.model();
        let mut out = Vec::with_capacity(10);
        let mut push = |name: &str, shape: Vec<usize>, data: Vec<f32>| {
            out.push(NamedTensor {
                name: name.to_string(),
                tensor: petal_core::Tensor {
                    shape,
                    data: data.into(),
                },
            });
        };
        for (prefix, conv) in [("conv1", &m.conv1), ("conv2", &m.conv2)] {
            let w = conv.weight.val();
            let shape = w.dims().to_vec();
            push(&format!("{prefix}.weight"), shape, to_vec(w.flatten(0, 3))?);
            let b = conv.bias.as_ref().expect("conv has a bias").val();
            push(&format!("{prefix}.bias"), b.dims().to_vec(), to_vec(b)?);
        }
        for (prefix, fc) in [("fc1", &m.fc1), ("fc2", &m.fc2), ("fc3", &m.fc3)] {
            // burn stores [in, out]; PyTorch and the wire use [out, in].
            let w = fc.weight.val().transpose();
            let shape = w.dims().to_vec();
            push(&format!("{prefix}.weight"), shape, to_vec(w.flatten(0, 1))?);
            let b = fc.bias.as_ref().expect("linear has a bias").val();
            push(&format!("{prefix}.bias"), b.dims().to_vec(), to_vec(b)?);
        }
        Ok(out)
    }

    fn set_weights(&mut self, weights: &[petal_core::Tensor]) -> Result<(), MlError> {
        check_shapes(&self.layout(), weights)?;
        let d = self.device.clone();
        let mut m = self.model.take().expect("model is present between calls");
        let t4 = |t: &petal_core::Tensor| {
            let s: [usize; 4] = t.shape.clone().try_into().expect("checked shape");
            Param::from_tensor(Tensor::<4>::from_data(
                TensorData::new(t.data.to_f32_vec(), s),
                &d,
            ))
        };
        let t1 = |t: &petal_core::Tensor| {
            Some(Param::from_tensor(Tensor::<1>::from_data(
                TensorData::new(t.data.to_f32_vec(), [t.data.len()]),
                &d,
            )))
        };
        let lin = |t: &petal_core::Tensor| {
            let s = [t.shape[0], t.shape[1]];
            Param::from_tensor(
                Tensor::<2>::from_data(TensorData::new(t.data.to_f32_vec(), s), &d).transpose(),
            )
        };
        m.conv1.weight = t4(&weights[0]);
        m.conv1.bias = t1(&weights[1]);
        m.conv2.weight = t4(&weights[2]);
        m.conv2.bias = t1(&weights[3]);
        m.fc1.weight = lin(&weights[4]);
        m.fc1.bias = t1(&weights[5]);
        m.fc2.weight = lin(&weights[6]);
        m.fc2.bias = t1(&weights[7]);
        m.fc3.weight = lin(&weights[8]);
        m.fc3.bias = t1(&weights[9]);
        self.model = Some(m);
        Ok(())
    }

    fn fit(&mut self, data: &ImageSet, opts: &TrainOptions) -> Result<FitStats, MlError> {
        self.check_data(data)?;
        if opts.optimizer != crate::OptimizerKind::Sgd || opts.weight_decay != 0.0 {
            return Err(MlError::Config(
                "burn's backend trains with SGD without weight decay; Adam and weight decay \
                 run on Petal's engine (--device cpu)"
                    .into(),
            ));
        }
        if data.is_empty() {
            return Err(MlError::Empty("no training images"));
        }
        let mut optim = SgdConfig::new()
            .with_momentum(Some(MomentumConfig {
                momentum: opts.momentum,
                dampening: 0.0,
                nesterov: false,
            }))
            .init();
        let loss_fn = CrossEntropyLossConfig::new().init(&self.device);
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let mut order: Vec<usize> = (0..data.len()).collect();
        let mut model = self.model.take().expect("model is present between calls");
        // FedProx: the loss gains mu/2 · ||w − w_global||².
        let anchor = (opts.proximal_mu > 0.0).then(|| model.clone());
        let mut last_epoch_loss = 0.0;
        for _ in 0..opts.epochs {
            order.shuffle(&mut rng);
            let mut sum = 0.0f64;
            for idx in order.chunks(opts.batch_size) {
                let (x, y) = self.batch(data, idx, &self.device);
                let mut loss = loss_fn.forward(model.forward(x), y);
                if let Some(a) = &anchor {
                    let prox = model.squared_distance(a).mul_scalar(opts.proximal_mu / 2.0);
                    loss = loss + prox;
                }
                let value = loss.clone().into_scalar::<f32>() as f64;
                if !value.is_finite() {
                    self.model = Some(model);
                    return Err(MlError::Diverged(format!(
                        "loss became {value} (lr {})",
                        opts.lr
                    )));
                }
                sum += value * idx.len() as f64;
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                model = optim.step(opts.lr, model, grads);
            }
            last_epoch_loss = sum / data.len() as f64;
        }
        self.model = Some(model);
        Ok(FitStats {
            num_examples: data.len(),
            train_loss: last_epoch_loss,
        })
    }

    fn evaluate(&mut self, data: &ImageSet, batch_size: usize) -> Result<EvalStats, MlError> {
        self.check_data(data)?;
        if data.is_empty() {
            return Err(MlError::Empty("no test images"));
        }
        let model = self.model().valid();
        let device = model
            .devices()
            .into_iter()
            .next()
            .unwrap_or_else(Device::flex);
        let loss_fn = CrossEntropyLossConfig::new().init(&device);
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        let all: Vec<usize> = (0..data.len()).collect();
        for idx in all.chunks(batch_size.max(1)) {
            let (x, y) = self.batch(data, idx, &device);
            let logits = model.forward(x);
            let pred = logits.clone().argmax(1).flatten::<1>(0, 1);
            correct += pred.equal(y.clone()).int().sum().into_scalar::<i64>() as usize;
            loss_sum += loss_fn.forward(logits, y).into_scalar::<f32>() as f64 * idx.len() as f64;
        }
        Ok(EvalStats {
            num_examples: data.len(),
            loss: loss_sum / data.len() as f64,
            accuracy: correct as f64 / data.len() as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use petal_data::SyntheticSpec;

    #[test]
    fn weights_round_trip_in_pytorch_layout() {
        let a = BurnCnn::new([1, 28, 28], 10, DeviceKind::Flex, 1).unwrap();
        let w = a.get_weights().unwrap();
        let names: Vec<_> = w.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names[0], "conv1.weight");
        assert_eq!(w[0].tensor.shape, vec![6, 1, 5, 5]);
        assert_eq!(w[4].tensor.shape, vec![120, 256], "fc1 is [out, in]");
        let mut b = BurnCnn::new([1, 28, 28], 10, DeviceKind::Flex, 2).unwrap();
        assert_ne!(b.get_weights().unwrap(), w);
        let tensors: Vec<_> = w.iter().map(|n| n.tensor.clone()).collect();
        b.set_weights(&tensors).unwrap();
        assert_eq!(b.get_weights().unwrap(), w);
    }

    #[test]
    fn wrong_shapes_name_the_tensor() {
        let a = BurnCnn::new([3, 32, 32], 10, DeviceKind::Flex, 1).unwrap();
        let mut w: Vec<_> = a
            .get_weights()
            .unwrap()
            .into_iter()
            .map(|n| n.tensor)
            .collect();
        w[4].shape = vec![120, 256];
        let mut b = BurnCnn::new([3, 32, 32], 10, DeviceKind::Flex, 1).unwrap();
        let e = b.set_weights(&w).unwrap_err().to_string();
        assert!(e.contains("fc1.weight: expected shape [120, 400]"), "{e}");
        assert!(BurnCnn::new([1, 8, 8], 10, DeviceKind::Flex, 1).is_err());
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
        let mut m = BurnCnn::new([1, 16, 16], 10, DeviceKind::Flex, 3).unwrap();
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
}
