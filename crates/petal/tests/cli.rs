//! Runs the real `petal` binary: federations over loopback gRPC and the
//! errors users get for bad input.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use support::{history, require};

/// Runs petal with a dead proxy in the environment: loopback gRPC must ignore it.
fn petal(args: &[&str]) -> Output {
    support::petal().args(args).output().expect("petal runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs petal with `--out` into a temporary folder; asserts success and
/// returns the history.
fn run_ok(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut all = args.to_vec();
    all.extend(["--out", out.to_str().unwrap()]);
    let o = petal(&all);
    assert!(o.status.success(), "{}", stderr(&o));
    let h = history(&out);
    assert!(out.join("history.csv").is_file() && out.join("checkpoint.safetensors").is_file());
    h
}

fn shared_cifar() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/cifar10-subset")
}

#[test]
fn three_clients_over_loopback_learn() {
    let h = run_ok(&[
        "run",
        "--clients",
        "3",
        "--min-clients",
        "3",
        "--fit-clients",
        "2",
        "--rounds",
        "3",
        "--dataset",
        "synthetic",
        "--synthetic-shape",
        "1x16x16",
        "--lr",
        "0.05",
    ]);
    let rounds = h["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    assert_eq!(h["status"], "completed");
    for r in rounds {
        assert_eq!(r["fit_results"], 2, "{r}");
        assert!(
            r["fit_metrics"]["train_loss"].as_f64().unwrap().is_finite(),
            "{r}"
        );
        assert_eq!(r["fit_failures"], 0, "{r}");
        assert_eq!(r["eval_results"], 3, "{r}");
    }
    let loss = |i: usize| rounds[i]["loss"].as_f64().unwrap();
    assert!(
        loss(2) < loss(0),
        "loss should fall: {} -> {}",
        loss(0),
        loss(2)
    );
    let acc = rounds[2]["accuracy"].as_f64().unwrap();
    assert!(acc > 0.3, "accuracy after 3 rounds: {acc}");
}

#[test]
fn in_process_isolation_also_runs() {
    let h = run_ok(&[
        "run",
        "--clients",
        "2",
        "--rounds",
        "1",
        "--isolation",
        "none",
        "--dataset",
        "synthetic",
        "--synthetic-shape",
        "3x16x16",
    ]);
    assert_eq!(h["rounds"][0]["fit_results"], 2);
    assert_eq!(h["rounds"][0]["eval_results"], 2);
}

#[test]
fn real_cifar10_subset_runs() {
    let root = shared_cifar();
    let present = root.join("cifar-10-batches-bin/test_batch.bin").is_file();
    if !require("../shared/data/cifar10-subset", present) {
        return;
    }
    let root = root.to_str().unwrap();
    let h = run_ok(&[
        "run",
        "--clients",
        "2",
        "--rounds",
        "1",
        "--dataset",
        "cifar10",
        "--data-dir",
        root,
    ]);
    // 1,000 test images split over two clients, all evaluated.
    assert_eq!(h["rounds"][0]["eval_results"], 2);
    assert!(h["rounds"][0]["loss"].as_f64().unwrap().is_finite());
}

/// Runs petal, expecting a non-zero exit and `needle` in its error output.
fn fails_with(args: &[&str], needle: &str) {
    let out = petal(args);
    let err = stderr(&out);
    assert!(!out.status.success(), "petal {args:?} should fail");
    assert!(err.contains(needle), "expected '{needle}' in:\n{err}");
}

#[test]
fn unknown_dataset_is_refused() {
    fails_with(
        &["run", "--dataset", "imagenet"],
        "unknown dataset 'imagenet'",
    );
}

#[test]
fn missing_data_fails_the_run_with_the_reason() {
    let empty = tempfile::tempdir().unwrap();
    let dir = empty.path().to_str().unwrap();
    let args = [
        "run",
        "--clients",
        "1",
        "--rounds",
        "1",
        "--dataset",
        "cifar10",
        "--data-dir",
        dir,
    ];
    fails_with(
        &args,
        "CIFAR-10 (cifar-10-batches-bin/test_batch.bin) not found",
    );
}

#[test]
fn more_fit_clients_than_clients_is_refused() {
    fails_with(
        &["run", "--clients", "2", "--fit-clients", "3"],
        "--fit-clients 3 is more than --clients 2",
    );
}

#[test]
fn port_in_use_is_reported() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    fails_with(
        &["server", "--address", &addr, "--rounds", "1"],
        &format!("cannot listen on {addr}"),
    );
}

#[test]
fn unreachable_server_gives_up_with_a_message() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let server = format!("127.0.0.1:{port}");
    fails_with(
        &[
            "client",
            "--server",
            &server,
            "--connect-attempts",
            "2",
            "--dataset",
            "synthetic",
        ],
        &format!("cannot reach server {server} after 2 attempts"),
    );
}

