//! A worker that crashes becomes a reported failure for that call; the
//! client stays connected and answers the next instruction.

use std::sync::Arc;
use std::time::Duration;

use petal_client::isolation::SubprocessClient;
use petal_client::{ConnectOptions, run_client};
use petal_core::{ClientManager, Config, FitIns, Parameters, Tensor};
use petal_server::GrpcServer;

fn fit_ins() -> FitIns {
    FitIns {
        parameters: Arc::new(Parameters {
            tensors: vec![Tensor::new(vec![2], vec![1.0, 2.0]).unwrap()],
        }),
        config: Config::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_is_a_failure_not_a_dead_client() {
    let manager = Arc::new(ClientManager::new(0));
    let server = GrpcServer::start("127.0.0.1:0".parse().unwrap(), manager.clone())
        .await
        .unwrap();
    // The "worker" kills itself with SIGKILL, as the OOM killer would.
    let worker = SubprocessClient::new("sh".into(), vec!["-c".into(), "kill -9 $$".into()]);
    let opts = ConnectOptions::new(server.local_addr().to_string());
    let client = tokio::spawn(async move { run_client(&opts, worker).await });

    assert!(manager.wait_for(1, Some(Duration::from_secs(10))).await);
    let proxy = manager.all().pop().unwrap();
    let timeout = Some(Duration::from_secs(30));
    for _ in 0..2 {
        let err = proxy.fit(fit_ins(), timeout).await.unwrap_err().to_string();
        assert!(err.contains("killed by signal 9"), "{err}");
    }
    assert_eq!(manager.num_available(), 1, "the client is still connected");
    proxy.disconnect(timeout).await.unwrap();
    client.await.unwrap().unwrap();
    server.shutdown(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_exit_code_and_garbage_output_are_failures() {
    use petal_client::Client;
    let mut exits = SubprocessClient::new("sh".into(), vec!["-c".into(), "exit 3".into()]);
    let err = tokio::task::spawn_blocking(move || exits.fit(fit_ins()))
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("exit status: 3"), "{err}");
    let mut garbage = SubprocessClient::new(
        "sh".into(),
        vec![
            "-c".into(),
            "cat > /dev/null; printf '\\377\\377\\377'".into(),
        ],
    );
    let err = tokio::task::spawn_blocking(move || garbage.fit(fit_ins()))
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("malformed worker output"), "{err}");
}

#[test]
fn hung_worker_is_killed_after_its_timeout() {
    use petal_client::Client;
    let mut hung = SubprocessClient::new("sh".into(), vec!["-c".into(), "exec sleep 60".into()])
        .with_timeout(Some(Duration::from_millis(300)));
    let err = hung.fit(fit_ins()).unwrap_err().to_string();
    assert!(err.contains("ran longer than 0.3s and was killed"), "{err}");
}
