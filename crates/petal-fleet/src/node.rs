//! A Petal node in a Flower federation: what `flower-supernode` does, with
//! a Petal [`Client`] doing the work instead of a Python ClientApp.
//!
//! The loop: register (with a fresh key) or use a registered key, activate,
//! send heartbeats from a second thread, and pull messages; for each: pull
//! its objects children first (retrying while they are not yet
//! available), check each against its id, confirm receipt, answer `train`
//! and `evaluate` with the client, push the reply and then every object
//! the SuperLink asks for. A lost SuperLink is retried with backoff; a
//! SuperLink that forgot the node (a restart) is joined again. On stop the
//! node deactivates (and unregisters a key it registered itself).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use petal_core::backoff::Backoff;
use petal_core::{Client, Config, DType, EvaluateIns, FitIns, Parameters, Scalar};
use petal_proto::limits::{LimitError, walk_fields};
use prost::Message as _;

use crate::auth::NodeKey;
use crate::http::{Connection, FleetClient, FleetError};
use crate::objects::{
    ArrayData, MAX_CHILDREN, MAX_DEPTH, ObjectSet, Objects, Record, RecordDict, RecordValue,
    encode_message, object_id, parse_object, tree_ids,
};
use crate::proto;

/// Flower's error code for a ClientApp that raised (`CLIENT_APP_RAISED_EXCEPTION`).
const CLIENT_ERROR: i64 = 2;

/// Settings of a node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// How to reach the SuperLink.
    pub connection: Connection,
    /// A key registered beforehand (`flwr supernode register`); `None`: a
    /// fresh key, registered by the node itself and unregistered at the end.
    pub key: Option<NodeKey>,
    /// Heartbeat interval announced to the SuperLink (10–1800 s).
    pub heartbeat_interval: Duration,
    /// Pause between pulls when there is nothing to do.
    pub poll_interval: Duration,
    /// Failed attempts in a row to reach the SuperLink before giving up.
    pub max_attempts: u32,
    /// Names of the learner's tensors, in its order: arrays are matched by
    /// name when all are present, by position otherwise.
    pub parameter_names: Option<Vec<String>>,
    /// Bytes of objects one message may bring, and of arrays assembled
    /// from them: a message over it is answered with an error.
    pub max_message_bytes: usize,
}

/// Default byte budget of one message (256 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 << 20;

impl NodeOptions {
    /// Defaults: heartbeat every 30 s (Flower's), a pull every second,
    /// 30 attempts (backoff up to 10 s) per outage.
    pub fn new(connection: Connection) -> Self {
        NodeOptions {
            connection,
            key: None,
            heartbeat_interval: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            max_attempts: 30,
            parameter_names: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Why a node stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A call failed in a way retrying cannot fix (a refused join, a bad setting).
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// The SuperLink could not be reached `max_attempts` times in a row.
    #[error("the SuperLink stayed unreachable for {attempts} attempts: {last}")]
    Unreachable { attempts: u32, last: String },
    /// The SuperLink forgot the node again after each of `max_attempts` joins.
    #[error("the SuperLink refused this node {times} times in a row after it joined: {last}")]
    Refused { times: u32, last: String },
}

/// What a node did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct NodeSummary {
    /// Messages answered (including error replies).
    pub replies: usize,
    /// Messages the client failed on (answered with an error).
    pub failures: usize,
}

/// Sleeps `d`, waking early when `stop` is set; true if stopped.
fn pause(d: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(100)));
    }
    stop.load(Ordering::Relaxed)
}

/// The node's link to the SuperLink: the client, its node id, its heartbeat.
struct Session {
    client: Arc<FleetClient>,
    node: proto::Node,
    self_registered: bool,
    heartbeat_stop: Arc<AtomicBool>,
}

impl Session {
    fn node(&self) -> Option<proto::Node> {
        Some(self.node)
    }
}

