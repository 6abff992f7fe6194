//! `petal`: federated learning in Rust, speaking Flower's protocol.
//! This binary is only argument handling and wiring; the work lives in the
//! library crates (see ARCHITECTURE.md).

#![forbid(unsafe_code)]

mod args;
mod bench;
mod commands;
mod output;
mod plot;
mod settings;
mod simulate;

use clap::{CommandFactory, FromArgMatches, Subcommand};

use crate::args::{FederationArgs, LearnerArgs, RoundArgs};
use crate::commands::Interrupted;

/// Federated learning in Rust, compatible with Flower.
#[derive(clap::Parser, Debug)]
#[command(name = "petal", version, about)]
struct Cli {
    /// Log lines as text or as JSON objects (one per line, on stderr).
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a federated-learning server (FedAvg) that Petal and Flower clients join.
    Server(ServerArgs),
    /// Join a server and train on a local data partition.
    Client(ClientArgs),
    /// Start a server and N client processes on this machine, and run to completion.
    Run(RunArgs),
    /// Simulate N virtual clients in this process: the same rounds,
    /// strategies, history and checkpoints as `petal run`, no sockets.
    Simulate(SimulateArgs),
    /// Join a Flower federation as a SuperNode (Fleet API, flwr >= 1.40).
    Node(NodeArgs),
    /// Manage node keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Draw loss and accuracy per round of one or more runs (SVG or PNG).
    Plot(PlotArgs),
    /// Show how a data set is cut among clients: counts and label
    /// histograms per partition, and a heat map.
    Partitions(PartitionsArgs),
    /// Measure local training speed.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Answer one instruction from stdin (used by `--isolation subprocess`).
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Answer simulation tasks from stdin (used by `simulate --isolation process`).
    #[command(hide = true)]
    SimWorker(WorkerArgs),
}

/// `petal keys` subcommands.
#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Write a new P-256 key pair: PATH (OpenSSH private key, for
    /// `petal node --auth-key`) and PATH.pub (OpenSSH public key, for
    /// `flwr supernode register`).
    Generate {
        /// Where to write the private key; the public key goes to PATH.pub.
        #[arg(long, default_value = "petal-node-key")]
        out: std::path::PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

/// `petal node` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// A TOML file of settings, its keys the long flag names
    /// (`rounds = 10`, `strategy = "fedprox"`); flags given here win.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// The SuperLink's Fleet API, host:port.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub superlink: String,
    /// Plain HTTP (no TLS).
    #[arg(long, conflicts_with = "root_certificates")]
    pub insecure: bool,
    /// PEM file of the CA certificate the SuperLink's certificate is signed with.
    #[arg(long)]
    pub root_certificates: Option<std::path::PathBuf>,
    /// Private key registered with the SuperLink (`flwr supernode register`),
    /// once per node; without it each node registers a fresh key itself.
    #[arg(long)]
    pub auth_key: Vec<std::path::PathBuf>,
    /// SuperNodes hosted by this process, on partitions --partition-id,
    /// --partition-id + 1, ...; each joins the SuperLink on its own.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Nodes of this process that train or evaluate at once (default: the
    /// number of cores); the others wait their turn.
    #[arg(long)]
    pub max_concurrent_fit: Option<usize>,
    /// Bytes of objects one message may bring, in MiB; a bigger message is
    /// answered with an error.
    #[arg(long, default_value_t = 256)]
    pub max_message_mb: usize,
    /// Heartbeat interval announced to the SuperLink, seconds (10-1800).
    #[arg(long, default_value_t = 30.0)]
    pub heartbeat_interval: f64,
    /// Seconds between pulls when the SuperLink has nothing for the node.
    #[arg(long, default_value_t = 1.0)]
    pub poll_interval: f64,
    /// Failed attempts in a row to reach the SuperLink before giving up.
    #[arg(long, default_value_t = 30)]
    pub connect_attempts: u32,
    /// Where train and evaluate run.
    #[arg(long, value_enum, default_value_t = Isolation::Subprocess)]
    pub isolation: Isolation,
    /// Seconds after which a worker process is killed and its message answered with an error.
    #[arg(long)]
    pub worker_timeout: Option<f64>,
    #[command(flatten)]
    pub learner: LearnerArgs,
}

