//! Central differential privacy around any strategy (Flower's
//! `DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping`):
//!
//! - *server-side* clipping: the server clips each update `w_k − w` to
//!   `clipping_norm` (L2 over the whole model) before aggregating;
//! - *client-side* clipping: the server sends `clipping_norm` and clients
//!   clip their own update ([`ClippingClient`] does it for any Petal
//!   client, as Flower's `fixedclipping_mod`/`adaptiveclipping_mod`);
//! - *adaptive*: the clipping norm follows the fraction of clipped updates
//!   towards `target_clipped_quantile` (Andrew et al., 2021), the count
//!   itself noised;
//! - then Gaussian noise of standard deviation
//!   `noise_multiplier · clipping_norm / num_sampled_clients` is added to
//!   every value of the aggregate.
//!
//! The noise generator is derived from the seed and the round, so a
//! resumed run draws the same noise as an uninterrupted one; the adaptive
//! clipping norm is saved with each checkpoint. A round in which a sampled
//! client failed keeps the model (Flower's rule: the noise was calibrated
//! to the number of clients sampled).

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use super::{EvaluateSummary, Instruction, Phase, Strategy, StrategyState};
use crate::client::Client;
use crate::client_manager::ClientManager;
use crate::types::{
    Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Metrics, NodeId, Parameters,
    Scalar, Tensor, TensorData,
};

/// The config key of the clipping norm (Flower's `KEY_CLIPPING_NORM`).
pub const KEY_CLIPPING_NORM: &str = "clipping_norm";
/// The metric saying a client's update was clipped (Flower's `KEY_NORM_BIT`).
pub const KEY_NORM_BIT: &str = "norm_bit";

/// Where clipping happens and whether its norm adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DpMode {
    ServerFixed,
    ClientFixed,
    ServerAdaptive,
    ClientAdaptive,
}

impl std::str::FromStr for DpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "server-fixed" => DpMode::ServerFixed,
            "client-fixed" => DpMode::ClientFixed,
            "server-adaptive" => DpMode::ServerAdaptive,
            "client-adaptive" => DpMode::ClientAdaptive,
            other => {
                return Err(format!(
                    "unknown --dp '{other}' (server-fixed, client-fixed, server-adaptive \
                     or client-adaptive)"
                ));
            }
        })
    }
}

/// A DP wrapper's settings, with Flower's names and defaults.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DpSpec {
    pub mode: DpMode,
    /// Noise standard deviation over the clipping norm (before dividing by
    /// the number of clients).
    pub noise_multiplier: f64,
    /// Clipping norm (fixed modes).
    pub clipping_norm: f64,
    /// Clients sampled per round (the noise's denominator).
    pub num_sampled_clients: usize,
    /// Adaptive: first clipping norm (Flower: 0.1).
    pub initial_clipping_norm: f64,
    /// Adaptive: the fraction of updates that should be clipped (0.5).
    pub target_clipped_quantile: f64,
    /// Adaptive: the norm's learning rate (0.2).
    pub clip_norm_lr: f64,
    /// Adaptive: noise on the clipped count (default `num_sampled_clients / 20`).
    pub clipped_count_stddev: Option<f64>,
    /// Seed of the noise (each round's generator derives from it).
    pub seed: u64,
}

impl DpSpec {
    /// Flower's defaults for `mode`.
    pub fn new(mode: DpMode, noise_multiplier: f64, num_sampled_clients: usize) -> Self {
        DpSpec {
            mode,
            noise_multiplier,
            clipping_norm: 0.0,
            num_sampled_clients,
            initial_clipping_norm: 0.1,
            target_clipped_quantile: 0.5,
            clip_norm_lr: 0.2,
            clipped_count_stddev: None,
            seed: 0,
        }
    }

    fn adaptive(&self) -> bool {
        matches!(self.mode, DpMode::ServerAdaptive | DpMode::ClientAdaptive)
    }

    fn server_side(&self) -> bool {
        matches!(self.mode, DpMode::ServerFixed | DpMode::ServerAdaptive)
    }
}

/// `(clipped_count_stddev, noise_multiplier)` of the adaptive modes (Flower's
/// `compute_adaptive_noise_params`).
fn adaptive_noise(spec: &DpSpec) -> Result<(f64, f64), CoreError> {
    if spec.noise_multiplier > 0.0 {
        let stddev = spec
            .clipped_count_stddev
            .unwrap_or(spec.num_sampled_clients as f64 / 20.0);
        if spec.noise_multiplier >= 2.0 * stddev {
            return Err(CoreError::Invalid(format!(
                "clipped_count_stddev {stddev} is too low for noise_multiplier {}: \
                 raise --clipped-count-stddev or lower --noise-multiplier",
                spec.noise_multiplier
            )));
        }
        let nm = (spec.noise_multiplier.powi(-2) - (2.0 * stddev).powi(-2)).powf(-0.5);
        Ok((stddev, nm))
    } else {
        Ok((spec.clipped_count_stddev.unwrap_or(0.0), 0.0))
    }
}

