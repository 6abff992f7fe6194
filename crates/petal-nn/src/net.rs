//! A sequential network (convolutions, 2×2 max-pooling, linear layers,
//! ReLU fused into the layer before it) trained with softmax cross-entropy
//! and SGD with PyTorch's momentum rule. A batch is split across threads,
//! each running the whole forward and backward pass on its share of the
//! images with its own buffers (reused from batch to batch); their weight
//! gradients are summed before the step.

use std::sync::{Mutex, RwLock, mpsc};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::NnError;
use crate::kernels::{Geom, Kernels, MAX_KERNEL};
use crate::simd::Isa;

/// One layer of a [`NetSpec`].
#[derive(Debug, Clone, PartialEq)]
pub enum LayerSpec {
    /// 2-D convolution, stride 1, square kernel, zero padding.
    Conv {
        /// Parameter name prefix (`conv1` gives `conv1.weight`, `conv1.bias`).
        name: String,
        out: usize,
        kernel: usize,
        padding: usize,
        /// ReLU after the layer.
        relu: bool,
    },
    /// 2×2 max-pooling with stride 2.
    MaxPool2,
    /// 2×2 average pooling with stride 2 (PyTorch's `avg_pool2d(2)`).
    AvgPool2,
    /// Average over each channel's whole plane, to 1×1 (PyTorch's
    /// `adaptive_avg_pool2d(1)`).
    GlobalAvgPool,
    /// Fully connected layer on the flattened input (PyTorch's flatten order).
    Linear {
        /// Parameter name prefix.
        name: String,
        out: usize,
        /// ReLU after the layer.
        relu: bool,
    },
}

/// A network: input shape `[channels, height, width]` and its layers; the
/// last layer's outputs are the class logits.
#[derive(Debug, Clone, PartialEq)]
pub struct NetSpec {
    pub input: [usize; 3],
    pub layers: Vec<LayerSpec>,
}

impl NetSpec {
    /// The CNN of Flower's example: conv 5×5 (C→6), pool, conv 5×5 (6→16),
    /// pool, fc 120, fc 84, fc `classes`, ReLU after all but the last.
    pub fn seed_cnn(input: [usize; 3], classes: usize) -> NetSpec {
        let conv = |name: &str, out| LayerSpec::Conv {
            name: name.into(),
            out,
            kernel: 5,
            padding: 0,
            relu: true,
        };
        let fc = |name: &str, out, relu| LayerSpec::Linear {
            name: name.into(),
            out,
            relu,
        };
        NetSpec {
            input,
            layers: vec![
                conv("conv1", 6),
                LayerSpec::MaxPool2,
                conv("conv2", 16),
                LayerSpec::MaxPool2,
                fc("fc1", 120, true),
                fc("fc2", 84, true),
                fc("fc3", classes, false),
            ],
        }
    }
}

/// A named parameter tensor (PyTorch's names, shapes and layouts).
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    /// `g.lanes` is unset (the batch decides it).
    Conv {
        g: Geom,
        relu: bool,
        w: usize,
    },
    Pool {
        c: usize,
        h: usize,
        w: usize,
    },
    AvgPool {
        c: usize,
        h: usize,
        w: usize,
    },
    GlobalAvg {
        c: usize,
        h: usize,
        w: usize,
    },
    Linear {
        inp: usize,
        out: usize,
        relu: bool,
        w: usize,
    },
}

impl Op {
    fn relu(&self) -> bool {
        match *self {
            Op::Conv { relu, .. } | Op::Linear { relu, .. } => relu,
            Op::Pool { .. } | Op::AvgPool { .. } | Op::GlobalAvg { .. } => false,
        }
    }
}

/// Buffers of one thread, sized for `lanes` images.
#[derive(Default)]
struct Workspace {
    lanes: usize,
    /// Input, then every layer's output, each `[values][lanes]`.
    acts: Vec<Vec<f32>>,
    /// Gradient of every layer's output (index `i + 1` for layer `i`).
    grads: Vec<Vec<f32>>,
    /// Weight gradients, one per parameter.
    pgrads: Vec<Vec<f32>>,
    /// Linear weight-gradient scratch: input and output gradient transposed.
    xt: Vec<f32>,
    dyt: Vec<f32>,
    dw_pad: Vec<f32>,
    loss: f64,
    correct: usize,
}

/// What never changes once a network is built.
struct Plan {
    kernels: Kernels,
    ops: Vec<Op>,
    /// Values per image of the input and of every layer's output.
    sizes: Vec<usize>,
}

/// How a training step updates the weights, with PyTorch's semantics
/// (`torch.optim.SGD` and `torch.optim.Adam`; `weight_decay` is the L2 term
/// both add to the gradient).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    Sgd {
        lr: f32,
        momentum: f32,
        weight_decay: f32,
    },
    Adam {
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    },
}

impl Optimizer {
    /// SGD with momentum, no weight decay.
    pub fn sgd(lr: f32, momentum: f32) -> Self {
        Optimizer::Sgd {
            lr,
            momentum,
            weight_decay: 0.0,
        }
    }

    /// Adam with PyTorch's defaults (betas 0.9, 0.999; eps 1e-8).
    pub fn adam(lr: f32, weight_decay: f32) -> Self {
        Optimizer::Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }
}

