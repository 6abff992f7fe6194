//! Property-based fuzzing of everything a peer's bytes reach: the `.npy`
//! decoder and the `ClientMessage` → core conversions. Every input must give
//! a value or an error, never a panic. The number of cases per property is
//! `PETAL_FUZZ_CASES` (default 4,000, as in CI); `bench/fuzz.sh` runs a
//! million and TESTING.md records the figures.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use petal_proto::flwr::{self, client_message as cm};
use petal_proto::{ClientMessage, TENSOR_TYPE_NUMPY, npy, serde as wire};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message;

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

/// Header texts built from the pieces NumPy headers are made of, glued in
/// random orders: most are near-valid, which reaches deep into the parser.
fn header_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("'descr'".to_string()),
        Just("'fortran_order'".to_string()),
        Just("'shape'".to_string()),
        Just(": ".to_string()),
        Just(", ".to_string()),
        Just("(".to_string()),
        Just(")".to_string()),
        Just("True".to_string()),
        Just("False".to_string()),
        Just("'<f4'".to_string()),
        Just("'>f8'".to_string()),
        Just("'|b1'".to_string()),
        Just("'é<f4'".to_string()),
        Just("18446744073709551616".to_string()),
        Just("L".to_string()),
        Just("\"".to_string()),
        Just("'".to_string()),
        (0usize..5).prop_map(|n| n.to_string()),
        "[ -~é\\\\]{0,4}",
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

fn npy_with_header(version: u8, header: &str, body: &[u8]) -> Vec<u8> {
    let mut v = vec![0x93, b'N', b'U', b'M', b'P', b'Y', version, 0];
    if version == 1 {
        v.extend_from_slice(&(header.len().min(u16::MAX as usize) as u16).to_le_bytes());
    } else {
        v.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(body);
    v
}

/// `.npy`-like byte strings: random bytes, structured headers, and valid
/// files with random bytes flipped or cut.
fn npy_bytes() -> impl Strategy<Value = Vec<u8>> {
    let valid = (
        prop::collection::vec(0usize..4, 0..4),
        any::<u64>(),
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        any::<usize>(),
    )
        .prop_map(|(shape, seed, flips, cut)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| (seed as f32) * i as f32).collect();
            let mut v = npy::encode_f32(&shape, &data);
            for (at, x) in flips {
                let len = v.len();
                v[at % len] ^= x;
            }
            v.truncate(cut % (v.len() + 1) + v.len() / 2);
            v
        });
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        (
            1u8..4,
            header_text(),
            prop::collection::vec(any::<u8>(), 0..32)
        )
            .prop_map(|(ver, h, body)| npy_with_header(ver, &h, &body)),
        valid,
    ]
}

#[test]
fn npy_decoder_never_panics() {
    fuzz("npy::decode", npy_bytes(), |bytes| {
        if let Ok(a) = npy::decode(&bytes) {
            let n = a
                .shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d));
            assert_eq!(n, Some(a.data.len()), "shape and data agree");
        }
    });
}

fn scalar() -> impl Strategy<Value = flwr::Scalar> {
    use flwr::scalar::Scalar as S;
    prop_oneof![
        any::<f64>().prop_map(S::Double),
        any::<u64>().prop_map(S::Uint64),
        any::<i64>().prop_map(S::Sint64),
        any::<bool>().prop_map(S::Bool),
        ".{0,8}".prop_map(S::String),
        prop::collection::vec(any::<u8>(), 0..8).prop_map(|b| S::Bytes(b.into())),
    ]
    .prop_map(|s| flwr::Scalar { scalar: Some(s) })
}

fn parameters() -> impl Strategy<Value = flwr::Parameters> {
    (
        prop::collection::vec(npy_bytes(), 0..4),
        prop_oneof![Just(TENSOR_TYPE_NUMPY.to_string()), ".{0,6}"],
    )
        .prop_map(|(t, tensor_type)| flwr::Parameters {
            tensors: t.into_iter().map(Bytes::from).collect(),
            tensor_type,
        })
}

fn status() -> impl Strategy<Value = Option<flwr::Status>> {
    prop::option::of(
        (any::<i32>(), ".{0,6}").prop_map(|(code, message)| flwr::Status { code, message }),
    )
}