/// `petal plot` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct PlotArgs {
    /// Run folders (each with a history.json); several share the chart.
    #[arg(required = true)]
    pub runs: Vec<std::path::PathBuf>,
    /// Output file: .svg or .png.
    #[arg(short, long)]
    pub output: std::path::PathBuf,
    /// Width and height in pixels.
    #[arg(long, default_value = "1200x480", value_parser = parse_size)]
    pub size: (u32, u32),
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once('x')
        .ok_or_else(|| format!("'{s}' is not WIDTHxHEIGHT"))?;
    let n = |v: &str| {
        v.parse::<u32>()
            .ok()
            .filter(|x| (100..=8000).contains(x))
            .ok_or_else(|| format!("'{v}' is not a size in 100..=8000"))
    };
    Ok((n(w)?, n(h)?))
}

/// `petal partitions` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct PartitionsArgs {
    #[command(flatten)]
    pub data: args::DataArgs,
    /// Number of partitions (clients).
    #[arg(long)]
    pub num_partitions: usize,
    /// Also draw the partitions × classes counts as a heat map (.svg or .png).
    #[arg(long)]
    pub heatmap: Option<std::path::PathBuf>,
}

/// `petal bench` subcommands.
#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Training and evaluation images/s of the seed CNN on random images.
    Train(bench::BenchTrainArgs),
}

/// `petal worker` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// The learner's settings, as JSON (written by `petal client`).
    #[arg(long)]
    pub learner_config: String,
}

/// Where `petal simulate` trains.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimIsolation {
    /// Worker threads of this process, one model replica each.
    Thread,
    /// Worker processes, replaced after --recycle-after tasks (frees all
    /// their memory, GPU included).
    Process,
}

/// `petal simulate` flags.
#[derive(clap::Args, Debug, Clone)]
#[command(
    mut_arg("partition_id", |a| a.hide(true)),
    mut_arg("num_partitions", |a| a.hide(true)),
    mut_arg("learner", |a| a.hide(true)),
    mut_arg("python", |a| a.hide(true)),
    mut_arg("call_timeout", |a| a.hide(true)),
    mut_arg("max_message_mb", |a| a.hide(true)),
    mut_arg("max_metrics", |a| a.hide(true)),
    mut_arg("max_tensors", |a| a.hide(true)),
    mut_arg("max_streams_per_connection", |a| a.hide(true)),
    mut_arg("max_connections_per_ip", |a| a.hide(true)),
    mut_arg("handshake_timeout", |a| a.hide(true)),
    mut_arg("keepalive_interval", |a| a.hide(true)),
    mut_arg("keepalive_timeout", |a| a.hide(true))
)]
pub struct SimulateArgs {
    /// A TOML file of settings, its keys the long flag names.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Virtual clients.
    #[arg(long, default_value_t = 2)]
    pub clients: usize,
    /// Clients sampled to train each round (default: --clients).
    #[arg(long)]
    pub fit_clients: Option<usize>,
    /// Workers training the sampled clients, each with one model replica
    /// (default: the cores). The model is the same to the bit for any number.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Where workers run.
    #[arg(long, value_enum, default_value_t = SimIsolation::Thread)]
    pub isolation: SimIsolation,
    /// With --isolation process: tasks a worker process answers before it
    /// is replaced (0: never).
    #[arg(long, default_value_t = 100)]
    pub recycle_after: usize,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub round: RoundArgs,
    #[command(flatten)]
    pub learner: LearnerArgs,
}

/// `petal server` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// A TOML file of settings, its keys the long flag names
    /// (`rounds = 10`, `strategy = "fedprox"`); flags given here win.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Address to listen on, host:port (`localhost:8080`, `0.0.0.0:8080`, `[::]:8080`).
    #[arg(long, default_value = "127.0.0.1:8080", value_parser = args::listen_address)]
    pub address: std::net::SocketAddr,
    #[command(flatten)]
    pub tls: args::ServerTlsArgs,
    /// OpenSSH public keys (one per line, `ecdsa-sha2-nistp256 AAAA... name`)
    /// of the clients allowed to join; others are refused (clients sign
    /// with --auth-key).
    #[arg(long)]
    pub auth_keys: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub federation: FederationArgs,
    /// The training settings sent to clients, and the learner and data the
    /// server evaluates with (--server-eval).
    #[command(flatten)]
    pub learner: LearnerArgs,
}

/// How a client runs its training steps.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Every fit/evaluate runs in a short-lived worker process (frees all its memory).
    Subprocess,
    /// The model lives in the client process.
    None,
}

