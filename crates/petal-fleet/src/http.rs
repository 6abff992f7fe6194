//! The Fleet API's transport: each call is `POST {base}/v1/fleet/<rpc>`
//! with the serialized request as body (`application/protobuf`), signed
//! with the node's key; the reply is the serialized response, or a 4xx/5xx
//! with a JSON `{"code", "detail"}`. Plain HTTP/1.1 (or HTTPS with the
//! SuperLink's CA), blocking; replies are read up to a size limit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;

use crate::auth::NodeKey;

/// Errors of a Fleet call.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The SuperLink could not be reached or the connection broke (retry).
    #[error("cannot reach the SuperLink: {0}")]
    Transport(String),
    /// The SuperLink answered with an error status.
    #[error("SuperLink refused {rpc} (HTTP {status}): {detail}")]
    Status {
        rpc: String,
        status: u16,
        detail: String,
    },
    /// The reply was not the expected protobuf message.
    #[error("malformed reply to {rpc}: {reason}")]
    Malformed { rpc: String, reason: String },
    /// A setting is wrong (address, certificates), or the two sides do not
    /// agree on TLS.
    #[error("{0}")]
    Config(String),
}

/// A transport error, with what to do when it shows the node and the
/// SuperLink disagree on TLS: a TLS node reading a plain-HTTP reply is a
/// setting error (retrying cannot help); a plain node whose connection is
/// dropped may be talking to a TLS port, which the error then says.
fn transport_error(e: &ureq::Error, superlink: &str, insecure: bool) -> FleetError {
    let text = e.to_string();
    if !insecure && (text.contains("InvalidContentType") || text.contains("corrupt message")) {
        return FleetError::Config(format!(
            "the SuperLink at {superlink} speaks plain HTTP, not TLS ({text}): start this node \
             with --insecure, or the SuperLink with TLS certificates"
        ));
    }
    if insecure
        && (text.contains("disconnected")
            || text.contains("reset")
            || text.contains("closed")
            || text.contains("HTTP/1")
            || text.contains("parse"))
    {
        return FleetError::Transport(format!(
            "{text} (if the SuperLink at {superlink} uses TLS, drop --insecure and give \
             --root-certificates)"
        ));
    }
    FleetError::Transport(text)
}

impl FleetError {
    /// True when trying again later may succeed: transport errors, 5xx,
    /// 408 and 429.
    pub fn is_transient(&self) -> bool {
        match self {
            FleetError::Transport(_) => true,
            FleetError::Status { status, .. } => *status >= 500 || matches!(status, 408 | 429),
            _ => false,
        }
    }

    /// True when a node that has joined should retry the call later: also
    /// a 400 or a reply that is not protobuf (a proxy or a SuperLink
    /// restarting may answer either once). A node gives up only after
    /// many such failures in a row.
    pub fn is_transient_while_serving(&self) -> bool {
        self.is_transient()
            || matches!(self, FleetError::Malformed { .. })
            || matches!(self, FleetError::Status { status: 400, .. })
    }
}

/// How to reach the SuperLink.
#[derive(Debug, Clone)]
pub struct Connection {
    /// `host:port` of the SuperLink's Fleet API.
    pub superlink: String,
    /// Plain HTTP; otherwise HTTPS.
    pub insecure: bool,
    /// PEM file of the CA that signed the SuperLink's certificate (HTTPS);
    /// `None`: the built-in web roots.
    pub root_certificates: Option<PathBuf>,
    /// Longest a call may take.
    pub timeout: Duration,
    /// Largest reply read (objects are at most a few MiB; messages small).
    pub max_reply_bytes: u64,
}

impl Connection {
    /// Plain HTTP to `superlink`, 60 s per call, replies up to 64 MiB.
    pub fn insecure(superlink: impl Into<String>) -> Self {
        Connection {
            superlink: superlink.into(),
            insecure: true,
            root_certificates: None,
            timeout: Duration::from_secs(60),
            max_reply_bytes: 64 << 20,
        }
    }
}

/// A signed Fleet API client.
pub struct FleetClient {
    agent: ureq::Agent,
    base: String,
    superlink: String,
    insecure: bool,
    key: NodeKey,
    max_reply_bytes: u64,
}

