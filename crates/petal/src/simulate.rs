//! `petal simulate`: N virtual clients of Petal's engine in this process
//! (`petal-sim`), on the round loop, strategies, history, checkpoints and
//! `--resume` of `petal run`, and `petal sim-worker`, the worker process of
//! `--isolation process`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use petal_core::{
    Client, ClientManager, Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, History,
    Parameters, RoundObserver, RunDir,
};
use petal_data::{DatasetSpec, ImageSet, PartitionScheme, Shares, Sharing, Splits, SyntheticSpec};
use petal_ml::{Backend, Learner, TrainOptions};
use petal_sim::process::WorkerCommand;
use petal_sim::{Federation, Isolation, MakeReplica, Replica, WorkerPool};

use crate::args::{FederationArgs, LearnerArgs};
use crate::commands::{
    every_round_trained, federation_outcome, open_run_dir, prepare, until_signal,
};
use crate::{SimIsolation, SimulateArgs};

/// Most workers a simulation may start.
const MAX_WORKERS: usize = 1024;

/// The data of every virtual client: one loaded data set and each
/// client's indices, or synthetic images made when a client needs them.
#[derive(Clone)]
enum SimData {
    Loaded {
        splits: Arc<Splits>,
        shares: Arc<Shares>,
    },
    Generated {
        spec: SyntheticSpec,
        sharing: Sharing,
    },
}

impl SimData {
    fn load(learner: &LearnerArgs, clients: usize) -> anyhow::Result<Self> {
        let spec = learner.data.spec()?;
        let sharing = learner.data.sharing(clients);
        if let DatasetSpec::Synthetic(spec) = spec {
            return Ok(SimData::Generated { spec, sharing });
        }
        let splits = spec.load(learner.data.data_dir.as_deref())?;
        let shares = Shares::compute(&splits, &sharing)?;
        tracing::info!(
            "{} clients' shares of {}: {} KiB of indices",
            clients,
            learner.data.dataset,
            shares.index_bytes() >> 10
        );
        Ok(SimData::Loaded {
            splits: Arc::new(splits),
            shares: Arc::new(shares),
        })
    }

    /// Client `partition`'s training (or test) examples, into `out` (its
    /// buffers reused from one client to the next).
    fn split_into(
        &self,
        partition: usize,
        test: bool,
        out: &mut ImageSet,
    ) -> Result<(), CoreError> {
        let bad = |e: petal_data::DataError| CoreError::Local(e.to_string());
        match self {
            SimData::Loaded { splits, shares } => {
                let (set, lists) = if test {
                    (&splits.test, &shares.test)
                } else {
                    (&splits.train, &shares.train)
                };
                let indices = lists
                    .get(partition)
                    .ok_or_else(|| CoreError::Local(format!("no virtual client {partition}")))?;
                set.select_into(indices, out);
                Ok(())
            }
            SimData::Generated { spec, sharing } if sharing.scheme == PartitionScheme::Iid => {
                spec.generate_split_into(partition, test, out).map_err(bad)
            }
            SimData::Generated { spec, sharing } => {
                let p = spec
                    .generate_partition_by(sharing.scheme, partition, sharing.clients, sharing.seed)
                    .map_err(bad)?;
                *out = if test { p.test } else { p.train };
                Ok(())
            }
        }
    }

    /// Example shape and number of classes.
    fn shape(&self) -> ([usize; 3], usize) {
        match self {
            SimData::Loaded { splits, .. } => (splits.train.shape, splits.train.num_classes),
            SimData::Generated { spec, .. } => (spec.shape, spec.num_classes),
        }
    }
}

/// One worker's model acting as any virtual client.
struct LearnerReplica {
    model: Model,
    data: SimData,
    defaults: TrainOptions,
    /// The current client's examples (buffers reused).
    scratch: ImageSet,
}

enum Model {
    Learner(Box<dyn Learner>),
    /// `--device noop`: no training at all (measures the framework).
    Noop(petal_ml::noop::NoopClient),
}

