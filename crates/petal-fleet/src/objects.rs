//! Flower's content-addressed message objects ("inflatable objects").
//!
//! A message travels as a tree of objects: `Message` → `RecordDict` →
//! `ArrayRecord` / `ConfigRecord` / `MetricRecord` → `Array` →
//! `ArrayChunk`. An object's bytes are a head and a body,
//! `"<Type> <child id>,<child id> <body length>\0" + body`, and its id is
//! the SHA-256 hex digest of those bytes. Bodies: `ArrayChunk`, raw bytes
//! (≤ 5 MiB; an Array's chunks concatenated are a `.npy` file); `Array`,
//! JSON `{"dtype", "shape", "stype", "arraychunk_ids"}`; `ArrayRecord` and
//! `RecordDict`, JSON `{name: child id}`; `ConfigRecord` and
//! `MetricRecord`, protobuf; `Message`, protobuf (metadata with an empty
//! message id, and the error if any). JSON is written byte for byte as
//! Python's `json.dumps` writes it, since ids are hashes of the bytes.
//!
//! Everything read from the SuperLink is checked: ids against content,
//! heads against bodies, children against the tree, every length.

use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message as _;
use sha2::{Digest, Sha256};

use crate::proto;

/// Largest `ArrayChunk` body Flower writes (`FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`).
pub const MAX_CHUNK: usize = 5 * 1024 * 1024;

/// Most children one object may have, and most objects in one message's
/// tree: a message holds a handful of records of at most a few thousand
/// arrays each.
pub const MAX_CHILDREN: usize = 100_000;

/// Deepest object tree (`Message` → `RecordDict` → `ArrayRecord` →
/// `Array` → `ArrayChunk` is 5).
pub const MAX_DEPTH: usize = 8;

/// Bytes of a `.npy` file beyond its values: NumPy's header limit plus
/// its magic and length fields.
const NPY_OVERHEAD: usize = petal_proto::npy::MAX_HEADER_BYTES + 12;

/// Why objects could not be read or built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ObjectError {
    #[error("object {id}: {reason}")]
    Invalid { id: String, reason: String },
    #[error("object {0} is missing")]
    Missing(String),
}

fn invalid(id: &str, reason: impl Into<String>) -> ObjectError {
    ObjectError::Invalid {
        id: id.to_string(),
        reason: reason.into(),
    }
}

/// SHA-256 hex digest of an object's bytes: its id.
pub fn object_id(content: &[u8]) -> String {
    Sha256::digest(content)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An object's bytes from its type, children and body.
pub fn object_bytes(kind: &str, children: &[String], body: &[u8]) -> Vec<u8> {
    let head = format!("{kind} {} {}", children.join(","), body.len());
    let mut out = Vec::with_capacity(head.len() + 1 + body.len());
    out.extend_from_slice(head.as_bytes());
    out.push(0);
    out.extend_from_slice(body);
    out
}

/// A parsed object.
#[derive(Debug, Clone, PartialEq)]
pub struct Object<'a> {
    pub kind: &'a str,
    pub children: Vec<&'a str>,
    pub body: &'a [u8],
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Splits and checks an object's bytes, as Flower's `validate_object_content`.
pub fn parse_object<'a>(id: &str, content: &'a [u8]) -> Result<Object<'a>, ObjectError> {
    let split = content
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| invalid(id, "no head/body divider"))?;
    let head =
        std::str::from_utf8(&content[..split]).map_err(|_| invalid(id, "head is not UTF-8"))?;
    let body = &content[split + 1..];
    let parts: Vec<&str> = head.split(' ').collect();
    let [kind, children, len] = parts[..] else {
        return Err(invalid(id, "head is not '<type> <children> <length>'"));
    };
    let children: Vec<&str> = if children.is_empty() {
        Vec::new()
    } else {
        children.split(',').take(MAX_CHILDREN + 1).collect()
    };
    if children.len() > MAX_CHILDREN {
        return Err(invalid(id, format!("more than {MAX_CHILDREN} children")));
    }
    if let Some(bad) = children.iter().find(|c| !is_sha256_hex(c)) {
        return Err(invalid(
            id,
            format!("child id '{bad}' is not a SHA-256 hash"),
        ));
    }
    if len.parse::<usize>().ok() != Some(body.len()) {
        return Err(invalid(
            id,
            format!("head says {len} body bytes, found {}", body.len()),
        ));
    }
    Ok(Object {
        kind,
        children,
        body,
    })
}

