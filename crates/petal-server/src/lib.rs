//! The gRPC server: serves Flower's `FlowerService.Join` so that Petal and
//! Flower clients connect, and exposes each stream to the
//! transport-independent round loop of `petal-core` as a [`ClientProxy`].
//!
//! This crate holds no FL logic: it registers each `Join` stream with a
//! [`Registry`] under a fresh [`NodeId`] and turns calls into
//! request/response pairs on the stream. A client that breaks its stream,
//! sends what was not asked for or misses a deadline is dropped: its
//! stream is closed and it may join again as a new node.
//!
//! `Join` is served by hand on tonic's HTTP/2 server ([`frames`] of
//! `petal-proto`) rather than by generated code, for scale: the model's
//! bytes are shared by every client's instruction (encoded once per
//! round), and a stream keeps no buffer between messages, so ten thousand
//! idle streams cost kilobytes each, not a copy of the model each.
//!
//! No peer can make the server hold unbounded memory or spin: each
//! stream's body is read as it arrives, and data a call is not waiting for
//! is a protocol error that drops the stream (so HTTP/2 never buffers
//! unread data); a reply may be at most as large as the call's answer can
//! be (sized from the model) and is scanned against [`Limits`] before it
//! is decoded; connections per address, streams per connection and the
//! handshake are bounded ([`incoming`]).

mod incoming;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as _, Frame};
use petal_core::{
    ClientProxy, Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, NodeId, Parameters,
    ProxyFuture, Registry,
};
use petal_proto::flwr::{client_message as cm, server_message as sm};
use petal_proto::frames::{self, ChunkBody, FrameDecoder};
use petal_proto::limits::{LimitError, Limits, scan_client_message};
use petal_proto::{ClientMessage, MAX_MESSAGE_BYTES, serde as wire};
use prost::Message;
use tokio::sync::{Mutex, mpsc, oneshot};
use tonic::body::Body;
use tonic::codegen::http::{HeaderMap, HeaderValue, Request, Response};

pub use incoming::ConnLimits;
pub use petal_proto::limits;

/// The gRPC path of Flower's bidirectional stream.
const JOIN_PATH: &str = "/flwr.proto.FlowerService/Join";

/// Room for metrics and headers in a reply, beyond its tensors.
const REPLY_SLACK: usize = 16 << 20;

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Transport settings of the server; every limit a peer could push
/// against has its field here (and a flag in `petal server`).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest message accepted or sent; a bigger one from a client breaks
    /// its stream (the client is dropped). A reply is further bounded by
    /// what its call can return: twice the model's size plus 16 MiB for a
    /// fit result, 16 MiB for an evaluation.
    pub max_message_bytes: usize,
    /// What one reply may carry (tensors, metrics, key and value lengths).
    pub limits: Limits,
    /// Interval of HTTP/2 keepalive pings to every client (`None`: off).
    pub keepalive_interval: Option<Duration>,
    /// A client that does not answer a ping within this is disconnected.
    pub keepalive_timeout: Duration,
    /// `Join` streams one connection may hold open (HTTP/2 `MAX_CONCURRENT_STREAMS`).
    pub max_streams_per_connection: u32,
    /// Connections one IP address may hold open; more are closed at once.
    pub max_connections_per_ip: usize,
    /// Time a new connection has to finish its TLS handshake and send the
    /// HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// TLS (see [`tls::server_config`]); `None`: plaintext.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Node authentication: only clients signing with a listed key join.
    pub auth: Option<Arc<petal_auth::Verifier>>,
}

impl Default for ServerOptions {
    /// Flower's message limit (512 MiB); a ping every 30 s, 20 s to
    /// answer; 4,096 streams per connection, 128 connections per address,
    /// 10 s for the handshake; [`Limits::default`].
    fn default() -> Self {
        ServerOptions {
            max_message_bytes: MAX_MESSAGE_BYTES,
            limits: Limits::default(),
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(20),
            max_streams_per_connection: 4096,
            max_connections_per_ip: 128,
            handshake_timeout: Duration::from_secs(10),
            tls: None,
            auth: None,
        }
    }
}

