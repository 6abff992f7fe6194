//! The subcommands: wiring of the library crates, nothing more.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use petal_client::isolation::{SubprocessClient, serve_worker};
use petal_client::{ConnectOptions, run_clients};
use petal_core::{
    Config, CoreError, FedAvgConfig, History, Registry, RoundObserver, RunConfig, RunDir,
    RunStatus, Scalar, run_federation,
};
use petal_data::{DatasetSpec, PartitionScheme, Splits};
use petal_ml::noop::NoopClient;
use petal_ml::{
    Backend, Learner, LearnerClient, LearnerPool, MakeLearner, PartitionData, PooledClient,
};
use petal_server::{GrpcServer, ServerOptions};

use crate::args::{FederationArgs, LearnerArgs, RoundArgs, TrainArgs, secs};
use crate::{ClientArgs, Isolation, NodeArgs, RunArgs, ServerArgs};

/// The run was stopped by Ctrl-C (exit status 130) or SIGTERM (143).
#[derive(Debug, thiserror::Error)]
#[error("interrupted; the history of the rounds played is in {0}")]
pub struct Interrupted(pub String, pub Stop);

/// A client stopped by Ctrl-C or SIGTERM.
#[derive(Debug, thiserror::Error)]
#[error("stopped by {0}")]
pub struct Stopped(pub Stop);

/// The signal that stopped a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl Stop {
    /// The shell's exit status for a process ended by this signal.
    pub fn exit_code(self) -> u8 {
        match self {
            Stop::Interrupt => 130,
            Stop::Terminate => 143,
        }
    }
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stop::Interrupt => "SIGINT",
            Stop::Terminate => "SIGTERM",
        })
    }
}

fn fit_config(train: &TrainArgs) -> Config {
    let mut c: Config = [
        ("epochs".to_string(), Scalar::I64(train.epochs as i64)),
        ("local_epochs".to_string(), Scalar::I64(train.epochs as i64)),
        ("lr".to_string(), Scalar::Double(train.lr)),
        ("momentum".to_string(), Scalar::Double(train.momentum)),
        (
            "batch_size".to_string(),
            Scalar::I64(train.batch_size as i64),
        ),
    ]
    .into();
    // Sent when set: the seed's clients (and Flower's) know only SGD.
    if train.optimizer != "sgd" {
        c.insert("optimizer".into(), Scalar::Str(train.optimizer.clone()));
    }
    if train.weight_decay != 0.0 {
        c.insert("weight_decay".into(), Scalar::Double(train.weight_decay));
    }
    c
}

fn server_options(round: &RoundArgs) -> anyhow::Result<ServerOptions> {
    let l = &round.limits;
    let max_message_bytes = l
        .max_message_mb
        .checked_mul(1 << 20)
        .filter(|&b| b > 0)
        .context("--max-message-mb must be between 1 and a few thousand")?;
    anyhow::ensure!(l.max_metrics >= 1, "--max-metrics must be at least 1");
    anyhow::ensure!(l.max_tensors >= 1, "--max-tensors must be at least 1");
    anyhow::ensure!(
        l.max_streams_per_connection >= 1,
        "--max-streams-per-connection must be at least 1"
    );
    anyhow::ensure!(
        l.max_connections_per_ip >= 1,
        "--max-connections-per-ip must be at least 1"
    );
    let handshake_timeout = secs(Some(l.handshake_timeout), false)?
        .filter(|d| !d.is_zero())
        .context("--handshake-timeout must be a positive number of seconds")?;
    anyhow::ensure!(round.rounds >= 1, "--rounds must be at least 1");
    let (keepalive_interval, keepalive_timeout) =
        crate::args::keepalive(l.keepalive_interval, l.keepalive_timeout)?;
    let defaults = ServerOptions::default();
    Ok(ServerOptions {
        max_message_bytes,
        limits: petal_server::limits::Limits {
            max_metrics: l.max_metrics,
            max_tensors: l.max_tensors,
            ..defaults.limits
        },
        max_streams_per_connection: l.max_streams_per_connection,
        max_connections_per_ip: l.max_connections_per_ip,
        handshake_timeout,
        keepalive_interval,
        keepalive_timeout,
        ..defaults
    })
}

/// `petal server`: serve until the federation completes; returns its history.
pub async fn server(args: &ServerArgs) -> anyhow::Result<History> {
    args.learner.train.validate()?;
    let registry = Arc::new(Registry::new());
    let mut options = server_options(&args.federation.round)?;
    options.tls = args.tls.config(args.address)?;
    if let Some(path) = &args.auth_keys {
        let keys = petal_auth::AuthorizedKeys::load(path)?;
        tracing::info!(
            "only the {} client keys of {} may join",
            keys.len(),
            path.display()
        );
        options.auth = Some(Arc::new(petal_auth::Verifier::new(
            keys,
            petal_auth::DEFAULT_WINDOW,
        )));
    }
    let prepared = prepare(&args.federation, &args.learner)?;
    let grpc = GrpcServer::start(args.address, registry.clone(), options).await?;
    let mut run = open_run_dir(&args.federation.round)?;
    let resume = run.resume.take();
    let history = federate(&registry, &run, resume, prepared).await;
    grpc.shutdown(Duration::from_secs(3)).await?;
    history
}

/// `runs/<UTC date and time>`, made unique with a suffix if needed.
fn default_run_dir() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let t = petal_core::utc::Utc::from_unix(secs);
    let stamp = format!(
        "{:04}-{:02}-{:02}T{:02}-{:02}-{:02}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    );
    let base = Path::new("runs").join(&stamp);
    let mut dir = base.clone();
    let mut n = 1;
    while dir.exists() {
        n += 1;
        dir = Path::new("runs").join(format!("{stamp}-{n}"));
    }
    dir
}

