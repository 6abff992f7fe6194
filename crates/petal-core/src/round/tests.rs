use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::RngCore;

use super::*;
use crate::client_manager::{ProxyFuture, Registry};
use crate::strategy::{EvaluateSummary, FedAvg, FedAvgConfig};
use crate::types::*;

/// How a fake client behaves.
#[derive(Clone, Copy, PartialEq)]
enum Act {
    /// Adds its offset to the model.
    Honest,
    /// Every fit fails.
    Fail,
    /// Sends an update with one tensor too many.
    WrongLayout,
    /// Panics inside fit.
    Panic,
    /// Leaves (unregisters) right after answering fit.
    LeaveAfterFit,
    /// Gives NaN parameters when asked for initial parameters.
    NanInit,
    /// Never answers a request for initial parameters.
    SilentInit,
    /// Its first fit is lost with its connection (it leaves and fails).
    LostOnce,
}

/// An in-process client that "trains" by adding its offset.
struct Fake {
    node: NodeId,
    offset: f32,
    examples: u64,
    act: Act,
    registry: std::sync::Weak<Registry>,
    seen: Mutex<Vec<(u64, f32)>>,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl ClientProxy for Fake {
    fn node_id(&self) -> NodeId {
        self.node
    }
    fn get_parameters(&self, _: Config, _: Option<Duration>) -> ProxyFuture<'_, Parameters> {
        Box::pin(async move {
            if self.act == Act::SilentInit {
                std::future::pending::<()>().await;
            }
            let v = if self.act == Act::NanInit {
                f32::NAN
            } else {
                0.0
            };
            Ok(Parameters::new(vec![Tensor::new(vec![1], vec![v])?]))
        })
    }
    fn fit(&self, ins: FitIns, _: Option<Duration>) -> ProxyFuture<'_, FitRes> {
        Box::pin(async move {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            tokio::task::yield_now().await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let round = config_f64(&ins.config, "server_round", 0.0)? as u64;
            let v = ins.parameters.tensors[0].data.as_f32().unwrap()[0];
            self.seen.lock().unwrap().push((round, v));
            let mut tensors = vec![Tensor::new(vec![1], vec![v + self.offset])?];
            match self.act {
                Act::Fail => {
                    return Err(CoreError::Client {
                        node: self.node,
                        reason: "boom".into(),
                    });
                }
                Act::Panic => panic!("client code exploded"),
                Act::WrongLayout => tensors.push(Tensor::new(vec![1], vec![0.0])?),
                Act::LeaveAfterFit => {
                    if let Some(r) = self.registry.upgrade() {
                        r.unregister(self.node);
                    }
                }
                Act::LostOnce if self.seen.lock().unwrap().len() == 1 => {
                    if let Some(r) = self.registry.upgrade() {
                        r.unregister(self.node);
                    }
                    return Err(CoreError::Client {
                        node: self.node,
                        reason: "stream error: connection lost".into(),
                    });
                }
                Act::LostOnce | Act::Honest | Act::NanInit | Act::SilentInit => {}
            }
            Ok(FitRes {
                parameters: Parameters::new(tensors),
                num_examples: self.examples,
                metrics: [("train_loss".to_string(), Scalar::Double(self.offset as f64))].into(),
            })
        })
    }
    fn evaluate(&self, ins: EvaluateIns, _: Option<Duration>) -> ProxyFuture<'_, EvaluateRes> {
        Box::pin(async move {
            let v = ins.parameters.tensors[0].data.as_f32().unwrap()[0];
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

struct Fleet {
    registry: Arc<Registry>,
    clients: Vec<Arc<Fake>>,
    peak: Arc<AtomicUsize>,
}

fn fleet(spec: &[(f32, u64, Act)]) -> Fleet {
    let registry = Arc::new(Registry::new());
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let clients = spec
        .iter()
        .map(|&(offset, examples, act)| {
            let c = Arc::new(Fake {
                node: registry.next_node_id(),
                offset,
                examples,
                act,
                registry: Arc::downgrade(&registry),
                seen: Mutex::new(Vec::new()),
                in_flight: in_flight.clone(),
                peak: peak.clone(),
            });
            registry.register(c.clone());
            c
        })
        .collect();
    Fleet {
        registry,
        clients,
        peak,
    }
}

/// Keeps every checkpoint.
#[derive(Default)]
struct Keep(Mutex<Vec<Checkpoint>>);

impl RoundObserver for Keep {
    fn round_done(&self, _: &History, c: &Checkpoint) -> Result<(), CoreError> {
        self.0.lock().unwrap().push(c.clone());
        Ok(())
    }
}

fn fedavg(fit: usize, min: usize) -> FedAvg {
    FedAvg::new(FedAvgConfig {
        fit_clients: fit,
        min_available_clients: min,
        ..Default::default()
    })
    .unwrap()
}

fn config(rounds: u64) -> RunConfig {
    RunConfig {
        num_rounds: rounds,
        wait_timeout: Some(Duration::from_millis(200)),
        ..Default::default()
    }
}

#[tokio::test]
async fn rounds_average_honest_results_and_name_each_failure() {
    let f = fleet(&[
        (1.0, 1, Act::Honest),
        (4.0, 3, Act::Honest),
        (0.0, 1, Act::Fail),
        (9.0, 5, Act::WrongLayout),
        (9.0, 5, Act::Panic),
    ]);
    let mut strategy = fedavg(5, 5);
    let keep = Keep::default();
    let h = run_federation(&*f.registry, &mut strategy, &config(1), None, &keep)
        .await
        .unwrap();
    let r = &h.rounds[0];
    assert_eq!((r.fit_results, r.fit_failures), (2, 3), "{:?}", r.failures);
    assert_eq!(r.fit_metrics["train_loss"], 3.25, "(1*1 + 3*4)/4");
    let why = |node: NodeId| {
        r.failures
            .iter()
            .find(|x| x.node == Some(node))
            .map(|x| x.reason.clone())
            .unwrap_or_default()
    };
    assert!(why(f.clients[2].node).contains("boom"));
    assert!(why(f.clients[3].node).contains("expected 1 tensors, got 2"));
    assert!(why(f.clients[4].node).contains("panicked: client code exploded"));
    assert!(
        f.registry.get(f.clients[4].node).is_none(),
        "a client whose task panicked is dropped"
    );
    // Only 4 of the 5 clients FedAvg waits for are left: evaluation is
    // skipped, with its reason, and the round still counts.
    assert_eq!((r.eval_results, r.loss), (0, None));
    let skip = r.failures.iter().find(|x| x.node.is_none()).unwrap();
    assert!(
        skip.reason
            .contains("5 clients needed for evaluate, 4 connected"),
        "{skip:?}"
    );
    assert_eq!(h.status, RunStatus::Completed);
    let model = keep.0.lock().unwrap()[0].parameters.tensors[0]
        .data
        .as_f32()
        .unwrap()[0];
    assert_eq!(
        model, 3.25,
        "the global model is FedAvg over the honest two"
    );
}

#[tokio::test]
async fn a_client_leaving_after_fit_does_not_stop_the_run() {
    let f = fleet(&[
        (1.0, 1, Act::Honest),
        (1.0, 1, Act::Honest),
        (1.0, 1, Act::LeaveAfterFit),
    ]);
    let mut strategy = fedavg(2, 2);
    let h = run_federation(&*f.registry, &mut strategy, &config(3), None, &())
        .await
        .unwrap();
    assert_eq!(h.rounds.len(), 3);
    assert!(
        h.rounds
            .iter()
            .all(|r| r.skipped.is_none() && r.fit_results == 2)
    );
    assert_eq!(f.registry.num_available(), 2);
}

#[tokio::test]
async fn a_step_whose_every_client_was_lost_is_played_again_when_they_return() {
    let f = fleet(&[(1.0, 1, Act::LostOnce), (3.0, 1, Act::LostOnce)]);
    let mut strategy = fedavg(2, 2);
    let cfg = RunConfig {
        wait_timeout: None,
        ..config(2)
    };
    let rejoin = async {
        // The outage: both clients leave in their first fit, then return.
        while f.registry.num_available() > 0 {
            tokio::task::yield_now().await;
        }
        // They rejoin as new nodes, as over a network.
        for c in &f.clients {
            f.registry.register(Arc::new(Fake {
                node: f.registry.next_node_id(),
                act: Act::Honest,
                seen: Mutex::new(Vec::new()),
                registry: c.registry.clone(),
                in_flight: c.in_flight.clone(),
                peak: c.peak.clone(),
                ..**c
            }));
        }
    };
    let (h, ()) = tokio::join!(
        run_federation(&*f.registry, &mut strategy, &cfg, None, &()),
        rejoin
    );
    let h = h.unwrap();
    assert_eq!(h.rounds.len(), 2);
    let r = &h.rounds[0];
    assert_eq!(r.skipped, None);
    assert_eq!((r.fit_results, r.fit_failures), (2, 2), "{:?}", r.failures);
    assert!(
        r.failures
            .iter()
            .all(|x| x.reason.contains("connection lost"))
    );
    assert_eq!(r.eval_results, 2, "round 1 is evaluated after its replay");
    assert_eq!((h.rounds[1].fit_results, h.rounds[1].fit_failures), (2, 0));

    // Clients that answer with an error stay connected: no replay.
    let f = fleet(&[(0.0, 1, Act::Fail), (0.0, 1, Act::Fail)]);
    let mut strategy = fedavg(2, 2);
    let h = run_federation(&*f.registry, &mut strategy, &config(1), None, &())
        .await
        .unwrap();
    assert_eq!((h.rounds[0].fit_results, h.rounds[0].fit_failures), (0, 2));
}

#[tokio::test]
async fn too_few_clients_skips_rounds_until_the_policy_stops_the_run() {
    let f = fleet(&[(1.0, 1, Act::Honest)]);
    let mut strategy = fedavg(2, 2);
    let h = run_federation(&*f.registry, &mut strategy, &config(2), None, &())
        .await
        .unwrap();
    assert_eq!(h.rounds.len(), 2);
    for r in &h.rounds {
        let why = r.skipped.as_deref().unwrap();
        assert!(
            why.contains("2 clients needed for fit, 1 connected"),
            "{why}"
        );
    }
    let cfg = RunConfig {
        max_skipped_rounds: Some(1),
        ..config(5)
    };
    let saved: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    struct Rec<'a>(&'a Mutex<Vec<u64>>);
    impl RoundObserver for Rec<'_> {
        fn round_done(&self, h: &History, _: &Checkpoint) -> Result<(), CoreError> {
            self.0.lock().unwrap().push(h.last_round());
            Ok(())
        }
    }
    let err = run_federation(&*f.registry, &mut fedavg(2, 2), &cfg, None, &Rec(&saved))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("2 rounds in a row were skipped"),
        "{err}"
    );
    assert_eq!(
        *saved.lock().unwrap(),
        vec![1, 2],
        "every round was recorded"
    );
}

