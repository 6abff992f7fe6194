//! Interoperability with real Flower (`flwr==1.41.0`, legacy gRPC API);
//! see `support/flower.rs` for the venv.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use petal_core::{DType, Tensor, TensorData};
use support::wait;

use support::flower::{no_proxy, python, skip};

fn script(name: &str) -> PathBuf {
    support::flower::fixture("interop", name)
}

#[test]
fn npy_bytes_match_numpy() {
    if skip() {
        return;
    }
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let ok = Command::new(&py)
        .arg(script("npy_fixtures.py"))
        .args(["write", dir.path().to_str().unwrap()])
        .status()
        .unwrap();
    assert!(ok.success());
    let load =
        |n: &str| petal_proto::npy::decode(&std::fs::read(dir.path().join(n)).unwrap()).unwrap();
    let a = load("f32.npy");
    assert_eq!(
        (a.shape, a.data),
        (vec![2, 3], TensorData::F32(vec![0., 1., 2., 3., 4., 5.]))
    );
    let a = load("f64_fortran.npy");
    assert_eq!(
        (a.shape, a.data),
        (vec![2, 3], TensorData::F64(vec![0., 1., 2., 3., 4., 5.]))
    );
    assert_eq!(load("i64.npy").data, TensorData::I64(vec![-3, 0, 7]));
    assert_eq!(load("f16.npy").data.dtype(), DType::F16);
    assert_eq!(load("f16.npy").data.to_f64_vec(), vec![0.5, -2.0]);
    let s = load("scalar.npy");
    assert_eq!((s.shape, s.data), (vec![], TensorData::F32(vec![4.25])));
    assert_eq!(load("big_endian.npy").data, TensorData::F32(vec![1.5, 2.5]));
    assert_eq!(load("u8.npy").data, TensorData::U8(vec![1, 255]));
    assert_eq!(load("bool.npy").data, TensorData::Bool(vec![true, false]));
    let f = load("i32_fortran.npy");
    assert_eq!(
        (f.shape, f.data),
        (vec![3, 2], TensorData::I32(vec![0, 1, 2, 3, 4, 5]))
    );

    // Every dtype Petal writes loads in NumPy with that dtype.
    for dtype in DType::ALL {
        if dtype == DType::BF16 {
            continue;
        }
        let t = Tensor::from_data(
            vec![2, 3],
            TensorData::from_f64(dtype, &[1.0, 0.0, 3.0, 1.0, 0.0, 2.0]),
        )
        .unwrap();
        let path = dir.path().join(format!("{}.npy", dtype.numpy_name()));
        std::fs::write(path, petal_proto::npy::encode(&t)).unwrap();
    }
    let scalar = Tensor::from_data(vec![], TensorData::I64(vec![42])).unwrap();
    std::fs::write(
        dir.path().join("scalar_i64.npy"),
        petal_proto::npy::encode(&scalar),
    )
    .unwrap();
    let out = Command::new(&py)
        .arg(script("npy_fixtures.py"))
        .args(["check", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway CA and server certificate for 127.0.0.1 in `dir/certs`.
fn certs(dir: &std::path::Path) -> PathBuf {
    let out = dir.join("certs");
    let ok = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/tls/make-certs.sh"))
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "make-certs.sh failed");
    out
}

#[test]
fn flower_numpy_clients_join_a_petal_server() {
    flower_clients_join_petal(false);
}

/// A Flower client with `root_certificates` joins a Petal TLS server.
#[test]
fn flower_numpy_clients_join_a_petal_tls_server() {
    flower_clients_join_petal(true);
}

fn flower_clients_join_petal(tls: bool) {
    if skip() {
        return;
    }
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let certs = tls.then(|| certs(dir.path()));
    let mut server = Command::new(env!("CARGO_BIN_EXE_petal"));
    if let Some(c) = &certs {
        server
            .arg("server")
            .arg("--ssl-certfile")
            .arg(c.join("server.pem"))
            .arg("--ssl-keyfile")
            .arg(c.join("server.key"));
    } else {
        server.arg("server");
    }
    let mut server = server
        .args(["--address", "127.0.0.1:0", "--rounds", "2"])
        .args([
            "--min-available-clients",
            "2",
            "--fit-clients",
            "2",
            "--wait-timeout",
            "120",
        ])
        .args(["--out", out.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The server logs the address it bound.
    let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.split("listening on ")
                .nth(1)
                .map(|a| a.trim().to_string())
        })
        .expect("server reports its address");
    let logger =
        std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>().join("\n"));

    let logs: Vec<PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("client{i}.json")))
        .collect();
    let mut clients: Vec<Child> = logs
        .iter()
        .enumerate()
        .map(|(i, log)| {
            let mut c = no_proxy(Command::new(&py));
            c.arg(script("numpy_client.py"))
                .args([&addr, &i.to_string(), log.to_str().unwrap()]);
            if let Some(certs) = &certs {
                c.arg(certs.join("ca.crt"));
            }
            c.spawn().unwrap()
        })
        .collect();
    let status = wait(&mut server, "petal server", Duration::from_secs(180));
    let server_log = logger.join().unwrap();
    assert!(status.success(), "server failed:\n{server_log}");
    for (i, c) in clients.iter_mut().enumerate() {
        let s = wait(c, "flower client", Duration::from_secs(30));
        assert!(s.success(), "flower client {i} failed");
    }

    let check = Command::new(&py)
        .arg(script("check_fedavg.py"))
        .args(&logs)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let h = support::history(&out);
    let r = &h["rounds"][1];
    assert_eq!(
        (r["fit_results"].as_u64(), r["eval_results"].as_u64()),
        (Some(2), Some(2))
    );
    // Accuracy is weighted by examples: clients report 0.25 on 5 and 0.5 on 6.
    let acc = r["accuracy"].as_f64().unwrap();
    assert!(
        (acc - (0.25 * 5.0 + 0.5 * 6.0) / 11.0).abs() < 1e-9,
        "{acc}"
    );
}

