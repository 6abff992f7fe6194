//! A run's settings: `config.json` records them, `--resume` brings them
//! back (and refuses a changed data set, model or strategy before anything
//! starts, leaving the folder untouched), a failed start leaves no folder
//! and does not move `runs/latest`, and `--config FILE` sets flags by
//! their long names, the command line winning.

mod support;

use std::path::Path;
use std::process::Output;

use support::{history, petal};

fn run(args: &[&str], cwd: &Path) -> Output {
    petal()
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .args(args)
        .output()
        .expect("petal runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file of a folder and its bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != ".lock")
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

const SMALL: [&str; 4] = ["--dataset", "synthetic", "--synthetic-shape", "1x16x16"];

#[test]
fn resume_keeps_the_runs_settings_and_refuses_changing_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let out_s = out.to_str().unwrap();
    let mut first = vec!["run", "--rounds", "1", "--out", out_s];
    first.extend(SMALL);
    first.extend([
        "--strategy",
        "fedavgm",
        "--server-momentum",
        "0.5",
        "--partition",
        "dirichlet:1",
        "--lr",
        "0.02",
    ]);
    let o = run(&first, tmp.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let setting = |k: &str| config["settings"][k][0].as_str().unwrap().to_string();
    assert_eq!(setting("strategy"), "fedavgm");
    assert_eq!(setting("server-momentum"), "0.5");
    assert_eq!(setting("partition"), "dirichlet:1");
    assert_eq!(setting("dataset"), "synthetic");
    assert_eq!(setting("lr"), "0.02");
    assert_eq!(config["command"], "run");

    // A changed data set is refused in one line, before anything starts.
    let before = snapshot(&out);
    let o = run(
        &[
            "run",
            "--resume",
            out_s,
            "--rounds",
            "2",
            "--dataset",
            "fashion-mnist",
        ],
        tmp.path(),
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("--dataset fashion-mnist differs from the run's synthetic"),
        "{err}"
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one error line: {err}");
    for (flag, value) in [("--strategy", "fedavg"), ("--lr", "0.5")] {
        let o = run(
            &["run", "--resume", out_s, "--rounds", "2", flag, value],
            tmp.path(),
        );
        assert!(!o.status.success(), "{flag} {value} was accepted");
        assert!(
            stderr(&o).contains("differs from the run's"),
            "{}",
            stderr(&o)
        );
    }
    assert_eq!(
        snapshot(&out),
        before,
        "the refused resumes left the folder untouched"
    );

    // Without flags the run goes on with its own settings.
    let o = run(
        &[
            "run",
            "--resume",
            out_s,
            "--rounds",
            "2",
            "--wait-timeout",
            "60",
        ],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("fedavgm for 2 rounds"),
        "{}",
        stderr(&o)
    );
    let h = history(&out);
    assert_eq!(h["rounds"].as_array().unwrap().len(), 2);
    assert_eq!(h["status"], "completed");
}

#[test]
fn a_failed_start_leaves_no_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    // No client ever joins: the server gives up without a round.
    let out = tmp.path().join("never");
    let o = run(
        &[
            "server",
            "--address",
            "127.0.0.1:0",
            "--out",
            out.to_str().unwrap(),
            "--wait-timeout",
            "1",
        ],
        tmp.path(),
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no client connected"), "{}", stderr(&o));
    assert!(!out.exists(), "a failed start left {}", out.display());
    // The default folder under runs/: none made, runs/latest not moved.
    let o = run(
        &["server", "--address", "127.0.0.1:0", "--wait-timeout", "1"],
        tmp.path(),
    );
    assert!(!o.status.success());
    let runs = tmp.path().join("runs");
    let left: Vec<_> = std::fs::read_dir(&runs)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "runs/ holds {left:?}");
    // A bad setting fails before any folder is made.
    let bad = tmp.path().join("bad");
    let o = run(
        &[
            "server",
            "--address",
            "127.0.0.1:0",
            "--out",
            bad.to_str().unwrap(),
            "--strategy",
            "fedadam",
            "--proximal-mu",
            "1",
        ],
        tmp.path(),
    );
    assert!(
        stderr(&o).contains("--proximal-mu does not apply to --strategy fedadam"),
        "{}",
        stderr(&o)
    );
    assert!(!bad.exists());
}

#[test]
fn a_config_file_sets_flags_by_their_long_names() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("petal.toml");
    std::fs::write(
        &file,
        "rounds = 2\nstrategy = \"fedprox\"\nproximal-mu = 0.1\ndataset = \"synthetic\"\n\
         synthetic-shape = \"1x16x16\"\nserver-eval = true\n",
    )
    .unwrap();
    let out = tmp.path().join("run");
    let o = run(
        &[
            "run",
            "--config",
            file.to_str().unwrap(),
            "--rounds",
            "1",
            "--out",
            out.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("fedprox for 1 rounds"),
        "the flag wins: {}",
        stderr(&o)
    );
    let h = history(&out);
    assert_eq!(h["rounds"].as_array().unwrap().len(), 1);
    assert!(h["rounds"][0]["centralized"]["accuracy"].is_number(), "{h}");
    assert!(h["initial_centralized"]["loss"].is_number(), "{h}");

    for (text, needle) in [
        ("roundz = 3\n", "unknown key 'roundz'"),
        ("rounds = \"many\"\n", "invalid value 'many' for '--rounds"),
        ("rounds = [\n", "is not TOML"),
        ("strategy = { name = 1 }\n", "key 'strategy'"),
    ] {
        std::fs::write(&file, text).unwrap();
        let o = run(&["run", "--config", file.to_str().unwrap()], tmp.path());
        assert!(!o.status.success(), "{text}");
        assert!(stderr(&o).contains(needle), "{text}: {}", stderr(&o));
    }
}

#[test]
fn a_run_recorded_before_server_eval_every_implied_server_eval_resumes_without_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let out_s = out.to_str().unwrap();
    let mut first = vec!["run", "--rounds", "1", "--out", out_s];
    first.extend(SMALL);
    let o = run(&first, tmp.path());
    assert!(o.status.success(), "{}", stderr(&o));
    // What an earlier Petal wrote: the flag's default, beside --server-eval false.
    let path = out.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(config["settings"]["server-eval"][0], "false");
    assert!(config["settings"].get("server-eval-every").is_none());
    config["settings"]["server-eval-every"] = serde_json::json!(["1"]);
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let o = run(&["run", "--resume", out_s, "--rounds", "2"], tmp.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let h = history(&out);
    assert_eq!(h["rounds"].as_array().unwrap().len(), 2);
    assert!(
        h["rounds"][1]["centralized"].is_null(),
        "no server-side evaluation: {}",
        h["rounds"][1]
    );
}
