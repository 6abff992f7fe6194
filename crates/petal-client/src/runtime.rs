//! The connection loop: join, answer instructions one by one, leave when
//! told; rejoin after any loss of the connection.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use bytes::Bytes;
use petal_core::backoff::Backoff;
use petal_core::{Client, CoreError};
use petal_proto::flwr::{self, client_message as cm, server_message as sm};
use petal_proto::frames::{self, ChunkBody, MessageReader};
use petal_proto::{ClientMessage, MAX_MESSAGE_BYTES, ServerMessage, serde as wire};
use prost::Message;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};
use tonic::transport::{Channel, Endpoint};

use crate::ClientError;

/// How a client connects, keeps its connection alive and retries.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Server address, `host:port` or `http://host:port`.
    pub server: String,
    /// Failed connection attempts in a row before giving up.
    pub max_attempts: u32,
    /// First delay between attempts; doubles each time up to `max_backoff`.
    /// Each delay is drawn between half and all of its value (jitter), so
    /// clients that lost the server together do not return together.
    pub initial_backoff: Duration,
    /// Longest delay between attempts.
    pub max_backoff: Duration,
    /// Interval of HTTP/2 keepalive pings to the server; a half-open
    /// connection is detected within interval + timeout. gRPC servers,
    /// Flower's included, refuse pings more often than every 5 minutes.
    pub keepalive_interval: Option<Duration>,
    /// A server that does not answer a ping within this is considered gone.
    pub keepalive_timeout: Duration,
    /// Largest message sent or accepted.
    pub max_message_bytes: usize,
    /// TLS settings; `None`: plaintext.
    pub tls: Option<ClientTls>,
    /// The key every `Join` is signed with (servers with `--auth-keys`).
    pub auth: Option<petal_auth::NodeKey>,
}

/// A client's TLS settings, as PEM bytes.
#[derive(Clone)]
pub struct ClientTls {
    /// The CA that signed the server's certificate.
    pub ca: Vec<u8>,
    /// This client's certificate chain and key, for servers that ask for
    /// one (mutual TLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("identity", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// Attempts in a row that show the two sides disagree on TLS before a
/// client gives up (retrying cannot fix a setting).
const TLS_MISMATCH_ATTEMPTS: u32 = 3;

/// What `reason` (a failed connection or join) says about TLS, if the two
/// sides seem to disagree on it: which side speaks plaintext and which flag
/// fixes it. `certain` when the error can only mean that.
fn tls_mismatch(reason: &str, tls: bool) -> Option<(String, bool)> {
    if tls && (reason.contains("InvalidContentType") || reason.contains("corrupt message")) {
        return Some((
            "the server speaks plaintext, not TLS: drop --root-certificates, or start the \
             server with --ssl-certfile and --ssl-keyfile"
                .into(),
            true,
        ));
    }
    if !tls && closed_early(reason) {
        return Some((
            "the server closed the connection at once: if it uses TLS, pass \
             --root-certificates CA (and --ssl-certfile/--ssl-keyfile if it asks for a client \
             certificate)"
                .into(),
            false,
        ));
    }
    None
}

impl ConnectOptions {
    /// Defaults: 10 attempts, backoff 0.5 s doubling up to 8 s, a keepalive
    /// ping every 300 s answered within 20 s, 512 MiB messages.
    pub fn new(server: impl Into<String>) -> Self {
        ConnectOptions {
            server: server.into(),
            max_attempts: 10,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            keepalive_interval: Some(Duration::from_secs(300)),
            keepalive_timeout: Duration::from_secs(20),
            max_message_bytes: MAX_MESSAGE_BYTES,
            tls: None,
            auth: None,
        }
    }

    fn endpoint(&self) -> Result<Endpoint, ClientError> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let uri = match self.server.split_once("://") {
            Some((_, rest)) => format!("{scheme}://{rest}"),
            None => format!("{scheme}://{}", self.server),
        };
        let has_port = uri
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.trim_end_matches('/').parse::<u16>().is_ok());
        if !has_port {
            return Err(ClientError::BadAddress(self.server.clone()));
        }
        let mut e = Endpoint::from_shared(uri)
            .map_err(|_| ClientError::BadAddress(self.server.clone()))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            // Many streams share the connection; large frames move a model
            // in few of them.
            .initial_connection_window_size(64 * 1024 * 1024)
            .max_frame_size(1024 * 1024);
        if let Some(i) = self.keepalive_interval {
            e = e
                .http2_keep_alive_interval(i)
                .keep_alive_timeout(self.keepalive_timeout)
                .keep_alive_while_idle(true);
        }
        if let Some(tls) = &self.tls {
            let mut config = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca));
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            e = e
                .tls_config(config)
                .map_err(|err| ClientError::Tls(err.to_string()))?;
        }
        Ok(e)
    }
}