#[tokio::test]
async fn initial_parameters_come_from_the_first_usable_client() {
    let f = fleet(&[
        (1.0, 1, Act::NanInit),
        (1.0, 1, Act::NanInit),
        (1.0, 1, Act::Honest),
    ]);
    let (p, _) = initial_parameters(&*f.registry, &mut fedavg(1, 1), &config(1))
        .await
        .unwrap();
    assert_eq!(p.tensors[0].data, vec![0.0]);
    let bad = fleet(&[(1.0, 1, Act::NanInit)]);
    let e = initial_parameters(&*bad.registry, &mut fedavg(1, 1), &config(1))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("NaN"), "{e}");
}

/// Silent clients do not delay the initial model: several are asked at
/// once and the first usable answer wins (each silent client asked alone
/// would cost a whole call timeout, here an hour).
#[tokio::test]
async fn silent_clients_do_not_delay_the_initial_model() {
    for seed in 0..10 {
        let mut spec = vec![(1.0, 1, Act::SilentInit); 6];
        spec.insert(seed as usize % 7, (1.0, 1, Act::Honest));
        let f = fleet(&spec);
        let cfg = RunConfig {
            call_timeout: Some(Duration::from_secs(3600)),
            sample_seed: seed,
            ..config(1)
        };
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            initial_parameters(&*f.registry, &mut fedavg(1, 1), &cfg),
        )
        .await
        .expect("the honest client's answer is used at once")
        .unwrap()
        .0;
        assert_eq!(got.tensors[0].data, vec![0.0]);
    }
}

