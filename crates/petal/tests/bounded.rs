//! One hostile peer against a real `petal server`, as an attacker would
//! probe it: the server's memory and CPU are measured from outside the
//! process (`/proc`), and honest clients must keep training. Each test
//! fails on a server without the limit it checks (run them against another
//! binary with `PETAL_TEST_BIN`).

mod support;

use std::io::Read;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use petal_proto::flwr::{self, client_message as cm, server_message as sm};
use prost::Message;
use support::*;

/// A model of two tensors ([2] and [1]), as the hostile tests use.
fn model(offset: f32) -> flwr::Parameters {
    wire_params(&[(vec![2], vec![offset; 2]), (vec![1], vec![offset])])
}

/// Answers every instruction honestly: its initial model is zeros, it
/// trains by adding `offset` with `examples` examples and `metrics`.
async fn honest(mut c: RawClient, offset: f32, examples: i64, metrics: Vec<(String, f64)>) {
    while let Some(msg) = c.recv().await {
        match msg {
            sm::Msg::GetParametersIns(_) => c.send(parameters_res(model(0.0))).await,
            sm::Msg::FitIns(ins) => {
                let g = decode_params(ins.parameters.as_ref().unwrap());
                let p = wire_params(&[
                    (vec![2], g[0].iter().map(|v| v + offset).collect()),
                    (vec![1], g[1].iter().map(|v| v + offset).collect()),
                ]);
                let mut res = fit_res(p, examples);
                if let cm::Msg::FitRes(r) = &mut res {
                    r.metrics = metrics
                        .iter()
                        .map(|(k, v)| {
                            let s = flwr::Scalar {
                                scalar: Some(flwr::scalar::Scalar::Double(*v)),
                            };
                            (k.clone(), s)
                        })
                        .collect();
                }
                c.send(res).await;
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

/// Answers `FitIns` with `reply` (raw bytes), everything else honestly.
async fn replies_to_fit_with(mut c: RawClient, reply: Bytes) {
    while let Some(msg) = c.recv().await {
        match msg {
            sm::Msg::GetParametersIns(_) => c.send(parameters_res(model(0.0))).await,
            sm::Msg::FitIns(_) => c.send_bytes(reply.clone()).await,
            sm::Msg::EvaluateIns(_) => c.send(evaluate_res(1.0, 1)).await,
            sm::Msg::ReconnectIns(_) => {
                c.send(disconnect_res()).await;
                return;
            }
            sm::Msg::GetPropertiesIns(_) => c.send(properties_res()).await,
        }
    }
}

/// Appends a length-delimited protobuf field.
fn field(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, out);
    prost::encoding::encode_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// A `ClientMessage { fit_res }` whose parameters are `n` empty tensors,
/// encoded by hand (2 bytes a tensor on the wire).
fn empty_tensors_fit_res(n: usize) -> Bytes {
    let mut params = Vec::with_capacity(2 * n + 16);
    for _ in 0..n {
        params.extend_from_slice(&[0x0a, 0x00]);
    }
    field(&mut params, 2, b"numpy.ndarray");
    let mut fit = Vec::with_capacity(params.len() + 16);
    field(
        &mut fit,
        1,
        &petal_proto::serde::ok_status().unwrap().encode_to_vec(),
    );
    field(&mut fit, 2, &params);
    prost::encoding::encode_key(3, prost::encoding::WireType::Varint, &mut fit);
    prost::encoding::encode_varint(10, &mut fit);
    let mut msg = Vec::with_capacity(fit.len() + 8);
    field(&mut msg, 4, &fit);
    msg.into()
}

/// A fit result with the right model and `n` metrics named `{prefix}{i}`.
fn many_metrics_fit_res(n: usize, prefix: &str) -> Bytes {
    let mut res = fit_res(model(1.0), 10);
    if let cm::Msg::FitRes(r) = &mut res {
        r.metrics = (0..n)
            .map(|i| {
                let s = flwr::Scalar {
                    scalar: Some(flwr::scalar::Scalar::Double(1.0)),
                };
                (format!("{prefix}{i}"), s)
            })
            .collect();
    }
    petal_proto::ClientMessage { msg: Some(res) }
        .encode_to_vec()
        .into()
}

fn server_args<'a>(out: &'a str, clients: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "--rounds",
        "1",
        "--min-available-clients",
        clients,
        "--fit-clients",
        clients,
        "--fraction-evaluate",
        "0",
        "--wait-timeout",
        "120",
        "--call-timeout",
        "60",
        "--out",
        out,
    ];
    a.extend_from_slice(extra);
    a
}

/// The failure reason the history records for `node` in round 1.
fn reason_of(h: &serde_json::Value, node: u64) -> String {
    h["rounds"][0]["failures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["node"] == node)
        .map(|f| f["reason"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no failure for node {node}: {:#}", h["rounds"][0]))
}

/// Streams that send data the server did not ask for: with unread data
/// buffered per stream, eight connections of them took a server to
/// 490 MB. Each is dropped at its first byte instead; the server stays
/// small and then trains honest clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_no_call_waits_for_is_not_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut server = Server::start(&server_args(out.to_str().unwrap(), "2", &[]));
    let peak = PeakRss::watch(server.child.id());
    let addr = server.addr.clone();
    // 8 connections × 300 streams × 256 KiB that nobody asked for.
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        for _ in 0..300 {
            let channel = channel.clone();
            flood.spawn(async move {
                let mut grpc = tonic::client::Grpc::new(channel);
                if grpc.ready().await.is_err() {
                    return;
                }
                let junk = vec![Bytes::from(vec![7u8; 64 * 1024]); 4];
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/flwr.proto.FlowerService/Join",
                );
                let call = grpc.streaming(
                    tonic::Request::new(tokio_stream::iter(junk)),
                    path,
                    RawCodec,
                );
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    if let Ok(r) = call.await {
                        let mut s = r.into_inner();
                        while let Ok(Some(_)) = s.message().await {}
                    }
                })
                .await;
            });
        }
    }
    tokio::time::timeout(Duration::from_secs(120), async {
        while flood.join_next().await.is_some() {}
    })
    .await
    .expect("the flood ends");
    // Honest clients still train.
    let a = RawClient::join(&addr).await;
    let b = RawClient::join(&addr).await;
    let ta = tokio::spawn(honest(a, 1.0, 10, vec![]));
    let tb = tokio::spawn(honest(b, 4.0, 30, vec![]));
    let status = tokio::task::spawn_blocking(move || {
        let s = server.wait(Duration::from_secs(120));
        (s, server.log())
    })
    .await
    .unwrap();
    let (_, _) = (ta.await, tb.await);
    assert!(status.0.success(), "the server failed:\n{}", status.1);
    let h = history(&out);
    assert_eq!(h["rounds"][0]["fit_results"], 2, "{:#}", h["rounds"][0]);
    assert!(
        status.1.contains("sent data while no call was waiting"),
        "the flood was not refused:\n{}",
        &status.1[..status.1.len().min(3000)]
    );
    let mib = peak.mib();
    assert!(
        mib < 200.0,
        "the server grew to {mib:.0} MiB under the flood"
    );
}

/// Replies that grow when decoded: 6 million empty tensors (12 MB on the
/// wire, hundreds of MB decoded), 200,000 small metrics, metrics under the
/// limit but each client with names of its own, and a reply larger than a
/// fit result for this model can be (20 million empty tensors, 40 MB). The first two are refused
/// on their bytes, before decoding; names aggregated per round are capped;
/// the history stays small and the model is FedAvg of the honest clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_that_grow_when_decoded_are_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut server = Server::start(&server_args(out.to_str().unwrap(), "6", &[]));
    let peak = PeakRss::watch(server.child.id());
    let addr = server.addr.clone();
    let mut tasks = Vec::new();
    // Joined one after another, client i gets node id i + 1.
    let c = RawClient::join(&addr).await;
    tasks.push(tokio::spawn(honest(c, 1.0, 10, vec![])));
    let c = RawClient::join(&addr).await;
    tasks.push(tokio::spawn(replies_to_fit_with(
        c,
        empty_tensors_fit_res(6_000_000),
    )));
    let c = RawClient::join(&addr).await;
    tasks.push(tokio::spawn(replies_to_fit_with(
        c,
        many_metrics_fit_res(200_000, "m"),
    )));
    let c = RawClient::join(&addr).await;
    let own: Vec<(String, f64)> = (0..1000).map(|i| (format!("a{i}"), 1.0)).collect();
    tasks.push(tokio::spawn(honest(c, 4.0, 30, own)));
    let c = RawClient::join(&addr).await;
    let own: Vec<(String, f64)> = (0..1000).map(|i| (format!("b{i}"), 1.0)).collect();
    tasks.push(tokio::spawn(honest(c, 4.0, 30, own)));
    let c = RawClient::join(&addr).await;
    tasks.push(tokio::spawn(replies_to_fit_with(
        c,
        empty_tensors_fit_res(20_000_000),
    )));
    let status = tokio::task::spawn_blocking(move || {
        let s = server.wait(Duration::from_secs(180));
        (s, server.log())
    })
    .await
    .unwrap();
    assert!(status.0.success(), "the server failed:\n{}", status.1);
    for t in tasks {
        let _ = t.await;
    }
    let h = history(&out);
    let r = &h["rounds"][0];
    assert_eq!(r["fit_results"], 3, "{r:#}");
    let tensors = reason_of(&h, 2);
    assert!(tensors.contains("more than 2 tensors"), "{tensors}");
    let metrics = reason_of(&h, 3);
    assert!(metrics.contains("more than 1024 metrics"), "{metrics}");
    // 40 MB for a model of 12 bytes: more than a fit result can be.
    let big = reason_of(&h, 6);
    assert!(big.contains("too large"), "{big}");
    let names = r["fit_metrics"].as_object().unwrap().len();
    assert!(names <= 256, "{names} metric names were aggregated");
    let size = std::fs::metadata(out.join("history.json")).unwrap().len();
    assert!(size < 200_000, "history.json is {size} bytes");
    // (10 * 1 + 30 * 4 + 30 * 4) / 70
    let c = petal_core::Checkpoint::from_safetensors(
        &std::fs::read(out.join("checkpoint.safetensors")).unwrap(),
    )
    .unwrap()
    .checkpoint;
    let want = (10.0 + 240.0) / 70.0;
    assert!((c.parameters.tensors[1].data.as_f32().unwrap()[0] - want).abs() < 1e-6);
    let mib = peak.mib();
    assert!(mib < 200.0, "the server grew to {mib:.0} MiB");
}