#[test]
fn petal_clients_join_a_flower_server() {
    petal_clients_join_flower(false);
}

/// Petal clients join a Flower server started with
/// `certificates=(ca, cert, key)`.
#[test]
fn petal_clients_join_a_flower_tls_server() {
    petal_clients_join_flower(true);
}

fn petal_clients_join_flower(tls: bool) {
    if skip() {
        return;
    }
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let h = dir.path().join("flower_history.json");
    let addr = format!("127.0.0.1:{}", support::free_port());
    let certs = tls.then(|| certs(dir.path()));
    let mut server = no_proxy(Command::new(&py));
    server
        .arg(script("flower_server.py"))
        .args([&addr, "2", h.to_str().unwrap()]);
    if let Some(c) = &certs {
        server.arg(c);
    }
    let mut server = server.spawn().unwrap();
    let mut clients: Vec<Child> = (0..2)
        .map(|i| {
            let mut c = Command::new(env!("CARGO_BIN_EXE_petal"));
            if let Some(certs) = &certs {
                c.arg("client")
                    .arg("--root-certificates")
                    .arg(certs.join("ca.crt"));
            } else {
                c.arg("client");
            }
            c.args(["--server", &addr, "--connect-attempts", "20"])
                .args(["--dataset", "synthetic", "--synthetic-shape", "1x16x16"])
                .args(["--partition-id", &i.to_string(), "--num-partitions", "2"])
                .args(["--isolation", if i == 0 { "none" } else { "subprocess" }])
                .env("RUST_LOG", "warn")
                .spawn()
                .unwrap()
        })
        .collect();
    let status = wait(&mut server, "flower server", Duration::from_secs(180));
    assert!(status.success(), "flower server failed");
    for (i, c) in clients.iter_mut().enumerate() {
        let s = wait(c, "petal client", Duration::from_secs(30));
        assert!(s.success(), "petal client {i} failed");
    }
    let h: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&h).unwrap()).unwrap();
    let losses = h["losses_distributed"].as_array().unwrap();
    assert_eq!(losses.len(), 2, "{h}");
    let acc = h["metrics_distributed"]["accuracy"].as_array().unwrap();
    assert_eq!(acc.len(), 2, "{h}");
    assert!(losses.iter().all(|l| l[1].as_f64().unwrap().is_finite()));
}

/// A Flower FedProx server drives Petal clients: they apply the
/// `proximal_mu` it sends, so with mu = 10 their aggregate moves much
/// less from the initial model than with mu = 0 (same seeds, same data).
#[test]
fn a_flower_fedprox_server_drives_petal_clients() {
    if skip() {
        return;
    }
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let moved = |mu: &str| -> f64 {
        let out = dir.path().join(format!("fedprox-{mu}.json"));
        let addr = format!("127.0.0.1:{}", support::free_port());
        let mut server = no_proxy(Command::new(&py))
            .arg(script("fedprox_server.py"))
            .args([&addr, mu, out.to_str().unwrap()])
            .spawn()
            .unwrap();
        let mut clients: Vec<Child> = (0..2)
            .map(|i| {
                Command::new(support::petal_bin())
                    .args(["client", "--server", &addr, "--connect-attempts", "20"])
                    .args(["--dataset", "synthetic", "--synthetic-shape", "1x16x16"])
                    .args(["--partition-id", &i.to_string(), "--num-partitions", "2"])
                    .args(["--isolation", "none"])
                    .env("RUST_LOG", "warn")
                    .spawn()
                    .unwrap()
            })
            .collect();
        let status = wait(&mut server, "flower server", Duration::from_secs(180));
        assert!(status.success(), "flower server failed");
        for c in &mut clients {
            assert!(wait(c, "petal client", Duration::from_secs(30)).success());
        }
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(r["failures"], 0, "{r}");
        r["distance"].as_f64().unwrap()
    };
    let (plain, prox) = (moved("0.0"), moved("10.0"));
    assert!(prox < 0.7 * plain, "mu 10 moved {prox}, mu 0 moved {plain}");
}
