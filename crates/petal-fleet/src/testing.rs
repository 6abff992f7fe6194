//! A scripted SuperLink for tests (feature `testing`): a small HTTP/1.1
//! server speaking the Fleet API on loopback. Each `pull-messages` answers
//! the next [`Pull`] of its script; objects are served from a map; every
//! call, reply and pushed object is recorded.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;

use crate::objects::{ObjectSet, RecordDict, encode_message, tree_ids};
use crate::proto;

/// What the fake answers to one `pull-messages`.
pub enum Pull {
    /// A message and its object tree.
    Message(Box<(proto::Message, proto::ObjectTree)>),
    /// HTTP 404: the SuperLink no longer knows the node.
    Forget,
    /// Any status and body, as is.
    Raw(u16, Vec<u8>),
    /// Waits this long, then answers with nothing to do.
    Stall(Duration),
}

/// What the fake saw and will answer.
#[derive(Default)]
pub struct State {
    /// Answers to the next pulls (nothing to do once empty).
    pub script: VecDeque<Pull>,
    /// Objects served by `pull-object`.
    pub objects: BTreeMap<String, Bytes>,
    /// Every call, by RPC name.
    pub calls: Vec<String>,
    /// Every reply message pushed, with its tree.
    pub replies: Vec<(proto::Message, proto::ObjectTree)>,
    /// Every object pushed.
    pub pushed: BTreeMap<String, Bytes>,
    /// `stop` is set when this many replies have arrived (0: never).
    pub stop_after: usize,
}

/// A scripted SuperLink serving on a loopback port.
pub struct FakeSuperLink {
    state: Mutex<State>,
    stop: Arc<AtomicBool>,
    addr: String,
}

impl FakeSuperLink {
    /// Starts serving `state`; `stop` is set after `state.stop_after` replies.
    pub fn start(state: State, stop: Arc<AtomicBool>) -> Arc<FakeSuperLink> {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let addr = listener.local_addr().expect("bound").to_string();
        let fake = Arc::new(FakeSuperLink {
            state: Mutex::new(state),
            stop,
            addr,
        });
        let served = fake.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let fake = served.clone();
                std::thread::spawn(move || fake.connection(conn));
            }
        });
        fake
    }

    /// `host:port` of the fake's Fleet API.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// What the fake saw (and its script).
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers one request: (status, body).
    fn handle(&self, rpc: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let mut s = self.state();
        s.calls.push(rpc.to_string());
        let ok = |m: &dyn Fn() -> Vec<u8>| (200, m());
        match rpc {
            "register-node" => {
                ok(&|| proto::RegisterNodeFleetResponse { node_id: 7 }.encode_to_vec())
            }
            "activate-node" => ok(&|| proto::ActivateNodeResponse { node_id: 7 }.encode_to_vec()),
            "send-node-heartbeat" => {
                ok(&|| proto::SendNodeHeartbeatResponse { success: true }.encode_to_vec())
            }
            "pull-messages" => match s.script.pop_front() {
                Some(Pull::Message(m)) => ok(&|| {
                    proto::PullMessagesResponse {
                        messages_list: vec![m.0.clone()],
                        message_object_trees: vec![m.1.clone()],
                        ..Default::default()
                    }
                    .encode_to_vec()
                }),
                Some(Pull::Forget) => (
                    404,
                    br#"{"code": 3001, "detail": "Node not found"}"#.to_vec(),
                ),
                Some(Pull::Raw(status, body)) => (status, body),
                Some(Pull::Stall(d)) => {
                    drop(s);
                    std::thread::sleep(d);
                    ok(&|| proto::PullMessagesResponse::default().encode_to_vec())
                }
                None => ok(&|| proto::PullMessagesResponse::default().encode_to_vec()),
            },
            "pull-object" => {
                let Ok(req) = proto::PullObjectRequest::decode(body) else {
                    return (400, b"{}".to_vec());
                };
                let found = s.objects.get(&req.object_id).cloned();
                ok(&|| {
                    proto::PullObjectResponse {
                        object_found: found.is_some(),
                        object_available: found.is_some(),
                        object_content: found.clone().unwrap_or_default(),
                    }
                    .encode_to_vec()
                })
            }
            "confirm-message-received" => {
                ok(&|| proto::ConfirmMessageReceivedResponse {}.encode_to_vec())
            }
            "push-messages" => {
                let Ok(req) = proto::PushMessagesRequest::decode(body) else {
                    return (400, b"{}".to_vec());
                };
                let (Some(m), Some(t)) = (
                    req.messages_list.first().cloned(),
                    req.message_object_trees.first().cloned(),
                ) else {
                    return (400, b"{}".to_vec());
                };
                let wanted = tree_ids(&t).unwrap_or_default();
                s.replies.push((m, t));
                if s.stop_after > 0 && s.replies.len() >= s.stop_after {
                    self.stop.store(true, Ordering::Relaxed);
                }
                ok(&|| {
                    proto::PushMessagesResponse {
                        objects_to_push: wanted.clone(),
                        session_id: "s".into(),
                        ..Default::default()
                    }
                    .encode_to_vec()
                })
            }
            "push-object" => {
                let Ok(req) = proto::PushObjectRequest::decode(body) else {
                    return (400, b"{}".to_vec());
                };
                s.pushed.insert(req.object_id, req.object_content);
                ok(&|| proto::PushObjectResponse { stored: true }.encode_to_vec())
            }
            "deactivate-node" => ok(&|| proto::DeactivateNodeResponse {}.encode_to_vec()),
            "unregister-node" => ok(&|| proto::UnregisterNodeFleetResponse {}.encode_to_vec()),
            _ => (404, br#"{"detail": "Not Found"}"#.to_vec()),
        }
    }

    /// Serves HTTP/1.1 requests (keep-alive) on one connection.
    fn connection(&self, conn: TcpStream) {
        let Ok(mut out) = conn.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(conn);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut length = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 {
                    return;
                }
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            let rpc = path.strip_prefix("/v1/fleet/").unwrap_or(&path);
            let (status, reply) = self.handle(rpc, &body);
            let kind = if status == 200 {
                "application/protobuf"
            } else {
                "application/json"
            };
            let head = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: {kind}\r\ncontent-length: {}\r\n\r\n",
                reply.len()
            );
            if out.write_all(head.as_bytes()).is_err() || out.write_all(&reply).is_err() {
                return;
            }
        }
    }
}

/// A ServerApp's message of type `kind` to node 7; its objects are added
/// to `objects`.
pub fn message(
    kind: &str,
    content: &RecordDict,
    objects: &mut BTreeMap<String, Bytes>,
) -> (proto::Message, proto::ObjectTree) {
    let meta = proto::Metadata {
        run_id: 1,
        src_node_id: 1,
        dst_node_id: 7,
        group_id: "1".into(),
        ttl: 3600.0,
        message_type: kind.into(),
        created_at: 1e9,
        ..Default::default()
    };
    let mut set = ObjectSet::default();
    let (m, t) = encode_message(&mut set, meta, Some(content), None);
    objects.extend(set.contents);
    (m, t)
}
