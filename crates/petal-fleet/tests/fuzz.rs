//! Property-based fuzzing of what a SuperLink's bytes reach in a node: the
//! object parser and the reading of a message's record dict from its
//! objects. Every input must give a value or an error, never a panic.
//! `PETAL_FUZZ_CASES` sets the cases per property (default 4,000, as in
//! CI); `bench/fuzz.sh` runs a million.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use petal_fleet::objects::{
    ArrayData, ObjectSet, Objects, Record, RecordDict, RecordValue, encode_record_dict, object_id,
    parse_object,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn cases() -> u32 {
    std::env::var("PETAL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4_000)
}

/// Runs `property` on `cases()` inputs of `strategy`, then reports the count.
fn fuzz<S: Strategy>(name: &str, strategy: S, property: impl Fn(S::Value))
where
    S::Value: std::fmt::Debug,
{
    let tried = AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |v| {
        tried.fetch_add(1, Ordering::Relaxed);
        property(v);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    eprintln!(
        "fuzz {name}: {} inputs, 0 panics",
        tried.load(Ordering::Relaxed)
    );
}

/// Object heads glued from the pieces real ones are made of.
fn object_bytes() -> impl Strategy<Value = Vec<u8>> {
    let kind = prop_oneof![
        Just("Message".to_string()),
        Just("RecordDict".to_string()),
        Just("ArrayRecord".to_string()),
        Just("Array".to_string()),
        Just("ArrayChunk".to_string()),
        "[ -~é]{0,12}",
    ];
    let child = prop_oneof![Just("a".repeat(64)), "[0-9a-f]{60,66}", "[ -~]{0,8}"];
    let len = prop_oneof![
        Just(None),
        Just(Some(u64::MAX.to_string())),
        Just(Some("-1".to_string())),
        "[0-9]{1,4}".prop_map(Some),
    ];
    let body = proptest::collection::vec(any::<u8>(), 0..64);
    (kind, proptest::collection::vec(child, 0..3), len, body).prop_map(
        |(kind, children, len, body)| {
            let len = len.unwrap_or_else(|| body.len().to_string());
            let mut out = format!("{kind} {} {len}", children.join(",")).into_bytes();
            out.push(0);
            out.extend(body);
            out
        },
    )
}

#[test]
fn object_parser_never_panics() {
    let strategy = prop_oneof![
        object_bytes(),
        proptest::collection::vec(any::<u8>(), 0..96)
    ];
    fuzz("parse_object", strategy, |bytes| {
        let _ = parse_object(&object_id(&bytes), &bytes);
    });
}

/// A message content of the shapes Flower's FedAvg sends.
fn record_dict() -> impl Strategy<Value = RecordDict> {
    let array = (proptest::collection::vec(-4f32..4.0, 0..40), 0usize..3).prop_map(|(v, rank)| {
        let shape = match rank {
            0 if v.len() == 1 => vec![],
            2 => vec![1, v.len()],
            _ => vec![v.len()],
        };
        ArrayData {
            dtype: "float32".into(),
            shape: shape.iter().map(|&d| d as i64).collect(),
            stype: "numpy.ndarray".into(),
            data: petal_proto::npy::encode_f32(&shape, &v),
        }
    });
    let value = prop_oneof![
        (-1e300f64..1e300).prop_map(RecordValue::Double),
        any::<i64>().prop_map(RecordValue::Sint),
        any::<bool>().prop_map(RecordValue::Bool),
        "[ -~é\"\\\\]{0,10}".prop_map(RecordValue::Str),
    ];
    let name = "[a-z\"\\\\é.-]{1,8}";
    (
        proptest::collection::btree_map(name, array, 1..4),
        proptest::collection::btree_map(name, value, 0..4),
    )
        .prop_map(|(arrays, config)| {
            vec![
                (
                    "arrays".into(),
                    Record::Arrays(arrays.into_iter().collect()),
                ),
                (
                    "config".into(),
                    Record::Config(config.into_iter().collect()),
                ),
            ]
        })
}

/// How one object of a valid message is damaged.
#[derive(Debug, Clone)]
enum Damage {
    Flip { at: usize, to: u8 },
    Cut { at: usize },
    Remove,
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, to)| Damage::Flip { at, to }),
        any::<usize>().prop_map(|at| Damage::Cut { at }),
        Just(Damage::Remove),
    ]
}

#[test]
fn reading_damaged_messages_never_panics() {
    let strategy = (record_dict(), any::<usize>(), damage());
    fuzz("record_dict", strategy, |(content, which, damage)| {
        let mut set = ObjectSet::default();
        let tree = encode_record_dict(&mut set, &content);
        let mut contents: BTreeMap<String, Bytes> = set.contents;
        // Undamaged, it reads back as it was written.
        let view = Objects::new(&contents);
        assert_eq!(view.record_dict(&tree.object_id).unwrap(), content);
        // Damaged (the id kept, as if the hash check were passed), it is
        // read or refused, never a panic.
        let ids: Vec<String> = contents.keys().cloned().collect();
        let id = &ids[which % ids.len()];
        match damage {
            Damage::Remove => {
                contents.remove(id);
            }
            Damage::Flip { at, to } => {
                let mut v = contents[id].to_vec();
                let at = at % v.len();
                v[at] = to;
                contents.insert(id.clone(), Bytes::from(v));
            }
            Damage::Cut { at } => {
                let v = &contents[id];
                let cut = v.slice(..at % v.len());
                contents.insert(id.clone(), cut);
            }
        }
        let view = Objects::new(&contents);
        let _ = view.record_dict(&tree.object_id);
    });
}
