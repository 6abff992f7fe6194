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

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use petal_core::{
    ClientProxy, Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, NodeId, Parameters,
    ProxyFuture, Registry,
};
use petal_proto::flwr::{client_message as cm, server_message as sm};
use petal_proto::frames::{self, ChunkBody, MessageReader};
use petal_proto::{ClientMessage, MAX_MESSAGE_BYTES, serde as wire};
use prost::Message;
use tokio::sync::{Mutex, mpsc, oneshot};
use tonic::body::Body;
use tonic::codegen::http::{HeaderValue, Request, Response};

/// The gRPC path of Flower's bidirectional stream.
const JOIN_PATH: &str = "/flwr.proto.FlowerService/Join";

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

/// Transport settings of the server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest message accepted or sent; a bigger one from a client breaks
    /// its stream (the client is dropped).
    pub max_message_bytes: usize,
    /// Interval of HTTP/2 keepalive pings to every client (`None`: off).
    pub keepalive_interval: Option<Duration>,
    /// A client that does not answer a ping within this is disconnected.
    pub keepalive_timeout: Duration,
}

impl Default for ServerOptions {
    /// Flower's message limit (512 MiB); a ping every 30 s, 20 s to answer.
    fn default() -> Self {
        ServerOptions {
            max_message_bytes: MAX_MESSAGE_BYTES,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(20),
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
            max_message_bytes: options.max_message_bytes,
        };
        // Accepted sockets get TCP_NODELAY: small replies must not wait
        // for delayed acknowledgements (a 40 ms stall per exchange).
        let incoming = tonic::transport::server::TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .http2_keepalive_interval(options.keepalive_interval)
                .http2_keepalive_timeout(Some(options.keepalive_timeout))
                // Many clients may share one connection (one stream each);
                // a small per-stream window bounds what an unread stream buffers.
                .max_concurrent_streams(Some(1_000_000))
                .initial_stream_window_size(Some(256 * 1024))
                .initial_connection_window_size(Some(64 * 1024 * 1024))
                .max_frame_size(Some(1024 * 1024))
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
        tracing::info!("Flower gRPC server listening on {local_addr}");
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
    max_message_bytes: usize,
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
        let node = self.registry.next_node_id();
        let peer = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|i| i.remote_addr())
            .map_or_else(|| "unknown address".to_string(), |a| a.to_string());
        let (tx, rx) = mpsc::channel(2);
        self.registry.register(Arc::new(GrpcClientProxy {
            node,
            registry: Arc::downgrade(&self.registry),
            bridge: Mutex::new(Bridge {
                tx: Some(tx),
                rx: Inbound(MessageReader::new(req.into_body(), self.max_message_bytes)),
            }),
        }));
        tracing::info!(node = node.0, %peer, "client joined");
        let registry = Arc::downgrade(&self.registry);
        let body = Outbound {
            body: ChunkBody::new(rx, true),
            node,
            registry,
        };
        let mut response = Response::new(Body::new(body));
        response
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        std::future::ready(Ok(response))
    }
}

/// The server-to-client half of a `Join` stream: the frames the proxy
/// sends, then an OK status when the proxy closes it. Unregisters the
/// client when hyper drops it (the client went away). Ids are never
/// reused, so this cannot remove a newer client.
struct Outbound {
    body: ChunkBody,
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

/// The client-to-server half: its messages, one at a time.
struct Inbound(MessageReader<Body>);

impl Inbound {
    /// The next message; `Ok(None)` when the client ended its stream.
    async fn next(&mut self) -> Result<Option<ClientMessage>, String> {
        match self.0.next().await {
            Ok(Some(bytes)) => ClientMessage::decode(bytes)
                .map(Some)
                .map_err(|e| format!("stream error: malformed message: {e}")),
            Ok(None) => Ok(None),
            Err(e) => Err(format!("stream error: {e}")),
        }
    }
}

struct Bridge {
    /// `None` once the stream is closed (the client was told to leave or dropped).
    tx: Option<mpsc::Sender<Vec<Bytes>>>,
    rx: Inbound,
}

/// One connected gRPC client: each call sends one `ServerMessage` and
/// waits for the matching `ClientMessage`.
struct GrpcClientProxy {
    node: NodeId,
    registry: std::sync::Weak<Registry>,
    bridge: Mutex<Bridge>,
}

impl GrpcClientProxy {
    fn error(&self, reason: impl Into<String>) -> CoreError {
        CoreError::Client {
            node: self.node,
            reason: reason.into(),
        }
    }

