//! `run_node` against a scripted SuperLink on loopback (a small HTTP/1.1
//! server speaking the Fleet API): a corrupt message is answered with an
//! error and the node carries on, a SuperLink that forgets the node makes
//! it join again, good messages are answered with the client's results,
//! and the node leaves cleanly when stopped. The real SuperLink is in
//! `crates/petal/tests/fleet.rs`.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use petal_core::{
    Client, Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar,
};
use petal_fleet::objects::{
    ArrayData, ObjectSet, Objects, Record, RecordDict, RecordValue, encode_message, tree_ids,
};
use petal_fleet::{Connection, NodeOptions, NodeSummary, proto, run_node};
use prost::Message;

/// What the fake answers to the next `pull-messages`.
enum Pull {
    Message(Box<(proto::Message, proto::ObjectTree)>),
    /// HTTP 404: the SuperLink no longer knows the node.
    Forget,
}

#[derive(Default)]
struct State {
    script: VecDeque<Pull>,
    /// Objects served by `pull-object`.
    objects: BTreeMap<String, Bytes>,
    calls: Vec<String>,
    replies: Vec<(proto::Message, proto::ObjectTree)>,
    pushed: BTreeMap<String, Bytes>,
    /// Set when this many replies have arrived.
    stop_after: usize,
}

struct Fake {
    state: Mutex<State>,
    stop: Arc<AtomicBool>,
}

impl Fake {
    /// Answers one request: (status, body).
    fn handle(&self, rpc: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let mut s = self.state.lock().unwrap();
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
                None => ok(&|| proto::PullMessagesResponse::default().encode_to_vec()),
            },
            "pull-object" => {
                let req = proto::PullObjectRequest::decode(body).unwrap();
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
                let req = proto::PushMessagesRequest::decode(body).unwrap();
                let (m, t) = (
                    req.messages_list[0].clone(),
                    req.message_object_trees[0].clone(),
                );
                let wanted = tree_ids(&t).unwrap();
                s.replies.push((m, t));
                if s.replies.len() >= s.stop_after {
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
                let req = proto::PushObjectRequest::decode(body).unwrap();
                s.pushed.insert(req.object_id, req.object_content);
                ok(&|| proto::PushObjectResponse { stored: true }.encode_to_vec())
            }
            "deactivate-node" => ok(&|| proto::DeactivateNodeResponse {}.encode_to_vec()),
            "unregister-node" => ok(&|| proto::UnregisterNodeFleetResponse {}.encode_to_vec()),
            _ => (404, br#"{"detail": "Not Found"}"#.to_vec()),
        }
    }

    /// Serves HTTP/1.1 requests (keep-alive) on `listener` until the test ends.
    fn serve(self: Arc<Self>, listener: TcpListener) {
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let fake = self.clone();
                std::thread::spawn(move || fake.connection(conn));
            }
        });
    }

    fn connection(&self, conn: TcpStream) {
        let mut out = conn.try_clone().unwrap();
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
                reader.read_line(&mut h).unwrap();
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body).unwrap();
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

/// Doubles the parameters it trains; evaluates to loss 0.5, accuracy 0.75.
struct Doubler;

impl Client for Doubler {
    fn get_parameters(&mut self, _: &Config) -> Result<Parameters, CoreError> {
        Ok(Parameters::new(Vec::new()))
    }
    fn fit(&mut self, ins: FitIns) -> Result<FitRes, CoreError> {
        let mut p = (*ins.parameters).clone();
        for t in &mut p.tensors {
            t.data.iter_mut().for_each(|x| *x *= 2.0);
        }
        let lr = match ins.config.get("lr") {
            Some(Scalar::Double(x)) => *x,
            _ => -1.0,
        };
        Ok(FitRes {
            parameters: p,
            num_examples: 10,
            metrics: [("lr_seen".to_string(), Scalar::Double(lr))].into(),
        })
    }
    fn evaluate(&mut self, _: EvaluateIns) -> Result<EvaluateRes, CoreError> {
        Ok(EvaluateRes {
            loss: 0.5,
            num_examples: 4,
            metrics: [("accuracy".to_string(), Scalar::Double(0.75))].into(),
        })
    }
}