/// Runs a node until `stop` is set, answering with `client`.
pub fn run_node(
    opts: &NodeOptions,
    client: &mut dyn Client,
    stop: &AtomicBool,
) -> Result<NodeSummary, NodeError> {
    let mut summary = NodeSummary::default();
    let mut session: Option<Session> = None;
    let mut forgotten = 0u32;
    let mut backoff = Backoff::new(
        Duration::from_millis(250),
        Duration::from_secs(10),
        opts.max_attempts,
    );
    let result = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        let serving = session.is_some();
        let step = match &session {
            None => join(opts).map(|s| {
                tracing::info!(
                    node_id = s.node.node_id,
                    "joined the SuperLink {}",
                    opts.connection.superlink
                );
                session = Some(s);
            }),
            Some(s) => serve_once(s, opts, client, stop, &mut summary),
        };
        match step {
            Ok(()) => {
                backoff.reset();
                if serving {
                    forgotten = 0;
                }
            }
            Err(e) if e.is_transient() || (serving && e.is_transient_while_serving()) => {
                let Some(delay) = backoff.failed() else {
                    break Err(NodeError::Unreachable {
                        attempts: backoff.attempts,
                        last: e.to_string(),
                    });
                };
                tracing::warn!("{e}; retrying in {:.1}s", delay.as_secs_f64());
                if pause(delay, stop) {
                    break Ok(());
                }
            }
            Err(
                e @ FleetError::Status {
                    status: 401 | 403 | 404,
                    ..
                },
            ) if session.is_some() => {
                // The SuperLink no longer knows this node (it restarted):
                // join again, soon; give up if it keeps refusing the node.
                if let Some(s) = session.take() {
                    s.heartbeat_stop.store(true, Ordering::Relaxed);
                }
                forgotten += 1;
                if forgotten > opts.max_attempts.max(1) {
                    break Err(NodeError::Refused {
                        times: forgotten,
                        last: e.to_string(),
                    });
                }
                let wait = Duration::from_millis(250)
                    .saturating_mul(1 << forgotten.min(6))
                    .min(Duration::from_secs(10));
                tracing::warn!("{e}; joining again in {:.1}s", wait.as_secs_f64());
                if pause(wait, stop) {
                    break Ok(());
                }
            }
            Err(e) => break Err(e.into()),
        }
    };
    if let Some(s) = session {
        leave(&s);
    }
    result.map(|()| summary)
}

/// Registers (with a fresh key) or uses the given key, activates, starts the heartbeat.
fn join(opts: &NodeOptions) -> Result<Session, FleetError> {
    let self_registered = opts.key.is_none();
    let key = opts.key.clone().unwrap_or_else(NodeKey::generate);
    let client = Arc::new(FleetClient::new(&opts.connection, key)?);
    let public_key = Bytes::copy_from_slice(client.key().public_pem());
    if self_registered {
        client.call::<proto::RegisterNodeFleetResponse>(
            "register-node",
            &proto::RegisterNodeFleetRequest {
                public_key: public_key.clone(),
            },
        )?;
    }
    let interval = opts.heartbeat_interval.as_secs_f64();
    let activated: proto::ActivateNodeResponse = client
        .call(
            "activate-node",
            &proto::ActivateNodeRequest {
                public_key,
                heartbeat_interval: interval,
            },
        )
        .map_err(|e| match e {
            FleetError::Status {
                rpc,
                status,
                detail,
            } if !self_registered && (400..500).contains(&status) => FleetError::Status {
                rpc,
                status,
                detail: format!(
                    "{detail} (is this node's public key registered? \
                     `flwr supernode register KEY.pub`; a node with this key that \
                     stopped without leaving stays online for 2 heartbeat intervals)"
                ),
            },
            e => e,
        })?;
    let node = proto::Node {
        node_id: activated.node_id,
    };
    let heartbeat_stop = Arc::new(AtomicBool::new(false));
    {
        let (client, node, stop) = (client.clone(), node, heartbeat_stop.clone());
        let every = opts.heartbeat_interval;
        std::thread::spawn(move || {
            while !pause(every, &stop) {
                let r = client.call::<proto::SendNodeHeartbeatResponse>(
                    "send-node-heartbeat",
                    &proto::SendNodeHeartbeatRequest {
                        node: Some(node),
                        heartbeat_interval: interval,
                    },
                );
                match r {
                    Ok(r) if r.success => {}
                    Ok(_) => tracing::warn!("the SuperLink refused a heartbeat"),
                    Err(e) => tracing::warn!("heartbeat: {e}"),
                }
            }
        });
    }
    Ok(Session {
        client,
        node,
        self_registered,
        heartbeat_stop,
    })
}

