//! FedYogi (Reddi et al., 2021): Yogi's second moment
//! `v − (1 − beta_2)·delta²·sign(v − delta²)` on the server (Flower's
//! defaults: eta 0.01, eta_l 0.0316, beta_1 0.9, beta_2 0.99, tau 0.001).

use super::fedopt::{FedOpt, FedOptParams};
use super::{Aggregator, Composed, StrategyConfig, StrategyState};
use crate::types::{CoreError, FitRes, Metrics, Parameters};

/// FedYogi's aggregation.
pub struct FedYogi(FedOpt);

impl FedYogi {
    /// Flower's defaults.
    pub const DEFAULTS: FedOptParams = FedOptParams {
        eta: 1e-2,
        eta_l: 0.0316,
        beta_1: 0.9,
        beta_2: 0.99,
        tau: 1e-3,
    };

    /// A FedYogi strategy.
    pub fn strategy(config: StrategyConfig, p: FedOptParams) -> Result<Composed<Self>, CoreError> {
        Composed::with(config, FedYogi(FedOpt::new(p)?))
    }
}

/// NumPy's sign: -1, 0 or 1.
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

impl Aggregator for FedYogi {
    fn name(&self) -> &'static str {
        "fedyogi"
    }

    fn fold(&mut self, res: FitRes) -> Result<(), CoreError> {
        self.0.fold(&res)
    }

    fn aggregate(
        &mut self,
        _round: u64,
        current: &Parameters,
    ) -> Option<(Parameters, Option<Metrics>)> {
        let p = self.0.params;
        let b2 = p.beta_2;
        self.0
            .step(current, p.eta, |v, d2| v - (1.0 - b2) * d2 * sign(v - d2))
            .map(|m| (m, None))
    }

    fn state(&self) -> StrategyState {
        self.0.state()
    }

    fn restore_state(&mut self, state: StrategyState) -> Result<(), CoreError> {
        self.0.restore_state(state)
    }
}
