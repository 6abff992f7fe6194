//! FedAdagrad (Reddi et al., 2021): the second moment sums `delta²`; no
//! first-moment decay (Flower's defaults: eta 0.1, eta_l 0.1, tau 0.001).

use super::fedopt::{FedOpt, FedOptParams};
use super::{Aggregator, Composed, StrategyConfig, StrategyState};
use crate::types::{CoreError, FitRes, Metrics, Parameters};

/// FedAdagrad's aggregation.
pub struct FedAdagrad(FedOpt);

impl FedAdagrad {
    /// Flower's defaults (beta_1 is 0: the first moment is the delta).
    pub const DEFAULTS: FedOptParams = FedOptParams {
        eta: 1e-1,
        eta_l: 1e-1,
        beta_1: 0.0,
        beta_2: 0.0,
        tau: 1e-3,
    };

    /// A FedAdagrad strategy.
    pub fn strategy(config: StrategyConfig, p: FedOptParams) -> Result<Composed<Self>, CoreError> {
        Composed::with(config, FedAdagrad(FedOpt::new(p)?))
    }
}

impl Aggregator for FedAdagrad {
    fn name(&self) -> &'static str {
        "fedadagrad"
    }

    fn fold(&mut self, res: FitRes) -> Result<(), CoreError> {
        self.0.fold(&res)
    }

    fn aggregate(
        &mut self,
        _round: u64,
        current: &Parameters,
    ) -> Option<(Parameters, Option<Metrics>)> {
        let eta = self.0.params.eta;
        self.0.step(current, eta, |v, d2| v + d2).map(|m| (m, None))
    }

    fn state(&self) -> StrategyState {
        self.0.state()
    }

    fn restore_state(&mut self, state: StrategyState) -> Result<(), CoreError> {
        self.0.restore_state(state)
    }
}
