//! Process isolation, the seed's key idea: each fit/evaluate runs in a child
//! process that receives the instruction on stdin, writes the result on
//! stdout and exits, so every byte it allocated (host or accelerator) is
//! freed. A child that crashes, hangs, or is killed becomes an error for
//! that call; the client itself stays alive and small.
//!
//! Wire format on the pipes: one length-delimited protobuf `ServerMessage`
//! in, one length-delimited `ClientMessage` out (the network's messages).
//! The reply is complete when its bytes are in, whatever the worker does
//! next: a worker that closes its pipes but lingers, or leaves a grandchild
//! holding them, cannot hang its client. Each worker leads its own process
//! group, which is killed when the call ends.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use petal_core::{Client, Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters};
use petal_proto::flwr::{client_message as cm, server_message as sm};
use petal_proto::{ClientMessage, ServerMessage, serde as wire};
use prost::Message;

/// How long a worker may take to exit after its reply, or to deliver its
/// exit status after closing its output, before its process group is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// A [`Client`] that runs every call in a fresh worker process.
pub struct SubprocessClient {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    timeout: Option<Duration>,
    properties: Config,
}

fn worker_err(reason: impl Into<String>) -> CoreError {
    CoreError::Local(format!("worker process: {}", reason.into()))
}

impl SubprocessClient {
    /// Runs `program args...` for every call; the program must answer with
    /// [`serve_worker`].
    pub fn new(program: PathBuf, args: Vec<String>) -> Self {
        SubprocessClient {
            program,
            args,
            env: Vec::new(),
            timeout: None,
            properties: Config::new(),
        }
    }

    /// Answers `get_properties` with `properties` (without a worker).
    pub fn with_properties(mut self, properties: Config) -> Self {
        self.properties = properties;
        self
    }

