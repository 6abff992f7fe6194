//! The round loop: sample → fit → fold → aggregate → evaluate → record.
//! Independent of the transport: it only sees [`ClientManager`] and
//! [`ClientProxy`](crate::ClientProxy).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::client_manager::ClientManager;
use crate::history::{History, RoundRecord};
use crate::strategy::Strategy;
use crate::types::{Config, CoreError, Parameters};

/// Settings of the round loop itself (strategy settings live in the strategy).
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Number of rounds.
    pub num_rounds: u64,
    /// Longest a single fit or evaluate may take before it counts as a failure.
    pub round_timeout: Option<Duration>,
    /// Longest to wait for enough clients to connect.
    pub wait_timeout: Option<Duration>,
}

/// Runs `config.num_rounds` rounds of `strategy` over the clients of
/// `manager`, then tells every client to disconnect.
pub async fn run_federation(
    manager: &ClientManager,
    strategy: &mut dyn Strategy,
    config: &RunConfig,
) -> Result<History, CoreError> {
    let start = Instant::now();
    let mut history = History::new();
    let mut parameters = Arc::new(initial_parameters(manager, strategy, config).await?);
    tracing::info!(
        tensors = parameters.tensors.len(),
        values = parameters.num_values(),
        "initial parameters ready"
    );
    for round in 1..=config.num_rounds {
        let round_start = Instant::now();
        tracing::info!("[ROUND {round}]");
        let mut failures = Vec::new();

        // Fit.
        let (n, min) = strategy.num_fit_clients(manager.num_available());
        let clients = manager.sample(n, min, config.wait_timeout).await?;
        tracing::info!(
            "configure_fit: strategy sampled {} clients (out of {})",
            clients.len(),
            manager.num_available()
        );
        let ins = strategy.configure_fit(round, parameters.clone());
        let timeout = config.round_timeout;
        let mut tasks = JoinSet::new();
        for client in clients {
            let ins = ins.clone();
            tasks.spawn(async move {
                let res = client.fit(ins, timeout).await;
                (client.cid().to_string(), res)
            });
        }
        let mut fit_results = 0;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((cid, Ok(res))) => match strategy.fold_fit(round, &cid, &res) {
                    Ok(()) => fit_results += 1,
                    Err(e) => failures.push(format!("{cid}: fit result rejected: {e}")),
                },
                Ok((cid, Err(e))) => failures.push(format!("{cid}: fit failed: {e}")),
                Err(e) => failures.push(format!("fit task failed: {e}")),
            }
        }
        let fit_failures = failures.len();
        tracing::info!("aggregate_fit: received {fit_results} results and {fit_failures} failures");
        for f in &failures {
            tracing::warn!("{f}");
        }
        match strategy.aggregate_fit(round) {
            Some(p) => parameters = Arc::new(p),
            None => tracing::warn!("round {round}: no fit results, keeping the previous model"),
        }

        // Evaluate.
        let (n, min) = strategy.num_evaluate_clients(manager.num_available());
        let mut eval_results = 0;
        let mut eval_failures = 0;
        if n > 0 {
            let clients = manager.sample(n, min.min(n), config.wait_timeout).await?;
            tracing::info!(
                "configure_evaluate: strategy sampled {} clients (out of {})",
                clients.len(),
                manager.num_available()
            );
            let ins = strategy.configure_evaluate(round, parameters.clone());
            let mut tasks = JoinSet::new();
            for client in clients {
                let ins = ins.clone();
                tasks.spawn(async move {
                    let res = client.evaluate(ins, timeout).await;
                    (client.cid().to_string(), res)
                });
            }
            while let Some(joined) = tasks.join_next().await {
                let failure = match joined {
                    Ok((cid, Ok(res))) => match strategy.fold_evaluate(round, &cid, &res) {
                        Ok(()) => None,
                        Err(e) => Some(format!("{cid}: evaluate result rejected: {e}")),
                    },
                    Ok((cid, Err(e))) => Some(format!("{cid}: evaluate failed: {e}")),
                    Err(e) => Some(format!("evaluate task failed: {e}")),
                };
                match failure {
                    None => eval_results += 1,
                    Some(f) => {
                        tracing::warn!("{f}");
                        failures.push(f);
                        eval_failures += 1;
                    }
                }
            }
            tracing::info!(
                "aggregate_evaluate: received {eval_results} results and {eval_failures} failures"
            );
        }
        let mut summary = strategy.aggregate_evaluate(round);
        let accuracy = summary.metrics.remove("accuracy");
        let record = RoundRecord {
            round,
            fit_results,
            fit_failures,
            eval_results,
            eval_failures,
            loss: summary.loss,
            accuracy,
            metrics: summary.metrics,
            failures,
            round_seconds: round_start.elapsed().as_secs_f64(),
            elapsed_seconds: start.elapsed().as_secs_f64(),
        };
        let show = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{x:.4}"));
        tracing::info!(
            "round {round}: loss {} accuracy {} in {:.1}s",
            show(record.loss),
            show(record.accuracy),
            record.round_seconds
        );
        history.rounds.push(record);
    }
    disconnect_all(manager, config.round_timeout).await;
    Ok(history)
}

