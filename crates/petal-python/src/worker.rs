//! The Python worker processes of one client process: a warm parent that
//! forks a child per step (`Mode::Fork`), or long-lived processes that keep
//! the learners (`Mode::Inline`, one per slot, partitions spread over
//! them). Requests carry an id; a reader thread per process hands each
//! reply to the caller waiting for it, so many logical clients share a
//! process and several steps may be in flight on it at once.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::frame::{Frame, read_frame, write_frame};

/// The worker's source: `python/petal_learner/worker.py`, run with `-c`,
/// so the Python environment needs only NumPy.
const WORKER_PY: &str = include_str!("../../../python/petal_learner/worker.py");

/// Longest a worker may take to import the learner's module and answer.
const START_TIMEOUT: Duration = Duration::from_secs(300);

/// How long past a step's timeout a warm parent (which kills its own
/// children on time) may take to say so before it is killed too.
const PARENT_GRACE: Duration = Duration::from_secs(30);

/// The user's learner: `NAME` in `FILE`, run by `python`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonSpec {
    pub file: PathBuf,
    pub name: String,
    pub python: PathBuf,
}

impl PythonSpec {
    /// Parses `python:FILE:NAME` (FILE may itself hold colons).
    pub fn parse(learner: &str, python: impl Into<PathBuf>) -> Result<PythonSpec, String> {
        let rest = learner
            .strip_prefix("python:")
            .ok_or_else(|| format!("'{learner}' is not python:FILE:NAME"))?;
        let (file, name) = rest
            .rsplit_once(':')
            .filter(|(f, n)| !f.is_empty() && !n.is_empty())
            .ok_or_else(|| format!("'{learner}' is not python:FILE:NAME"))?;
        Ok(PythonSpec {
            file: PathBuf::from(file),
            name: name.to_string(),
            python: python.into(),
        })
    }
}

/// How steps run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One warm parent per client process; every step in a forked child
    /// that exits afterwards (all its memory, host and GPU, returned).
    Fork,
    /// Learners kept in long-lived Python processes.
    Inline,
}

/// A reply, or why there is none.
type Reply = Result<Frame, String>;

/// One Python process and its requests in flight.
struct Process {
    child: Mutex<Child>,
    stdin: Mutex<BufWriter<ChildStdin>>,
    pending: Arc<Mutex<HashMap<u64, mpsc::Sender<Reply>>>>,
    /// Set when the process is gone (its reader saw the end of its output).
    dead: Arc<Mutex<Option<String>>>,
}

impl Process {
    fn start(
        spec: &PythonSpec,
        env: &[(String, String)],
        mode: Mode,
        label: &str,
    ) -> Result<Process, String> {
        let mode_flag = match mode {
            Mode::Fork => "fork",
            Mode::Inline => "inline",
        };
        let mut cmd = Command::new(&spec.python);
        cmd.arg("-c")
            .arg(WORKER_PY)
            .arg("--file")
            .arg(&spec.file)
            .args(["--name", &spec.name, "--mode", mode_flag])
            .env("PYTHONUNBUFFERED", "1")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {} (--python): {e}", spec.python.display()))?;
        petal_core::process_groups::track(child.id());
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            kill_group(&mut child);
            return Err("the Python worker has no pipes".into());
        };
        // What the learner prints, a whole line at a time, into the log.
        let who = label.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                tracing::info!(target: "learner", "[{who}] {line}");
            }
        });
        let pending: Arc<Mutex<HashMap<u64, mpsc::Sender<Reply>>>> = Arc::default();
        let dead: Arc<Mutex<Option<String>>> = Arc::default();
        let (hello_tx, hello_rx) = mpsc::channel();
        pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(0, hello_tx);
        {
            let (pending, dead) = (pending.clone(), dead.clone());
            std::thread::spawn(move || {
                let mut out = BufReader::with_capacity(1 << 16, stdout);
                let why = loop {
                    match read_frame(&mut out) {
                        Ok(Some(frame)) => {
                            let id = frame.header.get("id").and_then(Value::as_u64);
                            let waiting = id.and_then(|id| {
                                pending
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .remove(&id)
                            });
                            match waiting {
                                Some(tx) => {
                                    let _ = tx.send(Ok(frame));
                                }
                                None => tracing::warn!("a Python reply nobody waits for: {id:?}"),
                            }
                        }
                        Ok(None) => break "the Python worker exited".to_string(),
                        Err(e) => break e,
                    }
                };
                *dead.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
                for (_, tx) in pending.lock().unwrap_or_else(|e| e.into_inner()).drain() {
                    let _ = tx.send(Err(why.clone()));
                }
            });
        }
        let p = Process {
            child: Mutex::new(child),
            stdin: Mutex::new(BufWriter::with_capacity(1 << 16, stdin)),
            pending,
            dead,
        };
        match hello_rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(f)) if f.header.get("ok") == Some(&Value::Bool(true)) => Ok(p),
            Ok(Ok(f)) => {
                p.kill();
                Err(format!(
                    "the learner {}:{} could not be loaded:\n{}",
                    spec.file.display(),
                    spec.name,
                    f.header.get("error").and_then(Value::as_str).unwrap_or("")
                ))
            }
            Ok(Err(why)) => {
                p.kill();
                Err(format!(
                    "the Python worker did not start: {why} (see the log)"
                ))
            }
            Err(_) => {
                p.kill();
                Err(format!(
                    "the Python worker did not start within {} s",
                    START_TIMEOUT.as_secs()
                ))
            }
        }
    }

    fn is_dead(&self) -> bool {
        self.dead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Sends a request and waits for its reply (at most `wait`).
    fn request(
        &self,
        id: u64,
        header: &Value,
        body: &[&[u8]],
        wait: Option<Duration>,
    ) -> Result<Reply, RecvTimeoutError> {
        let (tx, rx) = mpsc::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        if let Some(why) = self.dead.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Ok(Err(why));
        }
        let sent = {
            let mut w = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
            write_frame(&mut *w, header, body)
        };
        if let Err(e) = sent {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Ok(Err(format!("writing to the Python worker: {e}")));
        }
        let r = match wait {
            Some(w) => rx.recv_timeout(w),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        if r.is_err() {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
        r
    }

    fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        kill_group(&mut child);
        let _ = child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Closing stdin ends the worker's loop; its children are killed.
        if let Ok(mut w) = self.stdin.lock() {
            let _ = write_frame(&mut *w, &json!({"op": "shutdown"}), &[]);
        }
        self.kill();
    }
}