/// The parameters, their SGD momentum, and the weights rearranged for the
/// kernels (rebuilt after each step): forward (`[cin][k][k][cout]` or
/// `[in][out]`) and input-gradient (`[cout][k][k][cin]` flipped, or
/// PyTorch's `[out][in]`).
#[derive(Default)]
struct Weights {
    params: Vec<Param>,
    /// SGD's momentum buffer, or Adam's first moment.
    momentum: Vec<Vec<f32>>,
    /// Adam's second moment (allocated at its first step).
    second: Vec<Vec<f32>>,
    /// Steps since the optimizer was reset (Adam's bias correction).
    steps: u32,
    /// FedProx: `mu` and the global weights the proximal term pulls towards.
    prox: Option<(f32, Vec<Vec<f32>>)>,
    fwd: Vec<Vec<f32>>,
    bwd: Vec<Vec<f32>>,
}

/// A network with its parameters, SGD momentum and per-thread buffers.
pub struct Network {
    spec: NetSpec,
    plan: Plan,
    weights: Weights,
    threads: usize,
    work: Vec<Workspace>,
}

fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

impl Network {
    /// A network for `spec`, initialised as PyTorch does (uniform in
    /// ±1/√fan_in for weights and biases), from `seed`, using the best
    /// instruction set of this CPU.
    pub fn new(spec: &NetSpec, seed: u64) -> Result<Network, NnError> {
        Self::with_isa(spec, seed, Isa::detect())
    }

    /// As [`Network::new`], with the kernels of `isa`.
    pub fn with_isa(spec: &NetSpec, seed: u64, isa: Isa) -> Result<Network, NnError> {
        if !Isa::available().contains(&isa) {
            return Err(NnError::Spec(format!(
                "{isa:?} is not available on this CPU"
            )));
        }
        let [mut c, mut h, mut w] = spec.input;
        if c == 0 || h == 0 || w == 0 {
            return Err(NnError::Spec(format!(
                "input shape {:?} has a zero side",
                spec.input
            )));
        }
        let mut ops = Vec::new();
        let mut params = Vec::new();
        let mut sizes = vec![c * h * w];
        let mut flat: Option<usize> = None;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut init = |name: String, shape: Vec<usize>, fan_in: usize| {
            let bound = 1.0 / (fan_in as f32).sqrt();
            let n: usize = shape.iter().product();
            let data = (0..n).map(|_| rng.random_range(-bound..=bound)).collect();
            Param { name, shape, data }
        };
        for (i, layer) in spec.layers.iter().enumerate() {
            let at = |what: String| NnError::Spec(format!("layer {i}: {what}"));
            match layer {
                LayerSpec::Conv {
                    name,
                    out,
                    kernel,
                    padding,
                    relu,
                } => {
                    if flat.is_some() {
                        return Err(at("a convolution cannot follow a linear layer".into()));
                    }
                    let (k, pad) = (*kernel, *padding);
                    if k == 0 || k > MAX_KERNEL || pad >= k || *out == 0 {
                        return Err(at(format!(
                            "kernel {k} with padding {pad} and {out} outputs is not supported \
                             (kernel 1..={MAX_KERNEL}, padding < kernel)"
                        )));
                    }
                    if h + 2 * pad < k || w + 2 * pad < k {
                        return Err(at(format!("a {k}×{k} kernel does not fit {h}×{w} inputs")));
                    }
                    let g = Geom {
                        cin: c,
                        h,
                        w,
                        cout: *out,
                        k,
                        pad,
                        lanes: 0,
                    };
                    let fan_in = c * k * k;
                    ops.push(Op::Conv {
                        g,
                        relu: *relu,
                        w: params.len(),
                    });
                    params.push(init(format!("{name}.weight"), vec![*out, c, k, k], fan_in));
                    params.push(init(format!("{name}.bias"), vec![*out], fan_in));
                    (c, h, w) = (*out, g.oh(), g.ow());
                }
                LayerSpec::MaxPool2 => {
                    if flat.is_some() || h < 2 || w < 2 {
                        return Err(at(format!("cannot max-pool {h}×{w} inputs")));
                    }
                    ops.push(Op::Pool { c, h, w });
                    (h, w) = (h / 2, w / 2);
                }
                LayerSpec::AvgPool2 => {
                    if flat.is_some() || h < 2 || w < 2 {
                        return Err(at(format!("cannot average-pool {h}×{w} inputs")));
                    }
                    ops.push(Op::AvgPool { c, h, w });
                    (h, w) = (h / 2, w / 2);
                }
                LayerSpec::GlobalAvgPool => {
                    if flat.is_some() {
                        return Err(at("global average pooling after a linear layer".into()));
                    }
                    ops.push(Op::GlobalAvg { c, h, w });
                    (h, w) = (1, 1);
                }
                LayerSpec::Linear { name, out, relu } => {
                    let inp = flat.unwrap_or(c * h * w);
                    if *out == 0 {
                        return Err(at("a linear layer needs outputs".into()));
                    }
                    ops.push(Op::Linear {
                        inp,
                        out: *out,
                        relu: *relu,
                        w: params.len(),
                    });
                    params.push(init(format!("{name}.weight"), vec![*out, inp], inp));
                    params.push(init(format!("{name}.bias"), vec![*out], inp));
                    flat = Some(*out);
                }
            }
            sizes.push(flat.unwrap_or(c * h * w));
        }
        if !matches!(ops.last(), Some(Op::Linear { relu: false, .. })) {
            return Err(NnError::Spec(
                "the last layer must be a linear layer without ReLU (the logits)".into(),
            ));
        }
        let momentum = params.iter().map(|p| vec![0.0; p.data.len()]).collect();
        let plan = Plan {
            kernels: Kernels::new(isa),
            ops,
            sizes,
        };
        let mut weights = Weights {
            params,
            momentum,
            second: Vec::new(),
            steps: 0,
            prox: None,
            fwd: Vec::new(),
            bwd: Vec::new(),
        };
        weights.arrange(&plan.ops);
        Ok(Network {
            spec: spec.clone(),
            plan,
            weights,
            threads: 1,
            work: Vec::new(),
        })
    }