/// Deactivates (and unregisters a self-registered key); best effort.
fn leave(s: &Session) {
    s.heartbeat_stop.store(true, Ordering::Relaxed);
    let id = s.node.node_id;
    if let Err(e) = s.client.call::<proto::DeactivateNodeResponse>(
        "deactivate-node",
        &proto::DeactivateNodeRequest { node_id: id },
    ) {
        tracing::warn!("deactivating node {id}: {e}");
    }
    if s.self_registered
        && let Err(e) = s.client.call::<proto::UnregisterNodeFleetResponse>(
            "unregister-node",
            &proto::UnregisterNodeFleetRequest { node_id: id },
        )
    {
        tracing::warn!("unregistering node {id}: {e}");
    }
    tracing::info!(node_id = id, "left the SuperLink");
}

/// One pull: answers a message if there is one, else waits a poll interval.
fn serve_once(
    s: &Session,
    opts: &NodeOptions,
    client: &mut dyn Client,
    stop: &AtomicBool,
    summary: &mut NodeSummary,
) -> Result<(), FleetError> {
    let pulled = s.client.call_bytes(
        "pull-messages",
        &proto::PullMessagesRequest {
            node: s.node(),
            message_ids: Vec::new(),
        },
    )?;
    let Some((msg, tree)) = first_message(&pulled)? else {
        pause(opts.poll_interval, stop);
        return Ok(());
    };
    let empty = proto::ObjectTree::default();
    let Some(meta) = msg.metadata.clone() else {
        // Nothing to reply to: skip it (the SuperLink does not send a
        // message twice).
        tracing::warn!("the SuperLink sent a message without metadata; skipped");
        summary.failures += 1;
        return Ok(());
    };
    tracing::info!(
        run = meta.run_id,
        round = %meta.group_id,
        "received {} message",
        meta.message_type
    );
    let started = Instant::now();
    // Objects that are missing, corrupt or unparsable fail this message
    // (an error reply), not the node.
    let objects = match &tree {
        Err(why) => Err(why.clone()),
        Ok(tree) => match pull_objects(s, meta.run_id, tree, stop, opts.max_message_bytes) {
            Err(FleetError::Malformed { reason, .. }) => {
                Err(format!("bad message objects: {reason}"))
            }
            r => Ok(r?),
        },
    };
    let tree = tree.as_ref().unwrap_or(&empty);
    s.client.call::<proto::ConfirmMessageReceivedResponse>(
        "confirm-message-received",
        &proto::ConfirmMessageReceivedRequest {
            node: s.node(),
            run_id: meta.run_id,
            message_object_id: meta.message_id.clone(),
        },
    )?;
    let answered = objects.and_then(|objects| {
        // Arrays assembled from the objects share the message's budget.
        let pulled: usize = objects.values().map(Bytes::len).sum();
        let budget = opts.max_message_bytes.saturating_sub(pulled);
        answer(&meta, tree, &objects, client, opts, budget)
    });
    let (content, error) = match answered {
        Ok(content) => (Some(content), None),
        Err(reason) => {
            tracing::warn!("{} failed: {reason}", meta.message_type);
            summary.failures += 1;
            (
                None,
                Some(proto::Error {
                    code: CLIENT_ERROR,
                    reason,
                }),
            )
        }
    };
    push_reply(s, &meta, content.as_ref(), error, started.elapsed())?;
    summary.replies += 1;
    Ok(())
}

/// The first message of a `PullMessagesResponse` and its object tree,
/// decoded alone: the others (a SuperLink sends one at a time) are
/// refused without being decoded, and an object tree over
/// [`MAX_CHILDREN`] nodes is refused (the message answered with an error)
/// before it is decoded.
#[allow(clippy::type_complexity)]
fn first_message(
    bytes: &[u8],
) -> Result<Option<(proto::Message, Result<proto::ObjectTree, String>)>, FleetError> {
    let malformed = |reason: String| FleetError::Malformed {
        rpc: "pull-messages".into(),
        reason,
    };
    let (mut msg, mut tree, mut extra) = (None, None, 0usize);
    walk_fields(bytes, |n, b| {
        match (n, b) {
            (2, Some(b)) if msg.is_none() => msg = Some(b),
            (3, Some(b)) if tree.is_none() => tree = Some(b),
            (2, _) => extra += 1,
            _ => {}
        }
        Ok(())
    })
    .map_err(|e| malformed(e.to_string()))?;
    if extra > 0 {
        tracing::warn!(
            "the SuperLink sent {} messages in one pull; the first is answered, \
             the others are refused",
            extra + 1
        );
    }
    let (Some(msg), Some(tree)) = (msg, tree) else {
        return Ok(None);
    };
    let msg = proto::Message::decode(msg).map_err(|e| malformed(e.to_string()))?;
    let tree = count_tree_nodes(tree, 0, &mut 0)
        .map_err(|e| format!("bad message objects: {e}"))
        .and_then(|()| {
            proto::ObjectTree::decode(tree).map_err(|e| format!("bad message objects: {e}"))
        });
    Ok(Some((msg, tree)))
}