/// Backoff between attempts to reach the server.
fn connect_backoff(opts: &ConnectOptions) -> Backoff {
    Backoff::new(opts.initial_backoff, opts.max_backoff, opts.max_attempts)
}

async fn connect(opts: &ConnectOptions) -> Result<Channel, ClientError> {
    let endpoint = opts.endpoint()?;
    let mut backoff = connect_backoff(opts);
    let mut mismatches = 0;
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) => {
                let mut reason = error_chain(&e);
                if let Some((hint, certain)) = tls_mismatch(&reason, opts.tls.is_some()) {
                    reason = format!("{reason}; {hint}");
                    mismatches += 1;
                    if certain && mismatches >= TLS_MISMATCH_ATTEMPTS {
                        return Err(ClientError::Unreachable {
                            addr: opts.server.clone(),
                            attempts: backoff.attempts + 1,
                            reason,
                        });
                    }
                }
                let Some(delay) = backoff.failed() else {
                    return Err(ClientError::Unreachable {
                        addr: opts.server.clone(),
                        attempts: backoff.attempts,
                        reason,
                    });
                };
                tracing::warn!(
                    "cannot reach {} ({reason}); retrying in {:.1}s (attempt {}/{})",
                    opts.server,
                    delay.as_secs_f64(),
                    backoff.attempts,
                    opts.max_attempts
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Whether a failed connection or join looks like the server closed the
/// connection under it.
fn closed_early(reason: &str) -> bool {
    let r = reason.to_lowercase();
    [
        "connection error",
        "canceled",
        "cancelled",
        "connection closed",
        "connection reset",
        "broken pipe",
        "frame with invalid size",
        "unexpected end of file",
        "h2 protocol error",
    ]
    .iter()
    .any(|k| r.contains(k))
}

/// Every message of `e`'s chain, outermost first (the innermost alone
/// often says nothing: "connection reset").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = s.source();
    }
    parts.join(": ")
}

/// Why a `Join` failed.
enum JoinError {
    /// The server refused this client (authentication): final.
    Refused(String),
    /// Anything else: try again.
    Other(String),
}

/// How one session (one `Join` stream) ended.
enum Ended {
    /// The server ended the run.
    Finished,
    /// The server asked to come back after a delay.
    Reconnect(Duration),
    /// The stream was lost (`joined`: after the server had accepted it).
    Lost { reason: String, joined: bool },
    /// The server refused this client's identity.
    Refused(String),
}

/// Joins the server and serves `client` until the server ends the run.
/// A lost connection (server restart, network failure, the server dropping
/// this client) is rejoined with backoff; `ReconnectIns` with a positive
/// delay rejoins after that delay.
pub async fn run_client<C: Client + 'static>(
    opts: &ConnectOptions,
    client: C,
) -> Result<(), ClientError> {
    run_clients(opts, vec![client], 1).await
}

