//! Sharp edges a newcomer meets (issue 20): every bad setting is refused in
//! one line before anything starts; signals end a run and its clients
//! quickly with the shell's exit status; a run whose clients cannot give a
//! model ends with an error; `localhost` works for server and client;
//! failures reach the server with the client's own message.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::{eventually, petal, wait};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs petal in `cwd`.
fn run_in(cwd: &Path, args: &[&str]) -> Output {
    petal()
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .args(args)
        .output()
        .expect("petal runs")
}

#[test]
fn bad_settings_are_refused_in_one_line_before_anything_starts() {
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--lr", "-1"], "--lr -1 must be a positive number"),
        (vec!["--lr=-0.5"], "--lr -0.5 must be a positive number"),
        (vec!["--epochs", "0"], "--epochs 0 is outside 1..=1000"),
        (vec!["--batch-size", "0"], "--batch-size 0 is outside"),
        (
            vec!["--momentum", "-0.1"],
            "--momentum -0.1 is outside [0, 1)",
        ),
        (
            vec!["--fraction-evaluate", "2"],
            "--fraction-evaluate 2 is outside [0, 1]",
        ),
        (
            vec![
                "--dataset",
                "cifar10",
                "--data-dir",
                "/nonexistent/petal-data",
            ],
            "--data-dir /nonexistent/petal-data does not exist",
        ),
        (
            vec!["--address", "localhost"],
            "'localhost' is not host:port",
        ),
        (vec!["--rounds", "0"], "--rounds must be at least 1"),
        (
            vec!["--keepalive-timeout", "0"],
            "--keepalive-timeout must be at least 0.1 seconds",
        ),
        (
            vec!["--keepalive-interval=-1"],
            "--keepalive-interval must be between 0 and 86400 seconds",
        ),
    ];
    #[cfg(not(feature = "cuda"))]
    let cases = {
        let mut c = cases;
        c.push((vec!["--device", "cuda"], "this build has no CUDA support"));
        c
    };
    for (extra, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["run", "--rounds", "1", "--dataset", "synthetic"];
        args.extend(&extra);
        let o = run_in(dir.path(), &args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{extra:?} was accepted:\n{err}");
        assert!(
            err.contains(needle),
            "{extra:?}: expected '{needle}' in:\n{err}"
        );
        let error_lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(error_lines.len(), 1, "{extra:?}: one error line:\n{err}");
        assert!(
            !err.contains("listening on") && !err.contains("started"),
            "{extra:?}: refused only after starting:\n{err}"
        );
        assert!(
            !dir.path().join("runs").exists(),
            "{extra:?}: a refused run left a run folder"
        );
    }
}

/// The pids of `pid`'s children (from /proc).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Whether `pid` is gone (or a zombie waiting to be reaped).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn signals_end_a_run_and_its_clients_quickly() {
    for (signal, code) in [("TERM", 143), ("INT", 130)] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let mut child = petal()
            .env("RUST_LOG", "info")
            .args([
                "run",
                "--clients",
                "3",
                "--rounds",
                "1000",
                "--dataset",
                "synthetic",
                "--synthetic-shape",
                "1x16x16",
                "--synthetic-train",
                "2000",
                "--out",
                out.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Signal once a round is saved and clients are training.
        assert!(
            eventually(Duration::from_secs(120), || out
                .join("checkpoint.safetensors")
                .is_file()),
            "no round was saved"
        );
        let clients = children(pid);
        assert_eq!(clients.len(), 3, "three client processes: {clients:?}");
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let status = wait(
            &mut child,
            "petal run after a signal",
            Duration::from_secs(5),
        );
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(code), "SIG{signal}:\n{err}");
        assert!(
            eventually(Duration::from_secs(2), || clients.iter().all(|&c| gone(c))),
            "SIG{signal}: client processes outlived the run"
        );
        // No noise from the clients or their workers on the way out.
        let after: Vec<&str> = err
            .lines()
            .skip_while(|l| !l.contains("History"))
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .collect();
        assert!(
            after.is_empty(),
            "SIG{signal}: noise after the signal:\n{err}"
        );
        assert!(err.contains("interrupted"), "{err}");
        let h = support::history(&out);
        assert_eq!(h["status"], "interrupted");
    }
}

#[test]
fn a_run_whose_clients_give_no_model_ends_with_an_error() {
    if support::flower::skip() {
        return;
    }
    let py = support::flower::python();
    let learner = format!(
        "python:{}:make",
        support::flower::fixture("edges", "no_model.py").display()
    );
    let dir = tempfile::tempdir().unwrap();
    let mut child = petal()
        .current_dir(dir.path())
        .args([
            "run",
            "--rounds",
            "1",
            "--learner",
            &learner,
            "--python",
            py.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It used to wait forever for a client that could.
    let status = wait(&mut child, "petal run", Duration::from_secs(120));
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("no client could provide initial parameters: all 2 clients asked failed"),
        "{err}"
    );
    assert!(err.contains("this learner has no model"), "{err}");
    assert!(
        !dir.path().join("runs").exists(),
        "a failed start left a run folder"
    );
}

#[test]
fn localhost_works_for_server_and_client() {
    let port = support::free_port().to_string();
    let addr = format!("localhost:{port}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut server = support::Server::start(&[
        "--address",
        &addr,
        "--rounds",
        "1",
        "--min-available-clients",
        "1",
        "--fit-clients",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    let o = petal()
        .args([
            "client",
            "--server",
            &addr,
            "--dataset",
            "synthetic",
            "--synthetic-shape",
            "1x16x16",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--num-partitions is 1: it trains on the whole synthetic data set"),
        "a client without partition flags says so: {}",
        stderr(&o)
    );
    assert!(
        server.wait(Duration::from_secs(60)).success(),
        "{}",
        server.log()
    );
}

#[test]
fn a_client_failure_reaches_the_server_with_its_message() {
    // Two clients whose images differ: the second cannot load the model
    // the first provides; the server records why, in the client's words.
    let dir = tempfile::tempdir().unwrap();
    let mut server = support::Server::start(&[
        "--rounds",
        "1",
        "--min-available-clients",
        "2",
        "--out",
        dir.path().join("run").to_str().unwrap(),
    ]);
    let client = |shape: &str| {
        petal()
            .args([
                "client",
                "--server",
                &server.addr,
                "--isolation",
                "none",
                "--dataset",
                "synthetic",
                "--synthetic-shape",
                shape,
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = client("1x16x16");
    assert!(eventually(Duration::from_secs(30), || server
        .log()
        .contains("client joined")));
    let mut second = client("3x16x16");
    assert!(
        server.wait(Duration::from_secs(60)).success(),
        "{}",
        server.log()
    );
    for c in [&mut first, &mut second] {
        wait(c, "petal client", Duration::from_secs(30));
    }
    let h = support::history(&dir.path().join("run"));
    let failures = h["rounds"][0]["failures"].as_array().unwrap();
    assert!(!failures.is_empty(), "{h}");
    for f in failures {
        let reason = f["reason"].as_str().unwrap();
        assert!(
            reason.contains("does not fit this client's data set (3x16x16 images, 10 classes"),
            "{reason}"
        );
        assert!(!reason.contains("NOT_IMPLEMENTED"), "{reason}");
    }
}
