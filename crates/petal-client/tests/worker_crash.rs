//! A worker that crashes, hangs or misbehaves becomes a reported failure
//! for that call; the client stays connected and answers the next one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use petal_client::isolation::SubprocessClient;
use petal_client::{Client, ConnectOptions, run_client};
use petal_core::{ClientManager, Config, FitIns, Parameters, Registry, Tensor};
use petal_server::{GrpcServer, ServerOptions};

fn fit_ins() -> FitIns {
    FitIns {
        parameters: Arc::new(Parameters::new(vec![
            Tensor::new(vec![2], vec![1.0, 2.0]).unwrap(),
        ])),
        config: Config::new(),
    }
}

fn sh(script: &str) -> SubprocessClient {
    SubprocessClient::new("sh".into(), vec!["-c".into(), script.into()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_is_a_failure_not_a_dead_client() {
    let registry = Arc::new(Registry::new());
    let server = GrpcServer::start(
        "127.0.0.1:0".parse().unwrap(),
        registry.clone(),
        ServerOptions::default(),
    )
    .await
    .unwrap();
    // The "worker" kills itself with SIGKILL, as the OOM killer would.
    let worker = sh("kill -9 $$");
    let opts = ConnectOptions::new(server.local_addr().to_string());
    let client = tokio::spawn(async move { run_client(&opts, worker).await });

    assert!(registry.wait_for(1, Some(Duration::from_secs(10))).await);
    let proxy = registry.all().pop().unwrap();
    let timeout = Some(Duration::from_secs(30));
    for _ in 0..2 {
        let err = proxy.fit(fit_ins(), timeout).await.unwrap_err().to_string();
        assert!(err.contains("killed by signal 9"), "{err}");
    }
    assert_eq!(registry.num_available(), 1, "the client is still connected");
    proxy.disconnect(timeout).await.unwrap();
    client.await.unwrap().unwrap();
    server.shutdown(Duration::from_secs(2)).await.unwrap();
}

fn fit_error(mut c: SubprocessClient) -> String {
    c.fit(fit_ins()).unwrap_err().to_string()
}

#[test]
fn worker_exit_code_and_garbage_output_are_failures() {
    let err = fit_error(sh("exit 3"));
    assert!(err.contains("exit status: 3"), "{err}");
    let err = fit_error(sh("cat > /dev/null; printf '\\003\\377\\377\\377'"));
    assert!(err.contains("malformed worker output"), "{err}");
    let err = fit_error(sh(
        "cat > /dev/null; printf '\\377\\377\\377\\377\\377\\377\\377\\377\\377\\001'",
    ));
    assert!(err.contains("malformed worker output"), "{err}");
    let err = fit_error(sh("cat > /dev/null"));
    assert!(err.contains("ended without a reply"), "{err}");
}

#[test]
fn hung_worker_is_killed_after_its_timeout() {
    let hung = sh("exec sleep 60").with_timeout(Some(Duration::from_millis(300)));
    let err = fit_error(hung);
    assert!(err.contains("ran longer than 0.3s and was killed"), "{err}");
}

#[test]
fn a_worker_that_closes_its_pipes_but_lingers_cannot_hang_the_client() {
    let start = Instant::now();
    let err = fit_error(sh("exec >&- <&-; sleep 60"));
    assert!(err.contains("did not exit; it was killed"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_grandchild_holding_the_output_cannot_hang_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("grandchild.pid");
    let start = Instant::now();
    let script = format!("sleep 60 & echo $! > {}; exit 0", pid_file.display());
    let err = fit_error(sh(&script));
    assert!(
        err.contains("a process it started still holds its output"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(30));
    // The grandchild died with the worker's process group.
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let stat = format!("/proc/{}/stat", pid.trim());
    let deadline = Instant::now() + Duration::from_secs(10);
    let dead = loop {
        let state = std::fs::read_to_string(&stat).ok();
        let dead = state.is_none_or(|s| s.rsplit(") ").next().is_some_and(|r| r.starts_with('Z')));
        if dead || Instant::now() > deadline {
            break dead;
        }
        std::thread::yield_now();
    };
    assert!(dead, "the grandchild {} still runs", pid.trim());
}