    /// Sets an environment variable of every worker (e.g. its serialized config).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Kills a worker that runs longer than `timeout` (the call then fails).
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    fn call(&self, msg: sm::Msg) -> Result<cm::Msg, CoreError> {
        let input = ServerMessage { msg: Some(msg) }.encode_length_delimited_to_vec();
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .spawn()
            .map_err(|e| worker_err(format!("cannot start {}: {e}", self.program.display())))?;
        petal_core::process_groups::track(child.id());
        let (Some(mut stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
            kill_group(&mut child);
            let _ = child.wait();
            return Err(worker_err("its pipes could not be opened"));
        };
        std::thread::spawn(move || {
            // A worker that exits without reading makes this fail: its exit says why.
            let _ = stdin.write_all(&input);
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(read_reply(&mut stdout));
        });
        let outcome = self.watch(&mut child, &rx);
        kill_group(&mut child);
        let status = child
            .wait()
            .map_err(|e| worker_err(format!("waiting for it: {e}")))?;
        let bytes = match outcome {
            Outcome::Reply(Ok(bytes)) => bytes,
            Outcome::Reply(Err(why)) if status.success() => return Err(worker_err(why)),
            Outcome::Reply(Err(_)) => return Err(worker_err(describe_exit(status))),
            Outcome::Lingered => {
                return Err(worker_err(format!(
                    "it {} but a process it started still holds its output",
                    describe_exit(status).trim_start_matches("worker ")
                )));
            }
            Outcome::ClosedButRunning => {
                return Err(worker_err(
                    "it closed its output without a reply and did not exit; it was killed",
                ));
            }
            Outcome::TimedOut(limit) => {
                return Err(worker_err(format!(
                    "worker ran longer than {:.1}s and was killed",
                    limit.as_secs_f64()
                )));
            }
        };
        let reply = ClientMessage::decode(bytes.as_slice())
            .map_err(|e| worker_err(format!("malformed worker output: {e}")))?;
        reply
            .msg
            .ok_or_else(|| worker_err("the worker sent an empty reply"))
    }

    /// Waits for the reply, the worker's end, or the timeout, whichever
    /// decides the call first.
    fn watch(&self, child: &mut Child, rx: &mpsc::Receiver<Result<Vec<u8>, String>>) -> Outcome {
        let start = Instant::now();
        let mut exited_at: Option<Instant> = None;
        let mut closed: Option<(Instant, String)> = None;
        loop {
            match rx.recv_timeout(Duration::from_millis(10)) {
                Ok(Ok(bytes)) => {
                    // Give the worker a moment to exit by itself.
                    let until = Instant::now() + EXIT_GRACE;
                    while !has_exited(child) && Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    return Outcome::Reply(Ok(bytes));
                }
                Ok(Err(why)) => closed = Some((Instant::now(), why)),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
            }
            let exited = has_exited(child);
            if exited && exited_at.is_none() {
                exited_at = Some(Instant::now());
            }
            match (&closed, exited) {
                (Some((_, why)), true) => return Outcome::Reply(Err(why.clone())),
                (Some((t, _)), false) if t.elapsed() > EXIT_GRACE => {
                    return Outcome::ClosedButRunning;
                }
                (None, true) if exited_at.is_some_and(|t| t.elapsed() > EXIT_GRACE) => {
                    return Outcome::Lingered;
                }
                _ => {}
            }
            if let Some(limit) = self.timeout
                && start.elapsed() > limit
            {
                return Outcome::TimedOut(limit);
            }
        }
    }
}

/// How a worker call ended.
enum Outcome {
    /// A whole reply arrived, or the output ended early (with why).
    Reply(Result<Vec<u8>, String>),
    /// The worker exited, but its output stayed open without a reply.
    Lingered,
    /// The output closed without a reply and the worker kept running.
    ClosedButRunning,
    /// The worker ran longer than allowed.
    TimedOut(Duration),
}

/// Reads one length-delimited message, refusing lengths above the limit.
fn read_reply(r: &mut impl Read) -> Result<Vec<u8>, String> {
    use petal_proto::frames::DelimitedError as E;
    match petal_proto::frames::read_delimited(r) {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => Err("the worker ended without a reply".into()),
        Err(E::Io(e)) => Err(format!("reading worker output: {e}")),
        Err(E::TooLong(len)) => Err(format!("malformed worker output: a reply of {len} bytes")),
        Err(E::CutShort) => Err("malformed worker output: the reply was cut short".into()),
        Err(E::BadPrefix) => Err("malformed worker output: bad length prefix".into()),
    }
}

/// True once the worker has exited; it is not reaped, so its pid (and
/// process group id) cannot be reused before [`kill_group`].
#[cfg(unix)]
fn has_exited(child: &Child) -> bool {
    // SAFETY: waitid with WNOWAIT only reads the child's state into `info`.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            child.id() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        r == 0 && info.si_pid() != 0
    }
}

#[cfg(not(unix))]
fn has_exited(_child: &Child) -> bool {
    false
}

