//! A strategy by name with its parameters (what `--strategy` and the
//! run's `config.json` hold), and [`build`], which makes it.

use serde::{Deserialize, Serialize};

use super::bulyan::Bulyan;
use super::dp::{DpSpec, DpWrapper};
use super::fedadagrad::FedAdagrad;
use super::fedadam::FedAdam;
use super::fedavg::FedAvg;
use super::fedavgm::FedAvgM;
use super::fedmedian::FedMedian;
use super::fedopt::FedOptParams;
use super::fedprox::FedProx;
use super::fedtrimmedavg::FedTrimmedAvg;
use super::fedyogi::FedYogi;
use super::krum::MultiKrum;
use super::qfedavg::QFedAvg;
use super::{Strategy, StrategyConfig};
use crate::types::CoreError;

/// Flower's strategies, with flwr 1.41's parameter names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum StrategySpec {
    FedAvg,
    FedProx {
        proximal_mu: f64,
    },
    FedAvgM {
        server_learning_rate: f64,
        server_momentum: f64,
    },
    FedAdagrad {
        eta: f64,
        eta_l: f64,
        tau: f64,
    },
    FedAdam {
        eta: f64,
        eta_l: f64,
        beta_1: f64,
        beta_2: f64,
        tau: f64,
    },
    FedYogi {
        eta: f64,
        eta_l: f64,
        beta_1: f64,
        beta_2: f64,
        tau: f64,
    },
    FedMedian,
    FedTrimmedAvg {
        beta: f64,
    },
    Krum {
        num_malicious_nodes: usize,
    },
    MultiKrum {
        num_malicious_nodes: usize,
        num_nodes_to_select: usize,
    },
    Bulyan {
        num_malicious_nodes: usize,
    },
    QFedAvg {
        client_learning_rate: f64,
        q: f64,
        train_loss_key: String,
    },
}

impl StrategySpec {
    /// Every strategy's name.
    pub const NAMES: [&'static str; 12] = [
        "fedavg",
        "fedprox",
        "fedavgm",
        "fedadagrad",
        "fedadam",
        "fedyogi",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
        "multikrum",
        "bulyan",
        "qfedavg",
    ];

    /// The strategy `name` with Flower's defaults.
    pub fn defaults(name: &str) -> Result<StrategySpec, CoreError> {
        let adam = FedAdam::DEFAULTS;
        let yogi = FedYogi::DEFAULTS;
        let adagrad = FedAdagrad::DEFAULTS;
        Ok(match name {
            "fedavg" => StrategySpec::FedAvg,
            "fedprox" => StrategySpec::FedProx { proximal_mu: 0.0 },
            "fedavgm" => StrategySpec::FedAvgM {
                server_learning_rate: 1.0,
                server_momentum: 0.0,
            },
            "fedadagrad" => StrategySpec::FedAdagrad {
                eta: adagrad.eta,
                eta_l: adagrad.eta_l,
                tau: adagrad.tau,
            },
            "fedadam" => StrategySpec::FedAdam {
                eta: adam.eta,
                eta_l: adam.eta_l,
                beta_1: adam.beta_1,
                beta_2: adam.beta_2,
                tau: adam.tau,
            },
            "fedyogi" => StrategySpec::FedYogi {
                eta: yogi.eta,
                eta_l: yogi.eta_l,
                beta_1: yogi.beta_1,
                beta_2: yogi.beta_2,
                tau: yogi.tau,
            },
            "fedmedian" => StrategySpec::FedMedian,
            "fedtrimmedavg" => StrategySpec::FedTrimmedAvg { beta: 0.2 },
            "krum" => StrategySpec::Krum {
                num_malicious_nodes: 0,
            },
            "multikrum" => StrategySpec::MultiKrum {
                num_malicious_nodes: 0,
                num_nodes_to_select: 1,
            },
            "bulyan" => StrategySpec::Bulyan {
                num_malicious_nodes: 0,
            },
            "qfedavg" => StrategySpec::QFedAvg {
                client_learning_rate: 0.1,
                q: 0.1,
                train_loss_key: "train_loss".into(),
            },
            other => {
                return Err(CoreError::Invalid(format!(
                    "unknown strategy '{other}' (one of {})",
                    Self::NAMES.join(", ")
                )));
            }
        })
    }