/// A run folder and how it came to be.
pub struct OpenedRun {
    pub dir: RunDir,
    pub resume: Option<petal_core::Resume>,
    /// True when this process made the folder (a failed start removes it).
    created: bool,
    /// True for the default `runs/<time>` (`runs/latest` follows it once
    /// a round is saved).
    pub default: bool,
}

impl OpenedRun {
    /// Removes the folder of a run that failed before saving a round, if
    /// this process made it: a failed start leaves nothing behind.
    pub(crate) fn discard_if_empty(&self, history: Option<&History>) {
        let saved = history.is_some_and(|h| !h.rounds.is_empty())
            || self
                .dir
                .path()
                .join(petal_core::run_dir::CHECKPOINT)
                .exists();
        if self.created && self.resume.is_none() && !saved {
            let _ = std::fs::remove_dir_all(self.dir.path());
            if self.default {
                // `runs/` itself, when this run was its first (only if empty).
                if let Some(parent) = self.dir.path().parent() {
                    let _ = std::fs::remove_dir(parent);
                }
            }
        }
    }
}

/// The run folder: the one to resume, the one asked for, or a new default;
/// a new one gets the run's settings (`config.json`).
pub(crate) fn open_run_dir(round: &RoundArgs) -> anyhow::Result<OpenedRun> {
    if let Some(dir) = &round.resume {
        let (run, resume) = RunDir::resume(dir)?;
        if resume.checkpoint.round >= round.rounds {
            bail!(
                "{} already holds {} rounds; pass --rounds N with N > {} to play more",
                dir.display(),
                resume.checkpoint.round,
                resume.checkpoint.round
            );
        }
        return Ok(OpenedRun {
            dir: run,
            resume: Some(resume),
            created: false,
            default: false,
        });
    }
    let (dir, default) = match &round.out {
        Some(d) => (d.clone(), false),
        None => (default_run_dir(), true),
    };
    let created = !dir.exists();
    let run = RunDir::create(&dir)?;
    if let Some(r) = crate::settings::RECORDED.get() {
        let json = serde_json::to_vec_pretty(r)?;
        petal_core::run_dir::write_atomic(&dir.join(crate::settings::CONFIG_JSON), &json)?;
    }
    Ok(OpenedRun {
        dir: run,
        resume: None,
        created,
        default,
    })
}

/// Saves each round in a run folder, and points `runs/latest` at a
/// default one once it holds a round.
pub(crate) struct Saver<'a> {
    dir: &'a RunDir,
    latest: std::sync::atomic::AtomicBool,
}

impl<'a> Saver<'a> {
    /// Saves in `dir`; `latest`: it is a default run folder.
    pub(crate) fn new(dir: &'a RunDir, latest: bool) -> Self {
        Saver {
            dir,
            latest: std::sync::atomic::AtomicBool::new(latest),
        }
    }

    /// Records the history and the checkpoint.
    pub(crate) fn save(
        &self,
        history: &History,
        checkpoint: &petal_core::Checkpoint,
    ) -> Result<(), CoreError> {
        self.dir.round_done(history, checkpoint)?;
        if self
            .latest
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            point_latest(self.dir.path());
        }
        Ok(())
    }
}

/// Points `runs/latest` at `dir` (a default run folder, once it holds a round).
fn point_latest(dir: &Path) {
    #[cfg(unix)]
    {
        let latest = Path::new("runs").join("latest");
        let _ = std::fs::remove_file(&latest);
        if let Some(name) = dir.file_name() {
            let _ = std::os::unix::fs::symlink(name, &latest);
        }
    }
}

/// Ctrl-C or SIGTERM, whichever comes first.
pub(crate) async fn shutdown_signal() -> Stop {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => Stop::Interrupt,
            _ = term.recv() => Stop::Terminate,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        Stop::Interrupt
    }
}

/// The strategy and the round loop's settings, made before anything is
/// started or written: a bad setting fails here.
pub(crate) struct Prepared {
    pub strategy: Box<dyn petal_core::Strategy>,
    pub config: RunConfig,
    fit_clients: usize,
    min_available_clients: usize,
}

pub(crate) fn prepare(fed: &FederationArgs, learner: &LearnerArgs) -> anyhow::Result<Prepared> {
    let f = fed.round.fraction_evaluate.unwrap_or(1.0);
    anyhow::ensure!(
        (0.0..=1.0).contains(&f),
        "--fraction-evaluate {f} is outside [0, 1]"
    );
    let fc = fit_config(&learner.train);
    let spec = fed.round.strategy.spec()?;
    let dp = fed
        .round
        .strategy
        .dp(fed.fit_clients, fed.round.sample_seed)?;
    let evaluate_fn = match fed.round.server_eval_every() {
        Some(every) => Some(server_evaluation(learner, every, fed.round.rounds)?),
        None => None,
    };
    let strategy = petal_core::strategy::build(
        &spec,
        FedAvgConfig {
            fit_clients: fed.fit_clients,
            min_available_clients: fed.min_available_clients,
            fraction_evaluate: f,
            evaluate_config: [("batch_size".to_string(), fc["batch_size"].clone())].into(),
            fit_config: fc,
            evaluate_fn,
            ..Default::default()
        },
        dp.as_ref(),
    )?;
    let config = RunConfig {
        num_rounds: fed.round.rounds,
        call_timeout: secs(Some(fed.round.call_timeout), true)?,
        wait_timeout: secs(fed.wait_timeout, false)?,
        max_skipped_rounds: fed.round.max_skipped_rounds,
        max_in_flight: fed
            .round
            .max_in_flight
            .unwrap_or(petal_core::round::DEFAULT_MAX_IN_FLIGHT),
        in_flight_bytes: (fed.round.in_flight_memory_mb > 0)
            .then(|| fed.round.in_flight_memory_mb.saturating_mul(1 << 20)),
        sample_seed: fed.round.sample_seed,
        parameter_names: None,
        initial_model_attempts: None,
        fold_in_order: false,
    };
    Ok(Prepared {
        strategy,
        config,
        fit_clients: fed.fit_clients,
        min_available_clients: fed.min_available_clients,
    })
}