/// A string as Python's `json.dumps` writes it (`ensure_ascii=True`).
pub fn py_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `{"k": "v", ...}` as Python writes a dict of strings.
fn py_json_str_map(entries: &[(String, String)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        py_json_str(k, &mut s);
        s.push_str(": ");
        py_json_str(v, &mut s);
    }
    s.push('}');
    s
}

/// Parses a flat JSON object of strings in document order; a repeated key
/// keeps its first place and its last value, as Python's `json.loads`.
fn parse_str_map(id: &str, body: &[u8]) -> Result<Vec<(String, String)>, ObjectError> {
    struct Ordered(Vec<(String, String)>);
    impl<'de> serde::Deserialize<'de> for Ordered {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Entries;
            impl<'de> serde::de::Visitor<'de> for Entries {
                type Value = Ordered;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object whose values are strings")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Ordered, A::Error> {
                    let mut out: Vec<(String, String)> = Vec::new();
                    let mut index: std::collections::HashMap<String, usize> =
                        std::collections::HashMap::new();
                    while let Some((k, v)) = map.next_entry::<String, String>()? {
                        match index.get(&k) {
                            Some(&i) => out[i].1 = v,
                            None => {
                                if out.len() >= MAX_CHILDREN {
                                    return Err(serde::de::Error::custom(format!(
                                        "more than {MAX_CHILDREN} entries"
                                    )));
                                }
                                index.insert(k.clone(), out.len());
                                out.push((k, v));
                            }
                        }
                    }
                    Ok(Ordered(out))
                }
            }
            d.deserialize_map(Entries)
        }
    }
    serde_json::from_slice::<Ordered>(body)
        .map(|o| o.0)
        .map_err(|e| invalid(id, format!("body is not a JSON object of strings: {e}")))
}

/// One value of a config or metric record.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordValue {
    Double(f64),
    Sint(i64),
    Uint(u64),
    Bool(bool),
    Str(String),
    Bytes(Vec<u8>),
    /// Lists are kept as they came, to pass through.
    List(proto::ConfigRecordValue),
}

/// An array: dtype, shape and the bytes of its `.npy` file.
#[derive(Debug, Clone, PartialEq)]
pub struct ArrayData {
    pub dtype: String,
    pub shape: Vec<i64>,
    pub stype: String,
    pub data: Vec<u8>,
}

/// A record of a `RecordDict`.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Arrays(Vec<(String, ArrayData)>),
    Config(Vec<(String, RecordValue)>),
    Metrics(Vec<(String, RecordValue)>),
}

/// A message's content: named records, in order.
pub type RecordDict = Vec<(String, Record)>;

/// Objects being built: id → bytes, children before parents.
#[derive(Debug, Default)]
pub struct ObjectSet {
    pub order: Vec<String>,
    pub contents: BTreeMap<String, Bytes>,
}

impl ObjectSet {
    fn add(&mut self, kind: &str, children: &[String], body: &[u8]) -> String {
        let bytes = object_bytes(kind, children, body);
        let id = object_id(&bytes);
        if !self.contents.contains_key(&id) {
            self.order.push(id.clone());
            self.contents.insert(id.clone(), Bytes::from(bytes));
        }
        id
    }
}

/// Children ids, each once, in order of first appearance (a Python dict's keys).
fn unique(ids: &[String]) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    ids.iter()
        .filter(|i| seen.insert(i.as_str()))
        .cloned()
        .collect()
}

