//! FedMedian (Yin et al., 2018): the coordinate-wise median of the
//! clients' models (NumPy's median: the mean of the middle two for an even
//! count). Keeps every result of the round until it aggregates.

use super::math::{like, median, per_coordinate, values};
use super::{Aggregator, Composed, StrategyConfig};
use crate::types::{CoreError, FitRes, Metrics, Parameters};

/// Results kept until the round's aggregation.
#[derive(Default)]
pub struct Buffer {
    pub(crate) results: Vec<FitRes>,
}

impl Buffer {
    /// Every result's values, in arrival order.
    pub(crate) fn models(&self) -> Vec<Vec<Vec<f64>>> {
        self.results.iter().map(|r| values(&r.parameters)).collect()
    }
}

/// FedMedian's aggregation.
#[derive(Default)]
pub struct FedMedian(Buffer);

impl FedMedian {
    /// A FedMedian strategy.
    pub fn strategy(config: StrategyConfig) -> Result<Composed<Self>, CoreError> {
        Composed::with(config, FedMedian::default())
    }
}

impl Aggregator for FedMedian {
    fn name(&self) -> &'static str {
        "fedmedian"
    }

    fn fold(&mut self, res: FitRes) -> Result<(), CoreError> {
        self.0.results.push(res);
        Ok(())
    }

    fn aggregate(
        &mut self,
        _round: u64,
        current: &Parameters,
    ) -> Option<(Parameters, Option<Metrics>)> {
        let buf = std::mem::take(&mut self.0);
        if buf.results.is_empty() {
            return None;
        }
        Some((like(per_coordinate(&buf.models(), median), current), None))
    }

    fn buffers_results(&self) -> bool {
        true
    }
}