#[tokio::test]
async fn fan_out_is_bounded_and_sampling_is_reproducible() {
    let spec: Vec<_> = (0..40).map(|_| (1.0, 1, Act::Honest)).collect();
    let run = |max_in_flight| {
        let spec = spec.clone();
        async move {
            let f = fleet(&spec);
            let cfg = RunConfig {
                max_in_flight,
                sample_seed: 11,
                ..config(2)
            };
            run_federation(&*f.registry, &mut fedavg(10, 10), &cfg, None, &())
                .await
                .unwrap();
            let trained: Vec<Vec<u64>> = f
                .clients
                .iter()
                .map(|c| c.seen.lock().unwrap().iter().map(|s| s.0).collect())
                .collect();
            (f.peak.load(Ordering::SeqCst), trained)
        }
    };
    let (peak, a) = run(3).await;
    assert_eq!(peak, 3, "the bound is reached and never passed");
    let (_, b) = run(100).await;
    assert_eq!(a, b, "same seed and join order, same samples");
    assert_eq!(a.iter().map(Vec::len).sum::<usize>(), 20);
}

#[tokio::test]
async fn resumed_run_continues_from_the_checkpoint() {
    let keep = Keep::default();
    let f = fleet(&[(0.5, 1, Act::Honest), (0.25, 3, Act::Honest)]);
    let full = run_federation(&*f.registry, &mut fedavg(2, 2), &config(4), None, &keep)
        .await
        .unwrap();
    let after2 = keep.0.lock().unwrap()[1].clone();
    let g = fleet(&[(0.5, 1, Act::Honest), (0.25, 3, Act::Honest)]);
    let mut partial = full.clone();
    partial.rounds.truncate(2);
    let resume = Resume {
        checkpoint: after2.clone(),
        history: partial,
    };
    let resumed = run_federation(
        &*g.registry,
        &mut fedavg(2, 2),
        &config(4),
        Some(resume),
        &(),
    )
    .await
    .unwrap();
    assert_eq!(resumed.rounds.len(), 4);
    assert_eq!(resumed.rounds[3].loss, full.rounds[3].loss);
    let first = g.clients[0].seen.lock().unwrap()[0];
    assert_eq!(
        first,
        (3, after2.parameters.tensors[0].data.as_f32().unwrap()[0])
    );
}