fn encode_array(set: &mut ObjectSet, a: &ArrayData, tree: &mut Vec<proto::ObjectTree>) -> String {
    let chunk_ids: Vec<String> = if a.data.is_empty() {
        Vec::new()
    } else {
        a.data
            .chunks(MAX_CHUNK)
            .map(|c| set.add("ArrayChunk", &[], c))
            .collect()
    };
    let children = unique(&chunk_ids);
    let idx: Vec<String> = chunk_ids
        .iter()
        .map(|c| {
            children
                .iter()
                .position(|u| u == c)
                .unwrap_or(0)
                .to_string()
        })
        .collect();
    let shape: Vec<String> = a.shape.iter().map(i64::to_string).collect();
    let mut body = String::from("{\"dtype\": ");
    py_json_str(&a.dtype, &mut body);
    body.push_str(&format!(", \"shape\": [{}], \"stype\": ", shape.join(", ")));
    py_json_str(&a.stype, &mut body);
    body.push_str(&format!(", \"arraychunk_ids\": [{}]}}", idx.join(", ")));
    let id = set.add("Array", &children, body.as_bytes());
    tree.push(proto::ObjectTree {
        object_id: id.clone(),
        children: children
            .iter()
            .map(|c| proto::ObjectTree {
                object_id: c.clone(),
                children: Vec::new(),
            })
            .collect(),
    });
    id
}

fn value_to_config(v: &RecordValue) -> proto::ConfigRecordValue {
    use proto::config_record_value::Value as V;
    let value = match v {
        RecordValue::Double(x) => V::Double(*x),
        RecordValue::Sint(x) => V::Sint64(*x),
        RecordValue::Uint(x) => V::Uint64(*x),
        RecordValue::Bool(x) => V::Bool(*x),
        RecordValue::Str(x) => V::String(x.clone()),
        RecordValue::Bytes(x) => V::Bytes(Bytes::from(x.clone())),
        RecordValue::List(l) => return l.clone(),
    };
    proto::ConfigRecordValue { value: Some(value) }
}

fn value_to_metric(v: &RecordValue) -> proto::MetricRecordValue {
    use proto::metric_record_value::Value as V;
    let value = match v {
        RecordValue::Sint(x) => V::Sint64(*x),
        RecordValue::Uint(x) => V::Uint64(*x),
        RecordValue::Double(x) => V::Double(*x),
        other => V::Double(match other {
            RecordValue::Bool(b) => f64::from(u8::from(*b)),
            _ => f64::NAN,
        }),
    };
    proto::MetricRecordValue { value: Some(value) }
}

/// Builds the objects of a record dict; returns its id and its subtree.
pub fn encode_record_dict(set: &mut ObjectSet, content: &RecordDict) -> proto::ObjectTree {
    let mut refs = Vec::new();
    let mut subtrees = Vec::new();
    for (name, record) in content {
        let (id, tree) = match record {
            Record::Arrays(arrays) => {
                let mut array_trees = Vec::new();
                let ids: Vec<String> = arrays
                    .iter()
                    .map(|(_, a)| encode_array(set, a, &mut array_trees))
                    .collect();
                let entries: Vec<(String, String)> = arrays
                    .iter()
                    .zip(&ids)
                    .map(|((k, _), id)| (k.clone(), id.clone()))
                    .collect();
                let children = unique(&ids);
                let id = set.add(
                    "ArrayRecord",
                    &children,
                    py_json_str_map(&entries).as_bytes(),
                );
                // One subtree per unique child, as Python's dict of children.
                let mut seen = std::collections::BTreeSet::new();
                array_trees.retain(|t| seen.insert(t.object_id.clone()));
                (
                    id.clone(),
                    proto::ObjectTree {
                        object_id: id,
                        children: array_trees,
                    },
                )
            }
            Record::Config(items) => {
                let body = proto::ConfigRecord {
                    items: items
                        .iter()
                        .map(|(k, v)| proto::config_record::Item {
                            key: k.clone(),
                            value: Some(value_to_config(v)),
                        })
                        .collect(),
                }
                .encode_to_vec();
                let id = set.add("ConfigRecord", &[], &body);
                (
                    id.clone(),
                    proto::ObjectTree {
                        object_id: id,
                        children: Vec::new(),
                    },
                )
            }
            Record::Metrics(items) => {
                let body = proto::MetricRecord {
                    items: items
                        .iter()
                        .map(|(k, v)| proto::metric_record::Item {
                            key: k.clone(),
                            value: Some(value_to_metric(v)),
                        })
                        .collect(),
                }
                .encode_to_vec();
                let id = set.add("MetricRecord", &[], &body);
                (
                    id.clone(),
                    proto::ObjectTree {
                        object_id: id,
                        children: Vec::new(),
                    },
                )
            }
        };
        refs.push((name.clone(), id));
        if !subtrees
            .iter()
            .any(|t: &proto::ObjectTree| t.object_id == tree.object_id)
        {
            subtrees.push(tree);
        }
    }
    let ids: Vec<String> = refs.iter().map(|(_, id)| id.clone()).collect();
    let id = set.add(
        "RecordDict",
        &unique(&ids),
        py_json_str_map(&refs).as_bytes(),
    );
    proto::ObjectTree {
        object_id: id,
        children: subtrees,
    }
}

