//! What FedAdagrad, FedAdam and FedYogi share (Reddi et al., 2021,
//! "Adaptive Federated Optimization"; Flower's `FedOpt`): the FedAvg of
//! the round gives `delta = average − current`, the first moment
//! `m = beta_1·m + (1 − beta_1)·delta`, a second moment `v` each variant
//! updates its own way, and the step `current + eta·m / (sqrt(v) + tau)`.
//! `m` and `v` are model-sized state, saved as tensors.

use super::StrategyState;
use super::fedavg::WeightedAverage;
use super::math::{like, round_like_state, state_tensors, values};
use crate::types::{CoreError, FitRes, Parameters};

/// The settings Flower's FedOpt family takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedOptParams {
    /// Server-side learning rate.
    pub eta: f64,
    /// Client-side learning rate (sent to clients as `eta_l`).
    pub eta_l: f64,
    /// First-moment decay.
    pub beta_1: f64,
    /// Second-moment decay.
    pub beta_2: f64,
    /// Adaptivity (added to sqrt(v)).
    pub tau: f64,
}

impl FedOptParams {
    pub(crate) fn check(&self) -> Result<(), CoreError> {
        for (name, v) in [
            ("eta", self.eta),
            ("eta_l", self.eta_l),
            ("beta_1", self.beta_1),
            ("beta_2", self.beta_2),
            ("tau", self.tau),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(CoreError::Invalid(format!(
                    "{name} must be a non-negative number, got {v}"
                )));
            }
        }
        if self.beta_1 >= 1.0 || self.beta_2 >= 1.0 {
            return Err(CoreError::Invalid(
                "beta_1 and beta_2 must be below 1".into(),
            ));
        }
        Ok(())
    }
}

/// The moments and the round's average.
pub(crate) struct FedOpt {
    pub params: FedOptParams,
    inner: WeightedAverage,
    m: Option<Vec<Vec<f64>>>,
    v: Option<Vec<Vec<f64>>>,
    layout: Option<Parameters>,
}

impl FedOpt {
    pub fn new(params: FedOptParams) -> Result<Self, CoreError> {
        params.check()?;
        Ok(FedOpt {
            params,
            inner: WeightedAverage::default(),
            m: None,
            v: None,
            layout: None,
        })
    }

    pub fn fold(&mut self, res: &FitRes) -> Result<(), CoreError> {
        self.inner.add(res)
    }

    /// One server step: `update_v(v, delta²)` gives the new second moment
    /// (v starts at zero), `eta` the step size of this round.
    pub fn step(
        &mut self,
        current: &Parameters,
        eta: f64,
        update_v: impl Fn(f64, f64) -> f64,
    ) -> Option<Parameters> {
        let avg = self.inner.take()?;
        let x = values(current);
        let delta: Vec<Vec<f64>> = values(&avg)
            .iter()
            .zip(&x)
            .map(|(a, c)| a.iter().zip(c).map(|(p, q)| p - q).collect())
            .collect();
        let b1 = self.params.beta_1;
        let zeros = || delta.iter().map(|d| vec![0.0; d.len()]).collect::<Vec<_>>();
        let mut m: Vec<Vec<f64>> = self
            .m
            .take()
            .unwrap_or_else(zeros)
            .iter()
            .zip(&delta)
            .map(|(m, d)| {
                m.iter()
                    .zip(d)
                    .map(|(a, b)| b1 * a + (1.0 - b1) * b)
                    .collect()
            })
            .collect();
        let mut v: Vec<Vec<f64>> = self
            .v
            .take()
            .unwrap_or_else(zeros)
            .iter()
            .zip(&delta)
            .map(|(v, d)| v.iter().zip(d).map(|(a, b)| update_v(*a, b * b)).collect())
            .collect();
        round_like_state(&mut m, current);
        round_like_state(&mut v, current);
        let tau = self.params.tau;
        let out = x
            .iter()
            .zip(m.iter().zip(&v))
            .map(|(x, (m, v))| {
                x.iter()
                    .zip(m.iter().zip(v))
                    .map(|(x, (m, v))| x + eta * m / (v.sqrt() + tau))
                    .collect()
            })
            .collect();
        self.m = Some(m);
        self.v = Some(v);
        self.layout = Some(current.clone());
        Some(like(out, current))
    }

    pub fn state(&self) -> StrategyState {
        let mut tensors = Vec::new();
        if let (Some(m), Some(v), Some(layout)) = (&self.m, &self.v, &self.layout) {
            for (name, values) in [("m", m), ("v", v)] {
                for (i, t) in state_tensors(values, layout).into_iter().enumerate() {
                    tensors.push((format!("{name}.{i}"), t));
                }
            }
        }
        StrategyState {
            json: serde_json::Value::Null,
            tensors,
        }
    }

    pub fn restore_state(&mut self, state: StrategyState) -> Result<(), CoreError> {
        if state.tensors.is_empty() {
            return Ok(());
        }
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for (name, t) in state.tensors {
            match name.split_once('.') {
                Some(("m", _)) => m.push(t),
                Some(("v", _)) => v.push(t),
                _ => {
                    return Err(CoreError::Invalid(format!(
                        "unexpected state tensor '{name}'"
                    )));
                }
            }
        }
        if m.len() != v.len() {
            return Err(CoreError::Invalid("the saved moments do not match".into()));
        }
        let layout = Parameters::new(m);
        self.m = Some(values(&layout));
        self.v = Some(values(&Parameters::new(v)));
        self.layout = Some(layout);
        Ok(())
    }
}
