//! Bulyan (El Mhamdi et al., 2018): MultiKrum selects `θ = n − 2f` models
//! (`f` = `num_malicious_nodes`; it needs `n ≥ 4f + 3` results, else the
//! round keeps its model), then each coordinate is the mean of the
//! `β = θ − 2f` selected values closest to their median. Keeps every
//! result of the round until it aggregates.

use super::fedmedian::Buffer;
use super::krum::select;
use super::math::{like, median};
use super::{Aggregator, Composed, StrategyConfig};
use crate::aggregate::MetricsMean;
use crate::types::{CoreError, FitRes, Metrics, Parameters};

/// Bulyan's aggregation.
pub struct Bulyan {
    buf: Buffer,
    num_malicious_nodes: usize,
}

impl Bulyan {
    /// A Bulyan strategy.
    pub fn strategy(
        config: StrategyConfig,
        num_malicious_nodes: usize,
    ) -> Result<Composed<Self>, CoreError> {
        Composed::with(
            config,
            Bulyan {
                buf: Buffer::default(),
                num_malicious_nodes,
            },
        )
    }
}

impl Aggregator for Bulyan {
    fn name(&self) -> &'static str {
        "bulyan"
    }

    fn fold(&mut self, res: FitRes) -> Result<(), CoreError> {
        self.buf.results.push(res);
        Ok(())
    }

    fn aggregate(
        &mut self,
        _round: u64,
        current: &Parameters,
    ) -> Option<(Parameters, Option<Metrics>)> {
        let buf = std::mem::take(&mut self.buf);
        let (n, f) = (buf.results.len(), self.num_malicious_nodes);
        if n < 4 * f + 3 {
            tracing::warn!(
                "bulyan needs at least {} results (4 × num_malicious_nodes + 3), got {n}: \
                 the model is not updated this round",
                4 * f + 3
            );
            return None;
        }
        let theta = n - 2 * f;
        let beta = theta - 2 * f;
        let models = buf.models();
        let picked = select(&models, f, theta);
        let selected: Vec<&Vec<Vec<f64>>> = picked.iter().map(|&i| &models[i]).collect();
        let mut column = vec![0.0; selected.len()];
        let mut diffs: Vec<(f64, f64)> = Vec::with_capacity(selected.len());
        let out = selected[0]
            .iter()
            .enumerate()
            .map(|(t, values)| {
                (0..values.len())
                    .map(|i| {
                        for (c, m) in column.iter_mut().zip(&selected) {
                            *c = m[t][i];
                        }
                        let med = median(&mut column.clone());
                        diffs.clear();
                        diffs.extend(column.iter().map(|&x| ((x - med).abs(), x)));
                        diffs.sort_by(|a, b| a.0.total_cmp(&b.0));
                        diffs[..beta].iter().map(|&(_, x)| x).sum::<f64>() / beta as f64
                    })
                    .collect()
            })
            .collect();
        let mut metrics = MetricsMean::default();
        for &i in &picked {
            let r = &buf.results[i];
            metrics.add(&r.metrics, r.num_examples as f64);
        }
        Some((like(out, current), Some(metrics.finish())))
    }

    fn buffers_results(&self) -> bool {
        true
    }
}
