//! One hostile SuperLink against a real `petal node` (a scripted Fleet API
//! on loopback): the node's memory and CPU are measured from outside the
//! process, and it must keep answering honest messages afterwards.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use petal_fleet::objects::{ArrayData, ObjectSet, Record, RecordDict, object_bytes, object_id};
use petal_fleet::proto;
use petal_fleet::testing::{FakeSuperLink, Pull, State, message};
use prost::Message;
use support::*;

/// A `petal node` (no-op learner) of `fake`, and its log.
struct Node {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    fn start(fake: &FakeSuperLink, extra: &[&str]) -> Node {
        let mut child = petal()
            .args(["node", "--insecure", "--superlink", fake.addr()])
            .args(["--device", "noop", "--dataset", "synthetic"])
            .args(["--isolation", "none", "--poll-interval", "0.05"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("petal node starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let lines = BufReader::new(child.stderr.take().unwrap()).lines();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Node { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn terminate(&mut self) -> Duration {
        let start = Instant::now();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        wait(&mut self.child, "petal node", Duration::from_secs(30));
        start.elapsed()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn arrays(values: &[f32]) -> Record {
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

/// An honest train message.
fn honest(objects: &mut BTreeMap<String, Bytes>) -> Pull {
    let content: RecordDict = vec![("arrays".into(), arrays(&[1.0, 2.0]))];
    Pull::Message(Box::new(message("train", &content, objects)))
}

/// Waits until the fake holds `n` replies (or `limit` passes).
fn replies(fake: &FakeSuperLink, n: usize, limit: Duration) -> Vec<proto::Message> {
    eventually(limit, || fake.state().replies.len() >= n);
    fake.state().replies.iter().map(|r| r.0.clone()).collect()
}

/// The ids of a tree, children first.
fn tree_of(id: &str, children: Vec<proto::ObjectTree>) -> proto::ObjectTree {
    proto::ObjectTree {
        object_id: id.to_string(),
        children,
    }
}

/// Objects that multiply when read: an array whose chunk list names one
/// 5 MiB chunk 400 times (2 GB assembled), a record naming one 5 MiB array
/// 200 times (1 GB), sent with 10,000 extra messages in the same pull. The
/// node refuses each message with an error reply, stays small, and
/// answers the honest message that follows.
#[test]
fn amplifying_objects_are_refused_within_the_budget() {
    let mut objects = BTreeMap::new();
    // An array promising 5 MiB whose chunk list repeats one chunk.
    let chunk = vec![0u8; 5 << 20];
    let chunk_bytes = object_bytes("ArrayChunk", &[], &chunk);
    let chunk_id = object_id(&chunk_bytes);
    objects.insert(chunk_id.clone(), Bytes::from(chunk_bytes));
    let ids = vec!["0"; 400].join(", ");
    let body = format!(
        "{{\"dtype\": \"float32\", \"shape\": [1310720], \"stype\": \"numpy.ndarray\", \
         \"arraychunk_ids\": [{ids}]}}"
    );
    let array = object_bytes("Array", std::slice::from_ref(&chunk_id), body.as_bytes());
    let array_id = object_id(&array);
    objects.insert(array_id.clone(), Bytes::from(array));
    let record_body = format!("{{\"w\": \"{array_id}\"}}");
    let record = object_bytes(
        "ArrayRecord",
        std::slice::from_ref(&array_id),
        record_body.as_bytes(),
    );
    let record_id = object_id(&record);
    objects.insert(record_id.clone(), Bytes::from(record));
    let dict_body = format!("{{\"arrays\": \"{record_id}\"}}");
    let dict = object_bytes(
        "RecordDict",
        std::slice::from_ref(&record_id),
        dict_body.as_bytes(),
    );
    let dict_id = object_id(&dict);
    objects.insert(dict_id.clone(), Bytes::from(dict));
    let tree = |dict_id: &str, record_id: &str, array_id: &str, chunk_id: &str| {
        tree_of(
            dict_id,
            vec![tree_of(
                record_id,
                vec![tree_of(array_id, vec![tree_of(chunk_id, vec![])])],
            )],
        )
    };
    let repeated = tree(&dict_id, &record_id, &array_id, &chunk_id);

    // A real 5 MiB array, named 200 times by one record.
    let big = ArrayData {
        dtype: "float32".into(),
        shape: vec![1_310_720],
        stype: "numpy.ndarray".into(),
        data: petal_proto::npy::encode_f32(&[1_310_720], &vec![0.5; 1_310_720]),
    };
    let content: RecordDict = vec![(
        "arrays".into(),
        Record::Arrays((0..200).map(|i| (format!("w{i}"), big.clone())).collect()),
    )];
    let (many_names, many_names_tree) = message("train", &content, &mut objects);

    let mut state = State::default();
    // The repeated chunk, with 10,000 more messages in the same pull.
    let mut set = ObjectSet::default();
    let meta = proto::Metadata {
        run_id: 1,
        dst_node_id: 7,
        message_type: "train".into(),
        ttl: 3600.0,
        created_at: 1e9,
        ..Default::default()
    };
    let (m, t) = petal_fleet::objects::encode_message(&mut set, meta, None, None);
    objects.extend(set.contents);
    let m_tree = tree_of(&t.object_id, vec![repeated]);
    let mut pull = proto::PullMessagesResponse {
        messages_list: vec![m],
        message_object_trees: vec![m_tree],
        ..Default::default()
    };
    pull.messages_list
        .extend(std::iter::repeat_n(proto::Message::default(), 10_000));
    state.script.push_back(Pull::Raw(200, pull.encode_to_vec()));
    state
        .script
        .push_back(Pull::Message(Box::new((many_names, many_names_tree))));
    state.script.push_back(honest(&mut objects));
    state.objects = objects;
    let fake = FakeSuperLink::start(state, Arc::new(AtomicBool::new(false)));
    let mut node = Node::start(&fake, &[]);
    let peak = PeakRss::watch(node.child.id());
    let got = replies(&fake, 3, Duration::from_secs(120));
    let mib = peak.mib();
    assert!(node.running(), "the node exited:\n{}", node.log());
    node.terminate();
    assert_eq!(got.len(), 3, "replies: {got:?}\n{}", node.log());
    let error = |i: usize| got[i].error.as_ref().map(|e| e.reason.clone());
    let first = error(0).expect("the repeated chunk is an error");
    assert!(first.contains("dtype and shape"), "{first}");
    let second = error(1).expect("the repeated array is an error");
    assert!(second.contains("byte budget"), "{second}");
    assert!(
        error(2).is_none(),
        "the honest message failed: {:?}",
        error(2)
    );
    assert!(
        node.log().contains("10001 messages in one pull"),
        "{}",
        node.log()
    );
    assert!(mib < 400.0, "the node grew to {mib:.0} MiB");
}

/// An object tree of 200,000 children cost a node 56 s of CPU (quadratic
/// duplicate removal) while its heartbeat kept it looking healthy. Such a
/// tree is refused at once, with an error reply.
#[test]
fn a_huge_object_tree_is_refused_at_once() {
    let mut objects = BTreeMap::new();
    let mut state = State::default();
    let content: RecordDict = vec![("arrays".into(), arrays(&[1.0]))];
    let (m, mut t) = message("train", &content, &mut objects);
    t.children = (0..200_000u32)
        .map(|i| tree_of(&format!("{:064x}", u64::from(i) + 1), vec![]))
        .collect();
    state.script.push_back(Pull::Message(Box::new((m, t))));
    state.script.push_back(honest(&mut objects));
    state.objects = objects;
    let fake = FakeSuperLink::start(state, Arc::new(AtomicBool::new(false)));
    let mut node = Node::start(&fake, &[]);
    let got = replies(&fake, 2, Duration::from_secs(60));
    let cpu = cpu_seconds(node.child.id()).unwrap_or(0.0);
    node.terminate();
    assert_eq!(got.len(), 2, "{}", node.log());
    let why = got[0]
        .error
        .as_ref()
        .expect("an error reply")
        .reason
        .clone();
    assert!(why.contains("object tree"), "{why}");
    assert!(got[1].error.is_none());
    assert!(cpu < 10.0, "the node used {cpu:.1} s of CPU");
}

/// One HTTP 429, one 400 and one 200 whose body is not protobuf used to
/// end the node for good; they are retried with backoff.
#[test]
fn transient_superlink_errors_are_retried() {
    let mut objects = BTreeMap::new();
    let mut state = State::default();
    state
        .script
        .push_back(Pull::Raw(429, br#"{"detail": "slow down"}"#.to_vec()));
    state
        .script
        .push_back(Pull::Raw(400, br#"{"detail": "bad request"}"#.to_vec()));
    state
        .script
        .push_back(Pull::Raw(200, b"<html>a proxy page</html>".to_vec()));
    state.script.push_back(honest(&mut objects));
    state.objects = objects;
    let fake = FakeSuperLink::start(state, Arc::new(AtomicBool::new(false)));
    let mut node = Node::start(&fake, &[]);
    let got = replies(&fake, 1, Duration::from_secs(60));
    let alive = node.running();
    node.terminate();
    assert!(alive, "the node exited:\n{}", node.log());
    assert_eq!(got.len(), 1, "{}", node.log());
    assert!(got[0].error.is_none());
}

/// SIGTERM while a request hangs (a SuperLink that answers after 60 s):
/// the node stops within 5 s instead of waiting it out.
#[test]
fn sigterm_is_honoured_during_a_slow_request() {
    let mut state = State::default();
    state.script.push_back(Pull::Stall(Duration::from_secs(60)));
    let fake = FakeSuperLink::start(state, Arc::new(AtomicBool::new(false)));
    let mut node = Node::start(&fake, &[]);
    assert!(
        eventually(Duration::from_secs(30), || fake
            .state()
            .calls
            .iter()
            .any(|c| c == "pull-messages")),
        "{}",
        node.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    let took = node.terminate();
    assert!(
        took < Duration::from_secs(6),
        "the node took {took:?} to stop\n{}",
        node.log()
    );
}
