//! The round loop: for each round, **fit** (wait for clients → the strategy
//! samples and configures → fan out → fold each result as it arrives →
//! aggregate) → **centralized evaluation** → **federated evaluation** →
//! **record** (history and checkpoint, after every round).
//!
//! It only sees a [`ClientManager`], [`ClientProxy`] handles and a
//! [`Strategy`]: no transport, no ML framework. Nothing a client does can
//! end the run: failures, timeouts, malformed results and even a panic in a
//! client's task are recorded as that client's failure. Too few clients
//! skips the round (recorded with its reason); the run stops early only
//! when `max_skipped_rounds` rounds in a row were skipped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;

use crate::checkpoint::{Checkpoint, history_digest, tensor_names};
use crate::client_manager::{ClientManager, ClientProxy};
use crate::history::{Failure, History, RoundRecord, RunStatus};
use crate::strategy::{Instruction, Phase, Strategy};
use crate::types::{Config, CoreError, NodeId, Parameters};

/// Default longest time one fit, evaluate or get_parameters call may take.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(1800);

/// Times a step whose every client was lost is played again in one round.
const MAX_REPLAYS: usize = 3;

/// Default bound on calls in flight at once (per step).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 512;

/// Default memory for model copies in flight: 1 GiB.
pub const DEFAULT_IN_FLIGHT_BYTES: usize = 1 << 30;

/// Settings of the round loop itself (strategy settings live in the strategy).
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Number of rounds (skipped rounds count).
    pub num_rounds: u64,
    /// Longest a single call may take before it counts as a failure (and
    /// the transport drops that client); `None`: no limit.
    pub call_timeout: Option<Duration>,
    /// Longest a step waits for enough clients before it is skipped; `None`: forever.
    pub wait_timeout: Option<Duration>,
    /// Stop with an error after this many skipped rounds in a row; `None`: never.
    pub max_skipped_rounds: Option<u64>,
    /// Calls in flight at once in one step; the others wait their turn.
    pub max_in_flight: usize,
    /// Memory for model copies in flight (an instruction being sent, a
    /// reply being received or waiting to be folded each hold one): the
    /// calls in flight are also at most this divided by the model's size,
    /// so the server's memory stays a constant multiple of the model
    /// whatever the number of clients. `None`: no such bound.
    pub in_flight_bytes: Option<usize>,
    /// Seed of client sampling: each step's generator derives from it, the
    /// round and the step, so a resumed run samples as an uninterrupted one.
    pub sample_seed: u64,
    /// Names of the model's tensors in checkpoints (PyTorch `state_dict` names).
    pub parameter_names: Option<Vec<String>>,
    /// Give up on the initial model once this many clients failed to give
    /// one and no other is connected (a run whose clients are all known);
    /// `None`: wait for clients that can (a server open to anyone, where
    /// failing peers must not end the run), bounded by `wait_timeout`.
    pub initial_model_attempts: Option<usize>,
    /// Fold each step's results in ascending client id, whatever order
    /// they arrive in (a reorder buffer of at most the calls in flight):
    /// the aggregate is then the same to the bit for a seed, however
    /// many workers trained and whenever they finished. Off: each result
    /// is folded as it arrives (no buffering; float sums may differ in
    /// the last bits between runs).
    pub fold_in_order: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            num_rounds: 3,
            call_timeout: Some(DEFAULT_CALL_TIMEOUT),
            wait_timeout: None,
            max_skipped_rounds: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            in_flight_bytes: Some(DEFAULT_IN_FLIGHT_BYTES),
            sample_seed: 0,
            parameter_names: None,
            initial_model_attempts: None,
            fold_in_order: false,
        }
    }
}

/// Where a resumed run starts from.
#[derive(Debug, Clone)]
pub struct Resume {
    /// The state after the last recorded round.
    pub checkpoint: Checkpoint,
    /// The history up to that round.
    pub history: History,
}