/// Builds a message's objects; returns the message with its id set, and
/// the object tree. `content` or `error`, as Flower's messages.
pub fn encode_message(
    set: &mut ObjectSet,
    mut metadata: proto::Metadata,
    content: Option<&RecordDict>,
    error: Option<proto::Error>,
) -> (proto::Message, proto::ObjectTree) {
    metadata.message_id = String::new();
    let subtree = content.map(|c| encode_record_dict(set, c));
    let body = proto::Message {
        metadata: Some(metadata.clone()),
        content: None,
        error: error.clone(),
    }
    .encode_to_vec();
    let children: Vec<String> = subtree.iter().map(|t| t.object_id.clone()).collect();
    let id = set.add("Message", &children, &body);
    metadata.message_id = id.clone();
    // On the wire the content is an empty RecordDict (its records travel
    // as objects); a message carries content or an error.
    let content = error.is_none().then_some(proto::RecordDict {});
    (
        proto::Message {
            metadata: Some(metadata),
            content,
            error,
        },
        proto::ObjectTree {
            object_id: id,
            children: subtree.into_iter().collect(),
        },
    )
}

/// Every id of a tree, children before parents (post-order), each once;
/// linear in the size of the tree. A tree deeper than [`MAX_DEPTH`] or
/// with more than [`MAX_CHILDREN`] nodes is refused.
pub fn tree_ids(tree: &proto::ObjectTree) -> Result<Vec<String>, ObjectError> {
    fn walk<'t>(
        t: &'t proto::ObjectTree,
        seen: &mut std::collections::HashSet<&'t str>,
        out: &mut Vec<String>,
        nodes: &mut usize,
        depth: usize,
    ) -> Result<(), ObjectError> {
        *nodes += 1;
        if depth > MAX_DEPTH || *nodes > MAX_CHILDREN {
            return Err(invalid(
                &t.object_id,
                format!(
                    "the message's object tree is deeper than {MAX_DEPTH} or holds more than \
                     {MAX_CHILDREN} objects"
                ),
            ));
        }
        for c in &t.children {
            walk(c, seen, out, nodes, depth + 1)?;
        }
        if seen.insert(&t.object_id) {
            out.push(t.object_id.clone());
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(
        tree,
        &mut std::collections::HashSet::new(),
        &mut out,
        &mut 0,
        0,
    )?;
    Ok(out)
}

/// Bytes of one element of a NumPy dtype, by the name Flower records
/// (`str(array.dtype)`, e.g. `float32`).
fn dtype_width(dtype: &str) -> Option<usize> {
    Some(match dtype.trim_start_matches(['<', '>', '|', '=']) {
        "bool" | "int8" | "uint8" | "b1" | "i1" | "u1" => 1,
        "float16" | "bfloat16" | "int16" | "uint16" | "f2" | "i2" | "u2" => 2,
        "float32" | "int32" | "uint32" | "f4" | "i4" | "u4" => 4,
        "float64" | "int64" | "uint64" | "f8" | "i8" | "u8" => 8,
        _ => return None,
    })
}

/// Reads objects fetched by id (each already checked against its id),
/// within a byte budget: every array assembled counts against it, so
/// objects that refer to the same chunk or array many times cannot make
/// the reader allocate more than the budget.
pub struct Objects<'a> {
    pub contents: &'a BTreeMap<String, Bytes>,
    budget: std::cell::Cell<usize>,
}