    /// The spec this network was built from.
    pub fn spec(&self) -> &NetSpec {
        &self.spec
    }

    /// The instruction set of the kernels.
    pub fn isa(&self) -> Isa {
        self.plan.kernels.isa()
    }

    /// Number of classes (outputs of the last layer).
    pub fn classes(&self) -> usize {
        *self.plan.sizes.last().unwrap_or(&0)
    }

    /// Threads a batch is split across (at least 1).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// The parameters, in order, with PyTorch's names, shapes and layouts.
    pub fn params(&self) -> &[Param] {
        &self.weights.params
    }

    /// Replaces every parameter; `values` follow [`Network::params`]' order.
    pub fn set_params(&mut self, values: &[&[f32]]) -> Result<(), NnError> {
        let params = &mut self.weights.params;
        if values.len() != params.len() {
            return Err(NnError::Params(format!(
                "expected {} tensors, got {}",
                params.len(),
                values.len()
            )));
        }
        for (p, v) in params.iter().zip(values) {
            if v.len() != p.data.len() {
                return Err(NnError::Params(format!(
                    "{}: expected {} values, got {}",
                    p.name,
                    p.data.len(),
                    v.len()
                )));
            }
        }
        for (p, v) in params.iter_mut().zip(values) {
            p.data.copy_from_slice(v);
        }
        self.weights.arrange(&self.plan.ops);
        Ok(())
    }

    /// FedProx: adds `mu/2 · ||w − w_now||²` to the training loss from now
    /// on (`w_now`: the current weights, the global model a fit starts
    /// from), as PyTorch's FedProx adds it to the loss it differentiates;
    /// `mu` 0 removes it.
    pub fn set_proximal(&mut self, mu: f32) {
        self.weights.prox = (mu > 0.0).then(|| {
            let anchor = self.weights.params.iter().map(|p| p.data.clone()).collect();
            (mu, anchor)
        });
    }

    /// Forgets the optimizer's state (a new optimizer, as each local fit starts).
    pub fn reset_momentum(&mut self) {
        for m in self
            .weights
            .momentum
            .iter_mut()
            .chain(&mut self.weights.second)
        {
            m.fill(0.0);
        }
        self.weights.steps = 0;
    }

    /// One epoch of SGD over `order` in batches of `batch_size`; returns
    /// each batch's mean loss. Stops after the first batch whose loss is
    /// not finite (training diverged). The threads live for the whole epoch.
    pub fn train_epoch(
        &mut self,
        data: &Images<'_>,
        order: &[usize],
        batch_size: usize,
        lr: f32,
        momentum: f32,
    ) -> Result<Vec<f64>, NnError> {
        self.train_epoch_with(data, order, batch_size, &Optimizer::sgd(lr, momentum))
    }

    /// One epoch with `optimizer` (see [`Network::train_epoch`]).
    pub fn train_epoch_with(
        &mut self,
        data: &Images<'_>,
        order: &[usize],
        batch_size: usize,
        optimizer: &Optimizer,
    ) -> Result<Vec<f64>, NnError> {
        data.check(self.spec.input, self.classes(), order)?;
        if batch_size == 0 {
            return Err(NnError::Data("batch size 0".into()));
        }
        Ok(self.session(|s| {
            let mut losses = Vec::new();
            for batch in order.chunks(batch_size) {
                let (loss, _) = s.run(data, batch, true);
                let loss = loss / batch.len() as f64 + s.proximal_loss();
                losses.push(loss);
                s.step(optimizer);
                if !loss.is_finite() {
                    break;
                }
            }
            losses
        }))
    }

    /// One SGD step on the images `batch` of `data`; returns the batch's
    /// mean cross-entropy loss. `lr` and `momentum` as PyTorch's SGD.
    pub fn train_batch(
        &mut self,
        data: &Images<'_>,
        batch: &[usize],
        lr: f32,
        momentum: f32,
    ) -> Result<f64, NnError> {
        if batch.is_empty() {
            return Err(NnError::Data("empty batch".into()));
        }
        self.train_batch_with(data, batch, &Optimizer::sgd(lr, momentum))
    }

    /// One step with `optimizer` on the images `batch` of `data`.
    pub fn train_batch_with(
        &mut self,
        data: &Images<'_>,
        batch: &[usize],
        optimizer: &Optimizer,
    ) -> Result<f64, NnError> {
        if batch.is_empty() {
            return Err(NnError::Data("empty batch".into()));
        }
        let losses = self.train_epoch_with(data, batch, batch.len(), optimizer)?;
        Ok(losses[0])
    }

    /// The summed cross-entropy loss and the number of correct predictions
    /// over the images `order` of `data`, in batches of `batch_size`.
    pub fn evaluate(
        &mut self,
        data: &Images<'_>,
        order: &[usize],
        batch_size: usize,
    ) -> Result<(f64, usize), NnError> {
        data.check(self.spec.input, self.classes(), order)?;
        Ok(self.session(|s| {
            let (mut loss, mut correct) = (0.0, 0);
            for batch in order.chunks(batch_size.max(1)) {
                let (l, c) = s.run(data, batch, false);
                loss += l;
                correct += c;
            }
            (loss, correct)
        }))
    }