/// A finite metric whose weighted sum overflows (1e308 × 10 examples) made
/// the mean infinite, written as `null`, and the run unresumable. The mean
/// stays finite and `--resume` continues the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_finite_metric_keeps_the_run_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap().to_string();
    let huge = vec![("m".to_string(), 1e308)];
    for resume in [false, true] {
        let mut args = server_args(&out_s, "2", &[]);
        if resume {
            let at = args.iter().position(|a| *a == "--out").unwrap();
            args[at] = "--resume";
            args[1] = "2";
        }
        let mut server = Server::start(&args);
        let a = RawClient::join(&server.addr).await;
        let b = RawClient::join(&server.addr).await;
        let ta = tokio::spawn(honest(a, 1.0, 10, huge.clone()));
        let tb = tokio::spawn(honest(b, 4.0, 30, huge.clone()));
        let status = tokio::task::spawn_blocking(move || {
            let s = server.wait(Duration::from_secs(120));
            (s, server.log())
        })
        .await
        .unwrap();
        let (_, _) = (ta.await, tb.await);
        assert!(status.0.success(), "resume {resume}: {}", status.1);
    }
    let h = history(&out);
    assert_eq!(h["rounds"].as_array().unwrap().len(), 2);
    for r in h["rounds"].as_array().unwrap() {
        let m = r["fit_metrics"]["m"].as_f64().expect("a number");
        assert!(m.is_finite() && m > 9e307, "{m}");
    }
}

