//! One process hosting many logical clients: each joins on its own stream
//! (its own node id) over one connection, and at most `max_concurrent` of
//! them work at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use petal_client::{ConnectOptions, run_clients};
use petal_core::{
    Client, ClientManager, Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters,
    Registry, Tensor,
};
use petal_server::{GrpcServer, ServerOptions};

/// Shared by the fake clients: how many are inside `fit`, the most ever,
/// how many finished, and release tokens handed out by the test.
#[derive(Default)]
struct Gate {
    active: AtomicUsize,
    peak: AtomicUsize,
    finished: AtomicUsize,
    tokens: Mutex<usize>,
    released: Condvar,
}

struct Held(Arc<Gate>);

impl Client for Held {
    fn get_parameters(&mut self, _: &Config) -> Result<Parameters, CoreError> {
        Ok(Parameters::new(vec![Tensor::new(vec![1], vec![0.0])?]))
    }
    fn fit(&mut self, ins: FitIns) -> Result<FitRes, CoreError> {
        let g = &self.0;
        let now = g.active.fetch_add(1, Ordering::SeqCst) + 1;
        g.peak.fetch_max(now, Ordering::SeqCst);
        // Waits for a release token (at most 30 s, so a failing test ends).
        let (mut tokens, _) = g
            .released
            .wait_timeout_while(g.tokens.lock().unwrap(), Duration::from_secs(30), |t| {
                *t == 0
            })
            .unwrap();
        *tokens = tokens.saturating_sub(1);
        drop(tokens);
        g.active.fetch_sub(1, Ordering::SeqCst);
        g.finished.fetch_add(1, Ordering::SeqCst);
        Ok(FitRes {
            parameters: (*ins.parameters).clone(),
            num_examples: 1,
            metrics: Config::new(),
        })
    }
    fn evaluate(&mut self, _: EvaluateIns) -> Result<EvaluateRes, CoreError> {
        Err(CoreError::Local("not asked".into()))
    }
}

fn until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::yield_now();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_clients_share_a_connection_and_a_bounded_slot_pool() {
    let registry = Arc::new(Registry::new());
    let server = GrpcServer::start(
        "127.0.0.1:0".parse().unwrap(),
        registry.clone(),
        ServerOptions::default(),
    )
    .await
    .unwrap();
    let gate = Arc::new(Gate::default());
    let clients: Vec<Held> = (0..5).map(|_| Held(gate.clone())).collect();
    let opts = ConnectOptions::new(server.local_addr().to_string());
    let host = tokio::spawn(async move { run_clients(&opts, clients, 2).await });
    assert!(registry.wait_for(5, Some(Duration::from_secs(10))).await);
    let ids = registry.node_ids();
    assert_eq!(ids.len(), 5, "five streams, five node ids");

    let ins = FitIns {
        parameters: Arc::new(Parameters::new(vec![
            Tensor::new(vec![1], vec![3.0]).unwrap(),
        ])),
        config: Config::new(),
    };
    let calls: Vec<_> = registry
        .all()
        .into_iter()
        .map(|c| {
            let ins = ins.clone();
            tokio::spawn(async move { c.fit(ins, Some(Duration::from_secs(60))).await })
        })
        .collect();
    let g = gate.clone();
    tokio::task::spawn_blocking(move || {
        until("two clients in fit", || {
            g.active.load(Ordering::SeqCst) == 2
        });
        for done in 1..=5 {
            *g.tokens.lock().unwrap() += 1;
            g.released.notify_all();
            until("a fit to finish", || {
                g.finished.load(Ordering::SeqCst) == done
            });
        }
    })
    .await
    .unwrap();
    for c in calls {
        assert_eq!(
            c.await.unwrap().unwrap().parameters.tensors[0].data,
            vec![3.0]
        );
    }
    assert_eq!(
        gate.peak.load(Ordering::SeqCst),
        2,
        "never more than two at once"
    );
    for c in registry.all() {
        c.disconnect(Some(Duration::from_secs(10))).await.unwrap();
    }
    host.await.unwrap().unwrap();
    server.shutdown(Duration::from_secs(2)).await.unwrap();
}