async fn federate(
    registry: &Registry,
    run: &OpenedRun,
    resume: Option<petal_core::Resume>,
    prepared: Prepared,
) -> anyhow::Result<History> {
    let Prepared {
        mut strategy,
        config,
        fit_clients,
        min_available_clients,
    } = prepared;
    let run_dir = &run.dir;
    tracing::info!(
        "{} for {} rounds: {} clients trained per round, {} must be connected; results in {}",
        strategy.name(),
        config.num_rounds,
        fit_clients,
        min_available_clients,
        run_dir.path().display()
    );
    let observer = Progress::new(run_dir, run.default, config.num_rounds);
    let outcome = until_signal(registry, &mut *strategy, &config, resume, &observer).await;
    observer.clear();
    federation_outcome(run, outcome)
}

/// The federation, until it ends or Ctrl-C/SIGTERM stops it.
pub(crate) async fn until_signal(
    manager: &dyn petal_core::ClientManager,
    strategy: &mut dyn petal_core::Strategy,
    config: &RunConfig,
    resume: Option<petal_core::Resume>,
    observer: &dyn RoundObserver,
) -> Result<Result<History, CoreError>, Stop> {
    tokio::select! {
        r = run_federation(manager, strategy, config, resume, observer) => Ok(r),
        stop = shutdown_signal() => Err(stop),
    }
}

/// The history of a federation that ran to its end, failed or was stopped
/// (recorded in the run folder, summarised on the terminal).
pub(crate) fn federation_outcome(
    run: &OpenedRun,
    outcome: Result<Result<History, CoreError>, Stop>,
) -> anyhow::Result<History> {
    let run_dir = &run.dir;
    let dir = run_dir.path().display().to_string();
    match outcome {
        Err(stop) => {
            let h = run_dir.finish(RunStatus::Interrupted)?;
            eprint!("{}", h.summary());
            run.discard_if_empty(Some(&h));
            Err(Interrupted(dir, stop).into())
        }
        Ok(Err(e)) => {
            let h = run_dir.finish(RunStatus::Failed(e.to_string()))?;
            eprint!("{}", h.summary());
            run.discard_if_empty(Some(&h));
            if h.rounds.is_empty() && run.created {
                return Err(anyhow::Error::from(e).context("the run failed before its first round"));
            }
            Err(anyhow::Error::from(e).context(format!("the run failed (history in {dir})")))
        }
        Ok(Ok(_)) => {
            let h = run_dir.finish(RunStatus::Completed)?;
            print!("{}", h.summary());
            tracing::info!("history and checkpoint written to {dir}");
            Ok(h)
        }
    }
}

/// Fails when a round of `history` aggregated no training result (it was
/// skipped, or every client failed), naming why.
pub(crate) fn every_round_trained(history: &History) -> anyhow::Result<()> {
    let Some(r) = history
        .rounds
        .iter()
        .find(|r| r.skipped.is_some() || r.fit_results == 0)
    else {
        return Ok(());
    };
    let why = match &r.skipped {
        Some(s) => format!("skipped: {s}"),
        None => r
            .failures
            .iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join("; "),
    };
    bail!("round {} aggregated no training result ({why})", r.round)
}

/// Server-side evaluation: a client of the whole data set (one partition)
/// evaluating the global model on the test split, after round 0, after
/// every `every` rounds and after round `last`.
fn server_evaluation(
    learner: &LearnerArgs,
    every: u64,
    last: u64,
) -> anyhow::Result<petal_core::strategy::EvaluateFn> {
    anyhow::ensure!(every >= 1, "--server-eval-every must be at least 1");
    let mut args = learner.clone();
    args.partition_id = 0;
    args.num_partitions = 1;
    args.partition_cache = None;
    // The whole test split, whatever the clients' shares.
    args.data.examples_per_client = None;
    args.validate()?;
    anyhow::ensure!(
        args.device()? != Backend::Noop || args.python_spec().is_some(),
        "--server-eval needs a learner: the noop device has none"
    );
    let mut client: Box<dyn petal_core::Client> = match args.python_spec() {
        Some(python) => {
            let pool = Arc::new(petal_python::WorkerPool::new(
                python,
                petal_python::Mode::Inline,
                1,
                None,
            ));
            pool.start(0).map_err(|e| anyhow::anyhow!(e))?;
            Box::new(petal_python::PythonClient::new(pool, 0, 1))
        }
        None => Box::new(load_learner_client(&args)?),
    };
    let batch = Scalar::I64(args.train.batch_size as i64);
    tracing::info!(
        "server-side evaluation on the test split of {}",
        args.data.dataset
    );
    Ok(Box::new(
        move |round, parameters: &petal_core::Parameters| {
            if !(round == 0 || round % every == 0 || round == last) {
                return None;
            }
            let ins = petal_core::EvaluateIns {
                parameters: Arc::new(parameters.clone()),
                config: [
                    ("server_round".to_string(), Scalar::I64(round as i64)),
                    ("batch_size".to_string(), batch.clone()),
                ]
                .into(),
            };
            match client.evaluate(ins) {
                Ok(r) => {
                    let mut metrics: petal_core::Metrics = r
                        .metrics
                        .iter()
                        .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
                        .collect();
                    metrics.retain(|_, v| v.is_finite());
                    tracing::info!(
                        "server-side evaluation after round {round}: loss {:.4}{}",
                        r.loss,
                        metrics
                            .get("accuracy")
                            .map_or(String::new(), |a| format!(" accuracy {a:.4}"))
                    );
                    Some(petal_core::EvaluateSummary {
                        loss: Some(f64::from(r.loss)),
                        metrics,
                    })
                }
                Err(e) => {
                    tracing::warn!("server-side evaluation after round {round} failed: {e}");
                    None
                }
            }
        },
    ))
}

