//! Shared by the integration tests: running the real `petal` binary, raw
//! Flower-protocol clients that can send anything (including bytes that are
//! not protobuf), and the rule for missing inputs.

#![allow(dead_code)]

pub mod flower;
pub mod netns;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use petal_proto::flwr::{self, client_message as cm, server_message as sm};
use petal_proto::{ClientMessage, ServerMessage, npy};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Status, Streaming};

/// Whether a test's input is present. Missing under CI (`CI` set) fails the
/// test with the reason; elsewhere the test says it is skipped.
pub fn require(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false") {
        panic!("missing test input under CI: {what}");
    }
    eprintln!("SKIPPED: {what} is not available");
    false
}

/// The `petal` binary under test: this build's, or `$PETAL_TEST_BIN` (to
/// check that a test fails on another version).
pub fn petal_bin() -> std::path::PathBuf {
    std::env::var_os("PETAL_TEST_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_petal").into())
}

/// A `petal` command with a dead proxy in the environment (loopback gRPC
/// must ignore it) and quiet logs.
pub fn petal() -> Command {
    let mut c = Command::new(petal_bin());
    c.env("RUST_LOG", "warn")
        .env("http_proxy", "http://127.0.0.1:9")
        .env("https_proxy", "http://127.0.0.1:9")
        .env("HTTPS_PROXY", "http://127.0.0.1:9")
        .env("all_proxy", "http://127.0.0.1:9");
    c
}

