//! FedAdam (Reddi et al., 2021): Adam on the server, with bias correction
//! `eta · sqrt(1 − beta_2^(t+1)) / (1 − beta_1^(t+1))` (Flower's
//! defaults: eta 0.1, eta_l 0.1, beta_1 0.9, beta_2 0.99, tau 0.001).

use super::fedopt::{FedOpt, FedOptParams};
use super::{Aggregator, Composed, StrategyConfig, StrategyState};
use crate::types::{CoreError, FitRes, Metrics, Parameters};

/// FedAdam's aggregation.
pub struct FedAdam(FedOpt);

impl FedAdam {
    /// Flower's defaults.
    pub const DEFAULTS: FedOptParams = FedOptParams {
        eta: 1e-1,
        eta_l: 1e-1,
        beta_1: 0.9,
        beta_2: 0.99,
        tau: 1e-3,
    };

    /// A FedAdam strategy.
    pub fn strategy(config: StrategyConfig, p: FedOptParams) -> Result<Composed<Self>, CoreError> {
        Composed::with(config, FedAdam(FedOpt::new(p)?))
    }
}

impl Aggregator for FedAdam {
    fn name(&self) -> &'static str {
        "fedadam"
    }

    fn fold(&mut self, res: FitRes) -> Result<(), CoreError> {
        self.0.fold(&res)
    }

    fn aggregate(
        &mut self,
        round: u64,
        current: &Parameters,
    ) -> Option<(Parameters, Option<Metrics>)> {
        let p = self.0.params;
        let t = round as f64 + 1.0;
        let eta = p.eta * (1.0 - p.beta_2.powf(t)).sqrt() / (1.0 - p.beta_1.powf(t));
        let b2 = p.beta_2;
        self.0
            .step(current, eta, |v, d2| b2 * v + (1.0 - b2) * d2)
            .map(|m| (m, None))
    }

    fn state(&self) -> StrategyState {
        self.0.state()
    }

    fn restore_state(&mut self, state: StrategyState) -> Result<(), CoreError> {
        self.0.restore_state(state)
    }
}