/// A server out of file descriptors used to retry `accept` at once, a
/// core's worth of CPU; it now backs off, logs, and stays idle.
#[test]
fn accept_failures_back_off() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "ulimit -n 48 && exec \"$0\" \"$@\""])
        .arg(petal_bin())
        .arg("server")
        .args(["--address", "127.0.0.1:0"])
        .args(server_args(
            out.to_str().unwrap(),
            "2",
            &["--handshake-timeout", "60"],
        ))
        .env("http_proxy", "http://127.0.0.1:9");
    let mut server = Server::start_cmd(cmd);
    let pid = server.child.id();
    let conns: Vec<TcpStream> = (0..80)
        .filter_map(|_| TcpStream::connect(&server.addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_seconds(pid).unwrap();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_seconds(pid).unwrap() - before;
    let wall = start.elapsed().as_secs_f64();
    let _ = server.child.kill();
    server.wait(Duration::from_secs(10));
    drop(conns);
    assert!(
        used < 0.3 * wall,
        "the server used {used:.2} s of CPU in {wall:.1} s while out of descriptors"
    );
    let log = server.log();
    assert!(log.contains("accepting a connection failed"), "{log}");
}

/// A connection that never starts HTTP/2 is closed after the handshake
/// timeout instead of being kept forever.
#[test]
fn a_connection_without_a_preface_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut server = Server::start(&server_args(
        out.to_str().unwrap(),
        "2",
        &["--handshake-timeout", "1"],
    ));
    let mut silent = TcpStream::connect(&server.addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 256];
    // The server's SETTINGS may arrive first; then the connection must end.
    let closed = loop {
        match silent.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    let _ = server.child.kill();
    server.wait(Duration::from_secs(10));
    assert!(closed, "the silent connection was still open after 20 s");
}

/// Clients that join and never answer do not delay the initial model: it
/// is asked of several at once, the first answer wins (asked one at a
/// time, each silent client cost a whole call timeout, here 10 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_do_not_delay_the_initial_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap().to_string();
    let mut server = Server::start(&[
        "--rounds",
        "1",
        "--min-available-clients",
        "1",
        "--fit-clients",
        "1",
        "--fraction-evaluate",
        "0",
        "--call-timeout",
        "600",
        "--out",
        &out_s,
    ]);
    let mut silent = Vec::new();
    for _ in 0..6 {
        silent.push(RawClient::join(&server.addr).await);
    }
    let c = RawClient::join(&server.addr).await;
    let t = tokio::spawn(honest(c, 1.0, 10, vec![]));
    let got = tokio::task::spawn_blocking(move || {
        let ok = eventually(Duration::from_secs(60), || {
            server.log().contains("global model ready")
        });
        let _ = server.child.kill();
        server.wait(Duration::from_secs(10));
        (ok, server.log())
    })
    .await
    .unwrap();
    t.abort();
    drop(silent);
    assert!(got.0, "no initial model within 60 s:\n{}", got.1);
}

