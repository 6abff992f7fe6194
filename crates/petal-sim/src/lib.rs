//! Simulation: `N` virtual clients in one process, driven by the same
//! round loop, strategies, history and checkpoints as a network server
//! (`petal_core::run_federation`).
//!
//! A virtual client is a number, nothing else: no socket, no thread, no
//! stream, no model. [`Federation`] is the [`ClientManager`] the round loop
//! samples from; each call on one of its clients becomes a task for a
//! [`WorkerPool`] of `W` workers, each holding one model replica (a
//! [`Replica`]) that acts as whichever client a task names. Workers are
//! threads, or processes recycled after `K` tasks ([`Isolation`]) so that
//! everything a step allocated (a GPU context too) is returned.
//!
//! Results are bit-identical for a seed whatever `W` and timing: a task's
//! outcome depends only on the client and the instruction (the replica is
//! reset from the instruction's model), and the round loop folds results
//! in client order (`RunConfig::fold_in_order`).

#![forbid(unsafe_code)]

mod pool;
pub mod process;

use std::sync::Arc;
use std::time::Duration;

use petal_core::{
    BoxFuture, ClientManager, ClientProxy, Config, CoreError, EvaluateIns, EvaluateRes, FitIns,
    FitRes, NodeId, Parameters, ProxyFuture,
};

pub use pool::{Isolation, MakeReplica, PoolStats, Replica, Reply, Task, WorkerPool};

/// The node id of virtual client `partition` (ids count from 1, as a
/// server's do).
pub fn node_of(partition: usize) -> NodeId {
    NodeId(partition as u64 + 1)
}

/// The partition of node `node`, when it is one of `clients`.
pub fn partition_of(node: NodeId, clients: usize) -> Option<usize> {
    let p = usize::try_from(node.0.checked_sub(1)?).ok()?;
    (p < clients).then_some(p)
}

/// `clients` virtual clients over one worker pool: every client is always
/// available, and a handle on one is made when the round loop asks for it.
pub struct Federation {
    clients: usize,
    pool: Arc<WorkerPool>,
}

impl Federation {
    /// Clients `0..clients`, their calls run by `pool`.
    pub fn new(clients: usize, pool: Arc<WorkerPool>) -> Self {
        Federation { clients, pool }
    }

    /// The pool running the clients' calls.
    pub fn pool(&self) -> &Arc<WorkerPool> {
        &self.pool
    }
}

impl ClientManager for Federation {
    fn num_available(&self) -> usize {
        self.clients
    }

    fn node_ids(&self) -> Vec<NodeId> {
        (0..self.clients).map(node_of).collect()
    }

    fn get(&self, node: NodeId) -> Option<Arc<dyn ClientProxy>> {
        let partition = partition_of(node, self.clients)?;
        Some(Arc::new(VirtualClient {
            partition,
            pool: self.pool.clone(),
        }))
    }

    fn wait_for(&self, n: usize, _timeout: Option<Duration>) -> BoxFuture<'_, bool> {
        // Nobody joins a simulation: there are enough clients now or never.
        let enough = n <= self.clients;
        Box::pin(async move { enough })
    }

    fn drop_client(&self, node: NodeId) {
        // A virtual client has no connection to close; the next task for it
        // starts from the instruction, as every task does.
        tracing::debug!(node = node.0, "a virtual client's call failed");
    }
}

/// The server's handle on one virtual client: its calls go to the pool.
struct VirtualClient {
    partition: usize,
    pool: Arc<WorkerPool>,
}

impl VirtualClient {
    async fn call(&self, task: Task) -> Result<Reply, CoreError> {
        self.pool
            .run(self.partition, task)
            .await
            .map_err(|e| match e {
                CoreError::Client { .. } => e,
                other => CoreError::Client {
                    node: node_of(self.partition),
                    reason: other.to_string(),
                },
            })
    }
}

fn unexpected<T>(what: &str) -> Result<T, CoreError> {
    Err(CoreError::Invalid(format!(
        "a worker answered a {what} task with another kind of reply"
    )))
}

impl ClientProxy for VirtualClient {
    fn node_id(&self) -> NodeId {
        node_of(self.partition)
    }

    fn get_parameters(
        &self,
        config: Config,
        _timeout: Option<Duration>,
    ) -> ProxyFuture<'_, Parameters> {
        Box::pin(async move {
            match self.call(Task::GetParameters(config)).await? {
                Reply::Parameters(p) => Ok(p),
                _ => unexpected("get_parameters"),
            }
        })
    }

    fn fit(&self, ins: FitIns, _timeout: Option<Duration>) -> ProxyFuture<'_, FitRes> {
        Box::pin(async move {
            match self.call(Task::Fit(ins)).await? {
                Reply::Fit(r) => Ok(r),
                _ => unexpected("fit"),
            }
        })
    }

    fn evaluate(
        &self,
        ins: EvaluateIns,
        _timeout: Option<Duration>,
    ) -> ProxyFuture<'_, EvaluateRes> {
        Box::pin(async move {
            match self.call(Task::Evaluate(ins)).await? {
                Reply::Evaluate(r) => Ok(r),
                _ => unexpected("evaluate"),
            }
        })
    }

    fn disconnect(&self, _timeout: Option<Duration>) -> ProxyFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn get_properties(
        &self,
        config: Config,
        _timeout: Option<Duration>,
    ) -> ProxyFuture<'_, Config> {
        Box::pin(async move {
            match self.call(Task::Properties(config)).await? {
                Reply::Properties(c) => Ok(c),
                _ => unexpected("get_properties"),
            }
        })
    }
}

#[cfg(test)]
mod tests;
