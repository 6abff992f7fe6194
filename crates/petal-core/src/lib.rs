//! Petal's federated-learning core: the messages a round exchanges, the
//! [`Client`] a participant implements, the [`Strategy`] trait with
//! [`FedAvg`], streaming aggregation, the [`ClientManager`] the loop samples
//! from, the round loop ([`run_federation`]) and what a run keeps: its
//! [`History`] and [`Checkpoint`]s in a [`RunDir`].
//!
//! This crate knows nothing about the wire (see `petal-proto`), the transport
//! (`petal-server` implements [`ClientProxy`] over gRPC) or the ML framework
//! (`petal-ml` implements [`Client`]).

pub mod aggregate;
pub mod backoff;
pub mod checkpoint;
pub mod client;
pub mod client_manager;
pub mod history;
pub mod process_groups;
pub mod round;
pub mod run_dir;
pub mod strategy;
pub mod tensor;
pub mod types;
pub mod utc;

pub use checkpoint::Checkpoint;
pub use client::{Client, PARAMETER_NAMES_PROPERTY, names_from_properties, names_property};
pub use client_manager::{BoxFuture, ClientManager, ClientProxy, ProxyFuture, Registry};
pub use history::{Failure, History, RoundRecord, RunStatus};
pub use round::{Resume, RoundObserver, RunConfig, run_federation};
pub use run_dir::RunDir;
pub use strategy::{
    EvaluateSummary, FedAvg, FedAvgConfig, Instruction, Phase, Strategy, StrategySpec,
    StrategyState,
};
pub use types::*;