/// Serves many logical clients from one process over one HTTP/2
/// connection: each joins on its own stream (so the server gives each its
/// own node id), and at most `max_concurrent` of them work (get
/// parameters, fit, evaluate) at once; the others wait their turn. An idle
/// client costs its stream and its `Client` value, nothing more. Returns
/// when every client is done; the first error, if any.
pub async fn run_clients<C: Client + 'static>(
    opts: &ConnectOptions,
    clients: Vec<C>,
    max_concurrent: usize,
) -> Result<(), ClientError> {
    let channel = connect(opts).await?;
    tracing::info!("connected to {} ({} clients)", opts.server, clients.len());
    let slots = Arc::new(Semaphore::new(max_concurrent.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        tasks.spawn(serve(opts.clone(), channel.clone(), client, slots.clone()));
    }
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined
            .unwrap_or_else(|e| Err(ClientError::Worker(format!("a client task failed: {e}"))));
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// One logical client: session after session until the run ends.
async fn serve<C: Client + 'static>(
    opts: ConnectOptions,
    channel: Channel,
    client: C,
    slots: Arc<Semaphore>,
) -> Result<(), ClientError> {
    let mut slot = Some(client);
    let mut backoff = connect_backoff(&opts);
    let mut ever_joined = false;
    let mut closed_at_once = 0;
    loop {
        match session(&opts, channel.clone(), &mut slot, &slots).await {
            Ended::Finished => {
                tracing::info!("disconnected: the server ended the run");
                return Ok(());
            }
            Ended::Refused(why) => {
                let why = match &opts.auth {
                    Some(k) if !why.contains(&k.public().fingerprint()) => {
                        format!("{why} (this client's key: {})", k.public().fingerprint())
                    }
                    _ => why,
                };
                return Err(ClientError::Refused(why));
            }
            Ended::Reconnect(delay) => {
                tracing::info!("server asked to reconnect in {}s", delay.as_secs());
                backoff = connect_backoff(&opts);
                tokio::time::sleep(delay).await;
            }
            Ended::Lost { mut reason, joined } => {
                if joined {
                    backoff = connect_backoff(&opts);
                    ever_joined = true;
                }
                // A plaintext client of a TLS server: the server closes the
                // connection before any HTTP/2 exchange, every time.
                // A TLS client without a certificate, of a server that asks
                // for one, is closed the same way after the handshake.
                let hint = match &opts.tls {
                    None => Some("if it uses TLS, pass --root-certificates CA"),
                    Some(t) if t.identity.is_none() => Some(
                        "if it asks for client certificates, pass --ssl-certfile and --ssl-keyfile",
                    ),
                    Some(_) => None,
                };
                if let Some(hint) =
                    hint.filter(|_| !joined && !ever_joined && closed_early(&reason))
                {
                    closed_at_once += 1;
                    reason = format!("{reason}; the server closed the connection at once: {hint}");
                    if closed_at_once >= TLS_MISMATCH_ATTEMPTS {
                        return Err(ClientError::Unreachable {
                            addr: opts.server.clone(),
                            attempts: closed_at_once,
                            reason,
                        });
                    }
                }
                let Some(delay) = backoff.failed() else {
                    return Err(ClientError::Unreachable {
                        addr: opts.server.clone(),
                        attempts: backoff.attempts,
                        reason,
                    });
                };
                tracing::warn!(
                    "lost the connection to {} ({reason}); rejoining in {:.1}s",
                    opts.server,
                    delay.as_secs_f64()
                );
                tokio::time::sleep(delay).await;
            }
        }
        if slot.is_none() {
            return Err(ClientError::Worker(
                "the client was lost in a failed call".into(),
            ));
        }
    }
}

async fn session<C: Client + 'static>(
    opts: &ConnectOptions,
    channel: Channel,
    slot: &mut Option<C>,
    slots: &Semaphore,
) -> Ended {
    let (tx, rx) = mpsc::channel::<Vec<Bytes>>(2);
    let (mut inbound, petal) =
        match join(channel, rx, opts.max_message_bytes, opts.auth.as_ref()).await {
            Ok(joined) => joined,
            Err(JoinError::Refused(why)) => return Ended::Refused(why),
            Err(JoinError::Other(reason)) => {
                return Ended::Lost {
                    reason: format!("join refused: {reason}"),
                    joined: false,
                };
            }
        };
    let lost = |reason: String| Ended::Lost {
        reason,
        joined: true,
    };
    let send = |msg: cm::Msg| {
        let bytes = ClientMessage { msg: Some(msg) }.encode_to_vec();
        tx.send(frames::frame(vec![Bytes::from(bytes)]))
    };
    loop {
        let msg = match inbound.next().await {
            Ok(Some(bytes)) => match ServerMessage::decode(bytes) {
                Ok(m) => m.msg,
                Err(e) => return lost(format!("malformed message from the server: {e}")),
            },
            Ok(None) => {
                let why = match inbound.status() {
                    Some((code, msg)) if *code != 0 => {
                        format!("the server ended the stream: {msg} (gRPC status {code})")
                    }
                    _ => "the server closed the stream".to_string(),
                };
                return lost(why);
            }
            Err(e) => return lost(e),
        };
        let Some(msg) = msg else { continue };
        if let sm::Msg::ReconnectIns(r) = &msg {
            let reply = cm::Msg::DisconnectRes(cm::DisconnectRes {
                reason: flwr::Reason::Ack as i32,
            });
            let _ = send(reply).await;
            let seconds = r.seconds;
            // Let the acknowledgement reach the server before closing:
            // wait (briefly) for the server to end the stream.
            drop(tx);
            let _ = tokio::time::timeout(Duration::from_secs(3), async {
                while let Ok(Some(_)) = inbound.next().await {}
            })
            .await;
            return match u64::try_from(seconds) {
                Ok(0) | Err(_) => Ended::Finished,
                Ok(s) => Ended::Reconnect(Duration::from_secs(s.min(86_400))),
            };
        }
        // Wait for a free slot: at most `max_concurrent` clients of this
        // process work at once.
        let Ok(_permit) = slots.acquire().await else {
            return Ended::Finished;
        };
        let Some(mut client) = slot.take() else {
            return Ended::Finished;
        };
        let kind = Kind::of(&msg);
        let joined = tokio::task::spawn_blocking(move || {
            let reply =
                std::panic::catch_unwind(AssertUnwindSafe(|| answer(msg, &mut client, petal)))
                    .unwrap_or_else(|p| {
                        let why = p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".into());
                        tracing::error!("the client panicked: {why}");
                        Some(kind.failure(format!("the client panicked: {why}"), petal))
                    });
            (client, reply)
        })
        .await;
        let Ok((client, reply)) = joined else {
            return lost("the client task was cancelled".into());
        };
        *slot = Some(client);
        let Some(reply) = reply else { continue };
        if send(reply).await.is_err() {
            return lost("the server closed the stream".into());
        }
    }
}