    /// As [`Network::evaluate`] on one batch.
    pub fn evaluate_batch(
        &mut self,
        data: &Images<'_>,
        batch: &[usize],
    ) -> Result<(f64, usize), NnError> {
        self.evaluate(data, batch, batch.len())
    }

    /// The mean loss and the gradient of every parameter over the images
    /// `batch` of `data`, without changing the network (for checks).
    pub fn gradients(
        &mut self,
        data: &Images<'_>,
        batch: &[usize],
    ) -> Result<(f64, Vec<Vec<f32>>), NnError> {
        data.check(self.spec.input, self.classes(), batch)?;
        if batch.is_empty() {
            return Err(NnError::Data("empty batch".into()));
        }
        Ok(self.session(|s| {
            let (loss, _) = s.run(data, batch, true);
            (loss / batch.len() as f64, s.summed_grads().to_vec())
        }))
    }

    /// The logits `[image][class]` of the images `batch` of `data`.
    pub fn logits(&mut self, data: &Images<'_>, batch: &[usize]) -> Result<Vec<Vec<f32>>, NnError> {
        data.check(self.spec.input, self.classes(), batch)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let classes = self.classes();
        Ok(self.session(|s| {
            s.run(data, batch, false);
            let mut out = Vec::with_capacity(batch.len());
            for (w, count) in s.last_chunks() {
                let z = w.acts.last().map(Vec::as_slice).unwrap_or(&[]);
                for l in 0..count {
                    out.push((0..classes).map(|c| z[c * w.lanes + l]).collect());
                }
            }
            out
        }))
    }

    /// Runs `body` with a team of `threads` threads that live until it returns.
    fn session<'e, R>(&mut self, body: impl FnOnce(&mut Session<'_, 'e>) -> R) -> R {
        let threads = self.threads;
        if self.work.len() < threads {
            self.work.resize_with(threads, Workspace::default);
        }
        let weights = RwLock::new(std::mem::take(&mut self.weights));
        let work: Vec<Mutex<Workspace>> = std::mem::take(&mut self.work)
            .into_iter()
            .map(Mutex::new)
            .collect();
        let plan = &self.plan;
        let result = std::thread::scope(|scope| {
            let (done_tx, done) = mpsc::channel::<Result<(), String>>();
            let mut jobs = Vec::new();
            for t in 1..threads {
                let (tx, rx) = mpsc::channel::<Job<'e>>();
                jobs.push(tx);
                let (weights, work, done_tx) = (&weights, &work, done_tx.clone());
                scope.spawn(move || {
                    for job in rx {
                        let outcome =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                let w = weights.read().unwrap_or_else(|e| e.into_inner());
                                let mut ws = work[t].lock().unwrap_or_else(|e| e.into_inner());
                                Shared {
                                    plan,
                                    w: &w,
                                    scale: job.scale,
                                }
                                .pass(&mut ws, job.data, job.idx, job.lanes, job.train);
                            }))
                            .map_err(|p| {
                                p.downcast_ref::<&str>()
                                    .map(|s| s.to_string())
                                    .or_else(|| p.downcast_ref::<String>().cloned())
                                    .unwrap_or_default()
                            });
                        if done_tx.send(outcome).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(done_tx);
            let mut session = Session {
                plan,
                weights: &weights,
                work: &work,
                jobs,
                done,
                counts: Vec::new(),
            };
            body(&mut session)
        });
        self.weights = weights.into_inner().unwrap_or_else(|e| e.into_inner());
        self.work = work
            .into_iter()
            .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .collect();
        result
    }
}

/// One thread's share of a batch.
struct Job<'a> {
    data: &'a Images<'a>,
    idx: &'a [usize],
    lanes: usize,
    train: bool,
    scale: f32,
}

/// A team of threads working batch after batch.
struct Session<'s, 'e> {
    plan: &'s Plan,
    weights: &'s RwLock<Weights>,
    work: &'s [Mutex<Workspace>],
    jobs: Vec<mpsc::Sender<Job<'e>>>,
    done: mpsc::Receiver<Result<(), String>>,
    /// Images per thread in the last batch.
    counts: Vec<usize>,
}