/// A strategy that gives each client its own instruction: here, a learning
/// rate that depends on the client's node id; evaluation is centralized only.
struct PerClientLr {
    inner: FedAvg,
    evaluated: Vec<u64>,
}

impl Strategy for PerClientLr {
    fn min_available_clients(&self, phase: Phase) -> usize {
        match phase {
            Phase::Fit => 2,
            Phase::Evaluate => 0,
        }
    }
    fn configure_fit(
        &mut self,
        round: u64,
        parameters: &Arc<Parameters>,
        clients: &dyn ClientManager,
        _rng: &mut dyn RngCore,
    ) -> Vec<Instruction<FitIns>> {
        clients
            .all()
            .into_iter()
            .map(|c| {
                let lr = 0.1 * c.node_id().0 as f64;
                let config = [
                    ("lr".to_string(), Scalar::Double(lr)),
                    ("server_round".to_string(), Scalar::I64(round as i64)),
                ]
                .into();
                let ins = FitIns {
                    parameters: parameters.clone(),
                    config,
                };
                (c, ins)
            })
            .collect()
    }
    fn fold_fit(&mut self, round: u64, node: NodeId, res: FitRes) -> Result<(), CoreError> {
        self.inner.fold_fit(round, node, res)
    }
    fn aggregate_fit(&mut self, round: u64, current: &Parameters) -> Option<(Parameters, Metrics)> {
        self.inner.aggregate_fit(round, current)
    }
    fn evaluate(&mut self, round: u64, p: &Parameters) -> Option<EvaluateSummary> {
        self.evaluated.push(round);
        Some(EvaluateSummary {
            loss: Some(p.tensors[0].data.as_f32().unwrap()[0] as f64),
            metrics: Metrics::new(),
        })
    }
    fn configure_evaluate(
        &mut self,
        _: u64,
        _: &Arc<Parameters>,
        _: &dyn ClientManager,
        _: &mut dyn RngCore,
    ) -> Vec<Instruction<EvaluateIns>> {
        Vec::new()
    }
    fn fold_evaluate(&mut self, r: u64, n: NodeId, res: EvaluateRes) -> Result<(), CoreError> {
        self.inner.fold_evaluate(r, n, res)
    }
    fn aggregate_evaluate(&mut self, round: u64) -> EvaluateSummary {
        self.inner.aggregate_evaluate(round)
    }
}

