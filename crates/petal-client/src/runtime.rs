//! The connection loop: join, answer instructions one by one, leave when
//! told; rejoin after any loss of the connection.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use petal_core::{Client, CoreError};
use petal_proto::flwr::flower_service_client::FlowerServiceClient;
use petal_proto::flwr::{self, client_message as cm, server_message as sm};
use petal_proto::{ClientMessage, MAX_MESSAGE_BYTES, serde as wire};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
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
        }
    }

    fn endpoint(&self) -> Result<Endpoint, ClientError> {
        let uri = if self.server.contains("://") {
            self.server.clone()
        } else {
            format!("http://{}", self.server)
        };
        let mut e = Endpoint::from_shared(uri)
            .map_err(|_| ClientError::BadAddress(self.server.clone()))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true);
        if let Some(i) = self.keepalive_interval {
            e = e
                .http2_keep_alive_interval(i)
                .keep_alive_timeout(self.keepalive_timeout)
                .keep_alive_while_idle(true);
        }
        Ok(e)
    }
}

/// A factor in [0.5, 1], different for every call and process (the delay
/// jitter; it need not be a strong random number).
fn jitter() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mut z = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ CALLS
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    0.5 + 0.5 * (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Exponential backoff with jitter.
struct Backoff {
    next: Duration,
    attempts: u32,
}

impl Backoff {
    fn new(opts: &ConnectOptions) -> Self {
        Backoff {
            next: opts.initial_backoff,
            attempts: 0,
        }
    }

    /// Counts a failed attempt; the delay before the next, or `None` when
    /// the attempts are used up.
    fn failed(&mut self, opts: &ConnectOptions) -> Option<Duration> {
        self.attempts += 1;
        if self.attempts >= opts.max_attempts.max(1) {
            return None;
        }
        let delay = self.next.mul_f64(jitter());
        self.next = (self.next * 2).min(opts.max_backoff);
        Some(delay)
    }
}

async fn connect(opts: &ConnectOptions) -> Result<Channel, ClientError> {
    let endpoint = opts.endpoint()?;
    let mut backoff = Backoff::new(opts);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) => {
                let reason = std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.to_string());
                let Some(delay) = backoff.failed(opts) else {
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

/// How one connection ended.
enum Ended {
    /// The server ended the run.
    Finished,
    /// The server asked to come back after a delay.
    Reconnect(Duration),
    /// The connection or stream was lost.
    Lost(String),
}

/// Joins the server and serves `client` until the server ends the run.
/// A lost connection (server restart, network failure, the server dropping
/// this client) is rejoined with backoff; `ReconnectIns` with a positive
/// delay rejoins after that delay.
pub async fn run_client<C: Client + 'static>(
    opts: &ConnectOptions,
    client: C,
) -> Result<(), ClientError> {
    let mut slot = Some(client);
    loop {
        let channel = connect(opts).await?;
        tracing::info!("connected to {}", opts.server);
        match session(opts, channel, &mut slot).await {
            Ended::Finished => {
                tracing::info!("disconnected: the server ended the run");
                return Ok(());
            }
            Ended::Reconnect(delay) => {
                tracing::info!("server asked to reconnect in {}s", delay.as_secs());
                tokio::time::sleep(delay).await;
            }
            Ended::Lost(reason) => {
                let delay = opts.initial_backoff.mul_f64(jitter());
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
) -> Ended {
    let mut stub = FlowerServiceClient::new(channel)
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(opts.max_message_bytes);
    let (tx, rx) = mpsc::channel::<ClientMessage>(4);
    let mut inbound = match stub.join(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) => return Ended::Lost(format!("join refused: {}", s.message())),
    };
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m.msg,
            Ok(None) => return Ended::Lost("the server closed the stream".into()),
            Err(s) => return Ended::Lost(s.message().to_string()),
        };
        let Some(msg) = msg else { continue };
        if let sm::Msg::ReconnectIns(r) = &msg {
            let reply = cm::Msg::DisconnectRes(cm::DisconnectRes {
                reason: flwr::Reason::Ack as i32,
            });
            let _ = tx.send(ClientMessage { msg: Some(reply) }).await;
            let seconds = r.seconds;
            // Let the acknowledgement reach the server before closing:
            // wait (briefly) for the server to end the stream.
            drop(tx);
            let _ = tokio::time::timeout(Duration::from_secs(3), async {
                while let Ok(Some(_)) = inbound.message().await {}
            })
            .await;
            return match u64::try_from(seconds) {
                Ok(0) | Err(_) => Ended::Finished,
                Ok(s) => Ended::Reconnect(Duration::from_secs(s.min(86_400))),
            };
        }
        let Some(mut client) = slot.take() else {
            return Ended::Finished;
        };
        let kind = Kind::of(&msg);
        let joined = tokio::task::spawn_blocking(move || {
            let reply = std::panic::catch_unwind(AssertUnwindSafe(|| answer(msg, &mut client)))
                .unwrap_or_else(|p| {
                    let why = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    tracing::error!("the client panicked: {why}");
                    Some(kind.failure(format!("the client panicked: {why}")))
                });
            (client, reply)
        })
        .await;
        let Ok((client, reply)) = joined else {
            return Ended::Lost("the client task was cancelled".into());
        };
        *slot = Some(client);
        let Some(reply) = reply else { continue };
        if tx.send(ClientMessage { msg: Some(reply) }).await.is_err() {
            return Ended::Lost("the server closed the stream".into());
        }
    }
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

    /// A non-OK reply of this kind: Flower's servers count it as a failure.
    fn failure(self, why: String) -> cm::Msg {
        use flwr::Code;
        match self {
            Kind::Properties => cm::Msg::GetPropertiesRes(cm::GetPropertiesRes {
                status: wire::status(Code::GetPropertiesNotImplemented, why),
                properties: Default::default(),
            }),
            Kind::Parameters => cm::Msg::GetParametersRes(cm::GetParametersRes {
                status: wire::status(Code::GetParametersNotImplemented, why),
                parameters: None,
            }),
            Kind::Fit => cm::Msg::FitRes(cm::FitRes {
                status: wire::status(Code::FitNotImplemented, why),
                ..Default::default()
            }),
            Kind::Evaluate => cm::Msg::EvaluateRes(cm::EvaluateRes {
                status: wire::status(Code::EvaluateNotImplemented, why),
                ..Default::default()
            }),
        }
    }
}

/// Answers one instruction with `client`. Errors become a non-OK status,
/// which Flower servers count as a failure. Returns `None` for
/// `ReconnectIns`, which the caller handles.
pub(crate) fn answer(msg: sm::Msg, client: &mut dyn Client) -> Option<cm::Msg> {
    Some(match msg {
        sm::Msg::ReconnectIns(_) => return None,
        sm::Msg::GetPropertiesIns(_) => cm::Msg::GetPropertiesRes(cm::GetPropertiesRes {
            status: wire::ok_status(),
            properties: Default::default(),
        }),
        sm::Msg::GetParametersIns(ins) => {
            let config = wire::config_from_proto(&ins.config);
            match client.get_parameters(&config) {
                Ok(p) => cm::Msg::GetParametersRes(wire::get_parameters_res_to_proto(&p)),
                Err(e) => {
                    tracing::error!("get_parameters failed: {e}");
                    Kind::Parameters.failure(e.to_string())
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
                    tracing::error!("fit failed: {e}");
                    Kind::Fit.failure(e.to_string())
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
                    tracing::error!("evaluate failed: {e}");
                    Kind::Evaluate.failure(e.to_string())
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
        let mut b = Backoff::new(&opts);
        let mut delays = Vec::new();
        while let Some(d) = b.failed(&opts) {
            delays.push(d);
        }
        assert_eq!(delays.len(), 4);
        for (i, d) in delays.iter().enumerate() {
            let full = Duration::from_millis(500) * 2u32.pow(i as u32);
            assert!(*d >= full / 2 && *d <= full, "attempt {i}: {d:?}");
        }
    }
}