impl LearnerReplica {
    fn new(learner: &LearnerArgs, data: SimData) -> Result<Self, CoreError> {
        let local = |e: &dyn std::fmt::Display| CoreError::Local(e.to_string());
        let backend = learner.device().map_err(|e| local(&e))?;
        let (shape, classes) = data.shape();
        let mut scratch = ImageSet::pixels(shape, classes);
        let model = if backend == Backend::Noop {
            data.split_into(0, false, &mut scratch)?;
            let examples = scratch.len() as u64;
            Model::Noop(petal_ml::noop::NoopClient::new(
                shape,
                classes,
                learner.noop_values,
                examples,
            ))
        } else {
            Model::Learner(
                learner
                    .build_learner(shape, classes)
                    .map_err(|e| CoreError::Local(format!("{e:#}")))?,
            )
        };
        Ok(LearnerReplica {
            model,
            data,
            defaults: learner.train.options(learner.seed),
            scratch,
        })
    }
}

impl Replica for LearnerReplica {
    fn client(&mut self, partition: usize) -> Result<Box<dyn Client + '_>, CoreError> {
        // Every client honours a server's `clipping_norm`, as in `petal run`.
        Ok(Box::new(petal_core::strategy::ClippingClient::new(
            VirtualClient {
                replica: self,
                partition,
            },
        )))
    }
}

/// Virtual client `partition`, on a worker's replica.
struct VirtualClient<'a> {
    replica: &'a mut LearnerReplica,
    partition: usize,
}

impl Client for VirtualClient<'_> {
    fn get_parameters(&mut self, config: &Config) -> Result<Parameters, CoreError> {
        match &mut self.replica.model {
            Model::Learner(l) => petal_ml::learner_parameters(&**l),
            Model::Noop(n) => n.get_parameters(config),
        }
    }

    fn fit(&mut self, ins: FitIns) -> Result<FitRes, CoreError> {
        let r = &mut *self.replica;
        match &mut r.model {
            Model::Learner(l) => {
                r.data.split_into(self.partition, false, &mut r.scratch)?;
                petal_ml::fit_on(&mut **l, &r.scratch, &r.defaults, &ins)
            }
            Model::Noop(n) => n.fit(ins),
        }
    }

    fn evaluate(&mut self, ins: EvaluateIns) -> Result<EvaluateRes, CoreError> {
        let r = &mut *self.replica;
        match &mut r.model {
            Model::Learner(l) => {
                r.data.split_into(self.partition, true, &mut r.scratch)?;
                petal_ml::evaluate_on(&mut **l, &r.scratch, &r.defaults, &ins)
            }
            Model::Noop(n) => n.evaluate(ins),
        }
    }

    fn get_properties(&mut self, config: &Config) -> Result<Config, CoreError> {
        let p = self.get_parameters(config)?;
        Ok(petal_core::names_property(&p.names))
    }
}

/// The learner settings of the simulation's workers: every client's
/// partition among `clients`, one engine thread per worker (unless set).
fn worker_learner(args: &SimulateArgs) -> LearnerArgs {
    let mut l = args.learner.clone();
    l.num_partitions = args.clients;
    l.partition_id = 0;
    if l.threads == 0 {
        l.threads = 1;
    }
    l
}