/// `petal client` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// A TOML file of settings, its keys the long flag names
    /// (`rounds = 10`, `strategy = "fedprox"`); flags given here win.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Server address, host:port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub server: String,
    #[command(flatten)]
    pub tls: args::ClientTlsArgs,
    /// Private key (`petal keys generate`) every join is signed with, for a
    /// server started with --auth-keys.
    #[arg(long)]
    pub auth_key: Option<std::path::PathBuf>,
    /// Seconds between HTTP/2 keepalive pings to the server (0: none). gRPC
    /// servers (Flower's) refuse pings more often than every 300 s; a Petal
    /// server allows any interval.
    #[arg(long, default_value_t = 300.0)]
    pub keepalive_interval: f64,
    /// Seconds the server has to answer a ping before the connection
    /// counts as dead and the client rejoins.
    #[arg(long, default_value_t = 20.0)]
    pub keepalive_timeout: f64,
    /// Where fit and evaluate run.
    #[arg(long, value_enum, default_value_t = Isolation::Subprocess)]
    pub isolation: Isolation,
    /// Connection attempts before giving up (backoff doubles from 0.5 s to 8 s).
    #[arg(long, default_value_t = 10)]
    pub connect_attempts: u32,
    /// Seconds after which a worker process is killed and its call reported failed.
    #[arg(long)]
    pub worker_timeout: Option<f64>,
    /// Logical clients hosted by this process, on partitions
    /// --partition-id, --partition-id + 1, ...; each joins on its own stream.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Clients of this process that fit or evaluate at once (default: the
    /// number of cores); the others wait their turn.
    #[arg(long)]
    pub max_concurrent_fit: Option<usize>,
    #[command(flatten)]
    pub learner: LearnerArgs,
    /// All learner settings as one JSON document, replacing the learner
    /// flags (how `petal run` configures its clients).
    #[arg(long, hide = true)]
    pub learner_config: Option<String>,
    /// Stop when standard input closes (how `petal run` stops its clients,
    /// and why they never outlive it).
    #[arg(long, hide = true)]
    pub stop_on_stdin_eof: bool,
}

/// `petal run` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// A TOML file of settings, its keys the long flag names
    /// (`rounds = 10`, `strategy = "fedprox"`); flags given here win.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Client processes to start.
    #[arg(long, default_value_t = 2)]
    pub clients: usize,
    /// Clients that must be connected before each round (default: --clients).
    #[arg(long)]
    pub min_clients: Option<usize>,
    /// Clients sampled to train each round (default: --min-clients).
    #[arg(long)]
    pub fit_clients: Option<usize>,
    /// Address the server listens on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0", value_parser = args::listen_address)]
    pub address: std::net::SocketAddr,
    /// Let --address be reachable from other machines (the run's own
    /// clients connect in plaintext; use `petal server` with TLS for others).
    #[arg(long)]
    pub insecure: bool,
    /// Where clients run fit and evaluate.
    #[arg(long, value_enum, default_value_t = Isolation::Subprocess)]
    pub isolation: Isolation,
    /// Seconds after which a client's worker process is killed (its call fails).
    #[arg(long)]
    pub worker_timeout: Option<f64>,
    /// Seconds a step waits for enough clients before the round is skipped.
    #[arg(long, default_value_t = 600.0)]
    pub wait_timeout: f64,
    /// Logical clients per client process (they share its connection,
    /// data and device).
    #[arg(long, default_value_t = 1)]
    pub clients_per_process: usize,
    /// Clients of one process that fit or evaluate at once (default:
    /// cores / processes, at least 1).
    #[arg(long)]
    pub max_concurrent_fit: Option<usize>,
    #[command(flatten)]
    pub round: RoundArgs,
    #[command(flatten)]
    pub learner: LearnerArgs,
}

/// The command line, with every subcommand letting a later flag override
/// an earlier one (a config file's or a resumed run's settings come first).
fn command() -> clap::Command {
    let mut cmd = Cli::command();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for n in names {
        // `--lr -1` reaches the range check (and its message) instead of
        // being taken for a flag.
        cmd = cmd.mut_subcommand(n, |s| {
            s.args_override_self(true).mut_args(|a| {
                if a.get_action().takes_values() {
                    a.allow_negative_numbers(true)
                } else {
                    a
                }
            })
        });
    }
    cmd
}