/// Told after every round ([`RunDir`](crate::RunDir) saves the history and
/// the checkpoint) and, optionally, as each step progresses (progress bars).
pub trait RoundObserver: Send + Sync {
    /// Records the history so far and the state after the round. An error
    /// stops the run (its results could not be kept).
    fn round_done(&self, history: &History, checkpoint: &Checkpoint) -> Result<(), CoreError>;

    /// A step of `round` sent instructions to `clients` clients.
    fn step_started(&self, _round: u64, _phase: Phase, _clients: usize) {}

    /// The step's replies so far: `results` usable, `failures`, and
    /// `outstanding` still expected.
    fn step_progress(&self, _results: usize, _failures: usize, _outstanding: usize) {}

    /// The step's replies are all in.
    fn step_finished(&self) {}
}

/// Keeps nothing (tests, throw-away runs).
impl RoundObserver for () {
    fn round_done(&self, _: &History, _: &Checkpoint) -> Result<(), CoreError> {
        Ok(())
    }
}

/// Runs rounds of `strategy` over the clients of `manager` (from round 1,
/// or after the checkpoint in `resume`), records each with `observer`,
/// then tells every client to disconnect.
pub async fn run_federation(
    manager: &dyn ClientManager,
    strategy: &mut dyn Strategy,
    config: &RunConfig,
    resume: Option<Resume>,
    observer: &dyn RoundObserver,
) -> Result<History, CoreError> {
    let start = Instant::now();
    let (mut history, mut parameters, first_round, seed, names) = match resume {
        Some(r) => {
            let c = r.checkpoint;
            strategy.restore_state(c.strategy_state)?;
            tracing::info!("resuming after round {}", c.round);
            (r.history, c.parameters, c.round + 1, c.sample_seed, c.names)
        }
        None => {
            let (p, from) = initial_parameters(manager, strategy, config).await?;
            let names = parameter_names(manager, config, &p, from).await;
            let mut h = History::new();
            h.initial_centralized =
                aggregate_off_runtime(|| strategy.evaluate(0, &p)).map(|mut e| {
                    e.finite_only();
                    e
                });
            (h, Arc::new(p), 1, config.sample_seed, names)
        }
    };
    tracing::info!(
        tensors = parameters.tensors.len(),
        values = parameters.num_values(),
        "global model ready"
    );
    let elapsed_before = history.rounds.last().map_or(0.0, |r| r.elapsed_seconds);
    let names = tensor_names(Some(&names), parameters.tensors.len());
    let mut skipped_in_a_row = 0u64;
    for round in first_round..=config.num_rounds {
        let round_start = Instant::now();
        tracing::info!("[ROUND {round}]");
        let mut record = RoundRecord {
            round,
            ..Default::default()
        };
        let step = Step {
            manager,
            config,
            observer,
            round,
            seed,
        };
        match step.fit(strategy, &parameters, &mut record).await {
            Err(StepError::Fatal(e)) => return Err(e),
            Err(StepError::Skipped(reason)) => {
                tracing::warn!("round {round} skipped: {reason}");
                record.skipped = Some(reason);
            }
            Ok(new) => {
                if let Some(p) = new {
                    parameters = Arc::new(p);
                }
                record.centralized =
                    aggregate_off_runtime(|| strategy.evaluate(round, &parameters));
                step.evaluate(strategy, &parameters, &mut record).await;
            }
        }
        record.round_seconds = round_start.elapsed().as_secs_f64();
        record.elapsed_seconds = elapsed_before + start.elapsed().as_secs_f64();
        record.finite_only();
        log_round(&record);
        let skip_reason = record.skipped.clone();
        history.rounds.push(record);
        let checkpoint = Checkpoint {
            round,
            parameters: parameters.clone(),
            names: names.clone(),
            strategy_state: strategy.state(),
            sample_seed: seed,
            history_crc32: Some(history_digest(&history, round)),
        };
        // Writing (and syncing) the run folder can take seconds on a busy
        // disk: off the async runtime, so connections keep being served.
        aggregate_off_runtime(|| observer.round_done(&history, &checkpoint))?;
        match skip_reason {
            None => skipped_in_a_row = 0,
            Some(reason) => {
                skipped_in_a_row += 1;
                if let Some(max) = config.max_skipped_rounds
                    && skipped_in_a_row > max
                {
                    return Err(CoreError::Invalid(format!(
                        "{skipped_in_a_row} rounds in a row were skipped (more than \
                         --max-skipped-rounds {max}); last reason: {reason}"
                    )));
                }
            }
        }
    }
    disconnect_all(manager, config).await;
    history.status = RunStatus::Completed;
    Ok(history)
}