/// Saves each round with the run folder and shows each step's progress: a
/// bar on a terminal, a log line every 5 s otherwise.
struct Progress<'a> {
    saver: Saver<'a>,
    rounds: u64,
    bar: Option<indicatif::ProgressBar>,
    step: std::sync::Mutex<(String, std::time::Instant)>,
}

impl<'a> Progress<'a> {
    fn new(dir: &'a RunDir, latest: bool, rounds: u64) -> Self {
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            crate::output::styled_bar(
                indicatif::ProgressBar::hidden(),
                "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})",
            )
        });
        crate::output::set_bar(bar.clone());
        Progress {
            saver: Saver::new(dir, latest),
            rounds,
            bar,
            step: std::sync::Mutex::new((String::new(), std::time::Instant::now())),
        }
    }

    fn clear(&self) {
        crate::output::finish_bar(self.bar.as_ref());
    }
}

impl RoundObserver for Progress<'_> {
    fn round_done(
        &self,
        history: &History,
        checkpoint: &petal_core::Checkpoint,
    ) -> Result<(), CoreError> {
        self.saver.save(history, checkpoint)
    }

    fn step_started(&self, round: u64, phase: petal_core::Phase, clients: usize) {
        let name = format!("round {round}/{} {}", self.rounds, phase.name());
        if let Some(bar) = &self.bar {
            bar.reset();
            bar.set_length(clients as u64);
            bar.set_prefix(name.clone());
            bar.set_message(format!("0 results, 0 failures, {clients} outstanding"));
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            // Time moves on the bar while clients train.
            bar.enable_steady_tick(Duration::from_millis(250));
        }
        *self.step.lock().unwrap_or_else(|e| e.into_inner()) = (name, std::time::Instant::now());
    }

    fn step_progress(&self, results: usize, failures: usize, outstanding: usize) {
        let what = format!("{results} results, {failures} failures, {outstanding} outstanding");
        match &self.bar {
            Some(bar) => {
                bar.set_position((results + failures) as u64);
                bar.set_message(what);
            }
            None => {
                let mut step = self.step.lock().unwrap_or_else(|e| e.into_inner());
                if step.1.elapsed() >= Duration::from_secs(5) && outstanding > 0 {
                    tracing::info!("{}: {what}", step.0);
                    step.1 = std::time::Instant::now();
                }
            }
        }
    }

    fn step_finished(&self) {
        if let Some(bar) = &self.bar {
            bar.disable_steady_tick();
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
    }
}

/// This client's partition: from the partition cache when one is set and
/// readable, else decoded from the data set (and saved to the cache).
fn load_partition(args: &LearnerArgs) -> anyhow::Result<Splits> {
    let cache = args.partition_cache.as_deref();
    if let Some(path) = cache.filter(|p| p.is_file()) {
        match Splits::load(path) {
            Ok(data) => return Ok(data),
            Err(e) => tracing::warn!("ignoring the partition cache: {e}"),
        }
    }
    let data = args.data.spec()?.load_partition(
        args.data.data_dir.as_deref(),
        &args.data.sharing(args.num_partitions),
        args.partition_id,
    )?;
    if let Some(path) = cache
        && let Err(e) = data.save(path)
    {
        tracing::warn!("cannot write the partition cache: {e}");
    }
    Ok(data)
}

fn load_learner_client(args: &LearnerArgs) -> anyhow::Result<LearnerClient<Box<dyn Learner>>> {
    let data = load_partition(args)?;
    let learner = args.build_learner(data.train.shape, data.train.num_classes)?;
    Ok(LearnerClient::new(
        learner,
        data,
        args.train.options(args.seed),
    ))
}

/// `petal client`: one logical client, or `--clients K` of them sharing
/// this process, its connection and its data.
pub async fn client(args: &ClientArgs) -> anyhow::Result<()> {
    let parent_gone = async {
        if !args.stop_on_stdin_eof {
            return std::future::pending().await;
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while std::io::Read::read(&mut std::io::stdin(), &mut buf).is_ok_and(|n| n > 0) {}
            let _ = tx.send(());
        });
        let _ = rx.await;
    };
    tokio::select! {
        r = serve_clients(args) => r,
        () = parent_gone => {
            petal_client::isolation::kill_worker_groups();
            tracing::info!("stopping: the run that started this client has ended");
            Err(Stopped(Stop::Terminate).into())
        }
        stop = shutdown_signal() => {
            // The workers go with the client, mid-step or not.
            petal_client::isolation::kill_worker_groups();
            tracing::info!("stopping ({stop})");
            Err(Stopped(stop).into())
        }
    }
}

async fn serve_clients(args: &ClientArgs) -> anyhow::Result<()> {
    let learner = match &args.learner_config {
        Some(json) => LearnerArgs::from_json(json)?,
        None => args.learner.clone(),
    };
    learner.validate()?;
    if args.learner_config.is_none() && learner.num_partitions == 1 {
        let what = match learner.python_spec() {
            Some(_) => "its learner gets partition_id 0 of num_partitions 1".to_string(),
            None => format!("it trains on the whole {} data set", learner.data.dataset),
        };
        tracing::warn!(
            "--num-partitions is 1: {what} (give --partition-id and --num-partitions for a share)"
        );
    }
    let (learner, ids, slots) = share_process(learner, args.clients, args.max_concurrent_fit)?;
    let mut opts = ConnectOptions::new(&args.server);
    opts.max_attempts = args.connect_attempts;
    opts.tls = args.tls.load()?;
    (opts.keepalive_interval, opts.keepalive_timeout) =
        crate::args::keepalive(args.keepalive_interval, args.keepalive_timeout)?;
    if let Some(path) = &args.auth_key {
        let key = petal_auth::NodeKey::load(path)?;
        tracing::info!("signing joins with key {}", key.public().fingerprint());
        opts.auth = Some(key);
    }
    let cache = tempfile::Builder::new()
        .prefix("petal-client-")
        .tempdir()
        .context("creating the partition cache folder")?;
    let clients = tokio::task::block_in_place(|| {
        build_clients(
            &learner,
            ids,
            args.isolation,
            args.worker_timeout,
            slots,
            cache.path(),
        )
    })?;
    run_clients(&opts, clients, slots).await?;
    Ok(())
}

