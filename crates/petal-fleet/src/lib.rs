//! Flower's Fleet API, the protocol between a SuperLink and its SuperNodes
//! since flwr 1.40 (protobuf over HTTP), from a node's side: Petal nodes
//! join a Flower federation next to Python SuperNodes and answer the
//! ServerApp's `train` and `evaluate` messages with a Petal client.
//!
//! - [`proto`]: our own `.proto` of the Fleet messages (written from the
//!   installed flwr 1.41.0's descriptors);
//! - [`objects`]: Flower's content-addressed message objects, byte for byte;
//! - [`auth`]: the node's P-256 key, request signing, OpenSSH key files;
//! - [`http`]: the signed protobuf-over-HTTP(S) client;
//! - [`node`]: the SuperNode loop ([`run_node`]).
//!
//! It knows nothing of ML: the work is done by any `petal_core::Client`.

pub mod auth;
pub mod http;
pub mod node;
pub mod objects;
#[cfg(feature = "testing")]
pub mod testing;

pub use auth::NodeKey;
pub use http::{Connection, FleetClient, FleetError};
pub use node::{NodeError, NodeOptions, NodeSummary, run_node};

/// Code generated from `proto/flwr/proto/fleet.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/flwr.proto.rs"));
}