/// Checks the settings before anything starts; returns (fit clients, workers).
fn check(args: &SimulateArgs) -> anyhow::Result<(usize, usize)> {
    anyhow::ensure!(args.clients >= 1, "--clients must be at least 1");
    let fit = args.fit_clients.unwrap_or(args.clients);
    anyhow::ensure!(
        (1..=args.clients).contains(&fit),
        "--fit-clients {fit} is outside 1..={} (--clients)",
        args.clients
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = args.workers.unwrap_or(cores);
    anyhow::ensure!(
        (1..=MAX_WORKERS).contains(&workers),
        "--workers {workers} is outside 1..={MAX_WORKERS}"
    );
    anyhow::ensure!(
        args.learner.python_spec().is_none(),
        "petal simulate trains Petal's own engine; a python: learner runs under \
         `petal run --learner python:FILE:NAME`"
    );
    anyhow::ensure!(args.round.rounds >= 1, "--rounds must be at least 1");
    worker_learner(args).validate()?;
    Ok((fit, workers))
}

/// `petal simulate`.
pub async fn simulate(args: &SimulateArgs) -> anyhow::Result<()> {
    let (fit, workers) = check(args)?;
    let learner = worker_learner(args);
    let spec = learner.data.spec()?;
    let dir = learner.data.data_dir.as_deref();
    let sharing = learner.data.sharing(args.clients);
    spec.check(dir, &sharing)?;
    spec.fetch_missing(dir)?;
    spec.check(dir, &sharing)?;

    let mut round = args.round.clone();
    let server_eval = round.server_eval_every().is_some();
    // Federated evaluation: none when the server evaluates, else as many
    // clients as train (all N clients evaluating each round is rarely
    // what a simulation wants).
    round.fraction_evaluate = Some(round.fraction_evaluate.unwrap_or(if server_eval {
        0.0
    } else {
        fit as f64 / args.clients as f64
    }));
    let fed = FederationArgs {
        round,
        min_available_clients: fit,
        fit_clients: fit,
        wait_timeout: Some(0.0),
    };
    // The server's own evaluation uses every core between rounds.
    let mut server_learner = learner.clone();
    server_learner.threads = args.learner.threads;
    let mut prepared = prepare(&fed, &server_learner)?;
    prepared.config.fold_in_order = true;
    prepared.config.wait_timeout = None;
    prepared.config.call_timeout = None;
    prepared.config.max_in_flight = fed.round.max_in_flight.unwrap_or(2 * workers).max(1);

    let isolation = match args.isolation {
        SimIsolation::Thread => {
            // Loaded once, shared by the workers (process workers load their own).
            let data = tokio::task::block_in_place(|| SimData::load(&learner, args.clients))?;
            let learner = learner.clone();
            let make: MakeReplica = Arc::new(move |_| {
                Ok(Box::new(LearnerReplica::new(&learner, data.clone())?) as Box<dyn Replica>)
            });
            Isolation::Threads(make)
        }
        SimIsolation::Process => Isolation::Processes(WorkerCommand {
            program: std::env::current_exe().context("locating the petal executable")?,
            args: vec![
                "sim-worker".into(),
                "--learner-config".into(),
                learner.to_json(),
            ],
            env: vec![("RAYON_NUM_THREADS".into(), learner.threads().to_string())],
            recycle_after: args.recycle_after,
        }),
    };
    let pool = Arc::new(WorkerPool::new(workers, isolation)?);
    let federation = Federation::new(args.clients, pool.clone());
    // A model that cannot be built fails here, once, not once per client.
    if let Some(first) = federation.get(petal_sim::node_of(0)) {
        first
            .get_parameters(Config::new(), None)
            .await
            .map_err(|e| anyhow::anyhow!("the workers cannot build the model: {e}"))?;
    }

    let mut run = open_run_dir(&fed.round)?;
    let resume = run.resume.take();
    tracing::info!(
        "simulating {} clients ({} per round) on {workers} {} workers for {} rounds; results in {}",
        args.clients,
        fit,
        match args.isolation {
            SimIsolation::Thread => "thread",
            SimIsolation::Process => "process",
        },
        prepared.config.num_rounds,
        run.dir.path().display()
    );
    let first_round = resume.as_ref().map_or(1, |r| r.checkpoint.round + 1);
    let observer = SimProgress::new(
        &run.dir,
        run.default,
        pool.clone(),
        first_round,
        prepared.config.num_rounds,
        !args.no_progress,
    );
    let mut strategy = prepared.strategy;
    let outcome = until_signal(
        &federation,
        &mut *strategy,
        &prepared.config,
        resume,
        &observer,
    )
    .await;
    observer.clear();
    let stats = pool.stats();
    tracing::info!(
        "{} tasks ({} failed){}",
        stats.tasks.load(Ordering::Relaxed),
        stats.failures.load(Ordering::Relaxed),
        match args.isolation {
            SimIsolation::Thread => String::new(),
            SimIsolation::Process => format!(
                " on {} worker processes (each replaced after {} tasks)",
                stats.processes.load(Ordering::Relaxed),
                args.recycle_after
            ),
        }
    );
    let history = federation_outcome(&run, outcome)?;
    every_round_trained(&history)
}

/// `petal sim-worker`: answers simulation tasks on stdin until it closes.
pub fn worker(learner_config: &str) -> anyhow::Result<()> {
    let learner = LearnerArgs::from_json(learner_config)?;
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    petal_sim::process::serve(&mut stdin.lock(), &mut stdout.lock(), || {
        let data = SimData::load(&learner, learner.num_partitions)
            .map_err(|e| CoreError::Local(format!("{e:#}")))?;
        Ok(Box::new(LearnerReplica::new(&learner, data)?) as Box<dyn Replica>)
    })?;
    Ok(())
}

/// Resident memory of this process, in bytes (Linux; `None` elsewhere).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Saves each round with the run folder and shows rounds done, clients
/// per second, time left and memory in use: a bar on a terminal, else a
/// log line every 5 s, every tenth round and after the last.
struct SimProgress<'a> {
    saver: crate::commands::Saver<'a>,
    pool: Arc<WorkerPool>,
    bar: Option<indicatif::ProgressBar>,
    start: Instant,
    first_round: u64,
    rounds: u64,
    last_line: std::sync::Mutex<Option<Instant>>,
}