/// K clients of one process: their partitions (from `--partition-id`), how
/// many may work at once (default: the cores), and the learner settings
/// with the cores shared among those.
fn share_process(
    mut learner: LearnerArgs,
    k: usize,
    max_concurrent: Option<usize>,
) -> anyhow::Result<(LearnerArgs, std::ops::Range<usize>, usize)> {
    let first = learner.partition_id;
    let ids = first..first + k.max(1);
    if ids.end > learner.num_partitions {
        bail!(
            "partitions {first}..{} do not exist: --num-partitions is {}",
            ids.end,
            learner.num_partitions
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let slots = max_concurrent.unwrap_or(cores).max(1);
    if learner.threads == 0 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        learner.threads = (cores / slots).max(1);
    }
    Ok((learner, ids, slots))
}

/// The clients of partitions `ids` of `learner`'s data: no-op clients;
/// worker-process clients (real data decoded once, here, and each
/// partition saved in `cache` for its workers; synthetic partitions are
/// generated by the workers); or clients borrowing models from one pool,
/// sharing the decoded data (synthetic data generated per call).
fn build_clients(
    learner: &LearnerArgs,
    ids: std::ops::Range<usize>,
    isolation: Isolation,
    worker_timeout: Option<f64>,
    slots: usize,
    cache: &Path,
) -> anyhow::Result<Vec<Box<dyn petal_core::Client>>> {
    // Every client honours a server's `clipping_norm` (central DP with
    // client-side clipping), whatever its learner.
    Ok(
        learner_clients(learner, ids, isolation, worker_timeout, slots, cache)?
            .into_iter()
            .map(|c| {
                Box::new(petal_core::strategy::ClippingClient::new(c))
                    as Box<dyn petal_core::Client>
            })
            .collect(),
    )
}

/// The clients of [`build_clients`], before clipping.
fn learner_clients(
    learner: &LearnerArgs,
    ids: std::ops::Range<usize>,
    isolation: Isolation,
    worker_timeout: Option<f64>,
    slots: usize,
    cache: &Path,
) -> anyhow::Result<Vec<Box<dyn petal_core::Client>>> {
    if let Some(python) = learner.python_spec() {
        let mode = match isolation {
            Isolation::Subprocess => petal_python::Mode::Fork,
            Isolation::None => petal_python::Mode::Inline,
        };
        let processes = slots.min(ids.len()).max(1);
        let timeout = secs(worker_timeout, false)?;
        let mut pool = petal_python::WorkerPool::new(python, mode, processes, timeout);
        // The learner's threads, as for the native engine (unless set).
        for var in ["OMP_NUM_THREADS", "MKL_NUM_THREADS"] {
            if std::env::var_os(var).is_none() {
                pool = pool.with_env(var, learner.threads().to_string());
            }
        }
        let pool = Arc::new(pool);
        // Import the learner now: a learner that cannot load fails here.
        pool.start(ids.start).map_err(|e| anyhow::anyhow!(e))?;
        return Ok(ids
            .map(|id| {
                Box::new(petal_python::PythonClient::new(
                    pool.clone(),
                    id,
                    learner.num_partitions,
                )) as Box<dyn petal_core::Client>
            })
            .collect());
    }
    let spec = learner.data.spec()?;
    let sharing = learner.data.sharing(learner.num_partitions);
    let sizes = spec.check(learner.data.data_dir.as_deref(), &sharing)?;
    let backend = learner.device()?;
    if backend == Backend::Noop {
        // No data, no model: what is left is the framework.
        let examples = sizes.map_or(learner.data.synthetic_sizes().0, |(train, _)| {
            learner
                .data
                .examples_per_client
                .unwrap_or(train / learner.num_partitions)
        });
        let shape = learner.data.shape();
        return Ok(ids
            .map(|_| {
                Box::new(NoopClient::new(
                    shape,
                    10,
                    learner.noop_values,
                    examples as u64,
                )) as Box<dyn petal_core::Client>
            })
            .collect());
    }
    let load = || spec.load_partitions(learner.data.data_dir.as_deref(), &sharing, ids.clone());
    match isolation {
        Isolation::Subprocess => {
            let exe = std::env::current_exe().context("locating the petal executable")?;
            let generated = matches!(spec, DatasetSpec::Synthetic(_))
                && learner.data.partition == PartitionScheme::Iid;
            if !generated {
                for (id, part) in ids.clone().zip(load()?) {
                    part.save(&cache.join(format!("partition-{id}.bin")))?;
                }
            }
            let timeout = secs(worker_timeout, false)?;
            let names = learner.parameter_names()?;
            Ok(ids
                .map(|id| {
                    let mut l = learner.clone();
                    l.partition_id = id;
                    let file = cache.join(format!("partition-{id}.bin"));
                    l.partition_cache = file.is_file().then_some(file);
                    let worker_args = vec!["worker".into(), "--learner-config".into(), l.to_json()];
                    Box::new(
                        SubprocessClient::new(exe.clone(), worker_args)
                            .with_timeout(timeout)
                            .with_properties(petal_core::names_property(&names)),
                    ) as Box<dyn petal_core::Client>
                })
                .collect())
        }
        Isolation::None => {
            let (parts, shape, classes): (Vec<PartitionData>, [usize; 3], usize) = match &spec {
                DatasetSpec::Synthetic(s) if learner.data.partition == PartitionScheme::Iid => (
                    ids.map(|id| PartitionData::Synthetic {
                        spec: s.clone(),
                        id,
                    })
                    .collect(),
                    s.shape,
                    s.num_classes,
                ),
                _ => {
                    let parts = load()?;
                    let (shape, classes) = parts.first().map_or((learner.data.shape(), 10), |p| {
                        (p.train.shape, p.train.num_classes)
                    });
                    (
                        parts
                            .into_iter()
                            .map(|p| PartitionData::Loaded(Arc::new(p)))
                            .collect(),
                        shape,
                        classes,
                    )
                }
            };
            // A model that does not fit the data fails here, once.
            learner.build_learner(shape, classes)?;
            let args = learner.clone();
            let make: MakeLearner = Box::new(move || {
                args.build_learner(shape, classes)
                    .map_err(|e| petal_ml::MlError::Model(format!("{e:#}")))
            });
            let pool = Arc::new(LearnerPool::new(make));
            let defaults = learner.train.options(learner.seed);
            Ok(parts
                .into_iter()
                .map(|p| {
                    Box::new(PooledClient::new(p, pool.clone(), defaults.clone()))
                        as Box<dyn petal_core::Client>
                })
                .collect())
        }
    }
}

/// `petal worker`: one instruction on stdin, one reply on stdout.
pub fn worker(learner_config: &str) -> anyhow::Result<()> {
    let args = LearnerArgs::from_json(learner_config)?;
    args.validate()?;
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    serve_worker(&mut stdin.lock(), &mut stdout.lock(), || {
        load_learner_client(&args).map_err(|e| CoreError::Local(format!("{e:#}")))
    })?;
    Ok(())
}

/// `petal run`: a server plus N client processes on this machine.
pub async fn run(args: &RunArgs) -> anyhow::Result<()> {
    let min = args.min_clients.unwrap_or(args.clients);
    let fit = args.fit_clients.unwrap_or(min);
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if min > args.clients {
        bail!(
            "--min-clients {min} is more than --clients {}",
            args.clients
        );
    }
    if fit > args.clients {
        bail!(
            "--fit-clients {fit} is more than --clients {}",
            args.clients
        );
    }
    if fit > min {
        bail!("--fit-clients {fit} is more than --min-clients {min}");
    }
    anyhow::ensure!(
        args.address.ip().is_loopback() || args.insecure,
        "--address {} is reachable from other machines and `petal run` serves plaintext: \
         use a loopback address, or --insecure",
        args.address
    );
    // Check the settings and the data once here rather than in every
    // client process.
    let mut check = args.learner.clone();
    check.num_partitions = args.clients;
    check.validate()?;
    if args.learner.python_spec().is_none() {
        let spec = args.learner.data.spec()?;
        let dir = args.learner.data.data_dir.as_deref();
        let sharing = args.learner.data.sharing(args.clients);
        spec.check(dir, &sharing)?;
        spec.fetch_missing(dir)?;
        spec.check(dir, &sharing)?;
    }

    let mut round = args.round.clone();
    // Each call in flight to an isolated client is a worker process: keep
    // their number, and so this machine's memory, bounded.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers =
        args.isolation == Isolation::Subprocess && args.learner.device()? != Backend::Noop;
    if round.max_in_flight.is_none() && workers {
        round.max_in_flight = Some(16 * cores);
    }
    let fed = FederationArgs {
        round,
        min_available_clients: min,
        fit_clients: fit,
        wait_timeout: Some(args.wait_timeout),
    };
    let per_process = args.clients_per_process.clamp(1, args.clients);
    let processes = args.clients.div_ceil(per_process);
    let mut options = server_options(&fed.round)?;
    // Every client process connects from this machine.
    options.max_connections_per_ip = options.max_connections_per_ip.max(processes + 16);
    let registry = Arc::new(Registry::new());
    let mut prepared = prepare(&fed, &args.learner)?;
    // Every client is this run's own: when all of them fail to give a
    // model, none will.
    prepared.config.initial_model_attempts = Some(args.clients);
    let grpc = GrpcServer::start(args.address, registry.clone(), options).await?;
    let mut run = open_run_dir(&fed.round)?;
    let resume = run.resume.take();
    let addr = grpc.local_addr();

    let exe = std::env::current_exe().context("locating the petal executable")?;
    let slots = args
        .max_concurrent_fit
        .unwrap_or((cores / processes).max(1))
        .max(1);
    // The cores are shared by the clients that train at once.
    let trainers = fit.min(processes * slots).max(1);
    let threads = (cores / trainers).max(1);
    let mut children = tokio::task::JoinSet::new();
    let mut stdins = Vec::new();
    for p in 0..processes {
        let first = p * per_process;
        let count = per_process.min(args.clients - first);
        let mut learner = args.learner.clone();
        learner.partition_id = first;
        learner.num_partitions = args.clients;
        if learner.threads == 0 {
            learner.threads = threads;
        }
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("client")
            .arg("--stop-on-stdin-eof")
            .args(["--server", &addr.to_string()])
            .args([
                "--isolation",
                match args.isolation {
                    Isolation::Subprocess => "subprocess",
                    Isolation::None => "none",
                },
            ])
            .args(["--clients", &count.to_string()])
            .args(["--max-concurrent-fit", &slots.to_string()])
            .args(["--learner-config", &learner.to_json()])
            // Closing its stdin stops a client (and a client whose run dies
            // stops too); its own process group keeps a terminal's Ctrl-C
            // for this process, which then stops the clients in order.
            .stdin(std::process::Stdio::piped())
            // Its lines reach our stderr whole, never mid-line in another's.
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(t) = args.worker_timeout {
            cmd.args(["--worker-timeout", &t.to_string()]);
        }
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", threads.to_string());
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting client process {p}"))?;
        stdins.extend(child.stdin.take());
        if let Some(err) = child.stderr.take() {
            tokio::spawn(crate::output::relay_lines(err));
        }
        children.spawn(async move { (p, child.wait().await) });
    }
    tracing::info!(
        "started {} clients in {processes} processes for server {addr}",
        args.clients
    );

    // A client process that dies is churn: the run goes on without it, and
    // the death is reported when the run ends. When none is left, nothing
    // can join any more and the run stops.
    let mut died: Vec<String> = Vec::new();
    let federation = federate(&registry, &run, resume, prepared);
    tokio::pin!(federation);
    let history = loop {
        tokio::select! {
            h = &mut federation => break h,
            Some(joined) = children.join_next() => {
                // A client that exits 0 was told by the server that the run is over.
                if let Ok((id, status)) = joined {
                    let what = match status {
                        Ok(s) if s.success() => continue,
                        Ok(s) => s.to_string(),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!("client process {id} exited with {what} before the run finished");
                    died.push(format!("client process {id}: {what}"));
                }
                if children.is_empty() {
                    let why = format!(
                        "every client process exited before the run finished ({})",
                        died.join(", ")
                    );
                    let h = run.dir.finish(RunStatus::Failed(why.clone()))?;
                    run.discard_if_empty(Some(&h));
                    grpc.shutdown(Duration::from_secs(3)).await?;
                    bail!(why);
                }
            }
        }
    };
    if history.is_err() {
        // Interrupted or failed: the clients were not told to leave. Stop
        // them now (closing their stdin), give them a moment to end their
        // workers, then kill what is left.
        drop(stdins);
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            while children.join_next().await.is_some() {}
        })
        .await;
        children.abort_all();
        grpc.shutdown(Duration::from_millis(500)).await?;
        return history.map(|_| ());
    }
    // Clients leave once the server says goodbye.
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(joined) = children.join_next().await {
            if let Ok((id, Ok(status))) = joined
                && !status.success()
            {
                died.push(format!("client process {id}: {status}"));
            }
        }
    })
    .await;
    grpc.shutdown(Duration::from_secs(3)).await?;
    let history = history?;
    if drained.is_err() {
        tracing::warn!("some clients did not exit within 30 s of the end of the run");
    }
    if !died.is_empty() {
        bail!("client processes failed: {}", died.join(", "));
    }
    every_round_trained(&history)?;
    Ok(())
}