/// L2 norm of an update over the whole model.
fn norm(update: &[Vec<f64>]) -> f64 {
    update
        .iter()
        .flat_map(|t| t.iter())
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
}

/// Clips `new − base` to `clipping_norm` in place of `new`; true when it
/// was scaled down (Flower's `compute_adaptive_clip_model_update`).
pub fn clip_update(new: &mut Parameters, base: &Parameters, clipping_norm: f64) -> bool {
    let dtypes: Vec<_> = new.tensors.iter().map(Tensor::dtype).collect();
    let update: Vec<Vec<f64>> = new
        .tensors
        .iter()
        .zip(&base.tensors)
        .map(|(n, b)| {
            let (n, b) = (n.data.to_f64_vec(), b.data.to_f64_vec());
            n.iter().zip(&b).map(|(x, y)| x - y).collect()
        })
        .collect();
    let size = norm(&update);
    let scale = if size > 0.0 {
        (clipping_norm / size).min(1.0)
    } else {
        1.0
    };
    let tensors = update
        .iter()
        .zip(&base.tensors)
        .zip(dtypes)
        .map(|((u, b), dtype)| {
            let base = b.data.to_f64_vec();
            let v: Vec<f64> = base.iter().zip(u).map(|(b, u)| b + u * scale).collect();
            Tensor {
                shape: b.shape.clone(),
                data: TensorData::from_f64(dtype, &v),
            }
        })
        .collect();
    let names = std::mem::take(&mut new.names);
    *new = Parameters::new(tensors).with_names(names);
    scale < 1.0
}

