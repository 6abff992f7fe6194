//! FedAvgM (Hsu et al., 2019): FedAvg with server momentum. The pseudo
//! gradient `current − average` is accumulated with `server_momentum` and
//! applied with `server_learning_rate` (Flower's defaults 0 and 1: plain
//! FedAvg). The momentum vector is model-sized state, saved as tensors.

use super::fedavg::WeightedAverage;
use super::math::{like, round_like_state, state_tensors, values};
use super::{Aggregator, Composed, StrategyConfig, StrategyState};
use crate::types::{CoreError, FitRes, Metrics, Parameters};

/// FedAvgM's aggregation.
pub struct FedAvgM {
    inner: WeightedAverage,
    server_learning_rate: f64,
    server_momentum: f64,
    momentum: Option<Vec<Vec<f64>>>,
    /// The model the momentum's dtypes follow (for saving it).
    layout: Option<Parameters>,
}

impl FedAvgM {
    /// A FedAvgM strategy.
    pub fn strategy(
        config: StrategyConfig,
        server_learning_rate: f64,
        server_momentum: f64,
    ) -> Result<Composed<Self>, CoreError> {
        for (name, v) in [
            ("server_learning_rate", server_learning_rate),
            ("server_momentum", server_momentum),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(CoreError::Invalid(format!(
                    "{name} must be a non-negative number, got {v}"
                )));
            }
        }
        Composed::with(
            config,
            FedAvgM {
                inner: WeightedAverage::default(),
                server_learning_rate,
                server_momentum,
                momentum: None,
                layout: None,
            },
        )
    }
}

impl Aggregator for FedAvgM {
    fn name(&self) -> &'static str {
        "fedavgm"
    }

    fn fold(&mut self, res: FitRes) -> Result<(), CoreError> {
        self.inner.add(&res)
    }

    fn aggregate(
        &mut self,
        _round: u64,
        current: &Parameters,
    ) -> Option<(Parameters, Option<Metrics>)> {
        let avg = self.inner.take()?;
        let server_opt = self.server_momentum != 0.0 || self.server_learning_rate != 1.0;
        if !server_opt {
            return Some((avg, None));
        }
        let old = values(current);
        let new = values(&avg);
        let mut pseudo: Vec<Vec<f64>> = old
            .iter()
            .zip(&new)
            .map(|(o, n)| o.iter().zip(n).map(|(a, b)| a - b).collect())
            .collect();
        if self.server_momentum > 0.0 {
            let mut m = match self.momentum.take() {
                None => pseudo,
                Some(mv) => mv
                    .iter()
                    .zip(&pseudo)
                    .map(|(m, p)| {
                        m.iter()
                            .zip(p)
                            .map(|(a, b)| self.server_momentum * a + b)
                            .collect()
                    })
                    .collect(),
            };
            round_like_state(&mut m, current);
            pseudo = m.clone();
            self.momentum = Some(m);
            self.layout = Some(current.clone());
        }
        let out = old
            .iter()
            .zip(&pseudo)
            .map(|(o, p)| {
                o.iter()
                    .zip(p)
                    .map(|(a, b)| a - self.server_learning_rate * b)
                    .collect()
            })
            .collect();
        Some((like(out, current), None))
    }

    fn state(&self) -> StrategyState {
        let tensors = match (&self.momentum, &self.layout) {
            (Some(m), Some(layout)) => state_tensors(m, layout)
                .into_iter()
                .enumerate()
                .map(|(i, t)| (format!("momentum.{i}"), t))
                .collect(),
            _ => Vec::new(),
        };
        StrategyState {
            json: serde_json::Value::Null,
            tensors,
        }
    }

    fn restore_state(&mut self, state: StrategyState) -> Result<(), CoreError> {
        if state.tensors.is_empty() {
            return Ok(());
        }
        let tensors: Vec<_> = state.tensors.into_iter().map(|(_, t)| t).collect();
        let layout = Parameters::new(tensors);
        self.momentum = Some(values(&layout));
        self.layout = Some(layout);
        Ok(())
    }
}
