//! Process isolation for the pool (`--isolation process`): each worker is
//! a child process holding one replica, recycled after `K` tasks so that
//! whatever a step allocated (host memory, a CUDA context and its cached
//! blocks) goes back to the system, the seed's guarantee, at a process
//! start per `K` tasks rather than per step.
//!
//! Pipe protocol, one task at a time. In: the client's partition (`u64`,
//! little-endian), a flag byte (1: the instruction's model is the one sent
//! with the previous instruction, and is left out, so the round's model
//! reaches each worker once) and a length-delimited `ServerMessage`. Out:
//! a length-delimited `ClientMessage`, failures as a non-OK status. The
//! worker ends when its input closes.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use petal_core::{CoreError, Parameters};
use petal_proto::flwr::{self, client_message as cm, server_message as sm};
use petal_proto::frames::read_delimited;
use petal_proto::{ClientMessage, ServerMessage, serde as wire};
use prost::Message;

use crate::pool::{PoolStats, Replica, Reply, Task, run_task};

/// How a worker process is started.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// The program (it must call [`serve`]).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Tasks a process answers before it is replaced (0: never replaced).
    pub recycle_after: usize,
}

const MODEL_AS_BEFORE: u8 = 1;

/// Longest a retired worker may take to exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

fn err(index: usize, why: impl std::fmt::Display) -> CoreError {
    CoreError::Local(format!("worker process {index}: {why}"))
}

struct Running {
    child: Child,
    stdin: BufWriter<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    tasks: usize,
}

/// The pool's side of one worker process.
pub(crate) struct ProcessWorker {
    command: WorkerCommand,
    index: usize,
    stats: Arc<PoolStats>,
    running: Option<Running>,
    /// The model the running process holds (sent with an earlier task).
    model: Weak<Parameters>,
}

impl ProcessWorker {
    pub(crate) fn new(command: WorkerCommand, index: usize, stats: Arc<PoolStats>) -> Self {
        ProcessWorker {
            command,
            index,
            stats,
            running: None,
            model: Weak::new(),
        }
    }

    fn start(&mut self) -> Result<&mut Running, CoreError> {
        if self.running.is_none() {
            let c = &self.command;
            let mut cmd = Command::new(&c.program);
            cmd.args(&c.args)
                .envs(c.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = cmd.spawn().map_err(|e| {
                err(
                    self.index,
                    format!("cannot start {}: {e}", c.program.display()),
                )
            })?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(self.index, "its pipes could not be opened"));
            };
            self.stats.processes.fetch_add(1, Ordering::Relaxed);
            self.model = Weak::new();
            self.running = Some(Running {
                child,
                stdin: BufWriter::new(stdin),
                stdout: BufReader::new(stdout),
                tasks: 0,
            });
        }
        self.running
            .as_mut()
            .ok_or_else(|| err(self.index, "not running"))
    }

    /// Ends the running process: its input closes and it exits (killed
    /// if it has not within [`EXIT_GRACE`]). Returns how it ended.
    fn retire(&mut self, kill: bool) -> String {
        let Some(mut r) = self.running.take() else {
            return "not running".into();
        };
        self.model = Weak::new();
        drop(r.stdin);
        if kill {
            let _ = r.child.kill();
        }
        let deadline = Instant::now() + EXIT_GRACE;
        loop {
            match r.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                _ => {
                    let _ = r.child.kill();
                    return r
                        .child
                        .wait()
                        .map_or_else(|e| e.to_string(), |s| format!("{s} (killed)"));
                }
            }
        }
    }

    fn frame(&self, partition: usize, task: &Task) -> Vec<u8> {
        let same = |p: &Arc<Parameters>| self.model.upgrade().is_some_and(|m| Arc::ptr_eq(&m, p));
        let (flag, msg) = match task {
            Task::GetParameters(c) => (
                0,
                sm::Msg::GetParametersIns(flwr::server_message::GetParametersIns {
                    config: wire::config_to_proto(c),
                }),
            ),
            Task::Properties(c) => (
                0,
                sm::Msg::GetPropertiesIns(flwr::server_message::GetPropertiesIns {
                    config: wire::config_to_proto(c),
                }),
            ),
            Task::Fit(ins) if same(&ins.parameters) => (
                MODEL_AS_BEFORE,
                sm::Msg::FitIns(sm::FitIns {
                    parameters: None,
                    config: wire::config_to_proto(&ins.config),
                }),
            ),
            Task::Fit(ins) => (0, sm::Msg::FitIns(wire::fit_ins_to_proto(ins))),
            Task::Evaluate(ins) if same(&ins.parameters) => (
                MODEL_AS_BEFORE,
                sm::Msg::EvaluateIns(sm::EvaluateIns {
                    parameters: None,
                    config: wire::config_to_proto(&ins.config),
                }),
            ),
            Task::Evaluate(ins) => (0, sm::Msg::EvaluateIns(wire::evaluate_ins_to_proto(ins))),
        };
        let mut out = Vec::new();
        out.extend_from_slice(&(partition as u64).to_le_bytes());
        out.push(flag);
        ServerMessage { msg: Some(msg) }
            .encode_length_delimited(&mut out)
            .unwrap_or_default();
        out
    }

    fn exchange(&mut self, frame: &[u8]) -> Result<Vec<u8>, String> {
        let r = self.running.as_mut().ok_or("not running")?;
        r.stdin
            .write_all(frame)
            .and_then(|()| r.stdin.flush())
            .map_err(|e| format!("sending the task: {e}"))?;
        read_delimited(&mut r.stdout)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "it ended without a reply".into())
    }
}