fn log_round(r: &RoundRecord) {
    if r.skipped.is_some() {
        return;
    }
    let show = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{x:.4}"));
    let server = r.centralized.as_ref().map_or(String::new(), |c| {
        format!(
            " (server: loss {} accuracy {})",
            show(c.loss),
            show(c.metrics.get("accuracy").copied())
        )
    });
    tracing::info!(
        "round {}: loss {} accuracy {}{server} in {:.1}s",
        r.round,
        show(r.loss),
        show(r.accuracy),
        r.round_seconds
    );
}

/// The sampling generator of one step: a function of the seed, the round
/// and the step only.
fn step_rng(seed: u64, round: u64, salt: u64) -> StdRng {
    use crate::backoff::mix64 as mix;
    StdRng::seed_from_u64(mix(seed ^ mix(round.wrapping_mul(4).wrapping_add(salt))))
}

fn salt(phase: Phase) -> u64 {
    match phase {
        Phase::Fit => 1,
        Phase::Evaluate => 2,
    }
}

/// Runs `f` (an aggregation, O(n²·d) for Krum; writing the run folder) on this worker thread
/// without holding up the runtime's other tasks, when the runtime has more
/// than one thread.
fn aggregate_off_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The reason of an error, without the node prefix when it names the client.
fn reason(e: CoreError) -> String {
    match e {
        CoreError::Client { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// Why a fit step did not run.
enum StepError {
    /// The round is skipped (recorded) and the run goes on.
    Skipped(String),
    /// The run cannot go on.
    Fatal(CoreError),
}

/// One step of one round.
struct Step<'a> {
    manager: &'a dyn ClientManager,
    config: &'a RunConfig,
    observer: &'a dyn RoundObserver,
    round: u64,
    seed: u64,
}

impl Step<'_> {
    /// Calls in flight at once for a model of `parameters`' size.
    fn in_flight(&self, parameters: &Parameters) -> usize {
        let model = parameters.num_values().saturating_mul(4).max(1);
        let by_memory = self
            .config
            .in_flight_bytes
            .map_or(usize::MAX, |b| b / model);
        self.config.max_in_flight.min(by_memory).max(1)
    }

    /// Waits (at most the wait timeout) for `n` connected clients.
    async fn wait_for(&self, n: usize, phase: Phase) -> Result<(), String> {
        let available = self.manager.num_available();
        if available >= n {
            return Ok(());
        }
        tracing::info!(
            "{}: waiting for {n} clients ({available} connected)",
            phase.name()
        );
        if self.manager.wait_for(n, self.config.wait_timeout).await {
            return Ok(());
        }
        Err(format!(
            "{n} clients needed for {}, {} connected after waiting {:.0}s",
            phase.name(),
            self.manager.num_available(),
            self.config.wait_timeout.unwrap_or_default().as_secs_f64()
        ))
    }

    /// The fit step; `Err` when it was skipped or cannot run at all,
    /// `Ok(None)` when no result could be aggregated (the global model stays).
    async fn fit(
        &self,
        strategy: &mut dyn Strategy,
        parameters: &Arc<Parameters>,
        record: &mut RoundRecord,
    ) -> Result<Option<Parameters>, StepError> {
        let mut replays = 0;
        loop {
            let first_failure = record.failures.len();
            self.fit_once(strategy, parameters, record).await?;
            let results = record.fit_results;
            if !self.replay(
                Phase::Fit,
                results,
                &record.failures[first_failure..],
                &mut replays,
            ) {
                break;
            }
        }
        let aggregated = aggregate_off_runtime(|| strategy.aggregate_fit(self.round, parameters));
        Ok(aggregated.and_then(|(p, metrics)| {
            record.fit_metrics = metrics;
            match p.check_like(parameters) {
                Ok(()) => Some(p.cast_like(parameters)),
                Err(e) => {
                    tracing::error!(
                        "aggregate_fit produced an invalid model ({e}); keeping the previous one"
                    );
                    None
                }
            }
        }))
    }

    /// Whether a step that gave no result is played again: when its
    /// `failures` all belong to clients that are gone (a network outage, a
    /// server whose link went down), at most [`MAX_REPLAYS`] times. Clients
    /// that answered with an error stay connected, so their failures never
    /// cause a replay.
    fn replay(
        &self,
        phase: Phase,
        results: usize,
        failures: &[Failure],
        replays: &mut usize,
    ) -> bool {
        let all_lost = !failures.is_empty()
            && failures
                .iter()
                .all(|f| f.node.is_some_and(|n| self.manager.get(n).is_none()));
        if results > 0 || *replays >= MAX_REPLAYS || !all_lost {
            return false;
        }
        *replays += 1;
        tracing::warn!(
            "round {}: every client sampled to {} was lost; playing the step again once enough \
             clients are connected (replay {replays}/{MAX_REPLAYS})",
            self.round,
            phase.name()
        );
        true
    }

    /// One attempt at the fit step: sample, fan out, fold.
    async fn fit_once(
        &self,
        strategy: &mut dyn Strategy,
        parameters: &Arc<Parameters>,
        record: &mut RoundRecord,
    ) -> Result<(), StepError> {
        self.wait_for(strategy.min_available_clients(Phase::Fit), Phase::Fit)
            .await
            .map_err(StepError::Skipped)?;
        let mut rng = step_rng(self.seed, self.round, salt(Phase::Fit));
        let mut instructions =
            strategy.configure_fit(self.round, parameters, self.manager, &mut rng);
        if self.config.fold_in_order {
            instructions.sort_by_key(|(c, _)| c.node_id());
        }
        if instructions.is_empty() {
            return Err(StepError::Skipped(
                "configure_fit selected no clients".into(),
            ));
        }
        if strategy.buffers_results()
            && let Some(budget) = self.config.in_flight_bytes
        {
            // Every result is kept until aggregation, and read as f64 then.
            let per = parameters
                .num_bytes()
                .saturating_add(parameters.num_values() * 8);
            let need = per.saturating_mul(instructions.len());
            if need > budget {
                return Err(StepError::Fatal(CoreError::Invalid(format!(
                    "{} keeps every result of a round until it aggregates: {} clients × {} MiB \
                     = {} MiB, more than --in-flight-memory-mb {}; raise it or train fewer \
                     clients per round",
                    strategy.name(),
                    instructions.len(),
                    per >> 20,
                    need >> 20,
                    budget >> 20
                ))));
            }
        }
        tracing::info!(
            "configure_fit: strategy sampled {} clients (out of {})",
            instructions.len(),
            self.manager.num_available()
        );
        let timeout = self.config.call_timeout;
        let round = self.round;
        self.observer
            .step_started(round, Phase::Fit, instructions.len());
        fan_out(
            self.manager,
            self.observer,
            instructions,
            self.in_flight(parameters),
            self.config.fold_in_order,
            |c, ins| async move { c.fit(ins, timeout).await },
            |node, result| {
                let folded = result.and_then(|res| {
                    res.parameters.check_like(parameters)?;
                    strategy.fold_fit(round, node, res)
                });
                match folded {
                    Ok(()) => {
                        record.fit_results += 1;
                        true
                    }
                    Err(e) => {
                        record.fit_failures += 1;
                        failure(record, node, Phase::Fit, reason(e));
                        false
                    }
                }
            },
        )
        .await;
        tracing::info!(
            "aggregate_fit: received {} results and {} failures",
            record.fit_results,
            record.fit_failures
        );
        Ok(())
    }

    /// The federated evaluation step.
    async fn evaluate(
        &self,
        strategy: &mut dyn Strategy,
        parameters: &Arc<Parameters>,
        record: &mut RoundRecord,
    ) {
        let mut replays = 0;
        loop {
            let first_failure = record.failures.len();
            if !self.evaluate_once(strategy, parameters, record).await {
                return;
            }
            let results = record.eval_results;
            if !self.replay(
                Phase::Evaluate,
                results,
                &record.failures[first_failure..],
                &mut replays,
            ) {
                break;
            }
        }
        let mut summary = strategy.aggregate_evaluate(self.round);
        record.loss = summary.loss;
        record.accuracy = summary.metrics.remove("accuracy");
        record.metrics = summary.metrics;
    }

    /// One attempt at the federated evaluation step.
    async fn evaluate_once(
        &self,
        strategy: &mut dyn Strategy,
        parameters: &Arc<Parameters>,
        record: &mut RoundRecord,
    ) -> bool {
        let min = strategy.min_available_clients(Phase::Evaluate);
        if min > 0
            && let Err(why) = self.wait_for(min, Phase::Evaluate).await
        {
            tracing::warn!("evaluation of round {} skipped: {why}", self.round);
            record.failures.push(Failure {
                node: None,
                phase: "evaluate".into(),
                reason: format!("skipped: {why}"),
            });
            return false;
        }
        let mut rng = step_rng(self.seed, self.round, salt(Phase::Evaluate));
        let mut instructions =
            strategy.configure_evaluate(self.round, parameters, self.manager, &mut rng);
        if self.config.fold_in_order {
            instructions.sort_by_key(|(c, _)| c.node_id());
        }
        if instructions.is_empty() {
            return false;
        }
        tracing::info!(
            "configure_evaluate: strategy sampled {} clients (out of {})",
            instructions.len(),
            self.manager.num_available()
        );
        let timeout = self.config.call_timeout;
        let round = self.round;
        self.observer
            .step_started(round, Phase::Evaluate, instructions.len());
        fan_out(
            self.manager,
            self.observer,
            instructions,
            self.in_flight(parameters),
            self.config.fold_in_order,
            |c, ins| async move { c.evaluate(ins, timeout).await },
            |node, result| match result.and_then(|res| strategy.fold_evaluate(round, node, res)) {
                Ok(()) => {
                    record.eval_results += 1;
                    true
                }
                Err(e) => {
                    record.eval_failures += 1;
                    failure(record, node, Phase::Evaluate, reason(e));
                    false
                }
            },
        )
        .await;
        tracing::info!(
            "aggregate_evaluate: received {} results and {} failures",
            record.eval_results,
            record.eval_failures
        );
        true
    }
}

fn failure(record: &mut RoundRecord, node: NodeId, phase: Phase, reason: String) {
    let reason = truncate_reason(&reason);
    tracing::warn!("{node}: {} failed: {reason}", phase.name());
    record.failures.push(Failure {
        node: Some(node),
        phase: phase.name().into(),
        reason,
    });
}

/// Sends every instruction with `call`, at most `max_in_flight` at once,
/// and hands each outcome to `on_result` (true: a usable result) as soon as
/// it arrives, or with `ordered` in the instructions' order (outcomes that
/// arrive early wait in a buffer of at most `max_in_flight`). A call whose
/// task panics is that client's failure, and the client is dropped.
async fn fan_out<I, R, F, Fut>(
    manager: &dyn ClientManager,
    observer: &dyn RoundObserver,
    instructions: Vec<Instruction<I>>,
    max_in_flight: usize,
    ordered: bool,
    call: F,
    mut on_result: impl FnMut(NodeId, Result<R, CoreError>) -> bool,
) where
    I: Send + 'static,
    R: Send + 'static,
    F: Fn(Arc<dyn ClientProxy>, I) -> Fut,
    Fut: Future<Output = Result<R, CoreError>> + Send + 'static,
{
    let total = instructions.len();
    let mut pending = instructions.into_iter().enumerate();
    let mut tasks = JoinSet::new();
    let mut owners: HashMap<tokio::task::Id, (usize, NodeId)> = HashMap::new();
    let mut early: BTreeMap<usize, (NodeId, Result<R, CoreError>)> = BTreeMap::new();
    let mut next = 0usize;
    let (mut done, mut failed) = (0usize, 0usize);
    loop {
        // Buffered outcomes count against the bound: the buffer stays small.
        while tasks.len() + early.len() < max_in_flight.max(1) {
            let Some((seq, (client, ins))) = pending.next() else {
                break;
            };
            let node = client.node_id();
            let handle = tasks.spawn(call(client, ins));
            owners.insert(handle.id(), (seq, node));
        }
        let Some(joined) = tasks.join_next_with_id().await else {
            break;
        };
        let (owner, result) = match joined {
            Ok((id, r)) => (owners.remove(&id), r),
            Err(e) => {
                let owner = owners.remove(&e.id());
                let why = if e.is_panic() {
                    let payload = e.into_panic();
                    let msg = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    format!("the server's task for this client panicked: {msg}")
                } else {
                    "the server's task for this client was cancelled".to_string()
                };
                if let Some((_, n)) = owner {
                    manager.drop_client(n);
                }
                (owner, Err(CoreError::Invalid(why)))
            }
        };
        let Some((seq, node)) = owner else {
            tracing::error!("a result arrived from an unknown task");
            failed += 1;
            continue;
        };
        let ready: Vec<(NodeId, Result<R, CoreError>)> = if ordered {
            early.insert(seq, (node, result));
            let mut ready = Vec::new();
            while let Some(r) = early.remove(&next) {
                ready.push(r);
                next += 1;
            }
            ready
        } else {
            vec![(node, result)]
        };
        for (node, result) in ready {
            if on_result(node, result) {
                done += 1;
            } else {
                failed += 1;
            }
            observer.step_progress(done, failed, total.saturating_sub(done + failed));
        }
    }
    observer.step_finished();
}

/// Clients asked for the initial parameters at once: a silent client
/// costs the others nothing, and the first usable answer wins.
const INITIAL_PARAMETERS_AT_ONCE: usize = 8;

/// Parameters from the strategy, or from the clients: up to
/// [`INITIAL_PARAMETERS_AT_ONCE`] are asked at once (more as they join or
/// fail), and the first usable model wins. The calls still running then
/// finish in the background, their answers unused, so no stream is left
/// out of step.
async fn initial_parameters(
    manager: &dyn ClientManager,
    strategy: &mut dyn Strategy,
    config: &RunConfig,
) -> Result<(Parameters, Option<NodeId>), CoreError> {
    if let Some(p) = strategy.initialize_parameters() {
        p.check_like(&p)
            .map_err(|e| CoreError::NoInitialParameters(format!("from the strategy: {e}")))?;
        tracing::info!("using initial parameters provided by the strategy");
        return Ok((p, None));
    }
    let mut rng = step_rng(config.sample_seed, 0, 0);
    let mut tried: BTreeSet<NodeId> = BTreeSet::new();
    let mut failures: Vec<String> = Vec::new();
    let mut asking: JoinSet<(NodeId, Result<Parameters, String>)> = JoinSet::new();
    let timeout = config.call_timeout;
    loop {
        let ids = manager.node_ids();
        let mut fresh: Vec<NodeId> = ids.iter().copied().filter(|n| !tried.contains(n)).collect();
        if asking.is_empty()
            && fresh.is_empty()
            && config
                .initial_model_attempts
                .is_some_and(|n| failures.len() >= n.max(1))
        {
            return Err(CoreError::NoInitialParameters(format!(
                "all {} clients asked failed: {}",
                failures.len(),
                failures.join("; ")
            )));
        }
        while asking.len() < INITIAL_PARAMETERS_AT_ONCE && !fresh.is_empty() {
            let node = fresh.swap_remove(rng.random_range(0..fresh.len()));
            tried.insert(node);
            let Some(client) = manager.get(node) else {
                continue;
            };
            tracing::info!("requesting initial parameters from {node}");
            asking.spawn(async move {
                let outcome = match client.get_parameters(Config::new(), timeout).await {
                    Ok(p) if p.tensors.is_empty() => Err("sent no tensors".to_string()),
                    Ok(p) => p.check_like(&p).map(|()| p).map_err(|e| e.to_string()),
                    Err(e) => Err(reason(e)),
                };
                (node, outcome)
            });
        }
        let more = ids.len() + 1;
        let joined = if asking.is_empty() {
            if !manager.wait_for(more, config.wait_timeout).await {
                let why = if failures.is_empty() {
                    "no client connected".to_string()
                } else {
                    failures.join("; ")
                };
                return Err(CoreError::NoInitialParameters(why));
            }
            continue;
        } else if asking.len() < INITIAL_PARAMETERS_AT_ONCE {
            tokio::select! {
                j = asking.join_next_with_id() => j,
                _ = manager.wait_for(more, None) => continue,
            }
        } else {
            asking.join_next_with_id().await
        };
        let (node, outcome) = match joined {
            Some(Ok((_, answer))) => answer,
            Some(Err(e)) => {
                let why = format!("the server's task for this client failed: {e}");
                tracing::warn!("get_parameters: {why}");
                failures.push(why);
                continue;
            }
            None => continue,
        };
        match outcome {
            Ok(p) => {
                tracing::info!("initial parameters from {node}");
                asking.detach_all();
                return Ok((p, Some(node)));
            }
            Err(why) => {
                tracing::warn!("{node}: get_parameters failed: {why}");
                failures.push(format!("{node}: {}", truncate_reason(&why)));
            }
        }
    }
}

/// The names of the model's tensors: the parameters' own, else those the
/// client that gave them reports (Petal clients do, over any transport),
/// else the configured ones; empty when none fits.
async fn parameter_names(
    manager: &dyn ClientManager,
    config: &RunConfig,
    p: &Parameters,
    from: Option<NodeId>,
) -> Vec<String> {
    let fits = |n: &[String]| n.len() == p.tensors.len();
    if fits(&p.names) {
        return p.names.clone();
    }
    if let Some(client) = from.and_then(|n| manager.get(n)) {
        let timeout = config.call_timeout.map(|t| t.min(Duration::from_secs(30)));
        let asked = client.get_properties(Config::new(), timeout).await;
        if let Some(names) = asked
            .ok()
            .as_ref()
            .and_then(crate::client::names_from_properties)
            .filter(|n| fits(n))
        {
            return names;
        }
    }
    config
        .parameter_names
        .clone()
        .filter(|n| fits(n))
        .unwrap_or_default()
}

/// Longest failure reason kept (a reason may quote what a client sent).
pub const MAX_REASON_CHARS: usize = 500;

/// `why`, cut to [`MAX_REASON_CHARS`] characters.
pub fn truncate_reason(why: &str) -> String {
    match why.char_indices().nth(MAX_REASON_CHARS) {
        None => why.to_string(),
        Some((i, _)) => format!("{}… ({} bytes in all)", &why[..i], why.len()),
    }
}

async fn disconnect_all(manager: &dyn ClientManager, config: &RunConfig) {
    let clients: Vec<_> = manager.all().into_iter().map(|c| (c, ())).collect();
    let timeout = config.call_timeout.map(|t| t.min(Duration::from_secs(10)));
    fan_out(
        manager,
        &(),
        clients,
        config.max_in_flight,
        false,
        |c, ()| async move { c.disconnect(timeout).await },
        |node, r| match r {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("{node}: disconnect: {e}");
                false
            }
        },
    )
    .await;
}

#[cfg(test)]
mod tests;