#[test]
fn node_settings_are_checked_before_joining() {
    fn node<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["node", "--insecure", "--dataset", "synthetic"];
        a.extend_from_slice(extra);
        a
    }
    fails_with(
        &node(&["--nodes", "2", "--num-partitions", "2", "--auth-key", "k0"]),
        "--auth-key is given 1 times for 2 nodes",
    );
    fails_with(
        &node(&["--nodes", "3", "--num-partitions", "2"]),
        "partitions 0..3 do not exist",
    );
    fails_with(&node(&["--heartbeat-interval", "5"]), "between 10 and 1800");
    fails_with(
        &node(&["--auth-key", "/nonexistent/key"]),
        "/nonexistent/key",
    );
    fails_with(
        &node(&[
            "--superlink",
            "http://127.0.0.1:1",
            "--connect-attempts",
            "1",
        ]),
        "expected host:port",
    );
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    fails_with(
        &node(&[
            "--superlink",
            &format!("127.0.0.1:{port}"),
            "--connect-attempts",
            "2",
        ]),
        "unreachable for 2 attempts",
    );
}

#[test]
fn bad_flags_are_refused() {
    fails_with(&["client", "--device", "tpu"], "unknown device 'tpu'");
    fails_with(
        &["run", "--synthetic-shape", "3x32"],
        "needs three dimensions",
    );
    fails_with(
        &["run", "--clients", "2", "--lr", "fast"],
        "invalid value 'fast'",
    );
}

#[test]
fn fashion_mnist_two_clients_learn_in_one_round() {
    let debian = Path::new("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz");
    if !require("Debian's dataset-fashion-mnist", debian.is_file()) {
        return;
    }
    let h = run_ok(&[
        "run",
        "--clients",
        "2",
        "--rounds",
        "1",
        "--isolation",
        "none",
    ]);
    let acc = h["rounds"][0]["accuracy"].as_f64().unwrap();
    // One epoch on each half of the 60,000 training images.
    assert!(acc > 0.6, "accuracy after one round: {acc}");
}

#[test]
fn many_clients_per_process_in_both_isolation_modes() {
    for isolation in ["none", "subprocess"] {
        let h = run_ok(&[
            "run",
            "--clients",
            "12",
            "--clients-per-process",
            "5",
            "--fit-clients",
            "4",
            "--rounds",
            "2",
            "--isolation",
            isolation,
            "--dataset",
            "synthetic",
            "--synthetic-shape",
            "1x16x16",
            "--synthetic-train",
            "40",
            "--synthetic-test",
            "10",
        ]);
        for r in h["rounds"].as_array().unwrap() {
            assert_eq!(r["fit_results"], 4, "{isolation}: {r}");
            assert_eq!(
                r["eval_results"], 12,
                "{isolation}: twelve distinct nodes: {r}"
            );
        }
    }
}