impl Drop for ProcessWorker {
    fn drop(&mut self) {
        self.retire(false);
    }
}

impl crate::pool::Executor for ProcessWorker {
    fn execute(&mut self, partition: usize, task: Task) -> Result<Reply, CoreError> {
        self.start()?;
        let frame = self.frame(partition, &task);
        let bytes = match self.exchange(&frame) {
            Ok(b) => b,
            Err(why) => {
                let ended = self.retire(true);
                return Err(err(self.index, format!("{why} ({ended})")));
            }
        };
        match &task {
            Task::Fit(i) => self.model = Arc::downgrade(&i.parameters),
            Task::Evaluate(i) => self.model = Arc::downgrade(&i.parameters),
            Task::GetParameters(_) | Task::Properties(_) => {}
        }
        let recycle = self.command.recycle_after;
        if let Some(r) = self.running.as_mut() {
            r.tasks += 1;
            if recycle > 0 && r.tasks >= recycle {
                self.retire(false);
            }
        }
        decode_reply(&bytes, &task).map_err(|e| err(self.index, e))
    }
}

fn decode_reply(bytes: &[u8], task: &Task) -> Result<Reply, String> {
    let msg = ClientMessage::decode(bytes)
        .map_err(|e| format!("malformed reply: {e}"))?
        .msg
        .ok_or("an empty reply")?;
    let failed = |status: &Option<flwr::Status>| wire::status_error(status);
    match (msg, task) {
        (cm::Msg::GetParametersRes(r), Task::GetParameters(_)) => {
            if let Some(e) = failed(&r.status) {
                return Err(e);
            }
            let p = r.parameters.as_ref().ok_or("a reply without parameters")?;
            wire::parameters_from_proto(p)
                .map(Reply::Parameters)
                .map_err(|e| e.to_string())
        }
        (cm::Msg::GetPropertiesRes(r), Task::Properties(_)) => match failed(&r.status) {
            Some(e) => Err(e),
            None => Ok(Reply::Properties(wire::config_from_proto(&r.properties))),
        },
        (cm::Msg::FitRes(r), Task::Fit(ins)) => {
            wire::fit_res_from_proto_like(&r, Some(&ins.parameters))
                .map(Reply::Fit)
                .map_err(|e| e.to_string())
        }
        (cm::Msg::EvaluateRes(r), Task::Evaluate(_)) => wire::evaluate_res_from_proto(&r)
            .map(Reply::Evaluate)
            .map_err(|e| e.to_string()),
        _ => Err("a reply of another kind than the task".into()),
    }
}