/// `petal partitions`: the partitions of a data set under a scheme, as a
/// table on stdout and, with `--heatmap`, a picture.
pub fn partitions(args: &crate::PartitionsArgs) -> anyhow::Result<()> {
    let n = args.num_partitions;
    anyhow::ensure!(n >= 1, "--num-partitions must be at least 1");
    let spec = args.data.spec()?;
    let scheme = args.data.partition;
    let parts = spec.load_partitions(args.data.data_dir.as_deref(), &args.data.sharing(n), 0..n)?;
    let classes = parts.first().map_or(10, |p| p.train.num_classes);
    let hist = |labels: &[u8]| {
        let mut h = vec![0usize; classes];
        for &l in labels {
            if let Some(c) = h.get_mut(l as usize) {
                *c += 1;
            }
        }
        h
    };
    println!(
        "{} in {n} partitions ({scheme}, seed {})",
        args.data.dataset, args.data.data_seed
    );
    println!(
        "{:>9} {:>7} {:>6}  training examples per class 0..{}",
        "partition",
        "train",
        "test",
        classes - 1
    );
    let mut counts = Vec::with_capacity(n);
    for (i, p) in parts.iter().enumerate() {
        let h = hist(&p.train.labels);
        let cells: Vec<String> = h.iter().map(|c| format!("{c:>5}")).collect();
        println!(
            "{i:>9} {:>7} {:>6}  {}",
            p.train.len(),
            p.test.len(),
            cells.join(" ")
        );
        counts.push(h);
    }
    let sizes: Vec<usize> = parts.iter().map(|p| p.train.len()).collect();
    let held: Vec<usize> = counts
        .iter()
        .map(|h| h.iter().filter(|&&c| c > 0).count())
        .collect();
    println!(
        "sizes: min {} max {}; classes per partition: min {} max {}",
        sizes.iter().min().unwrap_or(&0),
        sizes.iter().max().unwrap_or(&0),
        held.iter().min().unwrap_or(&0),
        held.iter().max().unwrap_or(&0)
    );
    if let Some(out) = &args.heatmap {
        let title = format!("{} · {n} partitions · {scheme}", args.data.dataset);
        crate::plot::heatmap(&counts, &title, out)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

/// `petal keys generate`.
pub fn keys_generate(out: &Path, force: bool) -> anyhow::Result<()> {
    let public = out.with_file_name(format!(
        "{}.pub",
        out.file_name()
            .map_or("petal-node-key".into(), |n| n.to_string_lossy())
    ));
    for p in [out, public.as_path()] {
        if p.exists() && !force {
            bail!("{} exists (pass --force to overwrite)", p.display());
        }
    }
    let key = petal_fleet::NodeKey::generate();
    let comment = "petal-node";
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts
            .open(out)
            .with_context(|| format!("writing {}", out.display()))?;
        f.write_all(key.private_openssh(comment).as_bytes())?;
    }
    std::fs::write(&public, key.public_openssh(comment))
        .with_context(|| format!("writing {}", public.display()))?;
    println!(
        "private key: {}\npublic key:  {}",
        out.display(),
        public.display()
    );
    Ok(())
}

/// `petal node`: SuperNodes of a Flower federation (Fleet API), one per
/// partition `--partition-id` … +K−1, sharing this process.
pub async fn node(args: &NodeArgs) -> anyhow::Result<()> {
    if !(10.0..=1800.0).contains(&args.heartbeat_interval) {
        bail!("--heartbeat-interval must be between 10 and 1800 seconds");
    }
    args.learner.validate()?;
    let max_message_bytes = args
        .max_message_mb
        .checked_mul(1 << 20)
        .filter(|&b| b > 0)
        .context("--max-message-mb must be between 1 and a few thousand")?;
    let (learner, ids, slots) =
        share_process(args.learner.clone(), args.nodes, args.max_concurrent_fit)?;
    let keys: Vec<Option<petal_fleet::NodeKey>> = match args.auth_key.len() {
        0 => ids.clone().map(|_| None).collect(),
        n if n == ids.len() => args
            .auth_key
            .iter()
            .map(|p| petal_fleet::NodeKey::load(p).map(Some))
            .collect::<Result<_, _>>()?,
        n => bail!(
            "--auth-key is given {n} times for {} nodes: give one key per node, or none",
            ids.len()
        ),
    };
    let mut connection = petal_fleet::Connection::insecure(&args.superlink);
    connection.insecure = args.insecure;
    connection.root_certificates = args.root_certificates.clone();
    let mut opts = petal_fleet::NodeOptions::new(connection);
    opts.heartbeat_interval = Duration::from_secs_f64(args.heartbeat_interval);
    opts.poll_interval = secs(Some(args.poll_interval), false)?.unwrap_or(Duration::from_secs(1));
    opts.max_attempts = args.connect_attempts;
    let python = learner.python_spec().is_some();
    opts.parameter_names = Some(learner.parameter_names()?);
    opts.max_message_bytes = max_message_bytes;
    let cache = tempfile::Builder::new()
        .prefix("petal-node-")
        .tempdir()
        .context("creating the partition cache folder")?;
    let (isolation, timeout) = (args.isolation, args.worker_timeout);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("stopping: the nodes leave the SuperLink after their current message");
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = stopping_tx.send(());
    });
    let k = ids.len();
    let work = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut clients = build_clients(
            &learner,
            ids.clone(),
            isolation,
            timeout,
            slots,
            cache.path(),
        )?;
        let mut opts = opts;
        if python {
            // The learner's own names order the arrays of each message.
            let mut first = clients
                .into_iter()
                .collect::<std::collections::VecDeque<_>>();
            let names = match first.front_mut() {
                Some(c) => c.get_parameters(&Config::new())?.names,
                None => Vec::new(),
            };
            opts.parameter_names = (!names.is_empty()).then_some(names);
            clients = first.into_iter().collect();
        }
        let slots = Arc::new(Slots::new(slots));
        std::thread::scope(|scope| {
            let mut running = Vec::with_capacity(clients.len());
            for ((client, key), id) in clients.into_iter().zip(keys).zip(ids) {
                let mut opts = opts.clone();
                opts.key = key;
                let mut client = Limited {
                    inner: client,
                    slots: slots.clone(),
                };
                let stop = &stop;
                let thread = std::thread::Builder::new()
                    .name(format!("node-{id}"))
                    .spawn_scoped(scope, move || {
                        petal_fleet::run_node(&opts, &mut client, stop)
                    })
                    .context("starting a node thread")?;
                running.push((id, thread));
            }
            Ok(running
                .into_iter()
                .map(|(id, t)| (id, t.join()))
                .collect::<Vec<_>>())
        })
    });
    tokio::pin!(work);
    // A stop is honoured within 5 s, even when a request to the SuperLink
    // is still in progress (its timeout is longer).
    let grace = async {
        if stopping.await.is_ok() {
            tokio::time::sleep(NODE_STOP_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let outcomes = tokio::select! {
        w = &mut work => w.context("the nodes' thread failed")??,
        () = grace => {
            tracing::warn!(
                "a node was still busy {} s after the stop; leaving without it",
                NODE_STOP_GRACE.as_secs()
            );
            return Ok(());
        }
    };
    let (mut replies, mut failures, mut errors) = (0, 0, Vec::new());
    for (id, outcome) in outcomes {
        match outcome {
            Ok(Ok(s)) => {
                replies += s.replies;
                failures += s.failures;
            }
            Ok(Err(e)) => errors.push(format!("node of partition {id}: {e}")),
            Err(_) => errors.push(format!("node of partition {id}: its thread panicked")),
        }
    }
    tracing::info!("node stopped after {replies} replies ({failures} failed)");
    match errors.len() {
        0 => Ok(()),
        1 if k == 1 => bail!("{}", errors[0].split_once(": ").map_or("", |(_, e)| e)),
        n => bail!("{n} of {k} nodes failed: {}", errors.join("; ")),
    }
}

/// How long `petal node` waits for its nodes after SIGTERM or Ctrl-C.
const NODE_STOP_GRACE: Duration = Duration::from_secs(4);

/// How many clients of a process may work at once.
struct Slots {
    free: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

impl Slots {
    fn new(n: usize) -> Self {
        Slots {
            free: std::sync::Mutex::new(n.max(1)),
            freed: std::sync::Condvar::new(),
        }
    }

    fn run<T>(&self, work: impl FnOnce() -> T) -> T {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        drop(free);
        struct Release<'a>(&'a Slots);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                self.0.freed.notify_one();
            }
        }
        let _release = Release(self);
        work()
    }
}

/// A client that takes a slot for each fit and evaluate.
struct Limited {
    inner: Box<dyn petal_core::Client>,
    slots: Arc<Slots>,
}

impl petal_core::Client for Limited {
    fn get_parameters(&mut self, config: &Config) -> Result<petal_core::Parameters, CoreError> {
        self.inner.get_parameters(config)
    }
    fn fit(&mut self, ins: petal_core::FitIns) -> Result<petal_core::FitRes, CoreError> {
        let inner = &mut self.inner;
        self.slots.run(|| inner.fit(ins))
    }
    fn evaluate(
        &mut self,
        ins: petal_core::EvaluateIns,
    ) -> Result<petal_core::EvaluateRes, CoreError> {
        let inner = &mut self.inner;
        self.slots.run(|| inner.evaluate(ins))
    }
}