/// A `petal server` process and what it logged.
pub struct Server {
    pub child: Child,
    pub addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `petal server ARGS` on a free port (or the `--address` in
    /// `args`) and waits for it to listen.
    pub fn start(args: &[&str]) -> Server {
        let mut cmd = petal();
        cmd.arg("server");
        if !args.contains(&"--address") {
            cmd.args(["--address", "127.0.0.1:0"]);
        }
        cmd.args(args);
        Server::start_cmd(cmd)
    }

    /// Starts a prepared `petal server` command and waits for it to listen.
    pub fn start_cmd(mut cmd: Command) -> Server {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("petal server starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut addr = None;
        for line in lines.by_ref().map_while(Result::ok) {
            log.lock().unwrap().push(line.clone());
            if let Some(a) = line.split("listening on ").nth(1) {
                addr = Some(a.trim().to_string());
                break;
            }
        }
        let addr = addr
            .unwrap_or_else(|| panic!("server did not start:\n{}", log.lock().unwrap().join("\n")));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Server { child, addr, log }
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for the server to exit (killing it after `limit`).
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        wait(&mut self.child, "petal server", limit)
    }
}

impl Drop for Server {
    /// A server a test is done with never outlives it.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `child` with a deadline, killing it if it overruns.
pub fn wait(child: &mut Child, what: &str, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads a run folder's history.
pub fn history(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("history.json")).expect("history.json written");
    serde_json::from_str(&text).expect("history is JSON")
}

/// Sends raw bytes as the client's messages and reads the server's messages.
#[derive(Clone, Copy)]
pub struct RawCodec;

pub struct RawEncoder;
pub struct MessageDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ServerMessage;
    type Encoder = RawEncoder;
    type Decoder = MessageDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> MessageDecoder {
        MessageDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for MessageDecoder {
    type Item = ServerMessage;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<ServerMessage>, Status> {
        ServerMessage::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

/// A Flower-protocol client driven by hand: it sends whatever it is told to.
pub struct RawClient {
    tx: mpsc::Sender<Bytes>,
    inbound: Streaming<ServerMessage>,
}

impl RawClient {
    /// Joins the server at `addr`.
    pub async fn join(addr: &str) -> RawClient {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("server reachable");
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let (tx, rx) = mpsc::channel(4);
        let path =
            tonic::codegen::http::uri::PathAndQuery::from_static("/flwr.proto.FlowerService/Join");
        let inbound = grpc
            .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, RawCodec)
            .await
            .expect("join accepted")
            .into_inner();
        RawClient { tx, inbound }
    }

    /// The next instruction, or `None` when the stream ended.
    pub async fn recv(&mut self) -> Option<sm::Msg> {
        match self.inbound.message().await {
            Ok(Some(m)) => m.msg,
            _ => None,
        }
    }

    /// Sends a message.
    pub async fn send(&self, msg: cm::Msg) {
        self.send_bytes(ClientMessage { msg: Some(msg) }.encode_to_vec().into())
            .await;
    }

    /// Sends bytes as one gRPC message, protobuf or not.
    pub async fn send_bytes(&self, bytes: Bytes) {
        let _ = self.tx.send(bytes).await;
    }
}

/// `.npy` tensors of parameters.
pub fn wire_params(tensors: &[(Vec<usize>, Vec<f32>)]) -> flwr::Parameters {
    flwr::Parameters {
        tensors: tensors
            .iter()
            .map(|(s, d)| Bytes::from(npy::encode_f32(s, d)))
            .collect(),
        tensor_type: petal_proto::TENSOR_TYPE_NUMPY.into(),
    }
}

/// An OK fit result.
pub fn fit_res(parameters: flwr::Parameters, num_examples: i64) -> cm::Msg {
    cm::Msg::FitRes(cm::FitRes {
        status: petal_proto::serde::ok_status(),
        parameters: Some(parameters),
        num_examples,
        metrics: Default::default(),
    })
}

/// An OK evaluate result.
pub fn evaluate_res(loss: f32, num_examples: i64) -> cm::Msg {
    cm::Msg::EvaluateRes(cm::EvaluateRes {
        status: petal_proto::serde::ok_status(),
        loss,
        num_examples,
        metrics: Default::default(),
    })
}

/// The answer to `GetParametersIns`.
pub fn parameters_res(parameters: flwr::Parameters) -> cm::Msg {
    cm::Msg::GetParametersRes(cm::GetParametersRes {
        status: petal_proto::serde::ok_status(),
        parameters: Some(parameters),
    })
}

/// The acknowledgement of `ReconnectIns`.
pub fn disconnect_res() -> cm::Msg {
    cm::Msg::DisconnectRes(cm::DisconnectRes {
        reason: flwr::Reason::Ack as i32,
    })
}

/// The server's round number in a config.
pub fn round_of(config: &std::collections::HashMap<String, flwr::Scalar>) -> i64 {
    match config.get("server_round").and_then(|s| s.scalar.as_ref()) {
        Some(flwr::scalar::Scalar::Sint64(r)) => *r,
        _ => -1,
    }
}

/// Decodes `.npy` parameters (panics on bad input: for test assertions).
pub fn decode_params(p: &flwr::Parameters) -> Vec<Vec<f32>> {
    p.tensors
        .iter()
        .map(|t| npy::decode(t).unwrap().data.to_f32_vec())
        .collect()
}

/// Resident memory of process `pid` in MiB (from `/proc`), if it runs.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// CPU seconds (user + system) process `pid` has used, if it runs.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Samples the resident memory of `pid` every 50 ms until dropped; the
/// largest value seen.
pub struct PeakRss {
    peak: Arc<Mutex<f64>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl PeakRss {
    /// Starts sampling `pid`.
    pub fn watch(pid: u32) -> PeakRss {
        let peak = Arc::new(Mutex::new(0.0f64));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(r) = rss_mib(pid) {
                    let mut m = p.lock().unwrap();
                    *m = m.max(r);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        PeakRss { peak, stop }
    }

    /// The largest resident memory seen so far, in MiB.
    pub fn mib(&self) -> f64 {
        *self.peak.lock().unwrap()
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it is true (or `limit` passes); for conditions on files
/// and processes that tests cannot be notified of.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// An OK `get_properties` reply with no properties.
pub fn properties_res() -> cm::Msg {
    cm::Msg::GetPropertiesRes(cm::GetPropertiesRes {
        status: petal_proto::serde::ok_status(),
        properties: Default::default(),
    })
}
