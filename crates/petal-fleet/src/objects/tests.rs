use super::*;
use base64::Engine;

/// A message Flower 1.41 built, as its objects (`tests/fixtures/make_objects.py`).
struct Fixture {
    message_id: String,
    metadata: proto::Metadata,
    tree: proto::ObjectTree,
    objects: BTreeMap<String, Bytes>,
}

fn tree_of(v: &serde_json::Value) -> proto::ObjectTree {
    proto::ObjectTree {
        object_id: v["id"].as_str().unwrap().to_string(),
        children: v["children"]
            .as_array()
            .unwrap()
            .iter()
            .map(tree_of)
            .collect(),
    }
}

fn fixture() -> Fixture {
    let v: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/fixtures/objects.json")).unwrap();
    let b64 = |s: &serde_json::Value| {
        base64::engine::general_purpose::STANDARD
            .decode(s.as_str().unwrap())
            .unwrap()
    };
    Fixture {
        message_id: v["message_id"].as_str().unwrap().to_string(),
        metadata: proto::Metadata::decode(b64(&v["metadata"]).as_slice()).unwrap(),
        tree: tree_of(&v["tree"]),
        objects: v["objects"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, o)| (k.clone(), Bytes::from(b64(o))))
            .collect(),
    }
}

#[test]
fn flowers_objects_parse_and_their_ids_are_their_hashes() {
    let f = fixture();
    for (id, content) in &f.objects {
        assert_eq!(&object_id(content), id);
        parse_object(id, content).unwrap();
    }
    let ids = tree_ids(&f.tree).unwrap();
    assert_eq!(ids.last(), Some(&f.message_id), "the message comes last");
    assert_eq!(ids.len(), f.objects.len());
}

#[test]
fn flowers_records_decode() {
    let f = fixture();
    let objects = Objects::new(&f.objects);
    let rd_id = &f.tree.children[0].object_id;
    let content = objects.record_dict(rd_id).unwrap();
    let names: Vec<&str> = content.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["arrays", "config", "metrics"]);
    let Record::Arrays(arrays) = &content[0].1 else {
        panic!()
    };
    let keys: Vec<&str> = arrays.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["conv1.weight", "conv1.bias", "same.bias", "scalar"],
        "order is kept"
    );
    let w = petal_proto::npy::decode(&arrays[0].1.data).unwrap();
    assert_eq!(
        (w.shape, w.data.to_f32_vec()),
        (vec![2, 3], vec![0., 1., 2., 3., 4., 5.])
    );
    assert_eq!(arrays[3].1.shape, Vec::<i64>::new());
    let Record::Config(cfg) = &content[1].1 else {
        panic!()
    };
    assert_eq!(cfg[0], ("lr".into(), RecordValue::Double(0.1)));
    assert_eq!(cfg[1], ("server-round".into(), RecordValue::Sint(3)));
    assert_eq!(cfg[2], ("name".into(), RecordValue::Str("é\n\"x\"".into())));
    assert_eq!(cfg[4], ("big".into(), RecordValue::Uint(1 << 63)));
    let Record::Metrics(m) = &content[2].1 else {
        panic!()
    };
    assert_eq!(m[0], ("num-examples".into(), RecordValue::Sint(64)));
}

#[test]
fn encoding_reproduces_flowers_bytes_and_ids() {
    let f = fixture();
    let objects = Objects::new(&f.objects);
    let content = objects.record_dict(&f.tree.children[0].object_id).unwrap();
    let mut set = ObjectSet::default();
    let (msg, tree) = encode_message(&mut set, f.metadata.clone(), Some(&content), None);
    assert_eq!(msg.metadata.unwrap().message_id, f.message_id);
    assert_eq!(tree, f.tree, "the same tree, in the same order");
    assert_eq!(set.contents, f.objects, "byte for byte");
}

#[test]
fn json_strings_are_written_as_python_writes_them() {
    let mut s = String::new();
    py_json_str("a\"b\\c\n\t\u{1}é😀/", &mut s);
    assert_eq!(s, r#""a\"b\\c\n\t\u0001\u00e9\ud83d\ude00/""#);
}

#[test]
fn large_arrays_are_chunked_and_read_back() {
    let data: Vec<u8> = (0..(2 * MAX_CHUNK + 10)).map(|i| (i % 251) as u8).collect();
    let content: RecordDict = vec![(
        "arrays".into(),
        Record::Arrays(vec![(
            "x".into(),
            ArrayData {
                dtype: "uint8".into(),
                shape: vec![data.len() as i64],
                stype: "numpy.ndarray".into(),
                data: data.clone(),
            },
        )]),
    )];
    let mut set = ObjectSet::default();
    let (_, tree) = encode_message(&mut set, proto::Metadata::default(), Some(&content), None);
    let array = &tree.children[0].children[0].children[0];
    assert_eq!(array.children.len(), 3, "three chunks");
    let back = Objects::new(&set.contents)
        .record_dict(&tree.children[0].object_id)
        .unwrap();
    assert_eq!(back, content);
}

#[test]
fn hostile_objects_are_errors() {
    let id = "x";
    for (bytes, needle) in [
        (&b"no divider"[..], "divider"),
        (b"Array  3\0ab", "head says 3"),
        (b"Array zz 0\0", "not a SHA-256"),
        (b"Array 0\0", "not '<type>"),
        (b"\xff 0\0", "UTF-8"),
    ] {
        let e = parse_object(id, bytes).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    // A record dict whose body points to other children than its head.
    let mut objects = BTreeMap::new();
    let child = object_bytes("ConfigRecord", &[], b"");
    let child_id = object_id(&child);
    objects.insert(child_id.clone(), Bytes::from(child));
    let body = format!("{{\"config\": \"{}\"}}", "0".repeat(64));
    let rd = object_bytes("RecordDict", &[child_id], body.as_bytes());
    let rd_id = object_id(&rd);
    objects.insert(rd_id.clone(), Bytes::from(rd));
    let e = Objects::new(&objects).record_dict(&rd_id).unwrap_err();
    assert!(e.to_string().contains("children differ"), "{e}");
}

#[test]
fn string_maps_keep_document_order_whatever_the_keys() {
    // A key that is a suffix of another's escaped text (found by fuzzing:
    // `"é\\"` inside `"b\"é\\"`) once confused the order.
    let entries: Vec<(String, String)> = ["b\"é\\", "é", "é\\", "z", "a"]
        .iter()
        .enumerate()
        .map(|(i, k)| (k.to_string(), i.to_string()))
        .collect();
    let text = py_json_str_map(&entries);
    assert_eq!(parse_str_map("x", text.as_bytes()).unwrap(), entries);
    // A repeated key: first place, last value (Python's json.loads).
    let dup = br#"{"a": "1", "b": "2", "a": "3"}"#;
    assert_eq!(
        parse_str_map("x", dup).unwrap(),
        [("a".into(), "3".into()), ("b".into(), "2".into())]
    );
    for bad in [&br#"["a"]"#[..], br#"{"a": 1}"#, b"{"] {
        assert!(parse_str_map("x", bad).is_err());
    }
}