/// Counts the nodes of an encoded `ObjectTree` (children are field 2),
/// refusing more than [`MAX_CHILDREN`] or a depth over [`MAX_DEPTH`].
fn count_tree_nodes(bytes: &[u8], depth: usize, nodes: &mut usize) -> Result<(), LimitError> {
    *nodes += 1;
    if *nodes > MAX_CHILDREN || depth > MAX_DEPTH {
        return Err(LimitError::TooMany {
            what: "objects (or levels) in the message's object tree",
            limit: MAX_CHILDREN,
        });
    }
    walk_fields(bytes, |n, b| match (n, b) {
        (2, Some(child)) => count_tree_nodes(child, depth + 1, nodes),
        _ => Ok(()),
    })
}

/// Pulls every object of `tree`, children first; each checked against its
/// id, all together at most `budget` bytes.
fn pull_objects(
    s: &Session,
    run_id: u64,
    tree: &proto::ObjectTree,
    stop: &AtomicBool,
    budget: usize,
) -> Result<BTreeMap<String, Bytes>, FleetError> {
    let malformed = |reason: String| FleetError::Malformed {
        rpc: "pull-object".into(),
        reason,
    };
    let mut out = BTreeMap::new();
    let mut total = 0usize;
    for id in tree_ids(tree).map_err(|e| malformed(e.to_string()))? {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut wait = Duration::from_millis(50);
        let content = loop {
            let r: proto::PullObjectResponse = s.client.call(
                "pull-object",
                &proto::PullObjectRequest {
                    node: s.node(),
                    run_id,
                    object_id: id.clone(),
                },
            )?;
            if !r.object_found {
                return Err(malformed(format!("object {id} was not found")));
            }
            if r.object_available {
                break r.object_content;
            }
            if Instant::now() > deadline {
                return Err(malformed(format!(
                    "object {id} stayed unavailable for 300 s"
                )));
            }
            if pause(wait, stop) {
                return Err(FleetError::Transport("stopped".into()));
            }
            wait = (wait * 2).min(Duration::from_secs(1));
        };
        total = total.saturating_add(content.len());
        if total > budget {
            return Err(malformed(format!(
                "the message's objects exceed its byte budget of {budget} bytes \
                 (--max-message-mb)"
            )));
        }
        if object_id(&content) != id {
            return Err(malformed(format!("object {id} does not hash to its id")));
        }
        parse_object(&id, &content).map_err(|e| malformed(e.to_string()))?;
        out.insert(id, content);
    }
    Ok(out)
}

/// The reply content for a message, or why there is none.
fn answer(
    meta: &proto::Metadata,
    tree: &proto::ObjectTree,
    objects: &BTreeMap<String, Bytes>,
    client: &mut dyn Client,
    opts: &NodeOptions,
    budget: usize,
) -> Result<RecordDict, String> {
    let view = Objects::with_budget(objects, budget);
    let rd_id = tree
        .children
        .first()
        .map(|t| t.object_id.clone())
        .ok_or("the message has no content")?;
    let content = view.record_dict(&rd_id).map_err(|e| e.to_string())?;
    let (names, parameters) = parameters_of(&content, opts.parameter_names.as_deref())?;
    let config = config_of(&content);
    match meta.message_type.as_str() {
        "train" => {
            let res = client
                .fit(FitIns {
                    parameters: Arc::new(parameters),
                    config,
                })
                .map_err(|e| e.to_string())?;
            let arrays = names_for(&names, &res.parameters)?;
            let mut metrics = vec![(
                "num-examples".to_string(),
                RecordValue::Sint(i64::try_from(res.num_examples).unwrap_or(i64::MAX)),
            )];
            metrics.extend(numeric_metrics(&res.metrics));
            Ok(vec![
                ("arrays".into(), Record::Arrays(arrays)),
                ("metrics".into(), Record::Metrics(metrics)),
            ])
        }
        "evaluate" => {
            let res = client
                .evaluate(EvaluateIns {
                    parameters: Arc::new(parameters),
                    config,
                })
                .map_err(|e| e.to_string())?;
            let mut metrics = vec![
                ("loss".to_string(), RecordValue::Double(res.loss as f64)),
                (
                    "num-examples".to_string(),
                    RecordValue::Sint(i64::try_from(res.num_examples).unwrap_or(i64::MAX)),
                ),
            ];
            metrics.extend(numeric_metrics(&res.metrics));
            Ok(vec![("metrics".into(), Record::Metrics(metrics))])
        }
        other => Err(format!(
            "Petal nodes answer train and evaluate messages, not '{other}'"
        )),
    }
}