fn is_loopback(host_port: &str) -> bool {
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl FleetClient {
    /// A client of the SuperLink `conn` describes, signing with `key`.
    pub fn new(conn: &Connection, key: NodeKey) -> Result<Self, FleetError> {
        if conn.superlink.contains("://") || conn.superlink.contains('/') {
            return Err(FleetError::Config(format!(
                "invalid SuperLink address '{}': expected host:port",
                conn.superlink
            )));
        }
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(conn.timeout));
        // Proxies from the environment are honoured, except for loopback.
        if is_loopback(&conn.superlink) {
            config = config.proxy(None);
        }
        if !conn.insecure {
            let mut tls = ureq::tls::TlsConfig::builder();
            if let Some(path) = &conn.root_certificates {
                let pem = std::fs::read(path)
                    .map_err(|e| FleetError::Config(format!("{}: {e}", path.display())))?;
                let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                    .filter_map(|item| match item {
                        Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                        _ => None,
                    })
                    .collect();
                if certs.is_empty() {
                    return Err(FleetError::Config(format!(
                        "{}: no PEM certificate found",
                        path.display()
                    )));
                }
                tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)));
            }
            config = config.tls_config(tls.build());
        }
        let scheme = if conn.insecure { "http" } else { "https" };
        Ok(FleetClient {
            agent: config.build().into(),
            base: format!("{scheme}://{}", conn.superlink),
            superlink: conn.superlink.clone(),
            insecure: conn.insecure,
            key,
            max_reply_bytes: conn.max_reply_bytes,
        })
    }

    /// The key this client signs with.
    pub fn key(&self) -> &NodeKey {
        &self.key
    }

    /// Calls `rpc` (kebab-case, e.g. `pull-messages`).
    pub fn call<Resp: Message + Default>(
        &self,
        rpc: &str,
        request: &impl Message,
    ) -> Result<Resp, FleetError> {
        let body = self.call_bytes(rpc, request)?;
        Resp::decode(body.as_slice()).map_err(|e| FleetError::Malformed {
            rpc: rpc.to_string(),
            reason: e.to_string(),
        })
    }

    /// Calls `rpc` and returns the reply's bytes, undecoded.
    pub fn call_bytes(&self, rpc: &str, request: &impl Message) -> Result<Vec<u8>, FleetError> {
        let url = format!("{}/v1/fleet/{rpc}", self.base);
        let mut req = self
            .agent
            .post(&url)
            .header("content-type", "application/protobuf")
            .header("accept", "application/protobuf");
        for (k, v) in self.key.headers() {
            req = req.header(k, v);
        }
        let mut resp = req
            .send(&request.encode_to_vec()[..])
            .map_err(|e| transport_error(&e, &self.superlink, self.insecure))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(self.max_reply_bytes)
            .read_to_vec()
            .map_err(|e| FleetError::Transport(format!("reading the reply to {rpc}: {e}")))?;
        if !(200..300).contains(&status) {
            return Err(FleetError::Status {
                rpc: rpc.to_string(),
                status,
                detail: error_detail(&body),
            });
        }
        Ok(body)
    }
}

/// The `detail` (and `code`) of an error reply, or its first bytes.
fn error_detail(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ApiError {
        code: Option<serde_json::Value>,
        detail: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<ApiError>(body) {
        Ok(ApiError { code, detail }) => {
            let detail = detail.map_or_else(String::new, |d| match d {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            });
            match code {
                Some(c) => format!("[code {c}] {detail}"),
                None => detail,
            }
        }
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_explained() {
        assert_eq!(
            error_detail(br#"{"code": 3, "detail": "no such node"}"#),
            "[code 3] no such node"
        );
        assert_eq!(
            error_detail(br#"{"detail": "Invalid SuperNode authentication"}"#),
            "Invalid SuperNode authentication"
        );
        assert_eq!(error_detail(b"oops"), "oops");
    }

    #[test]
    fn addresses_are_checked() {
        assert!(
            is_loopback("127.0.0.1:9092") && is_loopback("localhost:1") && is_loopback("[::1]:8")
        );
        assert!(!is_loopback("10.0.0.1:9092"));
        let e = FleetClient::new(&Connection::insecure("http://x:1"), NodeKey::generate())
            .err()
            .unwrap();
        assert!(e.to_string().contains("expected host:port"), "{e}");
    }

    #[test]
    fn an_absent_superlink_is_a_transient_transport_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = FleetClient::new(
            &Connection::insecure(format!("127.0.0.1:{port}")),
            NodeKey::generate(),
        )
        .unwrap();
        let e = c
            .call::<crate::proto::ActivateNodeResponse>(
                "activate-node",
                &crate::proto::ActivateNodeRequest::default(),
            )
            .unwrap_err();
        assert!(e.is_transient(), "{e}");
    }
}
