//! Network files (`--model`) and data sets from files (`--dataset npz|csv`):
//! a Petal checkpoint evaluated by PyTorch, through
//! `tools/torch_from_spec.py`, gives the accuracy and loss Petal reported
//! for every example model; bad files fail in one line.

mod support;

use std::path::{Path, PathBuf};

use support::{petal, require};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Trains `model` on a data set for 3 rounds with server-side evaluation;
/// returns the run folder and the server's last loss and accuracy.
fn train(model: &str, data: &[&str], out: &Path) -> (f64, f64) {
    let o = petal()
        .args([
            "simulate",
            "--clients",
            "3",
            "--rounds",
            "3",
            "--lr",
            "0.05",
        ])
        .args(["--batch-size", "8", "--server-eval", "--model"])
        .arg(root().join("examples/models").join(model))
        .args(data)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{model}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let h = support::history(out);
    let last = &h["rounds"][2]["centralized"];
    (
        last["loss"].as_f64().expect("a server loss"),
        last["accuracy"].as_f64().expect("a server accuracy"),
    )
}

/// PyTorch's loss and accuracy of the checkpoint in `out`.
fn torch_eval(
    py: &Path,
    model: &str,
    out: &Path,
    kind: &str,
    dir: &Path,
    extra: &[&str],
) -> (f64, f64) {
    let o = std::process::Command::new(py)
        .arg(root().join("crates/petal/tests/models/torch_eval.py"))
        .arg(root().join("tools"))
        .arg(root().join("examples/models").join(model))
        .arg(out.join("checkpoint.safetensors"))
        .arg(kind)
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(
        o.stdout
            .rsplit(|&b| b == b'\n')
            .find(|l| !l.is_empty())
            .unwrap(),
    )
    .unwrap();
    (v["loss"].as_f64().unwrap(), v["accuracy"].as_f64().unwrap())
}

#[test]
fn pytorch_reads_petal_checkpoints_of_every_example_model() {
    let Some(py) = support::flower::torch_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let npz = root().join("examples/data/npz");
    let csv = root().join("examples/data/csv");
    let cifar = root().join("../shared/data/cifar10-subset");
    /// A model file, its data flags, the data's kind and folder for PyTorch,
    /// and extra arguments of the PyTorch side.
    type Case<'a> = (&'a str, Vec<String>, &'a str, PathBuf, Vec<&'a str>);
    let mut cases: Vec<Case> = vec![
        (
            "mlp.toml",
            vec![
                "--dataset".into(),
                "npz".into(),
                "--data-dir".into(),
                npz.display().to_string(),
            ],
            "npz",
            npz.clone(),
            vec![],
        ),
        (
            "mlp.toml",
            vec![
                "--dataset".into(),
                "csv".into(),
                "--label-column".into(),
                "species".into(),
                "--data-dir".into(),
                csv.display().to_string(),
            ],
            "csv",
            csv.clone(),
            vec!["species"],
        ),
    ];
    let have_cifar = cifar.join("cifar-10-batches-bin/test_batch.bin").is_file();
    if require("../shared/data/cifar10-subset", have_cifar) {
        cases.push((
            "allconv.toml",
            vec![
                "--dataset".into(),
                "cifar10".into(),
                "--data-dir".into(),
                cifar.display().to_string(),
                "--examples-per-client".into(),
                "100".into(),
            ],
            "cifar10",
            cifar.clone(),
            vec![],
        ));
        cases.push((
            "seed-cnn.toml",
            vec![
                "--dataset".into(),
                "cifar10".into(),
                "--data-dir".into(),
                cifar.display().to_string(),
                "--examples-per-client".into(),
                "200".into(),
            ],
            "cifar10",
            cifar.clone(),
            vec![],
        ));
    }
    for (i, (model, data, kind, dir, extra)) in cases.iter().enumerate() {
        let out = tmp.path().join(format!("run{i}"));
        let data: Vec<&str> = data.iter().map(String::as_str).collect();
        let (loss, acc) = train(model, &data, &out);
        let (t_loss, t_acc) = torch_eval(&py, model, &out, kind, dir, extra);
        assert!(
            (acc - t_acc).abs() <= 0.002,
            "{model} on {kind}: Petal {acc}, PyTorch {t_acc}"
        );
        assert!(
            (loss - t_loss).abs() <= 1e-4 * loss.abs().max(1.0),
            "{model} on {kind}: Petal loss {loss}, PyTorch {t_loss}"
        );
    }
}

#[test]
fn bad_model_and_data_files_fail_in_one_line_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let bad_model = tmp.path().join("bad.toml");
    std::fs::write(&bad_model, "[[layer]]\ntype = \"batchnorm2d\"\n").unwrap();
    let npz = root().join("examples/data/npz");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--model".into(), bad_model.display().to_string()],
            "layer 1: batchnorm2d is not in Petal's engine yet",
        ),
        (
            vec!["--dataset".into(), "npz".into()],
            "--dataset npz needs --data-dir",
        ),
        (
            vec![
                "--dataset".into(),
                "csv".into(),
                "--data-dir".into(),
                npz.display().to_string(),
            ],
            "train.csv",
        ),
        (
            vec![
                "--dataset".into(),
                "npz".into(),
                "--data-dir".into(),
                npz.display().to_string(),
            ],
            "model does not fit the data",
        ),
        (
            vec![
                "--dataset".into(),
                "npz".into(),
                "--data-dir".into(),
                npz.display().to_string(),
                "--normalize".into(),
                "0.5:0.5,0.5".into(),
            ],
            "1 means and 2 stds",
        ),
    ];
    for (args, want) in cases {
        let out = tmp.path().join("run");
        let o = petal()
            .args(["simulate", "--clients", "2", "--rounds", "1"])
            .args(&args)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} left a run folder");
    }
}