/// Parses the command line, a `--config` file and a resumed run's
/// settings; exits with clap's message on a usage error.
fn parse() -> anyhow::Result<Cli> {
    let cmd = command();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let argv = settings::expand_config_file(&cmd, argv)?;
    let matches = cmd
        .clone()
        .try_get_matches_from(&argv)
        .unwrap_or_else(|e| e.exit());
    let resumed = settings::resume_args(&cmd, &matches, argv.clone())?;
    let matches = if resumed != argv {
        cmd.clone()
            .try_get_matches_from(&resumed)
            .unwrap_or_else(|e| e.exit())
    } else {
        matches
    };
    if let Some(r) = settings::record(&cmd, &matches) {
        let _ = settings::RECORDED.set(r);
    }
    Cli::from_arg_matches(&matches).map_err(|e| e.exit())
}

/// Logs to stderr: readable lines, or one JSON object per line with
/// `--log-format json` (read before the rest of the command line, so that
/// parsing a config file or a resumed run's settings can log too).
fn init_logs() {
    let args: Vec<String> = std::env::args().collect();
    let json = args
        .windows(2)
        .any(|w| w[0] == "--log-format" && w[1] == "json")
        || args.iter().any(|a| a == "--log-format=json");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(output::LogWriter)
        .with_target(false);
    if json {
        logs.json().flatten_event(true).init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

fn main() -> std::process::ExitCode {
    init_logs();
    let cli = match parse() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Worker(args) => commands::worker(&args.learner_config),
        Command::SimWorker(args) => simulate::worker(&args.learner_config),
        Command::Bench(BenchCommand::Train(args)) => bench::train(&args),
        Command::Keys(KeysCommand::Generate { out, force }) => commands::keys_generate(&out, force),
        Command::Plot(a) => plot::plot(&a.runs, &a.output, a.size),
        Command::Partitions(a) => commands::partitions(&a),
        command => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| {
                let r = rt.block_on(async move {
                    match command {
                        Command::Server(a) => commands::server(&a).await.map(|_| ()),
                        Command::Client(a) => commands::client(&a).await,
                        Command::Run(a) => commands::run(&a).await,
                        Command::Node(a) => commands::node(&a).await,
                        Command::Simulate(a) => simulate::simulate(&a).await,
                        Command::Worker(_)
                        | Command::SimWorker(_)
                        | Command::Bench(_)
                        | Command::Keys(_)
                        | Command::Plot(_)
                        | Command::Partitions(_) => {
                            unreachable!("handled above")
                        }
                    }
                });
                // Threads still blocked in a request are abandoned, not awaited.
                rt.shutdown_timeout(std::time::Duration::from_millis(500));
                r
            }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if let Some(commands::Stopped(stop)) = e.downcast_ref::<commands::Stopped>() {
                // Told to stop: not an error worth a line.
                return std::process::ExitCode::from(stop.exit_code());
            }
            eprintln!("error: {e:#}");
            match e.downcast_ref::<Interrupted>() {
                Some(Interrupted(_, stop)) => std::process::ExitCode::from(stop.exit_code()),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file in `examples/configs` parses, names only real flags, and
    /// builds its strategy (and DP wrapper) as `petal run` would.
    #[test]
    fn example_configs_are_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("examples/configs") {
            let path = entry.expect("entry").path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let argv: Vec<std::ffi::OsString> = vec![
                "petal".into(),
                "run".into(),
                "--config".into(),
                path.clone().into(),
            ];
            let cmd = command();
            let argv = settings::expand_config_file(&cmd, argv)
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            let matches = cmd
                .try_get_matches_from(&argv)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let Ok(Cli {
                command: Command::Run(run),
                ..
            }) = Cli::from_arg_matches(&matches)
            else {
                panic!("{}: not a run", path.display());
            };
            let s = &run.round.strategy;
            let spec = s
                .spec()
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            let name = path.file_stem().and_then(|n| n.to_str()).unwrap_or("");
            if let Some(dp) = name.strip_prefix("dp-") {
                let dp_spec = s.dp(run.clients, 0).expect("dp").expect("a DP wrapper");
                let want: petal_core::strategy::DpMode = dp.parse().expect("a DP mode");
                assert_eq!(dp_spec.mode, want, "{}", path.display());
            } else {
                assert_eq!(spec.name(), name, "{}", path.display());
            }
            run.learner
                .validate()
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            seen += 1;
        }
        assert!(seen >= 10, "only {seen} example configs");
    }
}
