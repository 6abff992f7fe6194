//! The subcommands: wiring of the library crates, nothing more.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use petal_client::isolation::{SubprocessClient, serve_worker};
use petal_client::{ClientError, ConnectOptions, run_client};
use petal_core::{
    ClientManager, Config, FedAvg, FedAvgConfig, History, RunConfig, Scalar, run_federation,
};
use petal_data::Splits;
use petal_ml::LearnerClient;
use petal_ml::burn_cnn::BurnCnn;
use petal_server::GrpcServer;

use crate::args::{FederationArgs, LearnerArgs, TrainArgs};
use crate::{ClientArgs, Isolation, RunArgs, ServerArgs};

fn secs(s: Option<f64>) -> anyhow::Result<Option<Duration>> {
    s.map(|v| Duration::try_from_secs_f64(v).with_context(|| format!("invalid duration {v} s")))
        .transpose()
}

fn fit_config(train: &TrainArgs) -> Config {
    [
        ("epochs".to_string(), Scalar::I64(train.epochs as i64)),
        ("lr".to_string(), Scalar::Double(train.lr)),
        ("momentum".to_string(), Scalar::Double(train.momentum)),
        (
            "batch_size".to_string(),
            Scalar::I64(train.batch_size as i64),
        ),
    ]
    .into()
}

/// `petal server`: serve until the federation completes; returns its history.
pub async fn server(args: &ServerArgs) -> anyhow::Result<History> {
    let manager = Arc::new(ClientManager::new(args.federation.round.sample_seed));
    let grpc = GrpcServer::start(args.address, manager.clone()).await?;
    let history = federate(&manager, &args.federation, &args.train).await;
    grpc.shutdown(Duration::from_secs(3)).await?;
    history
}

async fn federate(
    manager: &ClientManager,
    fed: &FederationArgs,
    train: &TrainArgs,
) -> anyhow::Result<History> {
    let fc = fit_config(train);
    let mut strategy = FedAvg::new(FedAvgConfig {
        fit_clients: fed.fit_clients,
        min_available_clients: fed.min_available_clients,
        fraction_evaluate: fed.round.fraction_evaluate,
        evaluate_config: [("batch_size".to_string(), fc["batch_size"].clone())].into(),
        fit_config: fc,
        initial_parameters: None,
    })?;
    let config = RunConfig {
        num_rounds: fed.round.rounds,
        round_timeout: secs(fed.round.round_timeout)?,
        wait_timeout: secs(fed.wait_timeout)?,
    };
    tracing::info!(
        "FedAvg for {} rounds: {} clients trained per round, {} must be connected",
        fed.round.rounds,
        fed.fit_clients,
        fed.min_available_clients
    );
    let history = run_federation(manager, &mut strategy, &config).await?;
    eprint!("{}", history.summary());
    if let Some(path) = &fed.round.history {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let json = serde_json::to_string_pretty(&history)?;
        std::fs::write(path, json)
            .with_context(|| format!("writing history to {}", path.display()))?;
        tracing::info!("history written to {}", path.display());
    }
    Ok(history)
}

/// This client's partition: from the partition cache when one is set and
/// readable, else decoded from the data set (and saved to the cache).
fn load_partition(args: &LearnerArgs) -> anyhow::Result<Splits> {
    let cache = args.partition_cache.as_deref();
    if let Some(path) = cache.filter(|p| p.is_file()) {
        match Splits::load(path) {
            Ok(data) => return Ok(data),
            Err(e) => tracing::warn!("ignoring the partition cache: {e}"),
        }
    }
    let data = args.data.spec()?.load_partition(
        args.data.data_dir.as_deref(),
        args.partition_id,
        args.num_partitions,
        args.data.data_seed,
    )?;
    if let Some(path) = cache
        && let Err(e) = data.save(path)
    {
        tracing::warn!("cannot write the partition cache: {e}");
    }
    Ok(data)
}

fn load_learner_client(args: &LearnerArgs) -> anyhow::Result<LearnerClient<BurnCnn>> {
    let data = load_partition(args)?;
    let learner = BurnCnn::new(
        data.train.shape,
        data.train.num_classes,
        args.device,
        args.seed,
    )?;
    Ok(LearnerClient::new(
        learner,
        data,
        args.train.options(args.seed),
    ))
}