/// Kills the worker and everything it started (before it is reaped).
#[cfg(unix)]
fn kill_group(child: &mut Child) {
    petal_core::process_groups::untrack(child.id());
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: signals the worker's own process group (it was spawned
        // as its leader and is not yet reaped).
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

/// Kills every worker process group this process has started and not yet
/// reaped (Python learners' included): what a client does when it is told
/// to stop. Their callers then see the workers die and fail their steps.
pub fn kill_worker_groups() {
    petal_core::process_groups::set_stopping();
    for pid in petal_core::process_groups::tracked() {
        #[cfg(unix)]
        if let Ok(pid) = i32::try_from(pid) {
            // SAFETY: `pid` leads a group this process spawned and has not
            // reaped (groups are untracked before their leader is reaped),
            // so the id cannot have been reused by another process.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        #[cfg(not(unix))]
        let _ = pid;
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

fn status_check(status: &Option<petal_proto::flwr::Status>) -> Result<(), CoreError> {
    match wire::status_error(status) {
        Some(e) => Err(worker_err(e)),
        None => Ok(()),
    }
}

fn decode<T>(r: Result<T, petal_proto::ProtoError>) -> Result<T, CoreError> {
    r.map_err(|e| worker_err(format!("malformed reply: {e}")))
}

impl Client for SubprocessClient {
    fn get_parameters(&mut self, config: &Config) -> Result<Parameters, CoreError> {
        let ins = sm::GetParametersIns {
            config: wire::config_to_proto(config),
        };
        match self.call(sm::Msg::GetParametersIns(ins))? {
            cm::Msg::GetParametersRes(r) => {
                status_check(&r.status)?;
                decode(wire::parameters_from_proto(
                    &r.parameters.unwrap_or_default(),
                ))
            }
            _ => Err(worker_err("unexpected reply to get_parameters")),
        }
    }

    fn fit(&mut self, ins: FitIns) -> Result<FitRes, CoreError> {
        match self.call(sm::Msg::FitIns(wire::fit_ins_to_proto(&ins)))? {
            cm::Msg::FitRes(r) => {
                status_check(&r.status)?;
                decode(wire::fit_res_from_proto(&r))
            }
            _ => Err(worker_err("unexpected reply to fit")),
        }
    }

    fn evaluate(&mut self, ins: EvaluateIns) -> Result<EvaluateRes, CoreError> {
        match self.call(sm::Msg::EvaluateIns(wire::evaluate_ins_to_proto(&ins)))? {
            cm::Msg::EvaluateRes(r) => {
                status_check(&r.status)?;
                decode(wire::evaluate_res_from_proto(&r))
            }
            _ => Err(worker_err("unexpected reply to evaluate")),
        }
    }

    fn get_properties(&mut self, _config: &Config) -> Result<Config, CoreError> {
        Ok(self.properties.clone())
    }
}

/// Worker side: reads one instruction from `input`, answers it with the
/// client `make_client` builds and writes the reply to `output`. Errors,
/// including failing to build the client, become a non-OK status.
pub fn serve_worker<C: Client>(
    input: &mut impl Read,
    output: &mut impl Write,
    make_client: impl FnOnce() -> Result<C, CoreError>,
) -> Result<(), CoreError> {
    let bytes = read_reply(input).map_err(|e| worker_err(format!("reading instruction: {e}")))?;
    let msg = ServerMessage::decode(bytes.as_slice())
        .map_err(|e| worker_err(format!("malformed instruction: {e}")))?
        .msg
        .ok_or_else(|| worker_err("empty instruction"))?;
    let reply = match make_client() {
        Ok(mut client) => crate::runtime::answer(msg, &mut client, true),
        Err(e) => crate::runtime::answer(msg, &mut Unavailable(e.to_string()), true),
    }
    .ok_or_else(|| worker_err("workers only answer get_parameters, fit and evaluate"))?;
    output
        .write_all(&ClientMessage { msg: Some(reply) }.encode_length_delimited_to_vec())
        .and_then(|()| output.flush())
        .map_err(|e| worker_err(format!("writing result: {e}")))
}

/// A client that could not be built: every call reports why.
struct Unavailable(String);

impl Client for Unavailable {
    fn get_parameters(&mut self, _: &Config) -> Result<Parameters, CoreError> {
        Err(CoreError::Local(self.0.clone()))
    }
    fn fit(&mut self, _: FitIns) -> Result<FitRes, CoreError> {
        Err(CoreError::Local(self.0.clone()))
    }
    fn evaluate(&mut self, _: EvaluateIns) -> Result<EvaluateRes, CoreError> {
        Err(CoreError::Local(self.0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lengths_are_bounded() {
        let mut huge: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(read_reply(&mut huge).unwrap_err().contains("a reply of"));
        let mut cut: &[u8] = &[5, 1, 2];
        assert!(read_reply(&mut cut).unwrap_err().contains("cut short"));
        let mut endless: &[u8] = &[0x80; 12];
        assert!(
            read_reply(&mut endless)
                .unwrap_err()
                .contains("length prefix")
        );
        let mut ok: &[u8] = &[2, 7, 8, 9];
        assert_eq!(read_reply(&mut ok).unwrap(), vec![7, 8]);
    }
}
