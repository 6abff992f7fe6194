//! Churn against a real `petal server`: clients that leave, hang, or lose
//! the server, and a server that is killed and resumed. Nothing of this
//! may abort a run or lose a round.

mod support;

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use petal_client::{ConnectOptions, run_client};
use petal_core::{
    Checkpoint, Client, Config, CoreError, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters,
    Scalar, Tensor, config_f64,
};
use petal_proto::flwr::server_message as sm;
use support::*;

/// Every fit a client saw: the round and the bits of the model it received.
type Fits = Arc<Mutex<Vec<(i64, Vec<u32>)>>>;

/// A client with a one-value model that adds 1 to it, records every fit
/// (round and the exact bits received), and can block in one round's fit
/// until released, or sleep in its first fit (a hung client).
struct Recording {
    fits: Fits,
    block_round: Option<(i64, std_mpsc::Receiver<()>)>,
    hang_first_fit: Option<Duration>,
}

impl Recording {
    fn new(fits: &Fits) -> Self {
        Recording {
            fits: fits.clone(),
            block_round: None,
            hang_first_fit: None,
        }
    }
}

impl Client for Recording {
    fn get_parameters(&mut self, _: &Config) -> Result<Parameters, CoreError> {
        Ok(Parameters::new(vec![Tensor::new(vec![1], vec![0.5])?]))
    }
    fn fit(&mut self, ins: FitIns) -> Result<FitRes, CoreError> {
        let round = config_f64(&ins.config, "server_round", -1.0)? as i64;
        let bits = ins.parameters.tensors[0]
            .data
            .as_f32()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        self.fits.lock().unwrap().push((round, bits));
        if let Some((r, rx)) = &self.block_round
            && *r == round
        {
            // Blocks until the test drops its sender.
            let _ = rx.recv();
        }
        if let Some(d) = self.hang_first_fit.take() {
            std::thread::sleep(d);
        }
        let v = ins.parameters.tensors[0].data.as_f32().unwrap()[0] + 1.0;
        Ok(FitRes {
            parameters: Parameters::new(vec![Tensor::new(vec![1], vec![v])?]),
            num_examples: 1,
            metrics: Config::new(),
        })
    }
    fn evaluate(&mut self, ins: EvaluateIns) -> Result<EvaluateRes, CoreError> {
        Ok(EvaluateRes {
            loss: ins.parameters.tensors[0].data.as_f32().unwrap()[0],
            num_examples: 1,
            metrics: [("accuracy".to_string(), Scalar::Double(0.5))].into(),
        })
    }
}

fn spawn_client(addr: &str, client: Recording) -> tokio::task::JoinHandle<Result<(), String>> {
    let mut opts = ConnectOptions::new(addr);
    opts.max_attempts = 40;
    opts.max_backoff = Duration::from_secs(1);
    tokio::spawn(async move { run_client(&opts, client).await.map_err(|e| e.to_string()) })
}

fn checkpoint_round(dir: &std::path::Path) -> Option<u64> {
    let bytes = std::fs::read(dir.join("checkpoint.safetensors")).ok()?;
    Checkpoint::from_safetensors(&bytes)
        .ok()
        .map(|c| c.checkpoint.round)
}