impl<'a> Objects<'a> {
    /// A reader of `contents` without a budget.
    pub fn new(contents: &'a BTreeMap<String, Bytes>) -> Self {
        Self::with_budget(contents, usize::MAX)
    }

    /// A reader of `contents` that assembles at most `bytes` of arrays.
    pub fn with_budget(contents: &'a BTreeMap<String, Bytes>, bytes: usize) -> Self {
        Objects {
            contents,
            budget: std::cell::Cell::new(bytes),
        }
    }

    fn get(&self, id: &str, kind: &str) -> Result<Object<'_>, ObjectError> {
        let bytes = self
            .contents
            .get(id)
            .ok_or_else(|| ObjectError::Missing(id.to_string()))?;
        let o = parse_object(id, bytes)?;
        if o.kind != kind {
            return Err(invalid(
                id,
                format!("expected a {kind}, found a {}", o.kind),
            ));
        }
        Ok(o)
    }

    /// The record dict `id` of a message, fully read.
    pub fn record_dict(&self, id: &str) -> Result<RecordDict, ObjectError> {
        let o = self.get(id, "RecordDict")?;
        let refs = parse_str_map(id, o.body)?;
        check_children(id, &o.children, refs.iter().map(|(_, v)| v.as_str()))?;
        refs.iter()
            .map(|(name, child)| Ok((name.clone(), self.record(child)?)))
            .collect()
    }

    fn record(&self, id: &str) -> Result<Record, ObjectError> {
        let bytes = self
            .contents
            .get(id)
            .ok_or_else(|| ObjectError::Missing(id.to_string()))?;
        let o = parse_object(id, bytes)?;
        match o.kind {
            "ArrayRecord" => {
                let refs = parse_str_map(id, o.body)?;
                check_children(id, &o.children, refs.iter().map(|(_, v)| v.as_str()))?;
                Ok(Record::Arrays(
                    refs.iter()
                        .map(|(name, child)| Ok((name.clone(), self.array(child)?)))
                        .collect::<Result<_, ObjectError>>()?,
                ))
            }
            "ConfigRecord" => {
                check_items(id, o.body)?;
                let r = proto::ConfigRecord::decode(o.body)
                    .map_err(|e| invalid(id, format!("not a ConfigRecord: {e}")))?;
                Ok(Record::Config(
                    r.items
                        .into_iter()
                        .map(|i| (i.key, config_value(i.value.unwrap_or_default())))
                        .collect(),
                ))
            }
            "MetricRecord" => {
                check_items(id, o.body)?;
                let r = proto::MetricRecord::decode(o.body)
                    .map_err(|e| invalid(id, format!("not a MetricRecord: {e}")))?;
                Ok(Record::Metrics(
                    r.items
                        .into_iter()
                        .map(|i| {
                            use proto::metric_record_value::Value as V;
                            let v = match i.value.and_then(|v| v.value) {
                                Some(V::Double(x)) => RecordValue::Double(x),
                                Some(V::Sint64(x)) => RecordValue::Sint(x),
                                Some(V::Uint64(x)) => RecordValue::Uint(x),
                                _ => RecordValue::Double(f64::NAN),
                            };
                            (i.key, v)
                        })
                        .collect(),
                ))
            }
            other => Err(invalid(id, format!("a record dict cannot hold a {other}"))),
        }
    }

    fn array(&self, id: &str) -> Result<ArrayData, ObjectError> {
        #[derive(serde::Deserialize)]
        struct Meta {
            dtype: String,
            shape: Vec<i64>,
            stype: String,
            arraychunk_ids: Vec<usize>,
        }
        let o = self.get(id, "Array")?;
        let meta: Meta = serde_json::from_slice(o.body)
            .map_err(|e| invalid(id, format!("array metadata: {e}")))?;
        // The size the dtype and shape promise, checked before anything is
        // assembled: chunks cannot add up to more.
        let width = dtype_width(&meta.dtype)
            .ok_or_else(|| invalid(id, format!("unsupported dtype '{}'", meta.dtype)))?;
        let values = meta
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| {
                usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
            })
            .and_then(|n| n.checked_mul(width))
            .ok_or_else(|| invalid(id, format!("shape {:?} is not a size", meta.shape)))?;
        let mut chunks = Vec::with_capacity(meta.arraychunk_ids.len().min(o.children.len()));
        let mut total = 0usize;
        for &i in &meta.arraychunk_ids {
            let chunk_id = o
                .children
                .get(i)
                .ok_or_else(|| invalid(id, format!("chunk index {i} has no child")))?;
            let chunk = self.get(chunk_id, "ArrayChunk")?;
            total = total.saturating_add(chunk.body.len());
            if total > values.saturating_add(NPY_OVERHEAD) {
                return Err(invalid(
                    id,
                    format!(
                        "its chunks hold more than the {values} bytes of its dtype and shape \
                         (plus a .npy header)"
                    ),
                ));
            }
            chunks.push(chunk.body);
        }
        let left = self.budget.get();
        if total > left {
            return Err(invalid(
                id,
                format!(
                    "assembling it would exceed the message's byte budget \
                     ({left} bytes left; --max-message-mb)"
                ),
            ));
        }
        self.budget.set(left - total);
        let mut data = Vec::with_capacity(total);
        for c in chunks {
            data.extend_from_slice(c);
        }
        Ok(ArrayData {
            dtype: meta.dtype,
            shape: meta.shape,
            stype: meta.stype,
            data,
        })
    }
}