/// A proxy that echoes the learning rate it was given as its update.
struct EchoLr(NodeId);

impl ClientProxy for EchoLr {
    fn node_id(&self) -> NodeId {
        self.0
    }
    fn get_parameters(&self, _: Config, _: Option<Duration>) -> ProxyFuture<'_, Parameters> {
        Box::pin(async { Ok(Parameters::new(vec![Tensor::new(vec![1], vec![0.0])?])) })
    }
    fn fit(&self, ins: FitIns, _: Option<Duration>) -> ProxyFuture<'_, FitRes> {
        Box::pin(async move {
            let lr = config_f64(&ins.config, "lr", 0.0)? as f32;
            Ok(FitRes {
                parameters: Parameters::new(vec![Tensor::new(vec![1], vec![lr])?]),
                num_examples: 1,
                metrics: Config::new(),
            })
        })
    }
    fn evaluate(&self, _: EvaluateIns, _: Option<Duration>) -> ProxyFuture<'_, EvaluateRes> {
        Box::pin(async { Err(CoreError::Invalid("not asked".into())) })
    }
    fn disconnect(&self, _: Option<Duration>) -> ProxyFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn per_client_instructions_and_centralized_evaluation() {
    let registry = Registry::new();
    for _ in 0..2 {
        let id = registry.next_node_id();
        registry.register(Arc::new(EchoLr(id)));
    }
    let mut s = PerClientLr {
        inner: fedavg(2, 2),
        evaluated: Vec::new(),
    };
    let h = run_federation(&registry, &mut s, &config(2), None, &())
        .await
        .unwrap();
    // Nodes 1 and 2 got lr 0.1 and 0.2: the mean is 0.15.
    let c = h.rounds[0].centralized.as_ref().unwrap();
    assert!((c.loss.unwrap() - 0.15).abs() < 1e-6, "{c:?}");
    assert_eq!(h.initial_centralized.as_ref().unwrap().loss, Some(0.0));
    assert_eq!(s.evaluated, vec![0, 1, 2]);
    assert_eq!(h.rounds[0].eval_results, 0);
}

/// A client that finishes only after every client with a higher id has:
/// results arrive in descending id order.
struct Reversed {
    node: NodeId,
    higher: usize,
    finished: Arc<tokio::sync::watch::Sender<usize>>,
}