/// Runs `petal ARGS`; its exit status and error output.
fn petal_output(args: &[&str]) -> (bool, String) {
    let o = petal().args(args).output().expect("petal runs");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Settings that would exhaust memory or cannot work are refused before
/// anything starts, naming the flag (a huge synthetic shape made each
/// worker allocate 10 GB; `--threads 100000` panicked a worker; `--rounds
/// 0` claimed a checkpoint it never wrote).
#[test]
fn impossible_settings_are_refused_before_start() {
    for (args, needle) in [
        (
            vec![
                "run",
                "--dataset",
                "synthetic",
                "--synthetic-shape",
                "1x100000x100000",
            ],
            "need about",
        ),
        (
            vec!["client", "--dataset", "synthetic", "--threads", "100000"],
            "--threads 100000 is more than 256",
        ),
        (
            vec!["run", "--dataset", "synthetic", "--rounds", "0"],
            "--rounds must be at least 1",
        ),
        (
            vec!["run", "--dataset", "synthetic", "--epochs", "5000"],
            "--epochs 5000 is outside 1..=1000",
        ),
    ] {
        let start = Instant::now();
        let (ok, err) = petal_output(&args);
        assert!(!ok, "petal {args:?} should fail");
        assert!(
            err.contains(needle),
            "petal {args:?}: expected '{needle}' in:\n{err}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "petal {args:?} was refused only after starting"
        );
    }
}

/// A completed one-round run of no-op clients in `out`.
fn small_run(out: &std::path::Path) {
    let (ok, err) = petal_output(&[
        "run",
        "--dataset",
        "synthetic",
        "--device",
        "noop",
        "--rounds",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
}

/// One flipped byte in a checkpoint, a history that lost rounds, and a
/// second server on a folder in use are refused; nothing is resumed from
/// silently.
#[test]
fn damaged_or_busy_run_folders_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    small_run(&out);
    let out_s = out.to_str().unwrap();
    let resume = |extra: &[&str]| {
        let mut a = vec!["run", "--resume", out_s];
        a.extend_from_slice(extra);
        a.extend(["--rounds", "2", "--wait-timeout", "1"]);
        petal_output(&a)
    };
    let ckpt = out.join("checkpoint.safetensors");
    let good = std::fs::read(&ckpt).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 3;
    bad[last] ^= 0x10;
    std::fs::write(&ckpt, &bad).unwrap();
    let (ok, err) = resume(&[]);
    assert!(!ok && err.contains("damaged"), "{err}");
    std::fs::write(&ckpt, &good).unwrap();

    let hist = out.join("history.json");
    let text = std::fs::read_to_string(&hist).unwrap();
    let mut h: serde_json::Value = serde_json::from_str(&text).unwrap();
    h["rounds"] = serde_json::json!([]);
    std::fs::write(&hist, h.to_string()).unwrap();
    let (ok, err) = resume(&[]);
    assert!(!ok && err.contains("history is incomplete"), "{err}");
    std::fs::remove_file(&hist).unwrap();
    let (ok, err) = resume(&[]);
    assert!(!ok && err.contains("history is needed"), "{err}");
    std::fs::write(&hist, &text).unwrap();

    // A server waiting for clients holds its folder; a second is refused.
    let other = dir.path().join("other");
    let mut a = Server::start(&["--out", other.to_str().unwrap(), "--wait-timeout", "60"]);
    let (ok, err) = petal_output(&[
        "server",
        "--address",
        "127.0.0.1:0",
        "--out",
        other.to_str().unwrap(),
    ]);
    let _ = a.child.kill();
    a.wait(Duration::from_secs(10));
    assert!(!ok && err.contains("is in use by process"), "{err}");
}