/// `petal client`.
pub async fn client(args: &ClientArgs) -> anyhow::Result<()> {
    // Fail fast on flags that would only fail later in a worker.
    args.learner.data.spec()?;
    let mut opts = ConnectOptions::new(&args.server);
    opts.max_attempts = args.connect_attempts;
    match args.isolation {
        Isolation::Subprocess => {
            let exe = std::env::current_exe().context("locating the petal executable")?;
            // Workers share one decoded copy of this client's partition,
            // removed when the client exits.
            let cache = tempfile::Builder::new()
                .prefix("petal-client-")
                .tempdir()
                .context("creating the partition cache folder")?;
            let mut learner = args.learner.clone();
            learner.partition_cache = Some(cache.path().join("partition.bin"));
            let mut worker_args = vec!["worker".to_string()];
            worker_args.extend(learner.to_args());
            let worker =
                SubprocessClient::new(exe, worker_args).with_timeout(secs(args.worker_timeout)?);
            run_client(&opts, worker).await?;
        }
        Isolation::None => {
            let learner = tokio::task::block_in_place(|| load_learner_client(&args.learner))?;
            run_client(&opts, learner).await?;
        }
    }
    Ok(())
}

/// `petal worker`: one instruction on stdin, one reply on stdout.
pub fn worker(args: &LearnerArgs) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    serve_worker(&mut stdin.lock(), &mut stdout.lock(), || {
        load_learner_client(args).map_err(|e| ClientError::Learner(format!("{e:#}")))
    })?;
    Ok(())
}

/// `petal run`: a server plus N client processes on this machine.
pub async fn run(args: &RunArgs) -> anyhow::Result<()> {
    let min = args.min_clients.unwrap_or(args.clients);
    let fit = args.fit_clients.unwrap_or(min);
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if min > args.clients {
        bail!(
            "--min-clients {min} is more than --clients {}",
            args.clients
        );
    }
    if fit > args.clients {
        bail!(
            "--fit-clients {fit} is more than --clients {}",
            args.clients
        );
    }
    if fit > min {
        bail!("--fit-clients {fit} is more than --min-clients {min}");
    }
    args.learner.data.spec()?;

    let fed = FederationArgs {
        round: args.round.clone(),
        min_available_clients: min,
        fit_clients: fit,
        wait_timeout: Some(600.0),
    };
    let manager = Arc::new(ClientManager::new(fed.round.sample_seed));
    let grpc = GrpcServer::start(args.address, manager.clone()).await?;
    let addr = grpc.local_addr();

    let exe = std::env::current_exe().context("locating the petal executable")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / fit.max(1)).max(1).to_string();
    let mut children = tokio::task::JoinSet::new();
    for id in 0..args.clients {
        let mut learner = args.learner.clone();
        learner.partition_id = id;
        learner.num_partitions = args.clients;
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("client")
            .args(["--server", &addr.to_string()])
            .args([
                "--isolation",
                match args.isolation {
                    Isolation::Subprocess => "subprocess",
                    Isolation::None => "none",
                },
            ])
            .args(learner.to_args())
            .kill_on_drop(true);
        if let Some(t) = args.worker_timeout {
            cmd.args(["--worker-timeout", &t.to_string()]);
        }
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", &threads);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting client {id}"))?;
        children.spawn(async move { (id, child.wait().await) });
    }
    tracing::info!(
        "started {} client processes for server {addr}",
        args.clients
    );

    // The federation ends the run; a client that dies first ends it too.
    let federation = federate(&manager, &fed, &args.learner.train);
    tokio::pin!(federation);
    let history = loop {
        tokio::select! {
            h = &mut federation => break h?,
            Some(joined) = children.join_next() => {
                let (id, status) = joined.context("waiting for a client")?;
                let status = status.with_context(|| format!("waiting for client {id}"))?;
                if !status.success() {
                    bail!("client {id} exited with {status} before the run finished");
                }
            }
        }
    };
    // Clients leave once the server says goodbye.
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        let mut failed = Vec::new();
        while let Some(joined) = children.join_next().await {
            if let Ok((id, Ok(status))) = joined
                && !status.success()
            {
                failed.push(format!("client {id}: {status}"));
            }
        }
        failed
    })
    .await;
    grpc.shutdown(Duration::from_secs(3)).await?;
    match drained {
        Ok(failed) if !failed.is_empty() => bail!("clients failed: {}", failed.join(", ")),
        Ok(_) => {}
        Err(_) => tracing::warn!("some clients did not exit within 30 s of the end of the run"),
    }
    if let Some(r) = history.rounds.iter().find(|r| r.fit_results == 0) {
        bail!(
            "round {} aggregated no training result: {}",
            r.round,
            r.failures.join("; ")
        );
    }
    Ok(())
}