fn numeric_metrics(m: &Config) -> Vec<(String, RecordValue)> {
    m.iter()
        .filter_map(|(k, v)| match v {
            Scalar::I64(x) => Some((k.clone(), RecordValue::Sint(*x))),
            Scalar::U64(x) => Some((k.clone(), RecordValue::Uint(*x))),
            Scalar::Double(x) => Some((k.clone(), RecordValue::Double(*x))),
            _ => None,
        })
        .collect()
}

/// The model in the message: the `arrays` record (or the first array
/// record), in the learner's order when its names are all present.
fn parameters_of(
    content: &RecordDict,
    learner_names: Option<&[String]>,
) -> Result<(Vec<String>, Parameters), String> {
    let arrays = content
        .iter()
        .find(|(k, r)| k == "arrays" && matches!(r, Record::Arrays(_)))
        .or_else(|| content.iter().find(|(_, r)| matches!(r, Record::Arrays(_))))
        .and_then(|(_, r)| match r {
            Record::Arrays(a) => Some(a),
            _ => None,
        })
        .ok_or("the message carries no ArrayRecord")?;
    let mut ordered: Vec<&(String, ArrayData)> = arrays.iter().collect();
    if let Some(names) = learner_names
        && names.len() == arrays.len()
        && names.iter().all(|n| arrays.iter().any(|(k, _)| k == n))
    {
        ordered = names
            .iter()
            .filter_map(|n| arrays.iter().find(|(k, _)| k == n))
            .collect();
    }
    let mut tensors = Vec::with_capacity(ordered.len());
    for (name, a) in &ordered {
        if a.stype != "numpy.ndarray" {
            return Err(format!(
                "array '{name}' is a '{}', not a numpy.ndarray",
                a.stype
            ));
        }
        let npy = petal_proto::npy::decode(&a.data).map_err(|e| format!("array '{name}': {e}"))?;
        if DType::from_name(&a.dtype) != Some(npy.data.dtype()) {
            return Err(format!(
                "array '{name}' says dtype {} but its data is {}",
                a.dtype,
                npy.data.dtype()
            ));
        }
        tensors.push(npy.into_tensor());
    }
    Ok((
        ordered.iter().map(|(n, _)| n.clone()).collect(),
        Parameters::new(tensors),
    ))
}

/// The trained tensors under the names they came with.
fn names_for(names: &[String], p: &Parameters) -> Result<Vec<(String, ArrayData)>, String> {
    if names.len() != p.tensors.len() {
        return Err(format!(
            "the learner returned {} tensors for {} arrays",
            p.tensors.len(),
            names.len()
        ));
    }
    Ok(names
        .iter()
        .zip(&p.tensors)
        .map(|(n, t)| {
            (
                n.clone(),
                ArrayData {
                    dtype: t.dtype().numpy_name().into(),
                    shape: t.shape.iter().map(|&d| d as i64).collect(),
                    stype: "numpy.ndarray".into(),
                    data: petal_proto::npy::encode(t),
                },
            )
        })
        .collect())
}

/// The `config` record as a client config; kebab-case keys are also given
/// in snake case (Flower's `server-round` as Petal's `server_round`), and
/// Flower's customary `local-epochs` as `epochs`.
fn config_of(content: &RecordDict) -> Config {
    let mut config = Config::new();
    for (_, r) in content {
        if let Record::Config(items) = r {
            for (k, v) in items {
                let s = match v {
                    RecordValue::Double(x) => Scalar::Double(*x),
                    RecordValue::Sint(x) => Scalar::I64(*x),
                    RecordValue::Uint(x) => Scalar::U64(*x),
                    RecordValue::Bool(x) => Scalar::Bool(*x),
                    RecordValue::Str(x) => Scalar::Str(x.clone()),
                    RecordValue::Bytes(x) => Scalar::Bytes(x.clone()),
                    RecordValue::List(_) => continue,
                };
                config.insert(k.replace('-', "_"), s.clone());
                config.insert(k.clone(), s);
            }
        }
    }
    if !config.contains_key("epochs")
        && let Some(e) = config.get("local_epochs").cloned()
    {
        config.insert("epochs".into(), e);
    }
    config
}