/// A config or metric record holds at most [`MAX_CHILDREN`] items
/// (counted on the wire, before decoding: an empty item is 2 bytes there
/// and far more once decoded).
fn check_items(id: &str, body: &[u8]) -> Result<(), ObjectError> {
    let mut items = 0usize;
    petal_proto::limits::walk_fields(body, |n, _| {
        if n == 1 {
            items += 1;
        }
        Ok(())
    })
    .map_err(|e| invalid(id, e.to_string()))?;
    if items > MAX_CHILDREN {
        return Err(invalid(
            id,
            format!("{items} record items (at most {MAX_CHILDREN})"),
        ));
    }
    Ok(())
}

fn config_value(v: proto::ConfigRecordValue) -> RecordValue {
    use proto::config_record_value::Value as V;
    match v.value.clone() {
        Some(V::Double(x)) => RecordValue::Double(x),
        Some(V::Sint64(x)) => RecordValue::Sint(x),
        Some(V::Uint64(x)) => RecordValue::Uint(x),
        Some(V::Bool(x)) => RecordValue::Bool(x),
        Some(V::String(x)) => RecordValue::Str(x),
        Some(V::Bytes(x)) => RecordValue::Bytes(x.to_vec()),
        _ => RecordValue::List(v),
    }
}

/// The head's children must be exactly the ids the body refers to.
fn check_children<'a>(
    id: &str,
    head: &[&str],
    refs: impl Iterator<Item = &'a str>,
) -> Result<(), ObjectError> {
    let want: std::collections::BTreeSet<&str> = refs.collect();
    let have: std::collections::BTreeSet<&str> = head.iter().copied().collect();
    if want != have {
        return Err(invalid(
            id,
            "its children differ from the ids its body refers to",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