impl<'e> Session<'_, 'e> {
    /// Forward (and with `train` backward) pass of `batch`, split across
    /// the team; returns the summed loss and the correct predictions.
    fn run(&mut self, data: &'e Images<'e>, batch: &'e [usize], train: bool) -> (f64, usize) {
        let vec = self.plan.kernels.isa().lanes();
        let threads = (self.jobs.len() + 1).min(batch.len().div_ceil(vec)).max(1);
        let per = batch.len().div_ceil(threads);
        let scale = 1.0 / batch.len() as f32;
        self.counts.clear();
        let mut remote = 0;
        for t in 0..threads {
            let start = (t * per).min(batch.len());
            let idx = &batch[start..(start + per).min(batch.len())];
            self.counts.push(idx.len());
            if t == 0 || idx.is_empty() {
                continue;
            }
            let job = Job {
                data,
                idx,
                lanes: round_up(idx.len(), vec),
                train,
                scale,
            };
            match self.jobs[t - 1].send(job) {
                Ok(()) => remote += 1,
                Err(_) => self.pass_here(t, data, idx, train, scale),
            }
        }
        self.pass_here(0, data, &batch[..self.counts[0]], train, scale);
        for _ in 0..remote {
            match self.done.recv() {
                Ok(Ok(())) => {}
                Ok(Err(why)) => panic!("a training thread panicked: {why}"),
                Err(_) => panic!("the training threads are gone"),
            }
        }
        let (mut loss, mut correct) = (0.0, 0);
        for (w, &c) in self.work.iter().zip(&self.counts) {
            if c > 0 {
                let w = w.lock().unwrap_or_else(|e| e.into_inner());
                loss += w.loss;
                correct += w.correct;
            }
        }
        (loss, correct)
    }

    fn pass_here(&self, t: usize, data: &Images<'_>, idx: &[usize], train: bool, scale: f32) {
        let w = self.weights.read().unwrap_or_else(|e| e.into_inner());
        let mut ws = self.work[t].lock().unwrap_or_else(|e| e.into_inner());
        let lanes = round_up(idx.len(), self.plan.kernels.isa().lanes());
        Shared {
            plan: self.plan,
            w: &w,
            scale,
        }
        .pass(&mut ws, data, idx, lanes, train);
    }

    /// The workspaces of the last batch's threads with their image counts.
    fn last_chunks(&self) -> Vec<(std::sync::MutexGuard<'_, Workspace>, usize)> {
        self.work
            .iter()
            .zip(&self.counts)
            .filter(|&(_, &c)| c > 0)
            .map(|(w, &c)| (w.lock().unwrap_or_else(|e| e.into_inner()), c))
            .collect()
    }

    /// The last batch's gradients, summed over the threads (into thread 0's).
    fn summed_grads(&self) -> Vec<Vec<f32>> {
        let mut chunks = self.last_chunks().into_iter();
        let Some((mut first, _)) = chunks.next() else {
            return Vec::new();
        };
        for (other, _) in chunks {
            for (g, o) in first.pgrads.iter_mut().zip(&other.pgrads) {
                for (a, b) in g.iter_mut().zip(o) {
                    *a += b;
                }
            }
        }
        first.pgrads.clone()
    }

    /// The proximal term `mu/2 · ||w − w_global||²` of the weights now (0
    /// without FedProx).
    fn proximal_loss(&self) -> f64 {
        let w = self.weights.read().unwrap_or_else(|e| e.into_inner());
        let Some((mu, anchor)) = &w.prox else {
            return 0.0;
        };
        let sq: f64 = w
            .params
            .iter()
            .zip(anchor)
            .flat_map(|(p, a)| p.data.iter().zip(a).map(|(x, y)| f64::from(x - y).powi(2)))
            .sum();
        f64::from(*mu) / 2.0 * sq
    }

    /// A step of `optimizer` with the last batch's gradients (plus FedProx's
    /// `mu · (w − w_global)`).
    fn step(&self, optimizer: &Optimizer) {
        let grads = self.summed_grads();
        let mut w = self.weights.write().unwrap_or_else(|e| e.into_inner());
        let w = &mut *w;
        w.steps = w.steps.saturating_add(1);
        let empty: Vec<Vec<f32>> = Vec::new();
        let (mu, anchor) = match &w.prox {
            Some((mu, a)) => (*mu, a),
            None => (0.0, &empty),
        };
        match *optimizer {
            Optimizer::Sgd {
                lr,
                momentum,
                weight_decay,
            } => {
                for (i, ((p, m), g)) in w
                    .params
                    .iter_mut()
                    .zip(&mut w.momentum)
                    .zip(&grads)
                    .enumerate()
                {
                    let a = anchor.get(i);
                    for (j, ((x, b), &d)) in p.data.iter_mut().zip(m.iter_mut()).zip(g).enumerate()
                    {
                        let d = if weight_decay != 0.0 {
                            d + weight_decay * *x
                        } else {
                            d
                        };
                        let prox = a.map_or(0.0, |a| mu * (*x - a[j]));
                        *b = momentum * *b + d + prox;
                        *x -= lr * *b;
                    }
                }
            }
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                if w.second.len() != w.params.len() {
                    w.second = w.params.iter().map(|p| vec![0.0; p.data.len()]).collect();
                }
                // PyTorch's single-tensor Adam, step for step.
                let t = f64::from(w.steps);
                let bc1 = 1.0 - f64::from(beta1).powf(t);
                let bc2 = 1.0 - f64::from(beta2).powf(t);
                let step_size = (f64::from(lr) / bc1) as f32;
                let bc2_sqrt = bc2.sqrt() as f32;
                let iter = w
                    .params
                    .iter_mut()
                    .zip(&mut w.momentum)
                    .zip(&mut w.second)
                    .zip(&grads);
                for (i, (((p, m), v), g)) in iter.enumerate() {
                    let a = anchor.get(i);
                    for (j, (((x, m), v), &d)) in p
                        .data
                        .iter_mut()
                        .zip(m.iter_mut())
                        .zip(v.iter_mut())
                        .zip(g)
                        .enumerate()
                    {
                        let mut d = if weight_decay != 0.0 {
                            d + weight_decay * *x
                        } else {
                            d
                        };
                        if let Some(a) = a {
                            d += mu * (*x - a[j]);
                        }
                        *m += (1.0 - beta1) * (d - *m);
                        *v = *v * beta2 + (1.0 - beta2) * d * d;
                        let denom = v.sqrt() / bc2_sqrt + eps;
                        *x += -step_size * (*m / denom);
                    }
                }
            }
        }
        w.arrange(&self.plan.ops);
    }
}

