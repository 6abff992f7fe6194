//! Petal's federated-learning core: the messages a round exchanges, the
//! [`Strategy`] trait with [`FedAvg`], streaming aggregation, the [`History`]
//! of a run and the round loop ([`run_federation`]).
//!
//! This crate knows nothing about the wire (see `petal-proto`), the transport
//! (`petal-server` implements [`ClientProxy`] over gRPC) or the ML framework
//! (`petal-ml`): a client is anything that answers [`FitIns`] and
//! [`EvaluateIns`].

pub mod aggregate;
pub mod client_manager;
pub mod history;
pub mod round;
pub mod strategy;
pub mod types;

pub use client_manager::{ClientManager, ClientProxy, ProxyFuture};
pub use history::{History, RoundRecord};
pub use round::{RunConfig, run_federation};
pub use strategy::{FedAvg, FedAvgConfig, Strategy};
pub use types::*;