/// A standard normal draw (Box-Muller; `rand` without `rand_distr`).
fn gaussian(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The noise generator of `round` (a function of the seed and the round).
fn round_rng(seed: u64, round: u64, salt: u64) -> StdRng {
    use crate::backoff::mix64;
    StdRng::seed_from_u64(mix64(
        seed ^ mix64(round.wrapping_mul(8).wrapping_add(salt)),
    ))
}

/// Adds Gaussian noise of standard deviation `std` to every value of `p`.
pub fn add_noise(p: &Parameters, std: f64, rng: &mut StdRng) -> Parameters {
    let tensors = p
        .tensors
        .iter()
        .map(|t| {
            let v: Vec<f64> = t
                .data
                .to_f64_vec()
                .into_iter()
                .map(|x| x + std * gaussian(rng))
                .collect();
            Tensor {
                shape: t.shape.clone(),
                data: TensorData::from_f64(t.dtype(), &v),
            }
        })
        .collect();
    Parameters::new(tensors).with_names(p.names.clone())
}

/// A strategy under central differential privacy (see the module).
pub struct DpWrapper {
    inner: Box<dyn Strategy>,
    spec: DpSpec,
    clipping_norm: f64,
    clipped_count_stddev: f64,
    noise_multiplier: f64,
    current: Option<Arc<Parameters>>,
    sampled: usize,
    folded: usize,
    clipped: usize,
}

impl DpWrapper {
    /// `inner` under the DP `spec`.
    pub fn new(inner: Box<dyn Strategy>, spec: DpSpec) -> Result<Self, CoreError> {
        if !(spec.noise_multiplier.is_finite() && spec.noise_multiplier >= 0.0) {
            return Err(CoreError::Invalid(
                "noise_multiplier must be a non-negative number".into(),
            ));
        }
        if spec.num_sampled_clients == 0 {
            return Err(CoreError::Invalid(
                "num_sampled_clients must be at least 1".into(),
            ));
        }
        let (clipping_norm, stddev, nm) = if spec.adaptive() {
            if spec.initial_clipping_norm.is_nan() || spec.initial_clipping_norm <= 0.0 {
                return Err(CoreError::Invalid(
                    "initial_clipping_norm must be positive".into(),
                ));
            }
            if !(0.0..=1.0).contains(&spec.target_clipped_quantile) {
                return Err(CoreError::Invalid(
                    "target_clipped_quantile must be in [0, 1]".into(),
                ));
            }
            if spec.clip_norm_lr.is_nan() || spec.clip_norm_lr <= 0.0 {
                return Err(CoreError::Invalid("clip_norm_lr must be positive".into()));
            }
            let (s, nm) = adaptive_noise(&spec)?;
            (spec.initial_clipping_norm, s, nm)
        } else {
            if spec.clipping_norm.is_nan() || spec.clipping_norm <= 0.0 {
                return Err(CoreError::Invalid(
                    "--clipping-norm must be positive".into(),
                ));
            }
            (spec.clipping_norm, 0.0, spec.noise_multiplier)
        };
        Ok(DpWrapper {
            inner,
            spec,
            clipping_norm,
            clipped_count_stddev: stddev,
            noise_multiplier: nm,
            current: None,
            sampled: 0,
            folded: 0,
            clipped: 0,
        })
    }

    /// The clipping norm now.
    pub fn clipping_norm(&self) -> f64 {
        self.clipping_norm
    }

    /// The noise's standard deviation now.
    pub fn noise_std(&self) -> f64 {
        self.noise_multiplier * self.clipping_norm / self.spec.num_sampled_clients as f64
    }

    fn update_norm(&mut self, round: u64, clipped: usize, results: usize) {
        let mut rng = round_rng(self.spec.seed, round, 1);
        let noised = clipped as f64 + self.clipped_count_stddev * gaussian(&mut rng);
        let fraction = noised / results as f64;
        self.clipping_norm *=
            (-self.spec.clip_norm_lr * (fraction - self.spec.target_clipped_quantile)).exp();
    }
}

impl Strategy for DpWrapper {
    fn name(&self) -> String {
        format!(
            "{} + dp {}",
            self.inner.name(),
            serde_json::to_value(self.spec.mode)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        )
    }

    fn initialize_parameters(&mut self) -> Option<Parameters> {
        self.inner.initialize_parameters()
    }

    fn min_available_clients(&self, phase: Phase) -> usize {
        self.inner.min_available_clients(phase)
    }

    fn configure_fit(
        &mut self,
        round: u64,
        parameters: &Arc<Parameters>,
        clients: &dyn ClientManager,
        rng: &mut dyn RngCore,
    ) -> Vec<Instruction<FitIns>> {
        self.current = Some(parameters.clone());
        self.folded = 0;
        self.clipped = 0;
        let mut ins = self.inner.configure_fit(round, parameters, clients, rng);
        self.sampled = ins.len();
        if !self.spec.server_side() {
            for (_, i) in &mut ins {
                i.config
                    .insert(KEY_CLIPPING_NORM.into(), Scalar::Double(self.clipping_norm));
            }
        }
        ins
    }

    fn fold_fit(&mut self, round: u64, node: NodeId, mut res: FitRes) -> Result<(), CoreError> {
        let clipped = match self.spec.mode {
            DpMode::ServerFixed | DpMode::ServerAdaptive => {
                let base = self
                    .current
                    .clone()
                    .ok_or_else(|| CoreError::Invalid("a result before configure_fit".into()))?;
                clip_update(&mut res.parameters, &base, self.clipping_norm)
            }
            DpMode::ClientAdaptive => match res.metrics.get(KEY_NORM_BIT) {
                Some(Scalar::Bool(b)) => *b,
                Some(v) => v.as_f64().is_some_and(|x| x != 0.0),
                None => {
                    return Err(CoreError::Invalid(format!(
                        "the client did not report '{KEY_NORM_BIT}' (client-side adaptive \
                         clipping needs it)"
                    )));
                }
            },
            DpMode::ClientFixed => false,
        };
        self.inner.fold_fit(round, node, res)?;
        self.folded += 1;
        self.clipped += usize::from(clipped);
        Ok(())
    }

    fn aggregate_fit(&mut self, round: u64, current: &Parameters) -> Option<(Parameters, Metrics)> {
        let out = self.inner.aggregate_fit(round, current);
        if self.folded < self.sampled {
            tracing::warn!(
                "{} of {} sampled clients failed: under differential privacy the model is \
                 not updated this round",
                self.sampled - self.folded,
                self.sampled
            );
            return None;
        }
        if self.folded != self.spec.num_sampled_clients {
            tracing::warn!(
                "{} results, but the noise is calibrated to {} sampled clients",
                self.folded,
                self.spec.num_sampled_clients
            );
        }
        if self.spec.adaptive() && self.folded > 0 {
            self.update_norm(round, self.clipped, self.folded);
        }
        let (p, metrics) = out?;
        let std = self.noise_std();
        tracing::info!(
            "dp: clipping norm {:.4}, noise standard deviation {std:.6}",
            self.clipping_norm
        );
        let mut rng = round_rng(self.spec.seed, round, 2);
        Some((add_noise(&p, std, &mut rng), metrics))
    }

    fn buffers_results(&self) -> bool {
        self.inner.buffers_results()
    }

    fn evaluate(&mut self, round: u64, parameters: &Parameters) -> Option<EvaluateSummary> {
        self.inner.evaluate(round, parameters)
    }

    fn configure_evaluate(
        &mut self,
        round: u64,
        parameters: &Arc<Parameters>,
        clients: &dyn ClientManager,
        rng: &mut dyn RngCore,
    ) -> Vec<Instruction<EvaluateIns>> {
        self.inner
            .configure_evaluate(round, parameters, clients, rng)
    }

    fn fold_evaluate(
        &mut self,
        round: u64,
        node: NodeId,
        res: EvaluateRes,
    ) -> Result<(), CoreError> {
        self.inner.fold_evaluate(round, node, res)
    }

    fn aggregate_evaluate(&mut self, round: u64) -> EvaluateSummary {
        self.inner.aggregate_evaluate(round)
    }

    fn state(&self) -> StrategyState {
        let mut s = self.inner.state();
        s.json = serde_json::json!({"inner": s.json, "clipping_norm": self.clipping_norm});
        s
    }

    fn restore_state(&mut self, mut state: StrategyState) -> Result<(), CoreError> {
        if let Some(c) = state.json.get("clipping_norm").and_then(|v| v.as_f64()) {
            self.clipping_norm = c;
        }
        state.json = state
            .json
            .get("inner")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        self.inner.restore_state(state)
    }
}

/// A client that honours a server's `clipping_norm` (Flower's
/// `fixedclipping_mod` and `adaptiveclipping_mod`): its update is clipped
/// to that norm, and the metric `norm_bit` says whether it was.
pub struct ClippingClient<C> {
    inner: C,
}

impl<C: Client> ClippingClient<C> {
    /// Wraps `inner`.
    pub fn new(inner: C) -> Self {
        ClippingClient { inner }
    }
}

impl<C: Client> Client for ClippingClient<C> {
    fn get_parameters(&mut self, config: &Config) -> Result<Parameters, CoreError> {
        self.inner.get_parameters(config)
    }

    fn fit(&mut self, ins: FitIns) -> Result<FitRes, CoreError> {
        let norm = ins.config.get(KEY_CLIPPING_NORM).and_then(Scalar::as_f64);
        let base = ins.parameters.clone();
        let mut res = self.inner.fit(ins)?;
        if let Some(c) = norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(CoreError::BadConfig {
                    key: KEY_CLIPPING_NORM.into(),
                    reason: format!("must be positive, got {c}"),
                });
            }
            if res.parameters.check_like(&base).is_ok() {
                let clipped = clip_update(&mut res.parameters, &base, c);
                res.metrics
                    .insert(KEY_NORM_BIT.into(), Scalar::Bool(clipped));
            }
        }
        Ok(res)
    }

    fn evaluate(&mut self, ins: EvaluateIns) -> Result<EvaluateRes, CoreError> {
        self.inner.evaluate(ins)
    }

    fn get_properties(&mut self, config: &Config) -> Result<Config, CoreError> {
        self.inner.get_properties(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[f32]) -> Parameters {
        Parameters::new(vec![Tensor::new(vec![v.len()], v.to_vec()).unwrap()])
    }

    #[test]
    fn updates_are_clipped_to_the_norm() {
        let base = p(&[1.0, 1.0]);
        let mut new = p(&[4.0, 5.0]);
        assert!(clip_update(&mut new, &base, 2.5), "|(3, 4)| = 5 > 2.5");
        assert_eq!(new.tensors[0].data, vec![2.5f32, 3.0]);
        let mut small = p(&[1.3, 1.4]);
        assert!(!clip_update(&mut small, &base, 2.5));
        assert_eq!(small.tensors[0].data.to_f64_vec()[0], 1.3f32 as f64);
    }

    #[test]
    fn noise_has_the_asked_scale_and_is_seeded() {
        let zeros = p(&vec![0.0; 200_000]);
        let a = add_noise(&zeros, 0.5, &mut round_rng(7, 3, 2));
        let b = add_noise(&zeros, 0.5, &mut round_rng(7, 3, 2));
        assert_eq!(a, b, "the same seed and round give the same noise");
        let v = a.tensors[0].data.to_f64_vec();
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
        // Standard errors: mean 0.5/sqrt(n) ≈ 0.0011, std ≈ 0.5/sqrt(2n) ≈ 0.0008.
        assert!(mean.abs() < 0.006, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.005, "std {}", var.sqrt());
        // Gaussian: about 68.27 % within one standard deviation.
        let within = v.iter().filter(|x| x.abs() < 0.5).count() as f64 / n;
        assert!((within - 0.6827).abs() < 0.006, "{within}");
        let c = add_noise(&zeros, 0.5, &mut round_rng(7, 4, 2));
        assert_ne!(a, c, "another round, other noise");
    }
}
