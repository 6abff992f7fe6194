//! Python learners driven by a real interpreter (the flwr venv of the
//! interop tests, `~/.cache/petal/flwr-venv`, made by `tools/venvs.sh flwr`):
//! dtypes and names survive, the warm parent forks a fresh process per
//! step while inline learners keep their state, and a learner that raises,
//! exits, crashes, hangs or prints is that step's failure or a log line,
//! never the end of the client.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use petal_core::{
    Client, Config, DType, EvaluateIns, FitIns, Parameters, Scalar, TensorData,
    names_from_properties,
};
use petal_python::{Mode, PythonClient, PythonSpec, WorkerPool};

/// A Python with NumPy and flwr, or `None` (skipped; a failure under CI).
fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PETAL_FLWR_PYTHON") {
        return Some(p.into());
    }
    let cache = std::env::var_os("PETAL_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/petal"),
        PathBuf::from,
    );
    let py = cache.join("flwr-venv/bin/python");
    if py.is_file() {
        return Some(py);
    }
    let what = format!("{} (run tools/venvs.sh flwr)", py.display());
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false") {
        panic!("missing test input under CI: {what}");
    }
    eprintln!("SKIPPED: {what} is not available");
    None
}

fn learner_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/learners/toy.py")
}

fn pool(
    py: &std::path::Path,
    name: &str,
    mode: Mode,
    timeout: Option<Duration>,
) -> Arc<WorkerPool> {
    let spec = PythonSpec {
        file: learner_file(),
        name: name.into(),
        python: py.to_path_buf(),
    };
    Arc::new(WorkerPool::new(spec, mode, 2, timeout))
}

fn config(pairs: &[(&str, Scalar)]) -> Config {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn fit(c: &mut PythonClient, p: &Parameters, cfg: Config) -> Result<petal_core::FitRes, String> {
    c.fit(FitIns {
        parameters: Arc::new(p.clone()),
        config: cfg,
    })
    .map_err(|e| e.to_string())
}

fn metric(m: &Config, key: &str) -> i64 {
    match m.get(key) {
        Some(Scalar::I64(v)) => *v,
        other => panic!("{key}: {other:?}"),
    }
}

#[test]
fn dtypes_names_and_warm_forked_steps() {
    let Some(py) = python() else { return };
    let pool = pool(&py, "make", Mode::Fork, None);
    let mut c = PythonClient::new(pool.clone(), 1, 2);
    let p = c.get_parameters(&Config::new()).unwrap();
    assert_eq!(p.names, ["w", "bn.num_batches_tracked", "h"]);
    let dtypes: Vec<DType> = p.tensors.iter().map(|t| t.dtype()).collect();
    assert_eq!(dtypes, [DType::F32, DType::I64, DType::F16]);
    assert_eq!(p.tensors[1].shape, Vec::<usize>::new(), "0-d buffer");
    assert_eq!(p.tensors[0].data, vec![1.0f32; 3], "partition 1's learner");
    let props = c.get_properties(&Config::new()).unwrap();
    assert_eq!(names_from_properties(&props).unwrap(), p.names);

    let cfg = config(&[
        ("lr", Scalar::Double(0.25)),
        ("tag", Scalar::Str("é".into())),
    ]);
    let a = fit(&mut c, &p, cfg.clone()).unwrap();
    let b = fit(&mut c, &a.parameters, cfg).unwrap();
    assert_eq!(b.parameters.tensors[0].data, vec![3.0f32; 3]);
    assert_eq!(b.parameters.tensors[1].data, TensorData::I64(vec![2]));
    assert_eq!(b.parameters.tensors[2].data.to_f64_vec(), vec![2.0, -4.0]);
    assert_eq!(b.num_examples, 11);
    assert_eq!(b.metrics["lr"], Scalar::Double(0.25));
    assert_eq!(b.metrics["tag"], Scalar::Str("é".into()));
    // Each step in its own process, forked from one warm parent.
    assert_ne!(metric(&a.metrics, "pid"), metric(&b.metrics, "pid"));
    assert_eq!(metric(&a.metrics, "parent"), metric(&b.metrics, "parent"));
    assert_eq!(metric(&b.metrics, "calls"), 1, "a fresh learner per step");

    let e = c
        .evaluate(EvaluateIns {
            parameters: Arc::new(b.parameters.clone()),
            config: Config::new(),
        })
        .unwrap();
    assert_eq!((e.loss, e.num_examples), (9.0, 5));
    assert_eq!(e.metrics["accuracy"], Scalar::Double(0.25));

    // Concurrent steps of several logical clients on one warm parent.
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let pool = pool.clone();
            let p = p.clone();
            std::thread::spawn(move || {
                let mut c = PythonClient::new(pool, i, 4);
                fit(&mut c, &p, Config::new()).unwrap().num_examples
            })
        })
        .collect();
    let mut got: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    got.sort();
    assert_eq!(got, [10, 11, 12, 13]);
}