#[test]
fn noop_clients_measure_the_framework() {
    let h = run_ok(&[
        "run",
        "--device",
        "noop",
        "--clients",
        "30",
        "--clients-per-process",
        "10",
        "--rounds",
        "2",
        "--dataset",
        "synthetic",
    ]);
    let r = &h["rounds"][1];
    assert_eq!(
        (r["fit_results"].as_u64(), r["eval_results"].as_u64()),
        (Some(30), Some(30)),
        "{r}"
    );
    assert_eq!(r["loss"], 0.0);
}

/// Parses `petal partitions`' table: per partition (train, test, per-class counts).
fn partition_table(out: &str) -> Vec<(usize, usize, Vec<usize>)> {
    out.lines()
        .filter_map(|l| {
            let v: Vec<usize> = l
                .split_whitespace()
                .map(|w| w.parse().ok())
                .collect::<Option<_>>()?;
            (v.len() > 3).then(|| (v[1], v[2], v[3..].to_vec()))
        })
        .collect()
}

#[test]
fn partitions_are_shown_per_class_and_drawn() {
    let dir = tempfile::tempdir().unwrap();
    let mut tables = Vec::new();
    for scheme in ["iid", "dirichlet:0.1", "shards:2"] {
        let o = petal(&[
            "partitions",
            "--dataset",
            "synthetic",
            "--num-partitions",
            "5",
            "--partition",
            scheme,
        ]);
        assert!(o.status.success(), "{scheme}: {}", stderr(&o));
        let t = partition_table(&String::from_utf8_lossy(&o.stdout));
        assert_eq!(t.len(), 5, "{scheme}: {t:?}");
        for (train, test, classes) in &t {
            assert_eq!(classes.len(), 10, "{scheme}");
            assert_eq!(classes.iter().sum::<usize>(), *train, "{scheme}");
            assert!(*test > 0, "{scheme}: every partition gets test images");
        }
        tables.push(t);
    }
    let total = |t: &[(usize, usize, Vec<usize>)]| t.iter().map(|r| r.0).sum::<usize>();
    assert_eq!(
        total(&tables[0]),
        total(&tables[1]),
        "every image is dealt once"
    );
    let classes_held = |t: &[(usize, usize, Vec<usize>)]| {
        t.iter()
            .map(|r| r.2.iter().filter(|&&c| c > 0).count())
            .min()
            .unwrap()
    };
    assert_eq!(classes_held(&tables[0]), 10, "iid: every class everywhere");
    assert!(
        classes_held(&tables[2]) <= 2,
        "shards:2 gives at most 2 classes"
    );

    if !require("a TrueType font (fonts-dejavu-core)", font_present()) {
        return;
    }
    let map = dir.path().join("map.svg");
    let o = petal(&[
        "partitions",
        "--dataset",
        "synthetic",
        "--num-partitions",
        "5",
        "--heatmap",
        map.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let svg = std::fs::read_to_string(&map).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<rect"),
        "{svg:.200}"
    );
}

fn font_present() -> bool {
    std::env::var_os("PETAL_FONT").is_some()
        || Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").is_file()
}

#[test]
fn runs_are_plotted_as_svg_and_png() {
    if !require("a TrueType font (fonts-dejavu-core)", font_present()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("fedavg-run");
    let o = petal(&[
        "run",
        "--clients",
        "2",
        "--rounds",
        "2",
        "--dataset",
        "synthetic",
        "--synthetic-shape",
        "1x16x16",
        "--isolation",
        "none",
        "--server-eval",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let svg = dir.path().join("p.svg");
    let o = petal(&["plot", run.to_str().unwrap(), "-o", svg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("fedavg-run (federated)"), "{text:.300}");
    assert!(text.contains("fedavg-run (centralized)"), "{text:.300}");
    let png = dir.path().join("p.png");
    let o = petal(&[
        "plot",
        run.to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
        "--size",
        "400x300",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");

    let o = petal(&["plot", "/nonexistent/run", "-o", svg.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/run"), "{}", stderr(&o));
    let o = petal(&["plot", run.to_str().unwrap(), "-o", "/tmp/x.gif"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains(".gif"), "{}", stderr(&o));
}