    /// Its name.
    pub fn name(&self) -> &'static str {
        match self {
            StrategySpec::FedAvg => "fedavg",
            StrategySpec::FedProx { .. } => "fedprox",
            StrategySpec::FedAvgM { .. } => "fedavgm",
            StrategySpec::FedAdagrad { .. } => "fedadagrad",
            StrategySpec::FedAdam { .. } => "fedadam",
            StrategySpec::FedYogi { .. } => "fedyogi",
            StrategySpec::FedMedian => "fedmedian",
            StrategySpec::FedTrimmedAvg { .. } => "fedtrimmedavg",
            StrategySpec::Krum { .. } => "krum",
            StrategySpec::MultiKrum { .. } => "multikrum",
            StrategySpec::Bulyan { .. } => "bulyan",
            StrategySpec::QFedAvg { .. } => "qfedavg",
        }
    }
}

/// The strategy `spec` names, with the shared settings in `config`, under
/// differential privacy when `dp` is given.
pub fn build(
    spec: &StrategySpec,
    config: StrategyConfig,
    dp: Option<&DpSpec>,
) -> Result<Box<dyn Strategy>, CoreError> {
    let s: Box<dyn Strategy> = match spec.clone() {
        StrategySpec::FedAvg => Box::new(FedAvg::new(config)?),
        StrategySpec::FedProx { proximal_mu } => Box::new(FedProx::strategy(config, proximal_mu)?),
        StrategySpec::FedAvgM {
            server_learning_rate,
            server_momentum,
        } => Box::new(FedAvgM::strategy(
            config,
            server_learning_rate,
            server_momentum,
        )?),
        StrategySpec::FedAdagrad { eta, eta_l, tau } => Box::new(FedAdagrad::strategy(
            config,
            FedOptParams {
                eta,
                eta_l,
                beta_1: 0.0,
                beta_2: 0.0,
                tau,
            },
        )?),
        StrategySpec::FedAdam {
            eta,
            eta_l,
            beta_1,
            beta_2,
            tau,
        } => Box::new(FedAdam::strategy(
            config,
            FedOptParams {
                eta,
                eta_l,
                beta_1,
                beta_2,
                tau,
            },
        )?),
        StrategySpec::FedYogi {
            eta,
            eta_l,
            beta_1,
            beta_2,
            tau,
        } => Box::new(FedYogi::strategy(
            config,
            FedOptParams {
                eta,
                eta_l,
                beta_1,
                beta_2,
                tau,
            },
        )?),
        StrategySpec::FedMedian => Box::new(FedMedian::strategy(config)?),
        StrategySpec::FedTrimmedAvg { beta } => Box::new(FedTrimmedAvg::strategy(config, beta)?),
        StrategySpec::Krum {
            num_malicious_nodes,
        } => Box::new(MultiKrum::krum(config, num_malicious_nodes)?),
        StrategySpec::MultiKrum {
            num_malicious_nodes,
            num_nodes_to_select,
        } => Box::new(MultiKrum::select_many(
            config,
            num_malicious_nodes,
            num_nodes_to_select,
        )?),
        StrategySpec::Bulyan {
            num_malicious_nodes,
        } => Box::new(Bulyan::strategy(config, num_malicious_nodes)?),
        StrategySpec::QFedAvg {
            client_learning_rate,
            q,
            train_loss_key,
        } => Box::new(QFedAvg::strategy(
            config,
            client_learning_rate,
            q,
            train_loss_key,
        )?),
    };
    Ok(match dp {
        Some(d) => Box::new(DpWrapper::new(s, d.clone())?),
        None => s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_builds_with_flowers_defaults_and_round_trips() {
        for name in StrategySpec::NAMES {
            let spec = StrategySpec::defaults(name).unwrap();
            assert_eq!(spec.name(), name);
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(serde_json::from_str::<StrategySpec>(&json).unwrap(), spec);
            let s = build(&spec, StrategyConfig::default(), None).unwrap();
            assert_eq!(s.name(), name);
        }
        assert!(StrategySpec::defaults("fedsgd").is_err());
    }
}