    /// Sends the frame, waits for the reply. A broken stream or a timeout
    /// drops the client: the stream cannot be trusted to stay in step.
    async fn call(
        &self,
        frame: Vec<Bytes>,
        timeout: Option<Duration>,
    ) -> Result<cm::Msg, CoreError> {
        let mut bridge = self.bridge.lock().await;
        let exchange = async {
            let tx = bridge.tx.as_ref().ok_or("client was disconnected")?;
            tx.send(frame)
                .await
                .map_err(|_| "connection closed".to_string())?;
            match bridge.rx.next().await? {
                Some(ClientMessage { msg: Some(m) }) => Ok(m),
                Some(ClientMessage { msg: None }) => Err("empty client message".to_string()),
                None => Err("client closed the stream".to_string()),
            }
        };
        let result = match timeout {
            Some(t) => tokio::time::timeout(t, exchange)
                .await
                .unwrap_or_else(|_| Err(format!("no reply within {:.1}s", t.as_secs_f64()))),
            None => exchange.await,
        };
        result.map_err(|reason| {
            // Close our half: the client sees the stream end and may rejoin.
            bridge.tx = None;
            self.drop_client();
            self.error(reason)
        })
    }

    fn drop_client(&self) {
        if let Some(r) = self.registry.upgrade()
            && r.unregister(self.node)
        {
            tracing::info!(node = self.node.0, "client dropped");
        }
    }

    /// A reply of the wrong kind: the stream is out of step, drop the client.
    async fn unexpected(&self, got: &cm::Msg, wanted: &str) -> CoreError {
        self.bridge.lock().await.tx = None;
        self.drop_client();
        let name = match got {
            cm::Msg::DisconnectRes(_) => "disconnect_res",
            cm::Msg::GetPropertiesRes(_) => "get_properties_res",
            cm::Msg::GetParametersRes(_) => "get_parameters_res",
            cm::Msg::FitRes(_) => "fit_res",
            cm::Msg::EvaluateRes(_) => "evaluate_res",
        };
        self.error(format!("expected {wanted}, got {name}"))
    }

    fn decode<T>(&self, r: Result<T, petal_proto::ProtoError>) -> Result<T, CoreError> {
        r.map_err(|e| self.error(e.to_string()))
    }
}

impl ClientProxy for GrpcClientProxy {
    fn node_id(&self) -> NodeId {
        self.node
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
            match self.call(frame, timeout).await? {
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
            drop(ins);
            match self.call(frame, timeout).await? {
                cm::Msg::FitRes(res) => self.decode(wire::fit_res_from_proto(&res)),
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
            match self.call(frame, timeout).await? {
                cm::Msg::EvaluateRes(res) => self.decode(wire::evaluate_res_from_proto(&res)),
                other => Err(self.unexpected(&other, "evaluate_res").await),
            }
        })
    }

    fn disconnect(&self, timeout: Option<Duration>) -> ProxyFuture<'_, ()> {
        Box::pin(async move {
            let frame = frames::server_message_frame(sm::Msg::ReconnectIns(sm::ReconnectIns {
                seconds: 0,
            }));
            let reply = self.call(frame, timeout).await;
            // Close our half of the stream so the client sees the end.
            self.bridge.lock().await.tx = None;
            if let Some(r) = self.registry.upgrade() {
                r.unregister(self.node);
            }
            match reply? {
                cm::Msg::DisconnectRes(_) => Ok(()),
                other => Err(self.unexpected(&other, "disconnect_res").await),
            }
        })
    }
}