/// A ServerApp's message to node 7, its objects added to `objects`.
fn message(
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

fn model(values: &[f32]) -> Record {
    Record::Arrays(vec![(
        "w".into(),
        ArrayData {
            dtype: "float32".into(),
            shape: vec![values.len() as i64],
            stype: "numpy.ndarray".into(),
            data: petal_proto::npy::encode_f32(&[values.len()], values),
        },
    )])
}

fn metric(content: &RecordDict, name: &str) -> Option<f64> {
    content.iter().find_map(|(_, r)| match r {
        Record::Metrics(items) => items.iter().find_map(|(k, v)| match v {
            RecordValue::Double(x) if k == name => Some(*x),
            RecordValue::Sint(x) if k == name => Some(*x as f64),
            _ => None,
        }),
        _ => None,
    })
}

#[test]
fn a_node_survives_a_corrupt_message_and_a_forgetful_superlink() {
    let stop = Arc::new(AtomicBool::new(false));
    let mut state = State {
        stop_after: 3,
        ..State::default()
    };
    let train: RecordDict = vec![
        ("arrays".into(), model(&[1.0, 2.0])),
        (
            "config".into(),
            Record::Config(vec![("lr".into(), RecordValue::Double(0.25))]),
        ),
    ];
    // 1: a train message whose objects do not hash to their ids (other
    // values than the good message's, so the objects differ).
    let mut corrupt = BTreeMap::new();
    let bad_content: RecordDict = vec![("arrays".into(), model(&[3.0]))];
    let (bad, bad_tree) = message("train", &bad_content, &mut corrupt);
    for content in corrupt.values_mut() {
        let mut v = content.to_vec();
        v.push(b'!');
        *content = Bytes::from(v);
    }
    state.objects.extend(corrupt);
    state
        .script
        .push_back(Pull::Message(Box::new((bad, bad_tree))));
    // 2: the SuperLink forgets the node; 3, 4: good messages.
    state.script.push_back(Pull::Forget);
    let mut objects = BTreeMap::new();
    let (good, good_tree) = message("train", &train, &mut objects);
    let eval_content: RecordDict = vec![("arrays".into(), model(&[1.0, 2.0]))];
    let (eval, eval_tree) = message("evaluate", &eval_content, &mut objects);
    state.objects.extend(objects);
    state
        .script
        .push_back(Pull::Message(Box::new((good.clone(), good_tree))));
    state
        .script
        .push_back(Pull::Message(Box::new((eval, eval_tree))));

    let fake = Arc::new(Fake {
        state: Mutex::new(state),
        stop: stop.clone(),
    });
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    fake.clone().serve(listener);

    let mut opts = NodeOptions::new(Connection::insecure(addr));
    opts.poll_interval = Duration::from_millis(10);
    let summary = run_node(&opts, &mut Doubler, &stop).expect("the node stops cleanly");
    assert_eq!(
        summary,
        NodeSummary {
            replies: 3,
            failures: 1
        }
    );

    let s = fake.state.lock().unwrap();
    let count = |rpc: &str| s.calls.iter().filter(|c| *c == rpc).count();
    assert_eq!(count("activate-node"), 2, "joined again after the 404");
    assert_eq!(
        s.calls[s.calls.len() - 2..],
        ["deactivate-node", "unregister-node"],
        "left cleanly: {:?}",
        s.calls
    );

    // The corrupt message got an error reply naming the problem.
    let (reply, _) = &s.replies[0];
    let error = reply.error.as_ref().expect("an error reply");
    assert!(error.reason.contains("does not hash"), "{}", error.reason);

    // The good ones got the client's results, as objects the fake stored.
    let view = Objects::new(&s.pushed);
    let content = |i: usize| -> RecordDict {
        let (m, t) = &s.replies[i];
        assert!(m.error.is_none());
        view.record_dict(&t.children[0].object_id).unwrap()
    };
    let (trained, evaluated) = (content(1), content(2));
    assert_eq!(
        s.replies[1]
            .0
            .metadata
            .as_ref()
            .unwrap()
            .reply_to_message_id,
        good.metadata.as_ref().unwrap().message_id
    );
    let Some((_, Record::Arrays(arrays))) = trained.iter().find(|(k, _)| k == "arrays") else {
        panic!("no arrays in {trained:?}");
    };
    let w = petal_proto::npy::decode(&arrays[0].1.data).unwrap();
    assert_eq!((arrays[0].0.as_str(), w.data), ("w", vec![2.0, 4.0]));
    assert_eq!(metric(&trained, "num-examples"), Some(10.0));
    assert_eq!(
        metric(&trained, "lr_seen"),
        Some(0.25),
        "config reached the client"
    );
    assert_eq!(metric(&evaluated, "loss"), Some(0.5));
    assert_eq!(metric(&evaluated, "accuracy"), Some(0.75));
    assert_eq!(metric(&evaluated, "num-examples"), Some(4.0));
}
