//! Connected clients, as the round loop sees them, whatever the transport.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use tokio::sync::watch;

use crate::types::{Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters};

/// A boxed future returned by [`ClientProxy`] methods.
pub type ProxyFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, CoreError>> + Send + 'a>>;

/// The server's handle on one client. Implemented by each transport
/// (gRPC in `petal-server`; in-process ones for simulation and tests).
pub trait ClientProxy: Send + Sync {
    /// Stable identifier (for logs, sampling and history).
    fn cid(&self) -> &str;
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
}

/// The set of connected clients, with waiting and seeded sampling.
pub struct ClientManager {
    clients: Mutex<BTreeMap<String, Arc<dyn ClientProxy>>>,
    count: watch::Sender<usize>,
    rng: Mutex<StdRng>,
}

impl ClientManager {
    /// An empty manager whose sampling is seeded by `seed`.
    pub fn new(seed: u64) -> Self {
        ClientManager {
            clients: Mutex::new(BTreeMap::new()),
            count: watch::channel(0).0,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<dyn ClientProxy>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a client; returns false if its cid is already registered.
    pub fn register(&self, client: Arc<dyn ClientProxy>) -> bool {
        let mut clients = self.lock();
        let cid = client.cid().to_string();
        if clients.contains_key(&cid) {
            return false;
        }
        clients.insert(cid.clone(), client);
        self.count.send_replace(clients.len());
        tracing::debug!(%cid, connected = clients.len(), "client registered");
        true
    }

    /// Removes a client (it disconnected).
    pub fn unregister(&self, cid: &str) {
        let mut clients = self.lock();
        if clients.remove(cid).is_some() {
            self.count.send_replace(clients.len());
            tracing::debug!(%cid, connected = clients.len(), "client unregistered");
        }
    }

    /// Number of connected clients.
    pub fn num_available(&self) -> usize {
        self.lock().len()
    }

    /// All connected clients, ordered by cid.
    pub fn all(&self) -> Vec<Arc<dyn ClientProxy>> {
        self.lock().values().cloned().collect()
    }

    /// Waits until at least `n` clients are connected; false on timeout.
    pub async fn wait_for(&self, n: usize, timeout: Option<Duration>) -> bool {
        let mut rx = self.count.subscribe();
        let wait = rx.wait_for(|&c| c >= n);
        match timeout {
            Some(t) => matches!(tokio::time::timeout(t, wait).await, Ok(Ok(_))),
            None => wait.await.is_ok(),
        }
    }

    /// Samples `n` distinct clients uniformly (seeded), once at least
    /// `min_available` are connected. Fails if fewer than `n` are connected.
    pub async fn sample(
        &self,
        n: usize,
        min_available: usize,
        timeout: Option<Duration>,
    ) -> Result<Vec<Arc<dyn ClientProxy>>, CoreError> {
        let need = n.max(min_available);
        if !self.wait_for(need, timeout).await {
            return Err(CoreError::Invalid(format!(
                "timed out waiting for {need} clients ({} connected)",
                self.num_available()
            )));
        }
        let all = self.all();
        if all.len() < n {
            return Err(CoreError::Invalid(format!(
                "cannot sample {n} clients: only {} connected",
                all.len()
            )));
        }
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let picked = sample(&mut *rng, all.len(), n);
        Ok(picked.into_iter().map(|i| all[i].clone()).collect())
    }
}