impl Weights {
    fn arrange(&mut self, ops: &[Op]) {
        self.fwd.resize(self.params.len(), Vec::new());
        self.bwd.resize(self.params.len(), Vec::new());
        for op in ops {
            match *op {
                Op::Conv { g, w, .. } => {
                    let src = &self.params[w].data;
                    let (co_n, ci_n, k) = (g.cout, g.cin, g.k);
                    let f = &mut self.fwd[w];
                    let b = &mut self.bwd[w];
                    f.resize(src.len(), 0.0);
                    b.resize(src.len(), 0.0);
                    for co in 0..co_n {
                        for ci in 0..ci_n {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let v = src[((co * ci_n + ci) * k + ky) * k + kx];
                                    f[((ci * k + ky) * k + kx) * co_n + co] = v;
                                    b[((co * k + (k - 1 - ky)) * k + (k - 1 - kx)) * ci_n + ci] = v;
                                }
                            }
                        }
                    }
                }
                Op::Linear { inp, out, w, .. } => {
                    let src = &self.params[w].data;
                    let f = &mut self.fwd[w];
                    f.resize(src.len(), 0.0);
                    for o in 0..out {
                        for i in 0..inp {
                            f[i * out + o] = src[o * inp + i];
                        }
                    }
                    self.bwd[w].clone_from(src);
                }
                Op::Pool { .. } | Op::AvgPool { .. } | Op::GlobalAvg { .. } => {}
            }
        }
    }
}

/// 2×2 average pooling, `[c][h][w][lanes]` → `[c][h/2][w/2][lanes]`, each
/// window summed row by row, as PyTorch does.
fn avg_pool_fwd(c: usize, h: usize, w: usize, lanes: usize, x: &[f32], y: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    for ch in 0..c {
        for oy in 0..oh {
            for ox in 0..ow {
                let at = |dy: usize, dx: usize| ((ch * h + 2 * oy + dy) * w + 2 * ox + dx) * lanes;
                let (a, b, cc, d) = (at(0, 0), at(0, 1), at(1, 0), at(1, 1));
                let out = ((ch * oh + oy) * ow + ox) * lanes;
                for l in 0..lanes {
                    y[out + l] = (x[a + l] + x[b + l] + x[cc + l] + x[d + l]) / 4.0;
                }
            }
        }
    }
}

/// The input gradient of [`avg_pool_fwd`]: a quarter of each output's
/// gradient to each of its window (0 for an odd last row or column).
fn avg_pool_bwd(c: usize, h: usize, w: usize, lanes: usize, dy: &[f32], dx: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    dx.fill(0.0);
    for ch in 0..c {
        for oy in 0..oh {
            for ox in 0..ow {
                let out = ((ch * oh + oy) * ow + ox) * lanes;
                for (ddy, ddx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    let at = ((ch * h + 2 * oy + ddy) * w + 2 * ox + ddx) * lanes;
                    for l in 0..lanes {
                        dx[at + l] = dy[out + l] / 4.0;
                    }
                }
            }
        }
    }
}

/// Each channel's mean over its `h × w` plane: `[c][h][w][lanes]` → `[c][lanes]`.
fn global_avg_fwd(c: usize, h: usize, w: usize, lanes: usize, x: &[f32], y: &mut [f32]) {
    let n = (h * w) as f32;
    for ch in 0..c {
        let out = &mut y[ch * lanes..(ch + 1) * lanes];
        out.fill(0.0);
        for p in 0..h * w {
            let row = &x[(ch * h * w + p) * lanes..(ch * h * w + p + 1) * lanes];
            for (o, v) in out.iter_mut().zip(row) {
                *o += v;
            }
        }
        for o in out.iter_mut() {
            *o /= n;
        }
    }
}

/// The input gradient of [`global_avg_fwd`].
fn global_avg_bwd(c: usize, h: usize, w: usize, lanes: usize, dy: &[f32], dx: &mut [f32]) {
    let n = (h * w) as f32;
    for ch in 0..c {
        for p in 0..h * w {
            let at = (ch * h * w + p) * lanes;
            for l in 0..lanes {
                dx[at + l] = dy[ch * lanes + l] / n;
            }
        }
    }
}

/// What every thread reads during a pass.
struct Shared<'a> {
    plan: &'a Plan,
    w: &'a Weights,
    /// 1 / images in the whole batch (the loss is their mean).
    scale: f32,
}

