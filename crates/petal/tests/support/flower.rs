//! Real Flower (`flwr==1.41.0`) for the interop tests.
//!
//! The first test to need it creates a venv under
//! `~/.cache/petal/flwr-venv` (outside the clone, so later runs on the same
//! machine reuse it; `$PETAL_CACHE` moves it), or uses
//! `$PETAL_FLWR_PYTHON`, installing flwr from the package index.
//! Set `PETAL_SKIP_INTEROP=1` to skip these tests on machines without
//! access to PyPI (refused under CI, where they must run).

use std::path::{Path, PathBuf};
use std::process::Command;

const FLWR: &str = "flwr==1.41.0";

/// True when the interop tests must be skipped (see [`super::require`]).
pub fn skip() -> bool {
    let skip = std::env::var_os("PETAL_SKIP_INTEROP").is_some();
    !super::require("the flwr venv (PETAL_SKIP_INTEROP is set)", !skip)
}

/// A file of the interop fixtures (`tests/<dir>/<name>`).
pub fn fixture(dir: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(dir)
        .join(name)
}

/// Where Petal's test venvs live: `$PETAL_CACHE`, else `~/.cache/petal`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PETAL_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/petal")
}

/// A Python with flwr installed; created once, under a file lock.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PETAL_FLWR_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).unwrap();
    let venv = cache.join("flwr-venv");
    let lock = std::fs::File::create(cache.join("flwr-venv.lock")).unwrap();
    lock.lock().unwrap();
    let py = venv.join("bin/python");
    let ready = venv.join(".installed");
    if !ready.exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 is installed");
        assert!(ok.success(), "python3 -m venv failed");
        let ok = Command::new(&py)
            .args(["-m", "pip", "install", "--quiet", FLWR])
            .status()
            .unwrap();
        assert!(
            ok.success(),
            "pip install {FLWR} failed (set PETAL_SKIP_INTEROP=1 offline)"
        );
        std::fs::write(&ready, FLWR).unwrap();
    }
    py
}

/// A Flower command-line tool (`flwr`, `flower-superlink`, ...) installed
/// beside [`python`].
pub fn tool(name: &str) -> PathBuf {
    let py = python();
    let bin = py.parent().expect("python lives in a bin folder");
    bin.join(name)
}

/// A command with proxies removed: grpcio and httpx would send loopback
/// traffic to them.
pub fn no_proxy(mut c: Command) -> Command {
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "grpc_proxy",
    ] {
        c.env_remove(v);
    }
    c.env("no_proxy", "127.0.0.1,localhost");
    c
}

/// A Python with `torch==2.15.0` (and flwr), from `tools/venvs.sh torch`
/// (created when missing, under the script's lock), or `None` when
/// `PETAL_SKIP_TORCH` is set (refused under CI).
pub fn torch_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PETAL_TORCH_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let skip = std::env::var_os("PETAL_SKIP_TORCH").is_some();
    if !super::require("the torch venv (PETAL_SKIP_TORCH is set)", !skip) {
        return None;
    }
    let py = cache_dir().join("torch-venv/bin/python");
    let marker = cache_dir().join("torch-venv/.installed");
    if !marker.exists() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/venvs.sh");
        let ok = Command::new("bash")
            .arg(script)
            .arg("torch")
            .status()
            .expect("bash runs");
        assert!(
            ok.success(),
            "tools/venvs.sh torch failed (set PETAL_SKIP_TORCH=1 without PyPI)"
        );
    }
    Some(py)
}
