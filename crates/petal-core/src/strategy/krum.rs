//! Krum and MultiKrum (Blanchard et al., 2017): each model is scored by
//! the sum of its squared distances to its `n − f − 2` nearest others
//! (`f` = `num_malicious_nodes`); the `num_nodes_to_select` best (1 for
//! Krum) are averaged, weighted by examples, and only their metrics count.
//! Keeps every result of the round until it aggregates.

use super::fedmedian::Buffer;
use super::math::{argsort, squared_distance};
use super::{Aggregator, Composed, StrategyConfig};
use crate::aggregate::{MetricsMean, WeightedMean};
use crate::types::{CoreError, FitRes, Metrics, Parameters};

/// MultiKrum's aggregation (Krum: one node selected).
pub struct MultiKrum {
    buf: Buffer,
    num_malicious_nodes: usize,
    num_nodes_to_select: usize,
    name: &'static str,
}

impl MultiKrum {
    /// A Krum strategy.
    pub fn krum(
        config: StrategyConfig,
        num_malicious_nodes: usize,
    ) -> Result<Composed<Self>, CoreError> {
        Self::build(config, num_malicious_nodes, 1, "krum")
    }

    /// A MultiKrum strategy selecting `num_nodes_to_select` results.
    pub fn select_many(
        config: StrategyConfig,
        num_malicious_nodes: usize,
        num_nodes_to_select: usize,
    ) -> Result<Composed<Self>, CoreError> {
        Self::build(
            config,
            num_malicious_nodes,
            num_nodes_to_select,
            "multikrum",
        )
    }

    fn build(
        config: StrategyConfig,
        num_malicious_nodes: usize,
        num_nodes_to_select: usize,
        name: &'static str,
    ) -> Result<Composed<Self>, CoreError> {
        if num_nodes_to_select == 0 {
            return Err(CoreError::Invalid(
                "num_nodes_to_select must be at least 1".into(),
            ));
        }
        Composed::with(
            config,
            MultiKrum {
                buf: Buffer::default(),
                num_malicious_nodes,
                num_nodes_to_select,
                name,
            },
        )
    }
}

/// The indices of the `select` best models by Krum score, best first.
pub(crate) fn select(models: &[Vec<Vec<f64>>], malicious: usize, select: usize) -> Vec<usize> {
    let n = models.len();
    let mut d = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let x = squared_distance(&models[i], &models[j]);
            d[i][j] = x;
            d[j][i] = x;
        }
    }
    let closest = n.saturating_sub(malicious + 2).max(1);
    let scores: Vec<f64> = d
        .iter()
        .map(|row| {
            // Flower skips the first of the sorted distances (its own 0).
            let order = argsort(row);
            order.iter().skip(1).take(closest).map(|&j| row[j]).sum()
        })
        .collect();
    argsort(&scores).into_iter().take(select).collect()
}

/// The example-weighted mean of `picked` results, and their metrics.
pub(crate) fn average(results: &[FitRes], picked: &[usize]) -> Option<(Parameters, Metrics)> {
    let mut acc = WeightedMean::new();
    let mut metrics = MetricsMean::default();
    for &i in picked {
        let r = &results[i];
        acc.fold(&r.parameters, r.num_examples as f64).ok()?;
        metrics.add(&r.metrics, r.num_examples as f64);
    }
    acc.finish().map(|p| (p, metrics.finish()))
}

impl Aggregator for MultiKrum {
    fn name(&self) -> &'static str {
        self.name
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
        if buf.results.is_empty() {
            return None;
        }
        let picked = select(
            &buf.models(),
            self.num_malicious_nodes,
            self.num_nodes_to_select,
        );
        tracing::info!(
            "{}: selected results {picked:?} of {}",
            self.name,
            buf.results.len()
        );
        let (p, metrics) = average(&buf.results, &picked)?;
        Some((
            p.cast_like(current).with_names(current.names.clone()),
            Some(metrics),
        ))
    }

    fn buffers_results(&self) -> bool {
        true
    }
}