/// A running gRPC server; dropping it does not stop it, call [`GrpcServer::shutdown`].
pub struct GrpcServer {
    local_addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl GrpcServer {
    /// Binds `addr` (port 0 picks a free port) and serves `FlowerService`,
    /// registering every joining client with `registry`.
    pub async fn start(
        addr: SocketAddr,
        registry: Arc<Registry>,
        options: ServerOptions,
    ) -> Result<Self, ServerError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        let service = JoinService {
            registry,
            options: Arc::new(options.clone()),
        };
        let (conns, incoming) = mpsc::channel(64);
        tokio::spawn(incoming::accept_loop(
            listener,
            ConnLimits {
                max_per_ip: options.max_connections_per_ip.max(1),
                handshake_timeout: options.handshake_timeout,
            },
            options.tls.clone().map(tokio_rustls::TlsAcceptor::from),
            conns,
        ));
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(incoming),
            Ok::<_, std::io::Error>,
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .http2_keepalive_interval(options.keepalive_interval)
                .http2_keepalive_timeout(Some(options.keepalive_timeout))
                // Many clients may share one connection (one stream each).
                // Streams are read as data arrives, so windows buffer
                // nothing while a stream waits.
                .max_concurrent_streams(Some(options.max_streams_per_connection.max(1)))
                .initial_stream_window_size(Some(256 * 1024))
                .initial_connection_window_size(Some(64 * 1024 * 1024))
                .max_frame_size(Some(1024 * 1024))
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
        tracing::info!(
            "Flower gRPC server{} listening on {local_addr}",
            if options.tls.is_some() { " (TLS)" } else { "" }
        );
        Ok(GrpcServer {
            local_addr,
            stop,
            task,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting clients and waits (at most `grace`) for open streams to close.
    pub async fn shutdown(self, grace: Duration) -> Result<(), ServerError> {
        let _ = self.stop.send(());
        match tokio::time::timeout(grace, self.task).await {
            Ok(Ok(res)) => res.map_err(ServerError::from),
            Ok(Err(join)) => {
                tracing::warn!("server task ended abnormally: {join}");
                Ok(())
            }
            Err(_) => {
                tracing::debug!("server shutdown grace period elapsed");
                Ok(())
            }
        }
    }
}

/// `flwr.proto.FlowerService`, served by hand.
#[derive(Clone)]
struct JoinService {
    registry: Arc<Registry>,
    options: Arc<ServerOptions>,
}

impl tonic::server::NamedService for JoinService {
    const NAME: &'static str = "flwr.proto.FlowerService";
}

/// A gRPC response carrying only a status (an error before any message).
fn status_response(code: tonic::Code, message: &str) -> Response<Body> {
    let mut r = Response::new(Body::empty());
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code as i32));
    if let Ok(v) = HeaderValue::from_str(message) {
        h.insert("grpc-message", v);
    }
    r
}

impl tonic::codegen::Service<Request<Body>> for JoinService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if req.uri().path() != JOIN_PATH {
            let what = format!("{} is not served here", req.uri().path());
            return std::future::ready(Ok(status_response(tonic::Code::Unimplemented, &what)));
        }
        let peer = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|i| i.remote_addr())
            .map_or_else(|| "unknown address".to_string(), |a| a.to_string());
        let identity = match &self.options.auth {
            None => None,
            Some(verifier) => {
                let headers = req.headers();
                let checked =
                    verifier.verify(|name| headers.get(name).and_then(|v| v.to_str().ok()));
                match checked {
                    Ok(who) => Some(who),
                    Err(e) => {
                        let code = match e {
                            petal_auth::AuthError::Unknown(_) => tonic::Code::PermissionDenied,
                            _ => tonic::Code::Unauthenticated,
                        };
                        tracing::warn!(%peer, "refused a client: {e}");
                        return std::future::ready(Ok(status_response(code, &e.to_string())));
                    }
                }
            }
        };
        let node = self.registry.next_node_id();
        let (tx, rx) = mpsc::channel(2);
        let (replies_tx, replies) = mpsc::channel(1);
        let (abort_tx, abort) = oneshot::channel();
        let shared = Arc::new(Shared {
            node,
            peer: peer.clone(),
            expecting: AtomicUsize::new(0),
            abort: std::sync::Mutex::new(Some(abort_tx)),
            registry: Arc::downgrade(&self.registry),
        });
        self.registry.register(Arc::new(GrpcClientProxy {
            shared: shared.clone(),
            options: self.options.clone(),
            bridge: Mutex::new(Bridge {
                tx: Some(tx),
                replies,
            }),
        }));
        tokio::spawn(read_stream(req.into_body(), shared, replies_tx));
        match &identity {
            Some(who) => tracing::info!(
                node = node.0,
                %peer,
                key = %who.fingerprint,
                "client joined as {}",
                if who.comment.is_empty() { "(no comment)" } else { &who.comment }
            ),
            None => tracing::info!(node = node.0, %peer, "client joined"),
        }
        let body = Outbound {
            body: ChunkBody::new(rx, true),
            abort,
            ended: false,
            node,
            registry: Arc::downgrade(&self.registry),
        };
        let mut response = Response::new(Body::new(body));
        let h = response.headers_mut();
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        h.insert(
            wire::PETAL_ERROR_CODES_HEADER,
            HeaderValue::from_static("1"),
        );
        std::future::ready(Ok(response))
    }
}