#[test]
fn inline_learners_keep_their_state() {
    let Some(py) = python() else { return };
    let pool = pool(&py, "list_params", Mode::Inline, None);
    let mut c = PythonClient::new(pool, 0, 1);
    let p = c.get_parameters(&Config::new()).unwrap();
    assert!(p.names.is_empty(), "a list has no names");
    let a = fit(&mut c, &p, Config::new()).unwrap();
    let b = fit(&mut c, &p, Config::new()).unwrap();
    assert_eq!(metric(&a.metrics, "pid"), metric(&b.metrics, "pid"));
    assert_eq!(metric(&b.metrics, "calls"), 2);
}

#[test]
fn failing_learners_fail_their_step_only() {
    let Some(py) = python() else { return };
    for mode in [Mode::Fork, Mode::Inline] {
        let pool = pool(&py, "make", mode, Some(Duration::from_secs(2)));
        let mut c = PythonClient::new(pool, 0, 1);
        let p = c.get_parameters(&Config::new()).unwrap();
        for (act, needle) in [
            ("raise", "ValueError: the learner refuses this step"),
            ("exit", "status 3"),
            ("segfault", "SIGSEGV"),
            ("hang", "--worker-timeout"),
        ] {
            let e = fit(&mut c, &p, config(&[("act", Scalar::Str(act.into()))])).unwrap_err();
            let needle = match (mode, act) {
                (Mode::Inline, "exit" | "segfault") => "exited",
                _ => needle,
            };
            assert!(e.contains(needle), "{mode:?} {act}: {e}");
            // The client carries on.
            let ok = fit(&mut c, &p, Config::new()).unwrap();
            assert_eq!(
                ok.parameters.tensors[0].data,
                vec![1.0f32; 3],
                "{mode:?} after {act}"
            );
        }
        // Printing (even on fd 1 directly) goes to the log, not the protocol.
        let noisy = fit(&mut c, &p, config(&[("act", Scalar::Str("print".into()))])).unwrap();
        assert_eq!(noisy.num_examples, 10, "{mode:?}");
    }
}

#[test]
fn a_learner_that_cannot_load_says_why() {
    let Some(py) = python() else { return };
    let e = pool(&py, "broken", Mode::Fork, None);
    let mut c = PythonClient::new(e, 0, 1);
    let why = c.get_parameters(&Config::new()).unwrap_err().to_string();
    assert!(why.contains("cannot build this learner"), "{why}");
    let missing = pool(&py, "nothing_here", Mode::Fork, None);
    let why = missing.start(0).unwrap_err();
    assert!(why.contains("has no 'nothing_here'"), "{why}");
    let spec = PythonSpec {
        file: learner_file(),
        name: "make".into(),
        python: "/nonexistent/python".into(),
    };
    let why = WorkerPool::new(spec, Mode::Fork, 1, None)
        .start(0)
        .unwrap_err();
    assert!(why.contains("--python"), "{why}");
}

#[test]
fn a_flower_numpy_client_works_unchanged() {
    let Some(py) = python() else { return };
    let pool = pool(&py, "flower", Mode::Fork, None);
    let mut c = PythonClient::new(pool, 0, 1);
    let p = c.get_parameters(&Config::new()).unwrap();
    let r = fit(&mut c, &p, Config::new()).unwrap();
    assert_eq!(r.parameters.tensors[0].data, vec![3.0f32, 3.0]);
    assert_eq!(r.metrics["flower"], Scalar::Bool(true));
}