/// An honest raw client that answers fit and evaluate; with `leave_after_fit`
/// it leaves (drops its connection) when the instruction after its first
/// fit arrives: between fit and evaluate.
async fn raw_client(mut c: RawClient, leave_after_fit: bool) -> bool {
    let mut trained = false;
    while let Some(msg) = c.recv().await {
        if trained && leave_after_fit {
            return trained;
        }
        match msg {
            sm::Msg::GetParametersIns(_) => {
                c.send(parameters_res(wire_params(&[(vec![1], vec![0.0])])))
                    .await
            }
            sm::Msg::FitIns(ins) => {
                let mut p = decode_params(ins.parameters.as_ref().unwrap());
                p[0][0] += 1.0;
                c.send(fit_res(wire_params(&[(vec![1], p[0].clone())]), 1))
                    .await;
                trained = true;
            }
            sm::Msg::EvaluateIns(_) => c.send(evaluate_res(0.5, 1)).await,
            sm::Msg::ReconnectIns(_) => {
                c.send(disconnect_res()).await;
                break;
            }
            sm::Msg::GetPropertiesIns(_) => c.send(properties_res()).await,
        }
    }
    trained
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_between_fit_and_evaluate_does_not_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut server = Server::start(&[
        "--rounds",
        "3",
        "--min-available-clients",
        "2",
        "--fit-clients",
        "2",
        "--sample-seed",
        "3",
        "--wait-timeout",
        "60",
        "--out",
        out.to_str().unwrap(),
    ]);
    // Joined one after another, the leaver is node 3. No client answers
    // before all three are in (the server first asks one of them for the
    // initial parameters), so round 1 samples from all three.
    let mut joined = Vec::new();
    for leave in [false, false, true] {
        joined.push((RawClient::join(&server.addr).await, leave));
    }
    let tasks: Vec<_> = joined
        .into_iter()
        .map(|(c, leave)| tokio::spawn(raw_client(c, leave)))
        .collect();
    let (status, log) = tokio::task::spawn_blocking(move || {
        let s = server.wait(Duration::from_secs(120));
        (s, server.log())
    })
    .await
    .unwrap();
    assert!(status.success(), "{log}");
    let mut trained = Vec::new();
    for t in tasks {
        trained.push(t.await.unwrap());
    }
    assert!(
        trained[2],
        "the leaver must have been sampled to train: pick another --sample-seed"
    );
    let h = history(&out);
    let rounds = h["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3, "{h:#}");
    assert_eq!(h["status"], "completed");
    // Round 1: the leaver's fit counts; its evaluation is a failure.
    let r1 = &rounds[0];
    assert_eq!(r1["eval_failures"], 1, "{r1:#}");
    assert_eq!(r1["failures"][0]["node"], 3, "{r1:#}");
    assert_eq!(r1["failures"][0]["phase"], "evaluate", "{r1:#}");
    for r in rounds {
        assert!(r["skipped"].is_null(), "{r:#}");
        assert_eq!(r["fit_results"], 2, "{r:#}");
        assert_eq!(r["eval_results"], 2, "{r:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_client_is_dropped_rejoins_and_trains_later() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut server = Server::start(&[
        "--rounds",
        "3",
        "--min-available-clients",
        "3",
        "--fit-clients",
        "3",
        "--call-timeout",
        "1",
        "--wait-timeout",
        "60",
        "--out",
        out.to_str().unwrap(),
    ]);
    let hung_fits: Fits = Default::default();
    let others: Fits = Default::default();
    let mut hung = Recording::new(&hung_fits);
    hung.hang_first_fit = Some(Duration::from_secs(4));
    let tasks = vec![
        spawn_client(&server.addr, hung),
        spawn_client(&server.addr, Recording::new(&others)),
        spawn_client(&server.addr, Recording::new(&others)),
    ];
    let (status, log) = tokio::task::spawn_blocking(move || {
        let s = server.wait(Duration::from_secs(120));
        (s, server.log())
    })
    .await
    .unwrap();
    assert!(status.success(), "{log}");
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let h = history(&out);
    let r1 = &h["rounds"][0];
    assert_eq!(
        (r1["fit_results"].as_u64(), r1["fit_failures"].as_u64()),
        (Some(2), Some(1)),
        "{r1:#}"
    );
    let reason = r1["failures"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("no reply within 1.0s"), "{reason}");
    let rounds: Vec<i64> = hung_fits.lock().unwrap().iter().map(|f| f.0).collect();
    assert_eq!(rounds[0], 1);
    assert!(
        rounds[1..].contains(&2),
        "the hung client trained again: {rounds:?}"
    );
    assert_eq!(h["rounds"][2]["fit_results"], 3, "{h:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_killed_after_round_2_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap().to_string();
    let common = [
        "--rounds",
        "4",
        "--min-available-clients",
        "2",
        "--fit-clients",
        "2",
        "--wait-timeout",
        "60",
    ];
    let mut first = Server::start(&[&common[..], &["--out", &out_s]].concat());
    let addr = first.addr.clone();
    let fits: Fits = Default::default();
    let (release, blocked) = std_mpsc::channel();
    let mut blocker = Recording::new(&fits);
    blocker.block_round = Some((3, blocked));
    let tasks = vec![
        spawn_client(&addr, blocker),
        spawn_client(&addr, Recording::new(&fits)),
    ];
    // Round 3 cannot finish while one client blocks in it: the checkpoint
    // on disk is round 2's when the server is killed.
    let dir2 = out.clone();
    assert!(
        tokio::task::spawn_blocking(move || eventually(Duration::from_secs(60), || {
            checkpoint_round(&dir2) == Some(2)
        }))
        .await
        .unwrap(),
        "no round-2 checkpoint:\n{}",
        first.log()
    );
    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();
    assert_eq!(checkpoint_round(&out), Some(2));
    let saved =
        Checkpoint::from_safetensors(&std::fs::read(out.join("checkpoint.safetensors")).unwrap())
            .unwrap()
            .checkpoint;
    drop(release);

    let mut second =
        Server::start(&[&common[..], &["--address", &addr, "--resume", &out_s]].concat());
    let (status, log) = tokio::task::spawn_blocking(move || {
        let s = second.wait(Duration::from_secs(120));
        (s, second.log())
    })
    .await
    .unwrap();
    assert!(status.success(), "{log}");
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let h = history(&out);
    let rounds = h["rounds"].as_array().unwrap();
    assert_eq!(
        rounds
            .iter()
            .map(|r| r["round"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert!(rounds.iter().all(|r| r["fit_results"] == 2), "{h:#}");
    assert_eq!(h["status"], "completed");
    let want: Vec<u32> = saved.parameters.tensors[0]
        .data
        .as_f32()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let round3: Vec<_> = fits
        .lock()
        .unwrap()
        .iter()
        .filter(|f| f.0 == 3)
        .cloned()
        .collect();
    assert!(
        round3.len() >= 2,
        "both clients train round 3 after the restart: {round3:?}"
    );
    for (_, bits) in round3 {
        assert_eq!(
            bits, want,
            "round 3's model is the round-2 checkpoint, bit for bit"
        );
    }
    assert_eq!(checkpoint_round(&out), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_the_history_of_finished_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut server = Server::start(&[
        "--rounds",
        "3",
        "--min-available-clients",
        "1",
        "--fit-clients",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    let fits: Fits = Default::default();
    let (_release, blocked) = std_mpsc::channel();
    let mut client = Recording::new(&fits);
    client.block_round = Some((2, blocked));
    let _task = spawn_client(&server.addr, client);
    let dir2 = out.clone();
    assert!(
        tokio::task::spawn_blocking(move || eventually(Duration::from_secs(60), || {
            checkpoint_round(&dir2) == Some(1)
        }))
        .await
        .unwrap()
    );
    let pid = server.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let (status, log) = tokio::task::spawn_blocking(move || {
        let s = server.wait(Duration::from_secs(30));
        (s, server.log())
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(143), "SIGTERM: {log}");
    let h = history(&out);
    assert_eq!(h["status"], "interrupted");
    assert_eq!(h["rounds"].as_array().unwrap().len(), 1);
    let csv = std::fs::read_to_string(out.join("history.csv")).unwrap();
    assert_eq!(csv.lines().count(), 2, "{csv}");
}