impl<'a> SimProgress<'a> {
    fn new(
        dir: &'a RunDir,
        latest: bool,
        pool: Arc<WorkerPool>,
        first_round: u64,
        rounds: u64,
        show: bool,
    ) -> Self {
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = (show && terminal).then(|| {
            let bar = crate::output::styled_bar(
                indicatif::ProgressBar::new(rounds),
                "round {pos}/{len} [{bar:30}] {msg} · {eta} left ({elapsed})",
            );
            bar.set_position(first_round.saturating_sub(1));
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        crate::output::set_bar(bar.clone());
        SimProgress {
            saver: crate::commands::Saver::new(dir, latest),
            pool,
            bar,
            start: Instant::now(),
            first_round,
            rounds,
            last_line: std::sync::Mutex::new(None),
        }
    }

    fn clear(&self) {
        crate::output::finish_bar(self.bar.as_ref());
    }
}

impl RoundObserver for SimProgress<'_> {
    fn round_done(
        &self,
        history: &History,
        checkpoint: &petal_core::Checkpoint,
    ) -> Result<(), CoreError> {
        self.saver.save(history, checkpoint)?;
        let elapsed = self.start.elapsed().as_secs_f64();
        let tasks = self.pool.stats().tasks.load(Ordering::Relaxed);
        let rate = tasks as f64 / elapsed.max(1e-9);
        let rss = resident_bytes().map_or("?".into(), |b| format!("{:.1}", b as f64 / 1048576.0));
        let what = format!("{rate:.0} clients/s · {rss} MiB");
        match &self.bar {
            Some(bar) => {
                bar.set_position(checkpoint.round);
                bar.set_message(what);
            }
            None => {
                let done = checkpoint.round + 1 - self.first_round;
                let left = elapsed / done as f64 * (self.rounds - checkpoint.round) as f64;
                let mut last = self.last_line.lock().unwrap_or_else(|e| e.into_inner());
                let due = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
                if due || checkpoint.round.is_multiple_of(10) || checkpoint.round == self.rounds {
                    tracing::info!(
                        "round {}/{} · {what} · {left:.0} s left",
                        checkpoint.round,
                        self.rounds
                    );
                    *last = Some(Instant::now());
                }
            }
        }
        Ok(())
    }
}
