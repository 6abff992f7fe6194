//! A node's identity on the Fleet API: see [`petal_auth`], shared with the
//! legacy gRPC transport.

pub use petal_auth::*;