impl Shared<'_> {
    fn prepare(&self, w: &mut Workspace, lanes: usize, train: bool) {
        let sizes = &self.plan.sizes;
        w.lanes = lanes;
        w.acts.resize_with(sizes.len(), Vec::new);
        for (a, &n) in w.acts.iter_mut().zip(sizes) {
            a.resize(n * lanes, 0.0);
        }
        if train {
            w.grads.resize_with(sizes.len(), Vec::new);
            for (g, &n) in w.grads.iter_mut().zip(sizes).skip(1) {
                g.resize(n * lanes, 0.0);
            }
            w.pgrads.resize_with(self.w.params.len(), Vec::new);
            for (g, p) in w.pgrads.iter_mut().zip(&self.w.params) {
                g.clear();
                g.resize(p.data.len(), 0.0);
            }
        }
    }

    /// Forward (and backward) pass over `idx`, the images of one thread.
    fn pass(&self, w: &mut Workspace, data: &Images<'_>, idx: &[usize], lanes: usize, train: bool) {
        self.prepare(w, lanes, train);
        data.fill(idx, lanes, &mut w.acts[0]);
        self.forward(w);
        self.loss(w, data, idx, train);
        if train {
            self.backward(w);
        }
    }

    fn forward(&self, w: &mut Workspace) {
        let k = &self.plan.kernels;
        let lanes = w.lanes;
        let vec = k.isa().lanes();
        for (i, op) in self.plan.ops.iter().enumerate() {
            let (before, after) = w.acts.split_at_mut(i + 1);
            let (x, y) = (&before[i], &mut after[0]);
            match *op {
                Op::Conv { g, relu, w: p } => {
                    let g = Geom { lanes, ..g };
                    k.conv_fwd(
                        &g,
                        x,
                        &self.w.fwd[p],
                        Some(&self.w.params[p + 1].data),
                        y,
                        relu,
                    );
                }
                Op::Pool { c, h, w: width } => k.pool_fwd(c, h, width, lanes, x, y),
                Op::AvgPool { c, h, w: width } => avg_pool_fwd(c, h, width, lanes, x, y),
                Op::GlobalAvg { c, h, w: width } => global_avg_fwd(c, h, width, lanes, x, y),
                Op::Linear {
                    inp,
                    out,
                    relu,
                    w: p,
                } => {
                    let g = Geom {
                        cin: inp,
                        h: 1,
                        w: lanes / vec,
                        cout: out,
                        k: 1,
                        pad: 0,
                        lanes: vec,
                    };
                    k.conv_fwd(
                        &g,
                        x,
                        &self.w.fwd[p],
                        Some(&self.w.params[p + 1].data),
                        y,
                        relu,
                    );
                }
            }
        }
    }

    /// Softmax cross-entropy of the real lanes: the summed loss, the
    /// correct predictions and (training) the logits' gradient, zero on
    /// padding lanes.
    fn loss(&self, w: &mut Workspace, data: &Images<'_>, idx: &[usize], train: bool) {
        let lanes = w.lanes;
        let classes = *self.plan.sizes.last().unwrap_or(&0);
        let logits = w.acts.last().map(Vec::as_slice).unwrap_or(&[]);
        let (mut loss, mut correct) = (0.0f64, 0usize);
        let mut probs = vec![0.0f32; classes];
        if train {
            let last = w.grads.len() - 1;
            w.grads[last].fill(0.0);
        }
        for (l, &i) in idx.iter().enumerate() {
            let label = data.labels[i] as usize;
            let z = |c: usize| logits[c * lanes + l];
            let mut best = 0;
            let mut max = f32::NEG_INFINITY;
            for c in 0..classes {
                if z(c) > max || c == 0 {
                    max = z(c);
                    best = c;
                }
            }
            let mut sum = 0.0f32;
            for (c, p) in probs.iter_mut().enumerate() {
                *p = (z(c) - max).exp();
                sum += *p;
            }
            loss += ((sum.ln() + max) - z(label)) as f64;
            correct += usize::from(best == label);
            if train {
                let last = w.grads.len() - 1;
                let d = &mut w.grads[last];
                for (c, p) in probs.iter().enumerate() {
                    let target = if c == label { 1.0 } else { 0.0 };
                    d[c * lanes + l] = (p / sum - target) * self.scale;
                }
            }
        }
        w.loss = loss;
        w.correct = correct;
    }

    fn backward(&self, w: &mut Workspace) {
        let k = &self.plan.kernels;
        let lanes = w.lanes;
        let vec = k.isa().lanes();
        // True when the gradient of layer i's output already went through its ReLU.
        let mut masked = false;
        for (i, op) in self.plan.ops.iter().enumerate().rev() {
            let (gin, gout) = w.grads.split_at_mut(i + 1);
            let dy = &mut gout[0];
            let x = &w.acts[i];
            let y = &w.acts[i + 1];
            if op.relu() && !masked {
                k.relu_bwd(y, dy);
            }
            masked = false;
            match *op {
                Op::Conv { g, w: p, .. } => {
                    let g = Geom { lanes, ..g };
                    let (dw, db) = w.pgrads.split_at_mut(p + 1);
                    k.conv_dw(&g, x, dy, &mut dw[p]);
                    k.bias_grad(g.cout, g.oh() * g.ow() * lanes, dy, &mut db[0]);
                    if i > 0 {
                        let back = Geom {
                            cin: g.cout,
                            h: g.oh(),
                            w: g.ow(),
                            cout: g.cin,
                            k: g.k,
                            pad: g.k - 1 - g.pad,
                            lanes,
                        };
                        k.conv_fwd(&back, dy, &self.w.bwd[p], None, &mut gin[i], false);
                    }
                }
                // The layer before applies its own ReLU mask (`masked` stays false).
                Op::AvgPool { c, h, w: width } if i > 0 => {
                    avg_pool_bwd(c, h, width, lanes, dy, &mut gin[i]);
                }
                Op::GlobalAvg { c, h, w: width } if i > 0 => {
                    global_avg_bwd(c, h, width, lanes, dy, &mut gin[i]);
                }
                Op::AvgPool { .. } | Op::GlobalAvg { .. } => {}
                Op::Pool { c, h, w: width } => {
                    let relu_before = i > 0 && self.plan.ops[i - 1].relu();
                    k.pool_bwd(c, h, width, lanes, x, y, dy, &mut gin[i], relu_before);
                    masked = relu_before;
                }
                Op::Linear { inp, out, w: p, .. } => {
                    // dW[o][i] = Σ_l dy[o][l] x[i][l]: the forward kernel with
                    // lanes as the reduction, on transposed operands.
                    let inp_pad = round_up(inp, vec);
                    transpose(x, inp, lanes, inp_pad, &mut w.xt);
                    transpose(dy, out, lanes, out, &mut w.dyt);
                    w.dw_pad.resize(out * inp_pad, 0.0);
                    let gw = Geom {
                        cin: lanes,
                        h: 1,
                        w: inp_pad / vec,
                        cout: out,
                        k: 1,
                        pad: 0,
                        lanes: vec,
                    };
                    k.conv_fwd(&gw, &w.xt, &w.dyt, None, &mut w.dw_pad, false);
                    let (dw, db) = w.pgrads.split_at_mut(p + 1);
                    for (o, row) in dw[p].chunks_exact_mut(inp).enumerate() {
                        row.copy_from_slice(&w.dw_pad[o * inp_pad..o * inp_pad + inp]);
                    }
                    k.bias_grad(out, lanes, dy, &mut db[0]);
                    if i > 0 {
                        let gx = Geom {
                            cin: out,
                            h: 1,
                            w: lanes / vec,
                            cout: inp,
                            k: 1,
                            pad: 0,
                            lanes: vec,
                        };
                        k.conv_fwd(&gx, dy, &self.w.bwd[p], None, &mut gin[i], false);
                    }
                }
            }
        }
    }
}