/// Opens a `Join` stream on `channel`: the request body is fed by `rx`;
/// returns the reader of the server's messages. Done by hand (as the
/// server) so that a stream keeps no buffer between messages: a process
/// hosting a thousand clients holds a thousand small streams, not a
/// thousand copies of the model.
async fn join(
    channel: Channel,
    rx: mpsc::Receiver<Vec<Bytes>>,
    max_message_bytes: usize,
    auth: Option<&petal_auth::NodeKey>,
) -> Result<(MessageReader<tonic::body::Body>, bool), JoinError> {
    use tonic::codegen::Service;
    use tonic::codegen::http::{HeaderValue, Method, Request};
    let mut req = Request::new(tonic::body::Body::new(ChunkBody::new(rx, false)));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = tonic::codegen::http::Uri::from_static("/flwr.proto.FlowerService/Join");
    let h = req.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    h.insert("te", HeaderValue::from_static("trailers"));
    if let Some(key) = auth {
        for (name, value) in key.headers() {
            let value = HeaderValue::from_str(&value)
                .map_err(|e| JoinError::Other(format!("signing the join: {e}")))?;
            h.insert(name, value);
        }
    }
    let mut channel = channel;
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| JoinError::Other(e.to_string()))?;
    let response = channel.call(req).await.map_err(|e| {
        JoinError::Other(
            std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.to_string()),
        )
    })?;
    if !response.status().is_success() {
        return Err(JoinError::Other(format!(
            "HTTP status {}",
            response.status()
        )));
    }
    // A status in the headers is an error before any message.
    if let Some(code) = response.headers().get("grpc-status")
        && code != "0"
    {
        let msg = response
            .headers()
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        // Unauthenticated or permission denied: retrying cannot help.
        if code == "16" || code == "7" {
            return Err(JoinError::Refused(msg.to_string()));
        }
        return Err(JoinError::Other(format!("gRPC status {code:?}: {msg}")));
    }
    let petal = response
        .headers()
        .contains_key(wire::PETAL_ERROR_CODES_HEADER);
    Ok((
        MessageReader::new(response.into_body(), max_message_bytes),
        petal,
    ))
}

/// The kind of an instruction, to build the matching failure reply.
#[derive(Clone, Copy)]
enum Kind {
    Properties,
    Parameters,
    Fit,
    Evaluate,
}

impl Kind {
    fn of(msg: &sm::Msg) -> Kind {
        match msg {
            sm::Msg::GetPropertiesIns(_) | sm::Msg::ReconnectIns(_) => Kind::Properties,
            sm::Msg::GetParametersIns(_) => Kind::Parameters,
            sm::Msg::FitIns(_) => Kind::Fit,
            sm::Msg::EvaluateIns(_) => Kind::Evaluate,
        }
    }

