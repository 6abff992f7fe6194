//! `run_node` against a scripted SuperLink on loopback (a small HTTP/1.1
//! server speaking the Fleet API): a corrupt message is answered with an
//! error and the node carries on, a SuperLink that forgets the node makes
//! it join again, good messages are answered with the client's results,
//! and the node leaves cleanly when stopped. The real SuperLink is in
//! `crates/petal/tests/fleet.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bytes::Bytes;
use petal_core::{
    Client, Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar,
};
use petal_fleet::objects::{ArrayData, Objects, Record, RecordDict, RecordValue};
use petal_fleet::testing::{FakeSuperLink, Pull, State, message};
use petal_fleet::{Connection, NodeOptions, NodeSummary, run_node};

/// Doubles the parameters it trains; evaluates to loss 0.5, accuracy 0.75.
struct Doubler;

impl Client for Doubler {
    fn get_parameters(&mut self, _: &Config) -> Result<Parameters, CoreError> {
        Ok(Parameters::new(Vec::new()))
    }
    fn fit(&mut self, ins: FitIns) -> Result<FitRes, CoreError> {
        let mut p = (*ins.parameters).clone();
        for t in &mut p.tensors {
            t.data
                .as_f32_mut()
                .unwrap()
                .iter_mut()
                .for_each(|x| *x *= 2.0);
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

    let fake = FakeSuperLink::start(state, stop.clone());
    let mut opts = NodeOptions::new(Connection::insecure(fake.addr()));
    opts.poll_interval = Duration::from_millis(10);
    let summary = run_node(&opts, &mut Doubler, &stop).expect("the node stops cleanly");
    assert_eq!(
        summary,
        NodeSummary {
            replies: 3,
            failures: 1
        }
    );

    let s = fake.state();
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
    assert_eq!(
        (arrays[0].0.as_str(), w.data.to_f32_vec()),
        ("w", vec![2.0, 4.0])
    );
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
