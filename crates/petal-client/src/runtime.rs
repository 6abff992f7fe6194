//! The connection loop: join, answer instructions one by one, leave when told.

use std::time::Duration;

use petal_proto::flwr::flower_service_client::FlowerServiceClient;
use petal_proto::flwr::{self, client_message as cm, server_message as sm};
use petal_proto::{ClientMessage, MAX_MESSAGE_BYTES, serde as wire};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::{Client, ClientError};

/// How a client connects and retries.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Server address, `host:port` or `http://host:port`.
    pub server: String,
    /// Connection attempts before giving up.
    pub max_attempts: u32,
    /// First delay between attempts; doubles each time up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest delay between attempts.
    pub max_backoff: Duration,
}

impl ConnectOptions {
    /// Defaults: 10 attempts, backoff 0.5 s doubling up to 8 s.
    pub fn new(server: impl Into<String>) -> Self {
        ConnectOptions {
            server: server.into(),
            max_attempts: 10,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
        }
    }
}

fn endpoint(server: &str) -> Result<Endpoint, ClientError> {
    let uri = if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    };
    Endpoint::from_shared(uri)
        .map(|e| e.connect_timeout(Duration::from_secs(10)).tcp_nodelay(true))
        .map_err(|_| ClientError::BadAddress(server.to_string()))
}

async fn connect(opts: &ConnectOptions) -> Result<Channel, ClientError> {
    let endpoint = endpoint(&opts.server)?;
    let mut backoff = opts.initial_backoff;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) => {
                let reason = std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.to_string());
                if attempt >= opts.max_attempts.max(1) {
                    return Err(ClientError::Unreachable {
                        addr: opts.server.clone(),
                        attempts: attempt,
                        reason,
                    });
                }
                tracing::warn!(
                    "cannot reach {} ({reason}); retrying in {:.1}s (attempt {attempt}/{})",
                    opts.server,
                    backoff.as_secs_f64(),
                    opts.max_attempts
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(opts.max_backoff);
            }
        }
    }
}

/// Joins the server and serves `client` until the server says goodbye.
/// A `ReconnectIns` with a positive delay reconnects after that delay.
pub async fn run_client<C: Client + 'static>(
    opts: &ConnectOptions,
    client: C,
) -> Result<(), ClientError> {
    let mut slot = Some(client);
    loop {
        let channel = connect(opts).await?;
        tracing::info!("connected to {}", opts.server);
        let mut stub = FlowerServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel::<ClientMessage>(4);
        let mut inbound = stub
            .join(ReceiverStream::new(rx))
            .await
            .map_err(|s| ClientError::Stream(s.message().to_string()))?
            .into_inner();
        let reconnect = loop {
            let msg = match inbound.message().await {
                Ok(Some(m)) => m.msg,
                Ok(None) => return Err(ClientError::Stream("server closed the stream".into())),
                Err(s) => return Err(ClientError::Stream(s.message().to_string())),
            };
            let Some(msg) = msg else { continue };
            if let sm::Msg::ReconnectIns(r) = &msg {
                let reply = cm::Msg::DisconnectRes(cm::DisconnectRes {
                    reason: flwr::Reason::Ack as i32,
                });
                let _ = tx.send(ClientMessage { msg: Some(reply) }).await;
                break r.seconds;
            }
            let mut client = slot.take().expect("client is returned after each call");
            let (client, reply) = tokio::task::spawn_blocking(move || {
                let reply = answer(msg, &mut client);
                (client, reply)
            })
            .await
            .map_err(|e| ClientError::Learner(format!("client task panicked: {e}")))?;
            slot = Some(client);
            let reply = reply.expect("only reconnect has no reply");
            tx.send(ClientMessage { msg: Some(reply) })
                .await
                .map_err(|_| ClientError::Stream("server closed the stream".into()))?;
        };
        // Let the acknowledgement reach the server before closing: wait
        // (briefly) for the server to end the stream.
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            while let Ok(Some(_)) = inbound.message().await {}
        })
        .await;
        if reconnect <= 0 {
            tracing::info!("disconnected: the server ended the run");
            return Ok(());
        }
        tracing::info!("server asked to reconnect in {reconnect}s");
        tokio::time::sleep(Duration::from_secs(reconnect as u64)).await;
    }
}

/// Answers one instruction with `client`. Errors become a non-OK status,
/// which Flower servers count as a failure. Returns `None` for
/// `ReconnectIns`, which the caller handles.
pub(crate) fn answer(msg: sm::Msg, client: &mut dyn Client) -> Option<cm::Msg> {
    use flwr::Code;
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
                    cm::Msg::GetParametersRes(cm::GetParametersRes {
                        status: wire::status(Code::GetParametersNotImplemented, e.to_string()),
                        parameters: None,
                    })
                }
            }
        }
        sm::Msg::FitIns(ins) => {
            let result = wire::fit_ins_from_proto(&ins)
                .map_err(ClientError::from)
                .and_then(|ins| client.fit(ins));
            match result {
                Ok(res) => cm::Msg::FitRes(wire::fit_res_to_proto(&res)),
                Err(e) => {
                    tracing::error!("fit failed: {e}");
                    cm::Msg::FitRes(cm::FitRes {
                        status: wire::status(Code::FitNotImplemented, e.to_string()),
                        ..Default::default()
                    })
                }
            }
        }
        sm::Msg::EvaluateIns(ins) => {
            let result = wire::evaluate_ins_from_proto(&ins)
                .map_err(ClientError::from)
                .and_then(|ins| client.evaluate(ins));
            match result {
                Ok(res) => cm::Msg::EvaluateRes(wire::evaluate_res_to_proto(&res)),
                Err(e) => {
                    tracing::error!("evaluate failed: {e}");
                    cm::Msg::EvaluateRes(cm::EvaluateRes {
                        status: wire::status(Code::EvaluateNotImplemented, e.to_string()),
                        ..Default::default()
                    })
                }
            }
        }
    })
}