impl ClientProxy for Reversed {
    fn node_id(&self) -> NodeId {
        self.node
    }
    fn get_parameters(&self, _: Config, _: Option<Duration>) -> ProxyFuture<'_, Parameters> {
        Box::pin(async { Ok(Parameters::new(vec![Tensor::new(vec![1], vec![0.0])?])) })
    }
    fn fit(&self, _: FitIns, _: Option<Duration>) -> ProxyFuture<'_, FitRes> {
        Box::pin(async move {
            let mut rx = self.finished.subscribe();
            let higher = self.higher;
            let _ = rx.wait_for(|&n| n >= higher).await;
            self.finished.send_modify(|n| *n += 1);
            Ok(FitRes {
                parameters: Parameters::new(vec![Tensor::new(vec![1], vec![self.node.0 as f32])?]),
                num_examples: 1,
                metrics: Config::new(),
            })
        })
    }
    fn evaluate(&self, _: EvaluateIns, _: Option<Duration>) -> ProxyFuture<'_, EvaluateRes> {
        Box::pin(async { Err(CoreError::Invalid("not asked".into())) })
    }
    fn disconnect(&self, _: Option<Duration>) -> ProxyFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// FedAvg that records the order results are folded in.
struct FoldOrder {
    inner: FedAvg,
    order: Vec<NodeId>,
}

impl Strategy for FoldOrder {
    fn min_available_clients(&self, phase: Phase) -> usize {
        self.inner.min_available_clients(phase)
    }
    fn configure_fit(
        &mut self,
        round: u64,
        parameters: &Arc<Parameters>,
        clients: &dyn ClientManager,
        rng: &mut dyn RngCore,
    ) -> Vec<Instruction<FitIns>> {
        self.inner.configure_fit(round, parameters, clients, rng)
    }
    fn fold_fit(&mut self, round: u64, node: NodeId, res: FitRes) -> Result<(), CoreError> {
        self.order.push(node);
        self.inner.fold_fit(round, node, res)
    }
    fn aggregate_fit(&mut self, round: u64, current: &Parameters) -> Option<(Parameters, Metrics)> {
        self.inner.aggregate_fit(round, current)
    }
    fn configure_evaluate(
        &mut self,
        _: u64,
        _: &Arc<Parameters>,
        _: &dyn ClientManager,
        _: &mut dyn RngCore,
    ) -> Vec<Instruction<EvaluateIns>> {
        Vec::new()
    }
    fn fold_evaluate(&mut self, r: u64, n: NodeId, res: EvaluateRes) -> Result<(), CoreError> {
        self.inner.fold_evaluate(r, n, res)
    }
    fn aggregate_evaluate(&mut self, round: u64) -> EvaluateSummary {
        self.inner.aggregate_evaluate(round)
    }
}

#[tokio::test]
async fn results_fold_in_client_order_when_asked_whatever_order_they_arrive_in() {
    for ordered in [false, true] {
        let registry = Registry::new();
        let finished = Arc::new(tokio::sync::watch::channel(0usize).0);
        let n = 6;
        for i in 0..n {
            registry.register(Arc::new(Reversed {
                node: registry.next_node_id(),
                higher: n - 1 - i,
                finished: finished.clone(),
            }));
        }
        let mut strategy = FoldOrder {
            inner: fedavg(n, n),
            order: Vec::new(),
        };
        let config = RunConfig {
            num_rounds: 1,
            fold_in_order: ordered,
            ..config(1)
        };
        run_federation(&registry, &mut strategy, &config, None, &())
            .await
            .unwrap();
        let mut ascending = registry.node_ids();
        ascending.sort();
        if ordered {
            assert_eq!(strategy.order, ascending);
        } else {
            ascending.reverse();
            assert_eq!(strategy.order, ascending, "as they arrived");
        }
    }
}