fn metrics() -> impl Strategy<Value = std::collections::HashMap<String, flwr::Scalar>> {
    prop::collection::hash_map(".{0,4}", scalar(), 0..3)
}

/// Client messages as a hostile peer could send them: every field random,
/// tensors from [`npy_bytes`].
fn client_message() -> impl Strategy<Value = ClientMessage> {
    let fit = (
        status(),
        prop::option::of(parameters()),
        any::<i64>(),
        metrics(),
    )
        .prop_map(|(status, parameters, num_examples, metrics)| {
            cm::Msg::FitRes(cm::FitRes {
                status,
                parameters,
                num_examples,
                metrics,
            })
        });
    let eval = (status(), any::<f32>(), any::<i64>(), metrics()).prop_map(
        |(status, loss, num_examples, metrics)| {
            cm::Msg::EvaluateRes(cm::EvaluateRes {
                status,
                loss,
                num_examples,
                metrics,
            })
        },
    );
    let get = (status(), prop::option::of(parameters())).prop_map(|(status, parameters)| {
        cm::Msg::GetParametersRes(cm::GetParametersRes { status, parameters })
    });
    prop_oneof![fit, eval, get].prop_map(|m| ClientMessage { msg: Some(m) })
}

/// What the server does with a client message: every conversion it may run.
fn convert(msg: &ClientMessage) {
    match &msg.msg {
        Some(cm::Msg::FitRes(r)) => {
            if let Ok(res) = wire::fit_res_from_proto(r) {
                let _ = res.parameters.check_like(&res.parameters);
            }
        }
        Some(cm::Msg::EvaluateRes(r)) => {
            let _ = wire::evaluate_res_from_proto(r);
        }
        Some(cm::Msg::GetParametersRes(r)) => {
            if let Some(p) = &r.parameters {
                let _ = wire::parameters_from_proto(p);
            }
            let _ = wire::status_error(&r.status);
        }
        _ => {}
    }
}

#[test]
fn client_message_conversion_never_panics() {
    fuzz("ClientMessage -> core", client_message(), |m| convert(&m));
}

#[test]
fn malformed_protobuf_never_panics() {
    // Valid encodings with bytes flipped or cut, and plain random bytes.
    let mutated = (
        client_message(),
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        any::<usize>(),
    )
        .prop_map(|(m, flips, cut)| {
            let mut v = m.encode_to_vec();
            if !v.is_empty() {
                for (at, x) in flips {
                    let len = v.len();
                    v[at % len] ^= x;
                }
                v.truncate(cut % (v.len() + 1));
            }
            v
        });
    let strategy = prop_oneof![prop::collection::vec(any::<u8>(), 0..128), mutated];
    fuzz("protobuf bytes -> core", strategy, |bytes| {
        if let Ok(m) = ClientMessage::decode(bytes.as_slice()) {
            convert(&m);
        }
    });
}

#[test]
fn frame_decoder_never_panics_and_ignores_chunking() {
    use petal_proto::frames::FrameDecoder;
    // Random bytes, or valid frames (some huge or compressed headers
    // flipped in), cut into random chunks.
    let frames =
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..5).prop_map(|msgs| {
            let mut v = Vec::new();
            for m in msgs {
                v.push(0);
                v.extend_from_slice(&(m.len() as u32).to_be_bytes());
                v.extend_from_slice(&m);
            }
            v
        });
    let bytes = prop_oneof![prop::collection::vec(any::<u8>(), 0..200), frames];
    let strategy = (bytes, prop::collection::vec(1usize..32, 1..20));
    fuzz("FrameDecoder", strategy, |(bytes, cuts)| {
        let decode = |sizes: &[usize]| {
            let mut d = FrameDecoder::new(64);
            let mut out = Vec::new();
            let mut rest = bytes.as_slice();
            for &s in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (head, tail) = rest.split_at(s.min(rest.len()));
                rest = tail;
                if let Err(e) = d.push(Bytes::copy_from_slice(head), &mut out) {
                    return (out, Some(e), d.is_idle());
                }
            }
            (out, None, d.is_idle())
        };
        assert_eq!(
            decode(&cuts),
            decode(&[bytes.len().max(1)]),
            "chunking must not matter"
        );
    });
}
