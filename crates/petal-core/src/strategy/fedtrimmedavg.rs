//! FedTrimmedAvg (Yin et al., 2018): the coordinate-wise mean of the
//! clients' models after cutting the lowest and highest `beta` fraction
//! (scipy's `trim_mean`; Flower's default beta 0.2). Keeps every result of
//! the round until it aggregates.

use super::fedmedian::Buffer;
use super::math::{like, per_coordinate};
use super::{Aggregator, Composed, StrategyConfig};
use crate::types::{CoreError, FitRes, Metrics, Parameters};

/// FedTrimmedAvg's aggregation.
pub struct FedTrimmedAvg {
    buf: Buffer,
    beta: f64,
}

impl FedTrimmedAvg {
    /// A FedTrimmedAvg strategy cutting `beta` of each side (in [0, 0.5)).
    pub fn strategy(config: StrategyConfig, beta: f64) -> Result<Composed<Self>, CoreError> {
        if !(0.0..0.5).contains(&beta) {
            return Err(CoreError::Invalid(format!(
                "beta must be in [0, 0.5), got {beta}"
            )));
        }
        Composed::with(
            config,
            FedTrimmedAvg {
                buf: Buffer::default(),
                beta,
            },
        )
    }
}

impl Aggregator for FedTrimmedAvg {
    fn name(&self) -> &'static str {
        "fedtrimmedavg"
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
        let n = buf.results.len();
        if n == 0 {
            return None;
        }
        let low = (self.beta * n as f64) as usize;
        let high = n - low;
        let trimmed = per_coordinate(&buf.models(), |column| {
            column.sort_by(f64::total_cmp);
            let kept = &column[low..high];
            kept.iter().sum::<f64>() / kept.len() as f64
        });
        Some((like(trimmed, current), None))
    }

    fn buffers_results(&self) -> bool {
        true
    }
}