/// The worker process's side: answers tasks from `input` on `output`
/// with the replica `make` builds (once, at the first task), until the
/// input ends. A replica that cannot be built makes every task fail with
/// why, rather than the process.
pub fn serve(
    input: &mut impl Read,
    output: &mut impl Write,
    make: impl FnOnce() -> Result<Box<dyn Replica>, CoreError>,
) -> Result<(), CoreError> {
    let io = |why: String| CoreError::Local(format!("sim worker: {why}"));
    let mut make = Some(make);
    let mut replica: Result<Box<dyn Replica>, String> = Err("not built".into());
    let mut model: Option<Arc<Parameters>> = None;
    loop {
        let mut head = [0u8; 9];
        match input.read(&mut head[..1]) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(io(format!("reading a task: {e}"))),
        }
        input
            .read_exact(&mut head[1..])
            .map_err(|e| io(format!("reading a task: {e}")))?;
        let partition = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
        let reuse = head[8] == MODEL_AS_BEFORE;
        let bytes = read_delimited(input)
            .map_err(|e| io(e.to_string()))?
            .ok_or_else(|| io("the task was cut short".into()))?;
        let msg = ServerMessage::decode(bytes.as_slice())
            .map_err(|e| io(format!("malformed task: {e}")))?
            .msg
            .ok_or_else(|| io("an empty task".into()))?;
        if let Some(m) = make.take() {
            replica = m().map_err(|e| format!("the worker's model could not be built: {e}"));
        }
        let reply = answer(msg, partition, reuse, &mut model, &mut replica);
        output
            .write_all(&ClientMessage { msg: Some(reply) }.encode_length_delimited_to_vec())
            .and_then(|()| output.flush())
            .map_err(|e| io(format!("writing a reply: {e}")))?;
    }
}

fn answer(
    msg: sm::Msg,
    partition: u64,
    reuse: bool,
    model: &mut Option<Arc<Parameters>>,
    replica: &mut Result<Box<dyn Replica>, String>,
) -> cm::Msg {
    let failure = |kind: &sm::Msg, why: String| {
        let status = wire::client_error(why);
        match kind {
            sm::Msg::GetParametersIns(_) => cm::Msg::GetParametersRes(cm::GetParametersRes {
                status,
                parameters: None,
            }),
            sm::Msg::GetPropertiesIns(_) => cm::Msg::GetPropertiesRes(cm::GetPropertiesRes {
                status,
                properties: Default::default(),
            }),
            sm::Msg::EvaluateIns(_) => cm::Msg::EvaluateRes(cm::EvaluateRes {
                status,
                ..Default::default()
            }),
            _ => cm::Msg::FitRes(cm::FitRes {
                status,
                ..Default::default()
            }),
        }
    };
    let mut model_of = |p: &Option<flwr::Parameters>| -> Result<Arc<Parameters>, String> {
        if reuse {
            return model
                .clone()
                .ok_or_else(|| "a task without a model, and none before it".to_string());
        }
        let p = p.as_ref().ok_or("a task without a model")?;
        let m = Arc::new(wire::parameters_from_proto(p).map_err(|e| e.to_string())?);
        *model = Some(m.clone());
        Ok(m)
    };
    let task = match &msg {
        sm::Msg::GetParametersIns(i) => Ok(Task::GetParameters(wire::config_from_proto(&i.config))),
        sm::Msg::GetPropertiesIns(i) => Ok(Task::Properties(wire::config_from_proto(&i.config))),
        sm::Msg::FitIns(i) => model_of(&i.parameters).map(|parameters| {
            Task::Fit(petal_core::FitIns {
                parameters,
                config: wire::config_from_proto(&i.config),
            })
        }),
        sm::Msg::EvaluateIns(i) => model_of(&i.parameters).map(|parameters| {
            Task::Evaluate(petal_core::EvaluateIns {
                parameters,
                config: wire::config_from_proto(&i.config),
            })
        }),
        sm::Msg::ReconnectIns(_) => Err("a sim worker takes no reconnect".to_string()),
    };
    let replica = match replica {
        Ok(r) => r,
        Err(why) => return failure(&msg, why.clone()),
    };
    let Ok(partition) = usize::try_from(partition) else {
        return failure(&msg, format!("partition {partition} is out of range"));
    };
    match task.and_then(|t| run_task(&mut **replica, partition, t).map_err(|e| e.to_string())) {
        Ok(Reply::Parameters(p)) => {
            cm::Msg::GetParametersRes(wire::get_parameters_res_to_proto(&p))
        }
        Ok(Reply::Properties(c)) => cm::Msg::GetPropertiesRes(cm::GetPropertiesRes {
            status: wire::ok_status(),
            properties: wire::config_to_proto(&c),
        }),
        Ok(Reply::Fit(r)) => cm::Msg::FitRes(wire::fit_res_to_proto(&r)),
        Ok(Reply::Evaluate(r)) => cm::Msg::EvaluateRes(wire::evaluate_res_to_proto(&r)),
        Err(why) => failure(&msg, why),
    }
}
