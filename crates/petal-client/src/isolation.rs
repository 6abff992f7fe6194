//! Process isolation, the seed's key idea: each fit/evaluate runs in a child
//! process that receives the instruction on stdin, writes the result on
//! stdout and exits, so every byte it allocated (host or accelerator) is
//! freed. A child that crashes or is killed becomes an error for that call;
//! the client itself stays alive and small.
//!
//! Wire format on the pipes: one protobuf `ServerMessage` in, one
//! `ClientMessage` out (the same messages as the network).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use petal_core::{Config, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters};
use petal_proto::flwr::{client_message as cm, server_message as sm};
use petal_proto::{ClientMessage, ServerMessage, serde as wire};
use prost::Message;

use crate::{Client, ClientError};

/// A [`Client`] that runs every call in a fresh worker process.
pub struct SubprocessClient {
    program: PathBuf,
    args: Vec<String>,
    timeout: Option<Duration>,
}

impl SubprocessClient {
    /// Runs `program args...` for every call; the program must answer with
    /// [`serve_worker`].
    pub fn new(program: PathBuf, args: Vec<String>) -> Self {
        SubprocessClient {
            program,
            args,
            timeout: None,
        }
    }

    /// Kills a worker that runs longer than `timeout` (the call then fails).
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    fn call(&self, msg: sm::Msg) -> Result<cm::Msg, ClientError> {
        let input = ServerMessage { msg: Some(msg) }.encode_to_vec();
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                ClientError::Worker(format!("cannot start {}: {e}", self.program.display()))
            })?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let child = Arc::new(Mutex::new(child));
        let (done, finished) = mpsc::channel::<()>();
        let watchdog = self.timeout.map(|limit| {
            let child = child.clone();
            std::thread::spawn(move || {
                let expired = finished.recv_timeout(limit) == Err(RecvTimeoutError::Timeout);
                if expired {
                    let _ = child.lock().unwrap_or_else(|e| e.into_inner()).kill();
                }
                expired
            })
        });
        let mut output = Vec::new();
        let read = { stdout }.read_to_end(&mut output);
        drop(done);
        let status = child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .wait()
            .map_err(|e| ClientError::Worker(format!("waiting for worker: {e}")))?;
        if watchdog.is_some_and(|w| w.join().unwrap_or(false)) {
            let limit = self.timeout.unwrap_or_default().as_secs_f64();
            return Err(ClientError::Worker(format!(
                "worker ran longer than {limit:.1}s and was killed"
            )));
        }
        let wrote = writer.join();
        if !status.success() {
            return Err(ClientError::Worker(describe_exit(status)));
        }
        read.map_err(|e| ClientError::Worker(format!("reading worker output: {e}")))?;
        if !matches!(wrote, Ok(Ok(()))) {
            return Err(ClientError::Worker(
                "worker did not read its instruction".into(),
            ));
        }
        let reply = ClientMessage::decode(output.as_slice())
            .map_err(|e| ClientError::Worker(format!("malformed worker output: {e}")))?;
        reply
            .msg
            .ok_or_else(|| ClientError::Worker("worker sent an empty reply".into()))
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("worker was killed by signal {sig}");
        }
    }
    format!("worker failed with {status}")
}

fn worker_error(status: &Option<petal_proto::flwr::Status>) -> Result<(), ClientError> {
    match wire::status_error(status) {
        Some(e) => Err(ClientError::Worker(e)),
        None => Ok(()),
    }
}

impl Client for SubprocessClient {
    fn get_parameters(&mut self, config: &Config) -> Result<Parameters, ClientError> {
        let ins = sm::GetParametersIns {
            config: wire::config_to_proto(config),
        };
        match self.call(sm::Msg::GetParametersIns(ins))? {
            cm::Msg::GetParametersRes(r) => {
                worker_error(&r.status)?;
                let p = r.parameters.unwrap_or_default();
                Ok(wire::parameters_from_proto(&p)?)
            }
            _ => Err(ClientError::Worker(
                "unexpected reply to get_parameters".into(),
            )),
        }
    }

    fn fit(&mut self, ins: FitIns) -> Result<FitRes, ClientError> {
        match self.call(sm::Msg::FitIns(wire::fit_ins_to_proto(&ins)))? {
            cm::Msg::FitRes(r) => {
                worker_error(&r.status)?;
                Ok(wire::fit_res_from_proto(&r)?)
            }
            _ => Err(ClientError::Worker("unexpected reply to fit".into())),
        }
    }

    fn evaluate(&mut self, ins: EvaluateIns) -> Result<EvaluateRes, ClientError> {
        match self.call(sm::Msg::EvaluateIns(wire::evaluate_ins_to_proto(&ins)))? {
            cm::Msg::EvaluateRes(r) => {
                worker_error(&r.status)?;
                Ok(wire::evaluate_res_from_proto(&r)?)
            }
            _ => Err(ClientError::Worker("unexpected reply to evaluate".into())),
        }
    }
}

/// Worker side: reads one instruction from `input`, answers it with the
/// client `make_client` builds and writes the reply to `output`. Errors,
/// including failing to build the client, become a non-OK status.
pub fn serve_worker<C: Client>(
    input: &mut impl Read,
    output: &mut impl Write,
    make_client: impl FnOnce() -> Result<C, ClientError>,
) -> Result<(), ClientError> {
    let mut buf = Vec::new();
    input
        .read_to_end(&mut buf)
        .map_err(|e| ClientError::Worker(format!("reading instruction: {e}")))?;
    let msg = ServerMessage::decode(buf.as_slice())
        .map_err(|e| ClientError::Worker(format!("malformed instruction: {e}")))?
        .msg
        .ok_or_else(|| ClientError::Worker("empty instruction".into()))?;
    let reply = match make_client() {
        Ok(mut client) => crate::runtime::answer(msg, &mut client),
        Err(e) => crate::runtime::answer(msg, &mut Unavailable(e.to_string())),
    }
    .ok_or_else(|| {
        ClientError::Worker("workers only answer get_parameters, fit and evaluate".into())
    })?;
    output
        .write_all(&ClientMessage { msg: Some(reply) }.encode_to_vec())
        .and_then(|()| output.flush())
        .map_err(|e| ClientError::Worker(format!("writing result: {e}")))
}

/// A client that could not be built: every call reports why.
struct Unavailable(String);

impl Client for Unavailable {
    fn get_parameters(&mut self, _: &Config) -> Result<Parameters, ClientError> {
        Err(ClientError::Learner(self.0.clone()))
    }
    fn fit(&mut self, _: FitIns) -> Result<FitRes, ClientError> {
        Err(ClientError::Learner(self.0.clone()))
    }
    fn evaluate(&mut self, _: EvaluateIns) -> Result<EvaluateRes, ClientError> {
        Err(ClientError::Learner(self.0.clone()))
    }
}
