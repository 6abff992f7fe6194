//! The gRPC server: implements Flower's `FlowerService.Join` so that Petal
//! and Flower clients connect, and exposes each connection to the
//! transport-independent round loop of `petal-core` as a [`ClientProxy`].
//!
//! This crate holds no FL logic: it registers clients with a
//! [`ClientManager`] and turns calls into request/response pairs on the stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use petal_core::{
    ClientManager, ClientProxy, Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes,
    Parameters, ProxyFuture,
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

/// A running gRPC server; dropping it does not stop it, call [`GrpcServer::shutdown`].
pub struct GrpcServer {
    local_addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl GrpcServer {
    /// Binds `addr` (port 0 picks a free port) and serves `FlowerService`,
    /// registering every joining client with `manager`.
    pub async fn start(addr: SocketAddr, manager: Arc<ClientManager>) -> Result<Self, ServerError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        let service = FlowerServiceServer::new(Service {
            manager,
            next_id: AtomicU64::new(0),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
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
    manager: Arc<ClientManager>,
    next_id: AtomicU64,
}

#[tonic::async_trait]
impl FlowerService for Service {
    type JoinStream = JoinStream;

    async fn join(
        &self,
        request: Request<Streaming<ClientMessage>>,
    ) -> Result<Response<Self::JoinStream>, Status> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cid = match request.remote_addr() {
            Some(SocketAddr::V4(a)) => format!("ipv4:{a}"),
            Some(SocketAddr::V6(a)) => format!("ipv6:{a}"),
            None => format!("client-{id}"),
        };
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let proxy = Arc::new(GrpcClientProxy {
            cid: cid.clone(),
            manager: Arc::downgrade(&self.manager),
            bridge: Mutex::new(Bridge {
                tx: Some(tx),
                rx: inbound,
            }),
        });
        if !self.manager.register(proxy) {
            return Err(Status::already_exists(format!(
                "client {cid} already connected"
            )));
        }
        tracing::info!(%cid, "client joined");
        // Unregister as soon as the client goes away, even while idle:
        // tonic drops the response stream when the connection ends.
        let manager = Arc::downgrade(&self.manager);
        Ok(Response::new(JoinStream {
            inner: ReceiverStream::new(rx),
            on_drop: Some(Box::new(move || {
                if let Some(m) = manager.upgrade() {
                    m.unregister(&cid);
                }
                tracing::info!(%cid, "client left");
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
    cid: String,
    manager: std::sync::Weak<ClientManager>,
    bridge: Mutex<Bridge>,
}

impl GrpcClientProxy {
    fn error(&self, reason: impl Into<String>) -> CoreError {
        CoreError::Client {
            cid: self.cid.clone(),
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
            self.drop_client();
            self.error(reason)
        })
    }

    fn drop_client(&self) {
        if let Some(m) = self.manager.upgrade() {
            m.unregister(&self.cid);
        }
    }

    fn unexpected(&self, got: &cm::Msg, wanted: &str) -> CoreError {
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
    fn cid(&self) -> &str {
        &self.cid
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
                other => Err(self.unexpected(&other, "get_parameters_res")),
            }
        })
    }

    fn fit(&self, ins: FitIns, timeout: Option<Duration>) -> ProxyFuture<'_, FitRes> {
        Box::pin(async move {
            let msg = sm::Msg::FitIns(wire::fit_ins_to_proto(&ins));
            drop(ins);
            match self.call(msg, timeout).await? {
                cm::Msg::FitRes(res) => self.decode(wire::fit_res_from_proto(&res)),
                other => Err(self.unexpected(&other, "fit_res")),
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
                other => Err(self.unexpected(&other, "evaluate_res")),
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
            self.drop_client();
            match reply? {
                cm::Msg::DisconnectRes(_) => Ok(()),
                other => Err(self.unexpected(&other, "disconnect_res")),
            }
        })
    }
}
