//! `petal simulate`: the same model to the bit for any number of workers,
//! thread or process workers, after a kill and `--resume`; the same model
//! as a networked `petal run` within float tolerance; bad settings refused
//! in one line.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use petal_core::Checkpoint;
use support::{eventually, petal, require, wait};

fn shared_cifar() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/cifar10-subset")
}

fn have_cifar() -> bool {
    let present = shared_cifar()
        .join("cifar-10-batches-bin/test_batch.bin")
        .is_file();
    require("../shared/data/cifar10-subset", present)
}

/// The CIFAR-10 subset shared by 60 clients of 40 images (fewer images than
/// 60 × 40: each client draws its own), 6 trained per round.
fn workload(rounds: u64) -> Vec<String> {
    let data_dir = shared_cifar();
    [
        "simulate",
        "--clients",
        "60",
        "--examples-per-client",
        "40",
        "--fit-clients",
        "6",
        "--batch-size",
        "10",
        "--lr",
        "0.01",
        "--dataset",
        "cifar10",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--server-eval-every",
        "2",
        "--rounds",
        &rounds.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The model tensors of a run folder's checkpoint, as bits.
fn model_bits(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(dir.join("checkpoint.safetensors")).expect("a checkpoint");
    let c: Checkpoint = Checkpoint::from_safetensors(&bytes)
        .expect("a valid checkpoint")
        .checkpoint;
    c.names
        .iter()
        .cloned()
        .zip(c.parameters.tensors.iter().map(|t| t.data.to_le_bytes()))
        .collect()
}

fn model_f32(dir: &Path) -> Vec<f32> {
    let bytes = std::fs::read(dir.join("checkpoint.safetensors")).expect("a checkpoint");
    let c = Checkpoint::from_safetensors(&bytes).unwrap().checkpoint;
    c.parameters
        .tensors
        .iter()
        .flat_map(|t| t.data.as_f32().unwrap().to_vec())
        .collect()
}

/// Runs `petal simulate`; returns its log.
fn simulate(args: &[String], extra: &[&str], out: &Path) -> String {
    let o = petal()
        .env("RUST_LOG", "info")
        .args(args)
        .args(extra)
        .arg("--out")
        .arg(out)
        .output()
        .expect("petal simulate starts");
    assert!(
        o.status.success(),
        "petal simulate {extra:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_checkpoint_is_the_same_to_the_bit_for_one_or_two_workers_threads_or_processes() {
    if !have_cifar() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let runs = [
        ("one", vec!["--workers", "1"]),
        ("two", vec!["--workers", "2"]),
        (
            "processes",
            vec![
                "--workers",
                "2",
                "--isolation",
                "process",
                "--recycle-after",
                "4",
            ],
        ),
    ];
    let mut models = Vec::new();
    for (name, extra) in &runs {
        let out = tmp.path().join(name);
        let log = simulate(&workload(3), extra, &out);
        if *name == "processes" {
            // 3 rounds × 6 fits and the initial model's calls, 4 tasks per process.
            let started: usize = log
                .split(" worker processes (each replaced")
                .next()
                .and_then(|s| s.rsplit(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no process count in the log: {log}"));
            assert!(
                started >= 5,
                "{started} worker processes for 21 tasks: {log}"
            );
        }
        let h = support::history(&out);
        let rounds = h["rounds"].as_array().unwrap();
        assert_eq!(rounds.len(), 3);
        for r in rounds {
            assert_eq!(r["fit_results"], 6, "{name}: {r}");
        }
        models.push(model_bits(&out));
    }
    assert_eq!(models[0].len(), 10, "the seed CNN's ten tensors");
    assert_eq!(models[0][0].0, "conv1.weight");
    assert!(models[0] == models[1], "one worker and two differ");
    assert!(models[0] == models[2], "thread and process workers differ");
    let h = support::history(&tmp.path().join("one"));
    let acc = h["rounds"][1]["centralized"]["accuracy"].as_f64();
    assert!(
        acc.is_some_and(|a| a > 0.0),
        "server-side evaluation at round 2: {h}"
    );
}

#[test]
fn a_killed_simulation_resumes_to_the_same_model() {
    const ROUNDS: u64 = 30;
    if !have_cifar() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    simulate(&workload(ROUNDS), &[], &whole);

    let cut = tmp.path().join("cut");
    let mut child = petal()
        .args(workload(ROUNDS))
        .arg("--out")
        .arg(&cut)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let saved = |dir: &Path| {
        std::fs::read_to_string(dir.join("history.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|h| h["rounds"].as_array().map(Vec::len))
            .unwrap_or(0)
    };
    assert!(
        eventually(Duration::from_secs(120), || saved(&cut) >= 2),
        "two rounds saved"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = saved(&cut);
    assert!(kept < ROUNDS as usize, "killed before its end");
    let o = petal()
        .args(["simulate", "--resume"])
        .arg(&cut)
        .args(["--rounds", &ROUNDS.to_string(), "--data-dir"])
        .arg(shared_cifar())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "resume after {kept} rounds: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(saved(&cut), ROUNDS as usize);
    assert!(
        model_bits(&whole) == model_bits(&cut),
        "killed after {kept} rounds and resumed: another model"
    );
}

#[test]
fn simulate_and_a_networked_run_give_the_same_model() {
    if !have_cifar() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = shared_cifar();
    let common = [
        "--clients",
        "3",
        "--fit-clients",
        "3",
        "--examples-per-client",
        "60",
        "--rounds",
        "2",
        "--batch-size",
        "10",
        "--lr",
        "0.01",
        "--dataset",
        "cifar10",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--fraction-evaluate",
        "0",
    ];
    let sim = tmp.path().join("sim");
    let o = petal()
        .arg("simulate")
        .args(common)
        .arg("--out")
        .arg(&sim)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let net = tmp.path().join("net");
    let mut run = petal()
        .arg("run")
        .args(common)
        .args(["--threads", "1"])
        .arg("--out")
        .arg(&net)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait(&mut run, "petal run", Duration::from_secs(300));
    assert!(status.success(), "petal run failed");
    let (a, b) = (model_f32(&sim), model_f32(&net));
    assert_eq!(a.len(), b.len());
    assert!(a.len() > 60_000, "the seed CNN for 3x32x32");
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1e-3 + x.abs().max(y.abs())))
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-3, "largest relative difference {worst}");
    // Training moved the model: the comparison is not of two initial models.
    let h = support::history(&sim);
    assert_eq!(h["rounds"][1]["fit_results"], 3);
}

#[test]
fn impossible_simulations_are_refused_in_one_line() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--clients", "4", "--fit-clients", "5"],
            "--fit-clients 5 is outside 1..=4",
        ),
        (&["--workers", "0"], "--workers 0 is outside"),
        (&["--clients", "0"], "--clients must be at least 1"),
        (
            &["--learner", "python:x.py:make"],
            "a python: learner runs under `petal run",
        ),
        (
            &["--dataset", "synthetic", "--examples-per-client", "0"],
            "--examples-per-client must be at least 1",
        ),
    ];
    for (args, want) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let o = petal()
            .arg("simulate")
            .args(*args)
            .arg("--out")
            .arg(tmp.path().join("run"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            !tmp.path().join("run").exists(),
            "{args:?} left a run folder"
        );
    }
}
