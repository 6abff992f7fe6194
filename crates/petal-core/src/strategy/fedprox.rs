//! FedProx (Li et al., 2020): FedAvg whose clients add the proximal term
//! `mu/2 · ||w − w_global||²` to their loss; the server sends `proximal_mu`
//! with every fit instruction (Flower's `proximal_mu`, default 0).

use super::fedavg::WeightedAverage;
use super::{Aggregator, Composed, StrategyConfig};
use crate::types::{Config, CoreError, FitRes, Metrics, Parameters, Scalar};

/// FedProx's aggregation: FedAvg's, with `proximal_mu` in the fit config.
pub struct FedProx {
    inner: WeightedAverage,
    proximal_mu: f64,
}

impl FedProx {
    /// A FedProx strategy.
    pub fn strategy(config: StrategyConfig, proximal_mu: f64) -> Result<Composed<Self>, CoreError> {
        if !(proximal_mu.is_finite() && proximal_mu >= 0.0) {
            return Err(CoreError::Invalid(format!(
                "proximal_mu must be a non-negative number, got {proximal_mu}"
            )));
        }
        Composed::with(
            config,
            FedProx {
                inner: WeightedAverage::default(),
                proximal_mu,
            },
        )
    }
}

impl Aggregator for FedProx {
    fn name(&self) -> &'static str {
        "fedprox"
    }

    fn fit_config(&self, _round: u64) -> Config {
        [("proximal_mu".to_string(), Scalar::Double(self.proximal_mu))].into()
    }

    fn fold(&mut self, res: FitRes) -> Result<(), CoreError> {
        self.inner.add(&res)
    }

    fn aggregate(
        &mut self,
        _round: u64,
        _current: &Parameters,
    ) -> Option<(Parameters, Option<Metrics>)> {
        self.inner.take().map(|p| (p, None))
    }
}
