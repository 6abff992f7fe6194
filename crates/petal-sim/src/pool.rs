//! The worker pool: `W` workers, each with one model replica, taking the
//! round's tasks in turn from one queue.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use petal_core::{Client, Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters};

use crate::process::{ProcessWorker, WorkerCommand};

/// One call on a virtual client.
#[derive(Debug, Clone)]
pub enum Task {
    GetParameters(Config),
    Properties(Config),
    Fit(FitIns),
    Evaluate(EvaluateIns),
}

/// The answer to a [`Task`].
#[derive(Debug, Clone)]
pub enum Reply {
    Parameters(Parameters),
    Properties(Config),
    Fit(FitRes),
    Evaluate(EvaluateRes),
}

/// One worker's model, able to act as any virtual client: `client(p)` is
/// client `p` (its data, this replica's model). Every task starts from the
/// instruction's model and a fresh optimizer, so an outcome never depends
/// on which worker ran it or what it ran before.
pub trait Replica: Send {
    /// Virtual client `partition`, borrowing this replica.
    fn client(&mut self, partition: usize) -> Result<Box<dyn Client + '_>, CoreError>;
}

/// Makes worker `i`'s replica (called on that worker, when it first works).
pub type MakeReplica = Arc<dyn Fn(usize) -> Result<Box<dyn Replica>, CoreError> + Send + Sync>;

/// Runs `task` as client `partition` of `replica`.
pub fn run_task(
    replica: &mut dyn Replica,
    partition: usize,
    task: Task,
) -> Result<Reply, CoreError> {
    let mut client = replica.client(partition)?;
    Ok(match task {
        Task::GetParameters(c) => Reply::Parameters(client.get_parameters(&c)?),
        Task::Properties(c) => Reply::Properties(client.get_properties(&c)?),
        Task::Fit(ins) => Reply::Fit(client.fit(ins)?),
        Task::Evaluate(ins) => Reply::Evaluate(client.evaluate(ins)?),
    })
}

/// Where the workers run.
pub enum Isolation {
    /// Threads of this process, each building its replica with the function.
    Threads(MakeReplica),
    /// Child processes, each started with the command and recycled after
    /// its number of tasks (see [`crate::process`]).
    Processes(WorkerCommand),
}

/// What the pool has done (for progress and tests).
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Tasks answered, failed or not.
    pub tasks: AtomicU64,
    /// Tasks that failed.
    pub failures: AtomicU64,
    /// Worker processes started (process isolation).
    pub processes: AtomicU64,
}

struct Job {
    partition: usize,
    task: Task,
    reply: tokio::sync::oneshot::Sender<Result<Reply, CoreError>>,
}

/// Runs tasks on one worker: a replica in this thread, or a child process.
pub(crate) trait Executor: Send {
    fn execute(&mut self, partition: usize, task: Task) -> Result<Reply, CoreError>;
}

/// A worker thread's replica, built on first use and again after a panic
/// (a replica that panicked mid-task cannot be trusted).
struct InThread {
    make: MakeReplica,
    index: usize,
    replica: Option<Box<dyn Replica>>,
}

impl Executor for InThread {
    fn execute(&mut self, partition: usize, task: Task) -> Result<Reply, CoreError> {
        let replica = match &mut self.replica {
            Some(r) => r,
            None => self.replica.insert((self.make)(self.index)?),
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| {
            run_task(&mut **replica, partition, task)
        })) {
            Ok(r) => r,
            Err(payload) => {
                self.replica = None;
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(CoreError::Local(format!("the worker panicked: {msg}")))
            }
        }
    }
}

/// `W` workers taking tasks from one queue, in the order they were given.
pub struct WorkerPool {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    workers: usize,
    stats: Arc<PoolStats>,
}

impl WorkerPool {
    /// Starts `workers` workers (at least one).
    pub fn new(workers: usize, isolation: Isolation) -> Result<Self, CoreError> {
        let workers = workers.max(1);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let stats = Arc::new(PoolStats::default());
        let mut threads = Vec::with_capacity(workers);
        for index in 0..workers {
            let mut executor: Box<dyn Executor> = match &isolation {
                Isolation::Threads(make) => Box::new(InThread {
                    make: make.clone(),
                    index,
                    replica: None,
                }),
                Isolation::Processes(command) => {
                    Box::new(ProcessWorker::new(command.clone(), index, stats.clone()))
                }
            };
            let rx = rx.clone();
            let stats = stats.clone();
            let handle = std::thread::Builder::new()
                .name(format!("petal-sim-{index}"))
                .spawn(move || {
                    loop {
                        let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                            Ok(job) => job,
                            Err(_) => break,
                        };
                        let out = executor.execute(job.partition, job.task);
                        stats.tasks.fetch_add(1, Ordering::Relaxed);
                        if out.is_err() {
                            stats.failures.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = job.reply.send(out);
                    }
                })
                .map_err(|e| CoreError::Local(format!("cannot start a worker thread: {e}")))?;
            threads.push(handle);
        }
        Ok(WorkerPool {
            jobs: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
            workers,
            stats,
        })
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// What the pool has done so far.
    pub fn stats(&self) -> &PoolStats {
        &self.stats
    }

    /// Runs `task` as client `partition` on the next free worker.
    pub async fn run(&self, partition: usize, task: Task) -> Result<Reply, CoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|tx| {
                tx.send(Job {
                    partition,
                    task,
                    reply,
                })
            });
        if !matches!(sent, Some(Ok(()))) {
            return Err(CoreError::Local("the worker pool has stopped".into()));
        }
        answer
            .await
            .map_err(|_| CoreError::Local("the worker pool has stopped".into()))?
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        // Closing the queue ends each worker after its current task.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
    }
}