async fn initial_parameters(
    manager: &ClientManager,
    strategy: &mut dyn Strategy,
    config: &RunConfig,
) -> Result<Parameters, CoreError> {
    if let Some(p) = strategy.initialize_parameters() {
        tracing::info!("using initial parameters provided by the strategy");
        return Ok(p);
    }
    let client = manager
        .sample(1, 1, config.wait_timeout)
        .await?
        .pop()
        .ok_or_else(|| CoreError::NoInitialParameters("no client connected".into()))?;
    tracing::info!("requesting initial parameters from one random client");
    client
        .get_parameters(Config::new(), config.round_timeout)
        .await
        .map_err(|e| CoreError::NoInitialParameters(format!("{}: {e}", client.cid())))
}

async fn disconnect_all(manager: &ClientManager, timeout: Option<Duration>) {
    let mut tasks = JoinSet::new();
    for client in manager.all() {
        tasks.spawn(async move {
            if let Err(e) = client.disconnect(timeout).await {
                tracing::debug!(cid = client.cid(), "disconnect: {e}");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client_manager::{ClientProxy, ProxyFuture};
    use crate::strategy::{FedAvg, FedAvgConfig};
    use crate::types::*;
    use std::sync::Mutex;

    /// An in-process client that "trains" by adding its offset.
    struct FakeClient {
        cid: String,
        offset: f32,
        examples: u64,
        fail: bool,
        seen: Mutex<Vec<f32>>,
    }

    impl ClientProxy for FakeClient {
        fn cid(&self) -> &str {
            &self.cid
        }
        fn get_parameters(&self, _: Config, _: Option<Duration>) -> ProxyFuture<'_, Parameters> {
            Box::pin(async {
                Ok(Parameters {
                    tensors: vec![Tensor::new(vec![1], vec![0.0])?],
                })
            })
        }
        fn fit(&self, ins: FitIns, _: Option<Duration>) -> ProxyFuture<'_, FitRes> {
            Box::pin(async move {
                if self.fail {
                    return Err(CoreError::Client {
                        cid: self.cid.clone(),
                        reason: "boom".into(),
                    });
                }
                let v = ins.parameters.tensors[0].data[0];
                self.seen.lock().unwrap().push(v);
                Ok(FitRes {
                    parameters: Parameters {
                        tensors: vec![Tensor::new(vec![1], vec![v + self.offset])?],
                    },
                    num_examples: self.examples,
                    metrics: Config::new(),
                })
            })
        }
        fn evaluate(&self, ins: EvaluateIns, _: Option<Duration>) -> ProxyFuture<'_, EvaluateRes> {
            Box::pin(async move {
                let v = ins.parameters.tensors[0].data[0];
                Ok(EvaluateRes {
                    loss: v,
                    num_examples: self.examples,
                    metrics: [("accuracy".to_string(), Scalar::Double(0.5))].into(),
                })
            })
        }
        fn disconnect(&self, _: Option<Duration>) -> ProxyFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
    }

    fn client(cid: &str, offset: f32, examples: u64, fail: bool) -> Arc<FakeClient> {
        Arc::new(FakeClient {
            cid: cid.into(),
            offset,
            examples,
            fail,
            seen: Mutex::new(Vec::new()),
        })
    }

    #[tokio::test]
    async fn rounds_average_and_record_failures() {
        let manager = ClientManager::new(7);
        let a = client("a", 1.0, 1, false);
        let b = client("b", 4.0, 3, false);
        let c = client("c", 0.0, 1, true);
        for x in [&a, &b, &c] {
            assert!(manager.register(x.clone()));
        }
        let mut strategy = FedAvg::new(FedAvgConfig {
            fit_clients: 3,
            min_available_clients: 3,
            ..Default::default()
        })
        .unwrap();
        let cfg = RunConfig {
            num_rounds: 2,
            round_timeout: None,
            wait_timeout: Some(Duration::from_secs(5)),
        };
        let h = run_federation(&manager, &mut strategy, &cfg).await.unwrap();
        assert_eq!(h.rounds.len(), 2);
        let r1 = &h.rounds[0];
        assert_eq!((r1.fit_results, r1.fit_failures), (2, 1));
        assert!(r1.failures[0].contains("boom"), "{:?}", r1.failures);
        // Round 1: (1*1 + 3*4)/4 = 3.25; evaluated loss is the model value.
        assert_eq!(r1.loss, Some(3.25));
        assert_eq!(r1.accuracy, Some(0.5));
        // Round 2 starts from 3.25: 3.25 + 3.25 = 6.5.
        assert_eq!(h.rounds[1].loss, Some(6.5));
        assert_eq!(*a.seen.lock().unwrap(), vec![0.0, 3.25]);
    }

    #[tokio::test]
    async fn sampling_times_out_with_too_few_clients() {
        let manager = ClientManager::new(1);
        manager.register(client("a", 1.0, 1, false));
        let mut strategy = FedAvg::new(FedAvgConfig::default()).unwrap();
        let cfg = RunConfig {
            num_rounds: 1,
            round_timeout: None,
            wait_timeout: Some(Duration::from_millis(50)),
        };
        let err = run_federation(&manager, &mut strategy, &cfg)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("waiting for 2 clients"), "{err}");
    }
}