    /// A non-OK reply of this kind: [`wire::CLIENT_ERROR_CODE`] for a
    /// Petal server (`petal`), else the call's `*_NOT_IMPLEMENTED`, the only
    /// failure Flower's servers know.
    fn failure(self, why: String, petal: bool) -> cm::Msg {
        use flwr::Code;
        let status = |code: Code| {
            if petal {
                wire::client_error(why.clone())
            } else {
                wire::status(code, why.clone())
            }
        };
        match self {
            Kind::Properties => cm::Msg::GetPropertiesRes(cm::GetPropertiesRes {
                status: status(Code::GetPropertiesNotImplemented),
                properties: Default::default(),
            }),
            Kind::Parameters => cm::Msg::GetParametersRes(cm::GetParametersRes {
                status: status(Code::GetParametersNotImplemented),
                parameters: None,
            }),
            Kind::Fit => cm::Msg::FitRes(cm::FitRes {
                status: status(Code::FitNotImplemented),
                ..Default::default()
            }),
            Kind::Evaluate => cm::Msg::EvaluateRes(cm::EvaluateRes {
                status: status(Code::EvaluateNotImplemented),
                ..Default::default()
            }),
        }
    }
}

/// Answers one instruction with `client`. Errors become a non-OK status
/// (see [`Kind::failure`] for `petal`), which servers count as a failure.
/// Returns `None` for `ReconnectIns`, which the caller handles.
pub(crate) fn answer(msg: sm::Msg, client: &mut dyn Client, petal: bool) -> Option<cm::Msg> {
    Some(match msg {
        sm::Msg::ReconnectIns(_) => return None,
        sm::Msg::GetPropertiesIns(ins) => {
            let config = wire::config_from_proto(&ins.config);
            match client.get_properties(&config) {
                Ok(p) => cm::Msg::GetPropertiesRes(cm::GetPropertiesRes {
                    status: wire::ok_status(),
                    properties: wire::config_to_proto(&p),
                }),
                Err(e) => {
                    if !petal_core::process_groups::stopping() {
                        tracing::error!("get_properties failed: {e}");
                    }
                    Kind::Properties.failure(e.to_string(), petal)
                }
            }
        }
        sm::Msg::GetParametersIns(ins) => {
            let config = wire::config_from_proto(&ins.config);
            match client.get_parameters(&config) {
                Ok(p) => cm::Msg::GetParametersRes(wire::get_parameters_res_to_proto(&p)),
                Err(e) => {
                    if !petal_core::process_groups::stopping() {
                        tracing::error!("get_parameters failed: {e}");
                    }
                    Kind::Parameters.failure(e.to_string(), petal)
                }
            }
        }
        sm::Msg::FitIns(ins) => {
            let result = wire::fit_ins_from_proto(&ins)
                .map_err(|e| CoreError::Invalid(e.to_string()))
                .and_then(|ins| client.fit(ins));
            match result {
                Ok(res) => cm::Msg::FitRes(wire::fit_res_to_proto(&res)),
                Err(e) => {
                    if !petal_core::process_groups::stopping() {
                        tracing::error!("fit failed: {e}");
                    }
                    Kind::Fit.failure(e.to_string(), petal)
                }
            }
        }
        sm::Msg::EvaluateIns(ins) => {
            let result = wire::evaluate_ins_from_proto(&ins)
                .map_err(|e| CoreError::Invalid(e.to_string()))
                .and_then(|ins| client.evaluate(ins));
            match result {
                Ok(res) => cm::Msg::EvaluateRes(wire::evaluate_res_to_proto(&res)),
                Err(e) => {
                    if !petal_core::process_groups::stopping() {
                        tracing::error!("evaluate failed: {e}");
                    }
                    Kind::Evaluate.failure(e.to_string(), petal)
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_gives_up() {
        let mut opts = ConnectOptions::new("x:1");
        opts.max_attempts = 5;
        let mut b = connect_backoff(&opts);
        let mut delays = Vec::new();
        while let Some(d) = b.failed() {
            delays.push(d);
        }
        assert_eq!(delays.len(), 4);
        for (i, d) in delays.iter().enumerate() {
            let full = Duration::from_millis(500) * 2u32.pow(i as u32);
            assert!(*d >= full / 2 && *d <= full, "attempt {i}: {d:?}");
        }
    }
}