/// What a stream's reader and its proxy share.
struct Shared {
    node: NodeId,
    peer: String,
    /// Largest reply the call in progress accepts; 0 when no call is
    /// waiting (any data is then a protocol error).
    expecting: AtomicUsize,
    /// Ends the response with an error status (taken once).
    abort: std::sync::Mutex<Option<oneshot::Sender<(tonic::Code, String)>>>,
    registry: std::sync::Weak<Registry>,
}

impl Shared {
    /// Ends the response with `code` and `why` (once).
    fn close(&self, code: tonic::Code, why: &str) {
        if let Some(abort) = self.abort.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = abort.send((code, why.to_string()));
        }
    }

    /// Drops the client: unregisters it and ends its stream with `code`
    /// and `why`, so the peer sees the reason and may join again.
    fn drop_client(&self, code: tonic::Code, why: &str) {
        self.close(code, why);
        if let Some(r) = self.registry.upgrade()
            && r.unregister(self.node)
        {
            tracing::info!(node = self.node.0, peer = %self.peer, "client dropped: {why}");
        }
    }
}

/// The innermost error of `e` (tonic's own text repeats every layer).
fn root_cause(e: &tonic::Status) -> String {
    let mut last: &dyn std::error::Error = e;
    while let Some(s) = last.source() {
        last = s;
    }
    match last.to_string() {
        s if s.is_empty() => e.message().to_string(),
        s => s,
    }
}

/// Reads a stream's body as it arrives, so that HTTP/2 never buffers data
/// for it: the reply to the call in progress goes to the proxy; data when
/// no call waits, a second message for one call, or a reply over the
/// call's size limit drop the client.
async fn read_stream(
    mut body: Body,
    shared: Arc<Shared>,
    replies: mpsc::Sender<Result<Bytes, String>>,
) {
    let mut decoder = FrameDecoder::new(0);
    let mut out = Vec::with_capacity(1);
    let why = loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let data = match frame {
            None if decoder.is_idle() => break "client closed the stream".to_string(),
            None => break "stream error: the stream ended inside a message".to_string(),
            Some(Err(e)) => break format!("stream error: {}", root_cause(&e)),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) if d.is_empty() => continue,
                Ok(d) => d,
                // Trailers: the stream ends with the next frame.
                Err(_) => continue,
            },
        };
        let max = shared.expecting.load(Ordering::Acquire);
        if max == 0 {
            break "protocol error: the client sent data while no call was waiting for it"
                .to_string();
        }
        decoder.set_max(max);
        if let Err(e) = decoder.push(data, &mut out) {
            break format!("stream error: {e}");
        }
        match out.len() {
            0 => continue,
            1 if decoder.is_idle() => {
                shared.expecting.store(0, Ordering::Release);
                let reply = out.pop().unwrap_or_default();
                if replies.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
            _ => {
                break "protocol error: the client sent more than one message for one call"
                    .to_string();
            }
        }
    };
    // A call waiting for a reply learns why none will come.
    let _ = replies.try_send(Err(why.clone()));
    if why.starts_with("client closed") {
        shared.close(tonic::Code::Ok, "");
        if let Some(r) = shared.registry.upgrade()
            && r.unregister(shared.node)
        {
            tracing::info!(node = shared.node.0, "client left");
        }
    } else {
        shared.drop_client(tonic::Code::InvalidArgument, &why);
    }
}

/// The server-to-client half of a `Join` stream: the frames the proxy
/// sends, then an OK status when the proxy closes it, or an error status
/// when the client is dropped. Unregisters the client when hyper drops it
/// (the client went away). Ids are never reused, so this cannot remove a
/// newer client.
struct Outbound {
    body: ChunkBody,
    abort: oneshot::Receiver<(tonic::Code, String)>,
    ended: bool,
    node: NodeId,
    registry: std::sync::Weak<Registry>,
}

