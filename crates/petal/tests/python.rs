//! Python learners in real `petal run`s: the seed's PyTorch CNN learns as
//! the native engine does, a BatchNorm model's checkpoint loads in PyTorch
//! with `load_state_dict(strict=True)`, and dtypes and names survive the
//! federation. The PyTorch tests use `~/.cache/petal/torch-venv`
//! (`tools/venvs.sh torch`; `PETAL_SKIP_TORCH=1` skips them off CI); the
//! NumPy one the flwr venv.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use petal_core::{Checkpoint, DType, TensorData};
use support::flower::{python, skip, torch_python};
use support::{history, petal, require};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fashion_mnist() -> bool {
    require(
        "Debian's dataset-fashion-mnist",
        Path::new("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
    )
}

/// `petal run ARGS --out OUT`; panics with the log on failure.
fn run(out: &Path, args: &[&str]) -> serde_json::Value {
    let o = petal()
        .arg("run")
        .args(args)
        .args(["--out", out.to_str().unwrap()])
        .output()
        .expect("petal runs");
    assert!(
        o.status.success(),
        "petal run {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    history(out)
}

fn final_accuracy(h: &serde_json::Value) -> f64 {
    let rounds = h["rounds"].as_array().unwrap();
    rounds.last().unwrap()["accuracy"].as_f64().unwrap()
}

/// The seed's CNN as a Python learner (PyTorch on the CPU) and Petal's
/// native engine, 2 clients × 3 rounds of Fashion-MNIST with the same
/// settings: the same accuracy, up to the noise of different shuffles and
/// initial weights.
#[test]
fn the_seeds_pytorch_cnn_learns_like_the_native_engine() {
    let Some(py) = torch_python() else { return };
    if !fashion_mnist() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let learner = format!(
        "python:{}:make",
        repo().join("examples/pytorch/cnn.py").display()
    );
    let torch = run(
        &dir.path().join("torch"),
        &["--learner", &learner, "--python", py.to_str().unwrap()],
    );
    let native = run(&dir.path().join("native"), &[]);
    let (t, n) = (final_accuracy(&torch), final_accuracy(&native));
    assert!(t > 0.7 && n > 0.7, "torch {t}, native {n}");
    assert!((t - n).abs() < 0.04, "torch {t} vs native {n}");
    let c = Checkpoint::from_safetensors(
        &std::fs::read(dir.path().join("torch/checkpoint.safetensors")).unwrap(),
    )
    .unwrap()
    .checkpoint;
    assert_eq!(c.names[0], "conv1.weight", "{:?}", c.names);
}

/// A BatchNorm model: its checkpoint holds the running statistics and an
/// int64 0-d `num_batches_tracked` (the mean of the clients', 938 batches
/// of 32 each), and loads in PyTorch with `load_state_dict(strict=True)`,
/// giving the accuracy Petal reported.
#[test]
fn a_batchnorm_checkpoint_loads_in_pytorch() {
    let Some(py) = torch_python() else { return };
    if !fashion_mnist() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bn");
    let learner = format!(
        "python:{}:make",
        repo().join("examples/pytorch/bn_cnn.py").display()
    );
    let h = run(
        &out,
        &[
            "--learner",
            &learner,
            "--python",
            py.to_str().unwrap(),
            "--rounds",
            "1",
            "--isolation",
            "none",
        ],
    );
    let c =
        Checkpoint::from_safetensors(&std::fs::read(out.join("checkpoint.safetensors")).unwrap())
            .unwrap()
            .checkpoint;
    let at = |name: &str| c.names.iter().position(|n| n == name).unwrap();
    let nbt = &c.parameters.tensors[at("bn1.num_batches_tracked")];
    assert_eq!(nbt.dtype(), DType::I64);
    assert!(nbt.shape.is_empty());
    assert_eq!(nbt.data, TensorData::I64(vec![938]));
    assert_eq!(
        c.parameters.tensors[at("bn2.running_var")].dtype(),
        DType::F32
    );
    let acc = final_accuracy(&h);
    let o = Command::new(&py)
        .arg(repo().join("crates/petal/tests/python/load_checkpoint.py"))
        .arg(out.join("checkpoint.safetensors"))
        .arg(acc.to_string())
        .env("PYTHONPATH", repo().join("examples/pytorch"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A NumPy learner under `petal run` (no PyTorch): an int64 0-d buffer and
/// a float16 tensor keep their dtypes through rounds of aggregation, and
/// the names reach the checkpoint.
#[test]
fn dtypes_and_names_survive_a_federation() {
    if skip() {
        return;
    }
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("toy");
    let learner = format!(
        "python:{}:make",
        repo()
            .join("crates/petal-python/tests/learners/toy.py")
            .display()
    );
    for isolation in ["subprocess", "none"] {
        let out = out.join(isolation);
        run(
            &out,
            &[
                "--learner",
                &learner,
                "--python",
                py.to_str().unwrap(),
                "--rounds",
                "3",
                "--isolation",
                isolation,
            ],
        );
        let c = Checkpoint::from_safetensors(
            &std::fs::read(out.join("checkpoint.safetensors")).unwrap(),
        )
        .unwrap()
        .checkpoint;
        assert_eq!(c.names, ["w", "bn.num_batches_tracked", "h"], "{isolation}");
        let t = &c.parameters.tensors;
        // Partitions 0 and 1 start at w = 0 and 1; each round adds 1.
        assert_eq!(t[1].data, TensorData::I64(vec![3]), "{isolation}");
        assert_eq!(t[2].dtype(), DType::F16, "{isolation}");
        assert_eq!(t[2].data.to_f64_vec(), vec![4.0, -8.0], "{isolation}");
        assert_eq!(t[0].dtype(), DType::F32, "{isolation}");
    }
}