#[cfg(unix)]
fn kill_group(child: &mut Child) {
    petal_core::process_groups::untrack(child.id());
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: signals the worker's own process group (it was spawned
        // as its leader and is not yet reaped: we hold its Child).
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

#[cfg(not(unix))]
fn kill_group(child: &mut Child) {
    petal_core::process_groups::untrack(child.id());
    let _ = child.kill();
}

/// The Python processes of one client process, shared by its logical clients.
pub struct WorkerPool {
    spec: PythonSpec,
    env: Vec<(String, String)>,
    mode: Mode,
    timeout: Option<Duration>,
    slots: Vec<Mutex<Option<Arc<Process>>>>,
    next_id: AtomicU64,
}

impl WorkerPool {
    /// A pool for `spec`: one warm parent (`Mode::Fork`) or `processes`
    /// long-lived ones (`Mode::Inline`), started on first use. Steps longer
    /// than `timeout` fail (their process is killed).
    pub fn new(
        spec: PythonSpec,
        mode: Mode,
        processes: usize,
        timeout: Option<Duration>,
    ) -> WorkerPool {
        let n = match mode {
            Mode::Fork => 1,
            Mode::Inline => processes.max(1),
        };
        WorkerPool {
            spec,
            env: Vec::new(),
            mode,
            timeout,
            slots: (0..n).map(|_| Mutex::new(None)).collect(),
            next_id: AtomicU64::new(1),
        }
    }

    /// Sets an environment variable of the Python processes.
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The learner this pool runs.
    pub fn spec(&self) -> &PythonSpec {
        &self.spec
    }

    /// Starts the process of `partition` now (importing the learner's
    /// module), so that a learner that cannot load fails at once.
    pub fn start(&self, partition: usize) -> Result<(), String> {
        self.process(partition).map(|_| ())
    }

    fn process(&self, partition: usize) -> Result<Arc<Process>, String> {
        let i = partition % self.slots.len();
        let mut slot = self.slots[i].lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = slot.as_ref().filter(|p| !p.is_dead()) {
            return Ok(p.clone());
        }
        let label = match self.mode {
            Mode::Fork => "python".to_string(),
            Mode::Inline => format!("python {i}"),
        };
        let p = Arc::new(Process::start(&self.spec, &self.env, self.mode, &label)?);
        *slot = Some(p.clone());
        Ok(p)
    }

    fn forget(&self, partition: usize, p: &Arc<Process>) {
        let i = partition % self.slots.len();
        let mut slot = self.slots[i].lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, p)) {
            *slot = None;
        }
    }

    /// Runs one request for `partition`; the reply frame, or why it failed.
    pub fn call(
        &self,
        partition: usize,
        num_partitions: usize,
        op: &str,
        config: Value,
        tensors: Value,
        body: &[&[u8]],
    ) -> Result<Frame, String> {
        let p = self.process(partition)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let header = json!({
            "id": id,
            "op": op,
            "partition_id": partition,
            "num_partitions": num_partitions,
            "config": config,
            "tensors": tensors,
            "timeout": self.timeout.map(|t| t.as_secs_f64()),
        });
        let wait = self.timeout.map(|t| match self.mode {
            Mode::Fork => t + PARENT_GRACE,
            Mode::Inline => t,
        });
        match p.request(id, &header, body, wait) {
            Ok(Ok(frame)) => {
                if frame.header.get("ok") == Some(&Value::Bool(true)) {
                    Ok(frame)
                } else {
                    let why = frame
                        .header
                        .get("error")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    Err(format!("the learner's {op} failed:\n{why}"))
                }
            }
            Ok(Err(why)) => {
                self.forget(partition, &p);
                Err(format!("{why} during {op}"))
            }
            Err(_) => {
                // Only an inline learner (or a stuck parent) gets here.
                p.kill();
                self.forget(partition, &p);
                Err(format!(
                    "the learner's {op} ran past --worker-timeout ({:.0} s); its process was killed",
                    self.timeout.unwrap_or_default().as_secs_f64()
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learner_specs_parse() {
        let s = PythonSpec::parse("python:examples/a:b.py:make", "py").unwrap();
        assert_eq!(s.file, PathBuf::from("examples/a:b.py"));
        assert_eq!(s.name, "make");
        for bad in ["python:file.py", "python::x", "torch:a:b", "python:a:"] {
            assert!(PythonSpec::parse(bad, "py").is_err(), "{bad}");
        }
    }
}