impl http_body::Body for Outbound {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(Ok((code, why))) = Pin::new(&mut self.abort).poll(cx) {
            self.ended = true;
            let mut t = HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from(code as i32));
            if let Ok(v) = HeaderValue::from_str(&why) {
                t.insert("grpc-message", v);
            }
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        Pin::new(&mut self.body).poll_frame(cx)
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        if let Some(r) = self.registry.upgrade()
            && r.unregister(self.node)
        {
            tracing::info!(node = self.node.0, "client left");
        }
    }
}

struct Bridge {
    /// `None` once the stream is closed (the client was told to leave or dropped).
    tx: Option<mpsc::Sender<Vec<Bytes>>>,
    /// Replies read by the stream's reader.
    replies: mpsc::Receiver<Result<Bytes, String>>,
}

/// Drops the client unless disarmed: a call abandoned between sending its
/// instruction and reading the reply leaves the stream out of step.
struct CallGuard<'a> {
    shared: &'a Shared,
    armed: bool,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.drop_client(
                tonic::Code::Cancelled,
                "the server abandoned a call in progress",
            );
        }
    }
}

/// One connected gRPC client: each call sends one `ServerMessage` and
/// waits for the matching `ClientMessage`.
struct GrpcClientProxy {
    shared: Arc<Shared>,
    options: Arc<ServerOptions>,
    bridge: Mutex<Bridge>,
}

/// What one call accepts back.
struct Expect {
    /// Largest reply, in bytes.
    bytes: usize,
    /// Tensors the reply may hold.
    tensors: usize,
}

impl GrpcClientProxy {
    fn node(&self) -> NodeId {
        self.shared.node
    }

    fn error(&self, reason: impl Into<String>) -> CoreError {
        CoreError::Client {
            node: self.node(),
            reason: reason.into(),
        }
    }

    /// The bytes and tensors a fit result for `model` may have.
    fn expect_model(&self, model: &Parameters) -> Expect {
        let tensors: usize = wire::npy_tensors(model).0.iter().map(Bytes::len).sum();
        Expect {
            bytes: tensors.saturating_mul(2).saturating_add(REPLY_SLACK),
            tensors: model.tensors.len(),
        }
    }

    /// Sends the frame, waits for the reply. A broken stream, a timeout or
    /// a reply over the limits drops the client: the stream cannot be
    /// trusted to stay in step.
    async fn call(
        &self,
        frame: Vec<Bytes>,
        timeout: Option<Duration>,
        expect: Expect,
    ) -> Result<cm::Msg, CoreError> {
        let mut bridge = self.bridge.lock().await;
        let mut guard = CallGuard {
            shared: &self.shared,
            armed: true,
        };
        let max = expect.bytes.min(self.options.max_message_bytes).max(1);
        self.shared.expecting.store(max, Ordering::Release);
        let exchange = async {
            let tx = bridge.tx.as_ref().ok_or("client was disconnected")?;
            tx.send(frame)
                .await
                .map_err(|_| "connection closed".to_string())?;
            let bytes = match bridge.replies.recv().await {
                Some(r) => r?,
                None => return Err("client closed the stream".to_string()),
            };
            let limits = Limits {
                max_tensors: expect.tensors.min(self.options.limits.max_tensors),
                ..self.options.limits
            };
            scan_client_message(&bytes, &limits).map_err(|e| match e {
                LimitError::Malformed(_) => format!("stream error: malformed message: {e}"),
                _ => format!("reply refused: {e}"),
            })?;
            match ClientMessage::decode(bytes) {
                Ok(ClientMessage { msg: Some(m) }) => Ok(m),
                Ok(ClientMessage { msg: None }) => Err("empty client message".to_string()),
                Err(e) => Err(format!("stream error: malformed message: {e}")),
            }
        };
        let result = match timeout {
            Some(t) => tokio::time::timeout(t, exchange)
                .await
                .unwrap_or_else(|_| Err(format!("no reply within {:.1}s", t.as_secs_f64()))),
            None => exchange.await,
        };
        guard.armed = false;
        result.map_err(|reason| {
            // Close our half: the client sees the stream end and may rejoin.
            bridge.tx = None;
            let code = if reason.starts_with("no reply within") {
                tonic::Code::DeadlineExceeded
            } else {
                tonic::Code::InvalidArgument
            };
            self.shared.drop_client(code, &reason);
            self.error(reason)
        })
    }

