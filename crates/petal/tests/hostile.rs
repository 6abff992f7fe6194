//! Hostile peers against a real `petal server`: raw Flower-protocol clients
//! that send every kind of bad result. The server must never exit, every
//! bad result must be a failure naming the client and the reason, and the
//! global model must be FedAvg over the honest clients only.

mod support;

use std::time::Duration;

use bytes::Bytes;
use petal_core::Checkpoint;
use petal_proto::flwr::server_message as sm;
use support::*;

/// What a client answers to `FitIns`.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Honest { offset: f32, examples: i64 },
    NonAsciiHeader,
    ShapeOverflow,
    Truncated,
    NaN,
    Inf,
    WrongShape,
    WrongCount,
    NegativeExamples,
    ZeroExamples,
    Oversized,
    MalformedProtobuf,
}

/// The global model: two tensors, all zeros at the start.
fn initial() -> Vec<(Vec<usize>, Vec<f32>)> {
    vec![(vec![2], vec![0.0; 2]), (vec![1], vec![0.0])]
}

fn npy_with_header(header: &str, body: &[u8]) -> Bytes {
    let mut v = b"\x93NUMPY\x01\x00".to_vec();
    v.extend_from_slice(&(header.len() as u16).to_le_bytes());
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(body);
    v.into()
}

async fn answer_fit(c: &RawClient, answer: Answer, global: Vec<Vec<f32>>) {
    let plus = |o: f32| -> Vec<(Vec<usize>, Vec<f32>)> {
        vec![
            (vec![2], global[0].iter().map(|v| v + o).collect()),
            (vec![1], global[1].iter().map(|v| v + o).collect()),
        ]
    };
    let with_first = |t: Bytes| {
        let mut p = wire_params(&plus(1.0));
        p.tensors[0] = t;
        p
    };
    let msg = match answer {
        Answer::Honest { offset, examples } => fit_res(wire_params(&plus(offset)), examples),
        Answer::NonAsciiHeader => fit_res(
            with_first(npy_with_header(
                "{'descr': 'é<f4', 'fortran_order': False, 'shape': (2,), }",
                &[0; 8],
            )),
            10,
        ),
        Answer::ShapeOverflow => fit_res(
            with_first(npy_with_header(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (18446744073709551615, 2), }",
                &[0; 8],
            )),
            10,
        ),
        Answer::Truncated => {
            let mut p = wire_params(&plus(1.0));
            let t = p.tensors[0].clone();
            p.tensors[0] = t.slice(..t.len() - 1);
            fit_res(p, 10)
        }
        Answer::NaN => fit_res(wire_params(&plus(f32::NAN)), 10),
        Answer::Inf => fit_res(wire_params(&plus(f32::INFINITY)), 10),
        Answer::WrongShape => {
            let mut t = plus(1.0);
            t[0] = (vec![3], vec![1.0; 3]);
            fit_res(wire_params(&t), 10)
        }
        Answer::WrongCount => {
            let mut t = plus(1.0);
            t.pop();
            fit_res(wire_params(&t), 10)
        }
        Answer::NegativeExamples => fit_res(wire_params(&plus(1.0)), -5),
        Answer::ZeroExamples => fit_res(wire_params(&plus(1.0)), 0),
        Answer::Oversized => fit_res(wire_params(&[(vec![600_000], vec![1.0; 600_000])]), 10),
        Answer::MalformedProtobuf => {
            c.send_bytes(Bytes::from_static(&[0xff, 0xff, 0xff, 0x0f]))
                .await;
            return;
        }
    };
    c.send(msg).await;
}

/// Plays one client until the server ends its stream.
async fn play(mut c: RawClient, answer: Answer) {
    while let Some(msg) = c.recv().await {
        match msg {
            sm::Msg::GetParametersIns(_) => c.send(parameters_res(wire_params(&initial()))).await,
            sm::Msg::FitIns(ins) => {
                let global = decode_params(ins.parameters.as_ref().unwrap());
                answer_fit(&c, answer, global).await;
            }
            sm::Msg::EvaluateIns(_) => c.send(evaluate_res(1.0, 1)).await,
            sm::Msg::ReconnectIns(_) => {
                c.send(disconnect_res()).await;
                return;
            }
            sm::Msg::GetPropertiesIns(_) => c.send(properties_res()).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_results_are_failures_and_the_model_averages_honest_clients() {
    let answers = [
        Answer::Honest {
            offset: 1.0,
            examples: 10,
        },
        Answer::NonAsciiHeader,
        Answer::ShapeOverflow,
        Answer::Truncated,
        Answer::NaN,
        Answer::Inf,
        Answer::WrongShape,
        Answer::WrongCount,
        Answer::NegativeExamples,
        Answer::ZeroExamples,
        Answer::Oversized,
        Answer::MalformedProtobuf,
        Answer::Honest {
            offset: 4.0,
            examples: 30,
        },
    ];
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let n = answers.len().to_string();
    let mut server = Server::start(&[
        "--rounds",
        "1",
        "--min-available-clients",
        &n,
        "--fit-clients",
        &n,
        "--fraction-evaluate",
        "0",
        "--max-message-mb",
        "1",
        "--wait-timeout",
        "60",
        "--call-timeout",
        "60",
        "--out",
        out.to_str().unwrap(),
    ]);
    // Joined one after another, client i gets node id i + 1.
    let mut tasks = Vec::new();
    for a in answers {
        let c = RawClient::join(&server.addr).await;
        tasks.push(tokio::spawn(play(c, a)));
    }
    let status = tokio::task::spawn_blocking(move || {
        let s = server.wait(Duration::from_secs(120));
        (s, server.log())
    })
    .await
    .unwrap();
    assert!(status.0.success(), "the server failed:\n{}", status.1);
    for t in tasks {
        t.await.unwrap();
    }

    let h = history(&out);
    let r = &h["rounds"][0];
    assert_eq!(r["fit_results"], 2, "{r:#}");
    assert_eq!(r["fit_failures"], 11, "{r:#}");
    let why = |node: u64| -> String {
        let f = r["failures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["node"] == node)
            .unwrap_or_else(|| panic!("no failure for node {node}: {r:#}"));
        assert_eq!(f["phase"], "fit");
        f["reason"].as_str().unwrap().to_string()
    };
    let expect = [
        (2, "unsupported dtype"),
        (3, "overflows"),
        (4, "needs 8 data bytes, found 7"),
        (5, "NaN"),
        (6, "inf"),
        (7, "expected shape [2], got [3]"),
        (8, "expected 2 tensors, got 1"),
        (9, "negative num_examples"),
        (10, "0 examples"),
        (11, "too large"),
        (12, "stream error"),
    ];
    for (node, needle) in expect {
        let reason = why(node);
        assert!(reason.contains(needle), "node {node}: {reason}");
    }
    // FedAvg over the honest two: (10 * 1 + 30 * 4) / 40 = 3.25.
    let bytes = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    let c = Checkpoint::from_safetensors(&bytes).unwrap().checkpoint;
    assert_eq!(c.round, 1);
    assert_eq!(c.parameters.tensors[0].data, vec![3.25, 3.25]);
    assert_eq!(c.parameters.tensors[1].data, vec![3.25]);
    assert_eq!(h["status"], "completed");
}
