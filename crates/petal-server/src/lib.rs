//! The gRPC server: implements Flower's `FlowerService.Join` so that Petal
//! and Flower clients connect, and exposes each connection to the
//! transport-independent round loop of `petal-core` as a [`ClientProxy`].
//!
//! This crate holds no FL logic: it registers each `Join` stream with a
//! [`Registry`] under a fresh [`NodeId`] and turns calls into
//! request/response pairs on the stream. A client that breaks its stream,
//! sends what was not asked for or misses a deadline is dropped: its
//! stream is closed and it may join again as a new node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use petal_core::{
    ClientProxy, Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, NodeId, Parameters,
    ProxyFuture, Registry,
};
use petal_proto::flwr::flower_service_server::{FlowerService, FlowerServiceServer};
use petal_proto::flwr::{client_message as cm, server_message as sm};
use petal_proto::{ClientMessage, MAX_MESSAGE_BYTES, ServerMessage, serde as wire};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

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
        let service = FlowerServiceServer::new(Service { registry })
            .max_decoding_message_size(options.max_message_bytes)
            .max_encoding_message_size(options.max_message_bytes);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .http2_keepalive_interval(options.keepalive_interval)
                .http2_keepalive_timeout(Some(options.keepalive_timeout))
                // Many clients may share one connection (one stream each).
                .max_concurrent_streams(Some(1_000_000))
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
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

struct Service {
    registry: Arc<Registry>,
}

#[tonic::async_trait]
impl FlowerService for Service {
    type JoinStream = JoinStream;

    async fn join(
        &self,
        request: Request<Streaming<ClientMessage>>,
    ) -> Result<Response<Self::JoinStream>, Status> {
        let node = self.registry.next_node_id();
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown address".to_string(), |a| a.to_string());
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        self.registry.register(Arc::new(GrpcClientProxy {
            node,
            registry: Arc::downgrade(&self.registry),
            bridge: Mutex::new(Bridge {
                tx: Some(tx),
                rx: inbound,
            }),
        }));
        tracing::info!(node = node.0, %peer, "client joined");
        // Unregister as soon as the client goes away, even while idle:
        // tonic drops the response stream when the connection ends. Ids are
        // never reused, so this cannot remove a newer client.
        let registry = Arc::downgrade(&self.registry);
        Ok(Response::new(JoinStream {
            inner: ReceiverStream::new(rx),
            on_drop: Some(Box::new(move || {
                if let Some(r) = registry.upgrade()
                    && r.unregister(node)
                {
                    tracing::info!(node = node.0, "client left");
                }
            })),
        }))
    }
}

/// The server-to-client half of a `Join` stream. It ends when the client's
/// proxy is dropped, and unregisters the client when tonic drops it.
pub struct JoinStream {
    inner: ReceiverStream<Result<ServerMessage, Status>>,
    on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl tokio_stream::Stream for JoinStream {
    type Item = Result<ServerMessage, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl Drop for JoinStream {
    fn drop(&mut self) {
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

struct Bridge {
    /// `None` once the client was told to disconnect: the stream is closed.
    tx: Option<mpsc::Sender<Result<ServerMessage, Status>>>,
    rx: Streaming<ClientMessage>,
}

/// One connected gRPC client: each call sends one [`ServerMessage`] and
/// waits for the matching [`ClientMessage`].
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

    /// Sends `msg`, waits for the reply. A broken stream or a timeout drops
    /// the client: the stream cannot be trusted to stay in step afterwards.
    async fn call(&self, msg: sm::Msg, timeout: Option<Duration>) -> Result<cm::Msg, CoreError> {
        let mut bridge = self.bridge.lock().await;
        let exchange = async {
            let tx = bridge.tx.as_ref().ok_or("client was disconnected")?;
            tx.send(Ok(ServerMessage { msg: Some(msg) }))
                .await
                .map_err(|_| "connection closed".to_string())?;
            match bridge.rx.message().await {
                Ok(Some(ClientMessage { msg: Some(m) })) => Ok(m),
                Ok(Some(ClientMessage { msg: None })) => Err("empty client message".to_string()),
                Ok(None) => Err("client closed the stream".to_string()),
                Err(status) => Err(format!("stream error: {}", status.message())),
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
            match self.call(sm::Msg::GetParametersIns(ins), timeout).await? {
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
            let msg = sm::Msg::FitIns(wire::fit_ins_to_proto(&ins));
            drop(ins);
            match self.call(msg, timeout).await? {
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
            let msg = sm::Msg::EvaluateIns(wire::evaluate_ins_to_proto(&ins));
            drop(ins);
            match self.call(msg, timeout).await? {
                cm::Msg::EvaluateRes(res) => self.decode(wire::evaluate_res_from_proto(&res)),
                other => Err(self.unexpected(&other, "evaluate_res").await),
            }
        })
    }

    fn disconnect(&self, timeout: Option<Duration>) -> ProxyFuture<'_, ()> {
        Box::pin(async move {
            let reply = self
                .call(
                    sm::Msg::ReconnectIns(sm::ReconnectIns { seconds: 0 }),
                    timeout,
                )
                .await;
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
