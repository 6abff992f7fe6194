//! q-FedAvg (Li et al., 2020, "Fair resource allocation"): clients with a
//! higher training loss weigh more. With `L = 1 / client_learning_rate`,
//! each result gives `Δ_k = loss_k^q · L · (w − w_k)` and
//! `h_k = q · loss_k^(q−1) · ||L · (w − w_k)||² + L · loss_k^q`; the new
//! model is `w − ΣΔ_k / Σh_k`. The loss is the client's metric
//! `train_loss_key` (Flower's `QFedAvg`: q 0.1, key `train_loss`).

use super::math::{like, values};
use super::{Aggregator, Composed, StrategyConfig};
use crate::types::{CoreError, FitRes, Metrics, Parameters};

/// q-FedAvg's aggregation (streaming: it keeps the sums, not the results).
pub struct QFedAvg {
    client_learning_rate: f64,
    q: f64,
    train_loss_key: String,
    /// The round's global model.
    global: Option<Vec<Vec<f64>>>,
    sum_delta: Vec<Vec<f64>>,
    sum_h: f64,
    folded: usize,
}

impl QFedAvg {
    /// A q-FedAvg strategy.
    pub fn strategy(
        config: StrategyConfig,
        client_learning_rate: f64,
        q: f64,
        train_loss_key: String,
    ) -> Result<Composed<Self>, CoreError> {
        if !(client_learning_rate.is_finite() && client_learning_rate > 0.0) {
            return Err(CoreError::Invalid(format!(
                "client_learning_rate must be positive, got {client_learning_rate}"
            )));
        }
        if !(q.is_finite() && q >= 0.0) {
            return Err(CoreError::Invalid(format!(
                "q must be non-negative, got {q}"
            )));
        }
        Composed::with(
            config,
            QFedAvg {
                client_learning_rate,
                q,
                train_loss_key,
                global: None,
                sum_delta: Vec::new(),
                sum_h: 0.0,
                folded: 0,
            },
        )
    }
}

impl Aggregator for QFedAvg {
    fn name(&self) -> &'static str {
        "qfedavg"
    }

    fn begin(&mut self, _round: u64, current: &std::sync::Arc<Parameters>) {
        let g = values(current);
        self.sum_delta = g.iter().map(|t| vec![0.0; t.len()]).collect();
        self.global = Some(g);
        self.sum_h = 0.0;
        self.folded = 0;
    }

    fn fold(&mut self, res: FitRes) -> Result<(), CoreError> {
        let loss = res
            .metrics
            .get(&self.train_loss_key)
            .and_then(|v| v.as_f64())
            .filter(|l| l.is_finite())
            .ok_or_else(|| {
                CoreError::Invalid(format!(
                    "q-FedAvg needs the client's training loss as metric '{}'",
                    self.train_loss_key
                ))
            })?;
        let global = self.global.as_ref().ok_or_else(|| {
            CoreError::Invalid("q-FedAvg got a result before its round began".into())
        })?;
        let l = 1.0 / self.client_learning_rate;
        let lq = (loss + 1e-10).powf(self.q);
        let mut norm = 0.0;
        for ((sd, g), t) in self
            .sum_delta
            .iter_mut()
            .zip(global)
            .zip(&res.parameters.tensors)
        {
            for (i, (s, &gv)) in sd.iter_mut().zip(g).enumerate() {
                let grad = l * (gv - t.data.get_f64(i));
                norm += grad * grad;
                *s += lq * grad;
            }
        }
        self.sum_h += self.q * (loss + 1e-10).powf(self.q - 1.0) * norm + l * lq;
        self.folded += 1;
        Ok(())
    }

    fn aggregate(
        &mut self,
        _round: u64,
        current: &Parameters,
    ) -> Option<(Parameters, Option<Metrics>)> {
        let global = self.global.take()?;
        if self.folded == 0 {
            return None;
        }
        let sum_h = self.sum_h;
        let out = global
            .iter()
            .zip(&self.sum_delta)
            .map(|(g, d)| g.iter().zip(d).map(|(gv, dv)| gv - dv / sum_h).collect())
            .collect();
        self.sum_delta.clear();
        self.folded = 0;
        Some((like(out, current), None))
    }
}
