//! Connected clients, as the round loop sees them, whatever the transport:
//! the [`ClientProxy`] trait (one client), the [`ClientManager`] trait (the
//! set of clients: waiting, lookup, sampling) and [`Registry`], the
//! implementation a network server registers its connections with.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngCore;
use rand::seq::index::sample;
use tokio::sync::watch;

use crate::types::{
    Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, NodeId, Parameters,
};

/// A boxed future returned by [`ClientProxy`] methods.
pub type ProxyFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, CoreError>> + Send + 'a>>;

/// A boxed future without error.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The server's handle on one client. Implemented by each transport
/// (gRPC in `petal-server`; in-process ones for simulation and tests).
pub trait ClientProxy: Send + Sync {
    /// The id the server gave this client when it joined.
    fn node_id(&self) -> NodeId;
    /// Asks the client for its current parameters.
    fn get_parameters(
        &self,
        config: Config,
        timeout: Option<Duration>,
    ) -> ProxyFuture<'_, Parameters>;
    /// Asks the client to train.
    fn fit(&self, ins: FitIns, timeout: Option<Duration>) -> ProxyFuture<'_, FitRes>;
    /// Asks the client to evaluate.
    fn evaluate(&self, ins: EvaluateIns, timeout: Option<Duration>)
    -> ProxyFuture<'_, EvaluateRes>;
    /// Tells the client the run is over.
    fn disconnect(&self, timeout: Option<Duration>) -> ProxyFuture<'_, ()>;
    /// Asks the client for its properties (Flower's `get_properties`);
    /// transports without it answer none.
    fn get_properties(
        &self,
        _config: Config,
        _timeout: Option<Duration>,
    ) -> ProxyFuture<'_, Config> {
        Box::pin(async { Ok(Config::new()) })
    }
}

/// The set of clients a run can use (Flower's `ClientManager`). The gRPC
/// server fills a [`Registry`]; a simulation can implement this trait over
/// virtual clients created on demand.
pub trait ClientManager: Send + Sync {
    /// Number of clients connected now.
    fn num_available(&self) -> usize;
    /// Ids of the clients connected now, ascending (join order).
    fn node_ids(&self) -> Vec<NodeId>;
    /// The client with this id, if it is still connected.
    fn get(&self, node: NodeId) -> Option<Arc<dyn ClientProxy>>;
    /// Waits until at least `n` clients are connected; false on timeout.
    fn wait_for(&self, n: usize, timeout: Option<Duration>) -> BoxFuture<'_, bool>;
    /// Removes a client the server no longer trusts (it timed out, broke
    /// its stream or panicked a task); its transport closes the connection.
    fn drop_client(&self, node: NodeId);

    /// Up to `n` distinct clients connected now, chosen uniformly with `rng`.
    fn sample(&self, n: usize, rng: &mut dyn RngCore) -> Vec<Arc<dyn ClientProxy>> {
        let ids = self.node_ids();
        let picked = sample(rng, ids.len(), n.min(ids.len()));
        picked
            .into_iter()
            .filter_map(|i| self.get(ids[i]))
            .collect()
    }

    /// Every client connected now, in join order.
    fn all(&self) -> Vec<Arc<dyn ClientProxy>> {
        self.node_ids()
            .into_iter()
            .filter_map(|id| self.get(id))
            .collect()
    }
}