/// Pushes the reply and the objects the SuperLink asks for.
fn push_reply(
    s: &Session,
    meta: &proto::Metadata,
    content: Option<&RecordDict>,
    error: Option<proto::Error>,
    runtime: Duration,
) -> Result<(), FleetError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let reply_meta = proto::Metadata {
        run_id: meta.run_id,
        message_id: String::new(),
        src_node_id: meta.dst_node_id,
        dst_node_id: meta.src_node_id,
        reply_to_message_id: meta.message_id.clone(),
        group_id: meta.group_id.clone(),
        ttl: (meta.created_at + meta.ttl - now).max(0.0),
        message_type: meta.message_type.clone(),
        created_at: now,
        src_task_id: meta.dst_task_id,
        dst_task_id: meta.src_task_id,
    };
    let mut set = ObjectSet::default();
    let (message, tree) = encode_message(&mut set, reply_meta, content, error);
    let pushed: proto::PushMessagesResponse = s.client.call(
        "push-messages",
        &proto::PushMessagesRequest {
            node: s.node(),
            messages_list: vec![message],
            message_object_trees: vec![tree.clone()],
            clientapp_runtime_list: vec![runtime.as_secs_f64()],
        },
    )?;
    let wanted: std::collections::BTreeSet<&str> =
        pushed.objects_to_push.iter().map(String::as_str).collect();
    let ids = tree_ids(&tree).map_err(|e| FleetError::Malformed {
        rpc: "push-messages".into(),
        reason: e.to_string(),
    })?;
    for id in ids {
        if !wanted.contains(id.as_str()) {
            continue;
        }
        let Some(content) = set.contents.get(&id) else {
            continue;
        };
        let stored: proto::PushObjectResponse = s.client.call(
            "push-object",
            &proto::PushObjectRequest {
                node: s.node(),
                run_id: meta.run_id,
                object_id: id.clone(),
                object_content: content.clone(),
                session_id: pushed.session_id.clone(),
            },
        )?;
        if !stored.stored {
            tracing::debug!("object {id} was already stored");
        }
    }
    tracing::info!("replied to the {} message", meta.message_type);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrays(names: &[&str]) -> RecordDict {
        vec![(
            "arrays".into(),
            Record::Arrays(
                names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        (
                            n.to_string(),
                            ArrayData {
                                dtype: "float32".into(),
                                shape: vec![1],
                                stype: "numpy.ndarray".into(),
                                data: petal_proto::npy::encode_f32(&[1], &[i as f32]),
                            },
                        )
                    })
                    .collect(),
            ),
        )]
    }

    #[test]
    fn arrays_follow_the_learners_names_when_all_are_there() {
        let learner: Vec<String> = vec!["a".into(), "b".into()];
        let (names, p) = parameters_of(&arrays(&["b", "a"]), Some(&learner)).unwrap();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(p.tensors[0].data, vec![1.0f32], "'a' came second");
        let (names, _) = parameters_of(&arrays(&["0", "1"]), Some(&learner)).unwrap();
        assert_eq!(names, ["0", "1"], "other names: by position");
        assert!(parameters_of(&Vec::new(), None).is_err());
    }

    #[test]
    fn server_round_is_given_under_both_names() {
        let c: RecordDict = vec![(
            "config".into(),
            Record::Config(vec![("server-round".into(), RecordValue::Sint(4))]),
        )];
        let config = config_of(&c);
        assert_eq!(config["server_round"], Scalar::I64(4));
        assert_eq!(config["server-round"], Scalar::I64(4));
    }

    #[test]
    fn local_epochs_means_epochs_unless_epochs_is_given() {
        let with = |items: Vec<(&str, i64)>| {
            let items = items
                .into_iter()
                .map(|(k, v)| (k.to_string(), RecordValue::Sint(v)))
                .collect();
            config_of(&vec![("config".into(), Record::Config(items))])
        };
        assert_eq!(with(vec![("local-epochs", 3)])["epochs"], Scalar::I64(3));
        let both = with(vec![("local-epochs", 3), ("epochs", 2)]);
        assert_eq!(both["epochs"], Scalar::I64(2));
    }
}