/// `[rows][cols]` → `[cols][rows_pad]`, zero-padded.
fn transpose(src: &[f32], rows: usize, cols: usize, rows_pad: usize, dst: &mut Vec<f32>) {
    dst.clear();
    dst.resize(cols * rows_pad, 0.0);
    for r in 0..rows {
        for c in 0..cols {
            dst[c * rows_pad + r] = src[r * cols + c];
        }
    }
}

/// Example values as stored: raw pixels or numbers.
#[derive(Debug, Clone, Copy)]
pub enum Pixels<'a> {
    U8(&'a [u8]),
    F32(&'a [f32]),
}

impl Pixels<'_> {
    fn len(&self) -> usize {
        match self {
            Pixels::U8(v) => v.len(),
            Pixels::F32(v) => v.len(),
        }
    }
}

/// The normalisation of pixels Petal's built-in data sets use:
/// `pixel / 127.5 − 1` (torchvision's `ToTensor` and `Normalize(0.5, 0.5)`).
pub const HALF: (f32, f32) = (127.5, -1.0);

/// Labelled examples, `[example][channel][row][column]`, each value
/// mapped to `v / divisor[c] + shift[c]` (its channel's) as batches are
/// assembled.
#[derive(Debug, Clone, Copy)]
pub struct Images<'a> {
    pub shape: [usize; 3],
    pub pixels: Pixels<'a>,
    pub labels: &'a [u8],
    /// Per channel `(divisor, shift)`; empty: [`HALF`] for every channel.
    pub norm: &'a [(f32, f32)],
}

impl<'a> Images<'a> {
    /// Raw pixels normalised as Petal's built-in data sets are ([`HALF`]).
    pub fn new(shape: [usize; 3], pixels: &'a [u8], labels: &'a [u8]) -> Self {
        Images {
            shape,
            pixels: Pixels::U8(pixels),
            labels,
            norm: &[],
        }
    }
}

impl Images<'_> {
    fn check(&self, shape: [usize; 3], classes: usize, batch: &[usize]) -> Result<(), NnError> {
        if self.shape != shape {
            return Err(NnError::Data(format!(
                "the network takes images of shape {shape:?}, the data has {:?}",
                self.shape
            )));
        }
        let size: usize = shape.iter().product();
        if self.pixels.len() != self.labels.len() * size {
            return Err(NnError::Data(format!(
                "{} values for {} examples of {size}",
                self.pixels.len(),
                self.labels.len()
            )));
        }
        if !self.norm.is_empty() && self.norm.len() != shape[0] {
            return Err(NnError::Data(format!(
                "a normalisation of {} channels for examples of {}",
                self.norm.len(),
                shape[0]
            )));
        }
        if let Some(&i) = batch.iter().find(|&&i| i >= self.labels.len()) {
            return Err(NnError::Data(format!("image {i} is out of range")));
        }
        if let Some(&l) = batch
            .iter()
            .map(|&i| &self.labels[i])
            .find(|&&l| l as usize >= classes)
        {
            return Err(NnError::Data(format!(
                "label {l} is out of range for {classes} classes"
            )));
        }
        Ok(())
    }

    /// Writes images `idx`, normalised, into `out` laid out `[pixel][lanes]`
    /// (the engine's batch layout), zeros in unused lanes. Exposed to
    /// measure the data path on its own.
    pub fn fill(&self, idx: &[usize], lanes: usize, out: &mut [f32]) {
        let size: usize = self.shape.iter().product();
        let plane = (self.shape[1] * self.shape[2]).max(1);
        if idx.len() < lanes {
            out.fill(0.0);
        }
        // Blocks of values keep the strided writes inside L1; a block never
        // spans two channels, so each has one normalisation.
        const BLOCK: usize = 64;
        for c in 0..self.shape[0] {
            let (div, shift) = self.norm.get(c).copied().unwrap_or(HALF);
            for p0 in (c * plane..(c + 1) * plane).step_by(BLOCK) {
                let p1 = (p0 + BLOCK).min((c + 1) * plane).min(size);
                for (l, &i) in idx.iter().enumerate() {
                    let range = i * size + p0..i * size + p1;
                    match self.pixels {
                        Pixels::U8(v) => {
                            for (j, &px) in v[range].iter().enumerate() {
                                out[(p0 + j) * lanes + l] = px as f32 / div + shift;
                            }
                        }
                        Pixels::F32(v) => {
                            for (j, &x) in v[range].iter().enumerate() {
                                out[(p0 + j) * lanes + l] = x / div + shift;
                            }
                        }
                    }
                }
            }
        }
    }
}