/// Clients connected to a server, keyed by the [`NodeId`] it assigns them.
/// Ids count up from 1 and are never reused, so a stale handle can never
/// unregister a newer client.
pub struct Registry {
    clients: Mutex<BTreeMap<NodeId, Arc<dyn ClientProxy>>>,
    count: watch::Sender<usize>,
    next_id: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry {
            clients: Mutex::new(BTreeMap::new()),
            count: watch::channel(0).0,
            next_id: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Arc<dyn ClientProxy>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh node id for a client that is joining.
    pub fn next_node_id(&self) -> NodeId {
        NodeId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Adds a client under its node id (from [`Registry::next_node_id`]).
    pub fn register(&self, client: Arc<dyn ClientProxy>) {
        let mut clients = self.lock();
        let node = client.node_id();
        clients.insert(node, client);
        self.count.send_replace(clients.len());
        tracing::debug!(
            node = node.0,
            connected = clients.len(),
            "client registered"
        );
    }

    /// Removes a client (it left or was dropped); unknown ids are ignored.
    pub fn unregister(&self, node: NodeId) -> bool {
        let mut clients = self.lock();
        let removed = clients.remove(&node).is_some();
        if removed {
            self.count.send_replace(clients.len());
            tracing::debug!(
                node = node.0,
                connected = clients.len(),
                "client unregistered"
            );
        }
        removed
    }
}

impl ClientManager for Registry {
    fn num_available(&self) -> usize {
        self.lock().len()
    }

    fn node_ids(&self) -> Vec<NodeId> {
        self.lock().keys().copied().collect()
    }

    fn get(&self, node: NodeId) -> Option<Arc<dyn ClientProxy>> {
        self.lock().get(&node).cloned()
    }

    fn wait_for(&self, n: usize, timeout: Option<Duration>) -> BoxFuture<'_, bool> {
        let mut rx = self.count.subscribe();
        Box::pin(async move {
            let wait = rx.wait_for(|&c| c >= n);
            match timeout {
                Some(t) => matches!(tokio::time::timeout(t, wait).await, Ok(Ok(_))),
                None => wait.await.is_ok(),
            }
        })
    }

    fn drop_client(&self, node: NodeId) {
        if self.unregister(node) {
            tracing::info!(node = node.0, "client dropped by the server");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    struct Idle(NodeId);

    impl ClientProxy for Idle {
        fn node_id(&self) -> NodeId {
            self.0
        }
        fn get_parameters(&self, _: Config, _: Option<Duration>) -> ProxyFuture<'_, Parameters> {
            Box::pin(async { Ok(Parameters::default()) })
        }
        fn fit(&self, _: FitIns, _: Option<Duration>) -> ProxyFuture<'_, FitRes> {
            Box::pin(async { Err(CoreError::Invalid("idle".into())) })
        }
        fn evaluate(&self, _: EvaluateIns, _: Option<Duration>) -> ProxyFuture<'_, EvaluateRes> {
            Box::pin(async { Err(CoreError::Invalid("idle".into())) })
        }
        fn disconnect(&self, _: Option<Duration>) -> ProxyFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
    }

    fn join(r: &Registry) -> NodeId {
        let id = r.next_node_id();
        r.register(Arc::new(Idle(id)));
        id
    }

    #[test]
    fn ids_are_never_reused() {
        let r = Registry::new();
        let a = join(&r);
        assert!(r.unregister(a));
        let b = join(&r);
        assert_ne!(a, b);
        assert!(!r.unregister(a), "a stale id cannot remove the new client");
        assert_eq!(r.node_ids(), vec![b]);
    }

    #[test]
    fn sampling_is_reproducible_for_a_seed_and_join_order() {
        let pick = |seed| {
            let r = Registry::new();
            (0..20).for_each(|_| {
                join(&r);
            });
            let mut rng = StdRng::seed_from_u64(seed);
            r.sample(5, &mut rng)
                .iter()
                .map(|c| c.node_id())
                .collect::<Vec<_>>()
        };
        assert_eq!(pick(3), pick(3));
        assert_ne!(pick(3), pick(4));
        let r = Registry::new();
        join(&r);
        assert_eq!(r.sample(5, &mut StdRng::seed_from_u64(0)).len(), 1);
    }

    #[tokio::test]
    async fn wait_for_times_out_or_sees_joins() {
        let r = Arc::new(Registry::new());
        assert!(!r.wait_for(1, Some(Duration::from_millis(10))).await);
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move { r.wait_for(2, None).await })
        };
        join(&r);
        join(&r);
        assert!(waiter.await.unwrap());
    }
}