    /// A reply of the wrong kind: the stream is out of step, drop the client.
    async fn unexpected(&self, got: &cm::Msg, wanted: &str) -> CoreError {
        self.bridge.lock().await.tx = None;
        let name = match got {
            cm::Msg::DisconnectRes(_) => "disconnect_res",
            cm::Msg::GetPropertiesRes(_) => "get_properties_res",
            cm::Msg::GetParametersRes(_) => "get_parameters_res",
            cm::Msg::FitRes(_) => "fit_res",
            cm::Msg::EvaluateRes(_) => "evaluate_res",
        };
        let why = format!("expected {wanted}, got {name}");
        self.shared.drop_client(tonic::Code::InvalidArgument, &why);
        self.error(why)
    }

    fn decode<T>(&self, r: Result<T, petal_proto::ProtoError>) -> Result<T, CoreError> {
        r.map_err(|e| self.error(e.to_string()))
    }
}

impl ClientProxy for GrpcClientProxy {
    fn node_id(&self) -> NodeId {
        self.node()
    }

    fn get_parameters(
        &self,
        config: Config,
        timeout: Option<Duration>,
    ) -> ProxyFuture<'_, Parameters> {
        Box::pin(async move {
            let ins = sm::GetParametersIns {
                config: wire::config_to_proto(&config),
            };
            let frame = frames::server_message_frame(sm::Msg::GetParametersIns(ins));
            let expect = Expect {
                bytes: self.options.max_message_bytes,
                tensors: self.options.limits.max_tensors,
            };
            match self.call(frame, timeout, expect).await? {
                cm::Msg::GetParametersRes(res) => {
                    if let Some(e) = wire::status_error(&res.status) {
                        return Err(self.error(e));
                    }
                    let p = res
                        .parameters
                        .as_ref()
                        .ok_or_else(|| self.error("get_parameters_res has no parameters"))?;
                    self.decode(wire::parameters_from_proto(p))
                }
                other => Err(self.unexpected(&other, "get_parameters_res").await),
            }
        })
    }

    fn fit(&self, ins: FitIns, timeout: Option<Duration>) -> ProxyFuture<'_, FitRes> {
        Box::pin(async move {
            let frame = frames::fit_ins_frame(&ins);
            let expect = self.expect_model(&ins.parameters);
            let model = ins.parameters;
            match self.call(frame, timeout, expect).await? {
                cm::Msg::FitRes(res) => {
                    self.decode(wire::fit_res_from_proto_like(&res, Some(&model)))
                }
                other => Err(self.unexpected(&other, "fit_res").await),
            }
        })
    }

    fn evaluate(
        &self,
        ins: EvaluateIns,
        timeout: Option<Duration>,
    ) -> ProxyFuture<'_, EvaluateRes> {
        Box::pin(async move {
            let frame = frames::evaluate_ins_frame(&ins);
            drop(ins);
            let expect = Expect {
                bytes: REPLY_SLACK,
                tensors: 0,
            };
            match self.call(frame, timeout, expect).await? {
                cm::Msg::EvaluateRes(res) => self.decode(wire::evaluate_res_from_proto(&res)),
                other => Err(self.unexpected(&other, "evaluate_res").await),
            }
        })
    }

    fn get_properties(&self, config: Config, timeout: Option<Duration>) -> ProxyFuture<'_, Config> {
        Box::pin(async move {
            let ins = sm::GetPropertiesIns {
                config: wire::config_to_proto(&config),
            };
            let frame = frames::server_message_frame(sm::Msg::GetPropertiesIns(ins));
            let expect = Expect {
                bytes: REPLY_SLACK,
                tensors: 0,
            };
            match self.call(frame, timeout, expect).await? {
                cm::Msg::GetPropertiesRes(res) => {
                    if let Some(e) = wire::status_error(&res.status) {
                        return Err(self.error(e));
                    }
                    Ok(wire::config_from_proto(&res.properties))
                }
                other => Err(self.unexpected(&other, "get_properties_res").await),
            }
        })
    }

    fn disconnect(&self, timeout: Option<Duration>) -> ProxyFuture<'_, ()> {
        Box::pin(async move {
            let frame = frames::server_message_frame(sm::Msg::ReconnectIns(sm::ReconnectIns {
                seconds: 0,
            }));
            let expect = Expect {
                bytes: REPLY_SLACK,
                tensors: 0,
            };
            let reply = self.call(frame, timeout, expect).await;
            // Close our half of the stream so the client sees the end.
            self.bridge.lock().await.tx = None;
            if let Some(r) = self.shared.registry.upgrade() {
                r.unregister(self.node());
            }
            match reply? {
                cm::Msg::DisconnectRes(_) => Ok(()),
                other => Err(self.unexpected(&other, "disconnect_res").await),
            }
        })
    }
}
