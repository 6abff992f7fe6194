//! Petal nodes in a real Flower federation (Fleet API, `flwr==1.41.0`): a
//! Flower SuperLink runs the FedAvg ServerApp of `examples/flower-app`, Python
//! SuperNodes and `petal node`s answer it side by side. The ServerApp checks
//! every aggregate against NumPy and prints `PETAL-CHECK` lines.

mod support;

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use support::flower::{fixture, no_proxy, python, skip, tool};
use support::{eventually, free_port, petal, wait};

/// A child process in its own process group, killed with it on drop.
struct Proc {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr in `dir/<name>.log`.
    fn spawn(mut cmd: Command, dir: &Path, name: &str) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).unwrap();
        let child = cmd
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{name} does not start: {e}"));
        Proc {
            child,
            name: name.into(),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM to the process, then its exit status.
    fn terminate(&mut self) -> ExitStatus {
        signal("TERM", &format!("{}", self.child.id()));
        wait(&mut self.child, &self.name, Duration::from_secs(30))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        signal("KILL", &format!("-{}", self.child.id()));
        let _ = self.child.wait();
    }
}

fn signal(sig: &str, target: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), "--", target])
        .stderr(Stdio::null())
        .status();
}

/// The FedAvg ServerApp of `examples/flower-app`.
fn flower_app() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/flower-app")
}

/// A Flower tool with the venv first on `PATH` (the SuperLink and the
/// SuperNode start `flwr-serverapp` and `flwr-clientapp` by name).
fn flower(name: &str, home: &Path) -> Command {
    let bin = tool(name);
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = no_proxy(Command::new(&bin));
    c.env("PATH", path).env("FLWR_HOME", home);
    c
}

/// A SuperLink on a free port, with its `flwr` configuration.
struct Federation {
    dir: tempfile::TempDir,
    addr: String,
    tls: bool,
    superlink: Proc,
}

impl Federation {
    /// Starts a SuperLink: plain HTTP, or TLS with node authentication.
    fn start(tls: bool) -> Federation {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("flwr-home");
        std::fs::create_dir_all(&home).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let mut config = format!(
            "[superlink]\ndefault = \"local\"\n\n[superlink.local]\naddress = \"{addr}\"\n"
        );
        if tls {
            let ok = Command::new(python())
                .arg(fixture("fleet", "make_certs.py"))
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(ok.success(), "make_certs.py failed");
            let ca = dir.path().join("ca.crt");
            config += &format!("root-certificates = \"{}\"\n", ca.display());
        } else {
            config += "insecure = true\n";
        }
        std::fs::write(home.join("config.toml"), config).unwrap();
        let superlink = Self::superlink(dir.path(), &addr, tls, "superlink");
        Federation {
            dir,
            addr,
            tls,
            superlink,
        }
    }

    /// A SuperLink process on `addr`, once it listens.
    fn superlink(dir: &Path, addr: &str, tls: bool, name: &str) -> Proc {
        let (host, port) = addr.split_once(':').unwrap();
        let mut cmd = flower("flower-superlink", &dir.join("flwr-home"));
        cmd.current_dir(dir)
            .args(["--host", host, "--port", port])
            .arg("--disable-runtime-dependency-installation");
        if tls {
            cmd.args([
                "--ssl-certfile",
                "server.pem",
                "--ssl-keyfile",
                "server.key",
            ])
            .args(["--ssl-ca-certfile", "ca.crt", "--enable-supernode-auth"]);
        } else {
            cmd.arg("--insecure");
        }
        let superlink = Proc::spawn(cmd, dir, name);
        let up = eventually(Duration::from_secs(120), || {
            std::net::TcpStream::connect(addr).is_ok()
        });
        assert!(up, "the SuperLink does not listen:\n{}", superlink.log());
        superlink
    }

    /// Stops the SuperLink (with everything it started) and starts a new
    /// one on the same address, with empty state.
    fn restart_superlink(&mut self) {
        signal("TERM", &format!("-{}", self.superlink.child.id()));
        wait(
            &mut self.superlink.child,
            "superlink",
            Duration::from_secs(60),
        );
        self.superlink = Self::superlink(self.dir.path(), &self.addr, self.tls, "superlink-2");
    }

    /// Waits until the SuperLink lists `n` online nodes.
    fn wait_online(&self, n: usize) {
        let online = eventually(Duration::from_secs(120), || {
            let out = self
                .flwr()
                .args(["supernode", "list", "--format", "json"])
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
            nodes.iter().filter(|x| x["status"] == "online").count() >= n
        });
        assert!(
            online,
            "{n} nodes are not online:\n{}",
            self.superlink.log()
        );
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn flwr(&self) -> Command {
        let mut c = flower("flwr", &self.path("flwr-home"));
        c.current_dir(self.dir.path());
        c
    }

    /// `petal node` number `i` of `n` (synthetic CIFAR-shaped data).
    fn petal_node(&self, i: usize, n: usize, isolation: &str, extra: &[&str]) -> Command {
        let mut c = petal();
        c.env("RUST_LOG", "info")
            .args(["node", "--superlink", &self.addr])
            .args(["--dataset", "synthetic", "--synthetic-shape", "3x32x32"])
            .args(["--partition-id", &i.to_string()])
            .args(["--num-partitions", &n.to_string()])
            .args(["--isolation", isolation])
            .args(extra);
        if self.tls {
            c.arg("--root-certificates").arg(self.path("ca.crt"));
        } else {
            c.arg("--insecure");
        }
        c
    }

    /// A key for a Petal node, registered with the SuperLink when `register`.
    fn key(&self, name: &str, register: bool) -> PathBuf {
        let key = self.path(name);
        let out = petal()
            .args(["keys", "generate", "--out"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        if register {
            let out = self
                .flwr()
                .args(["supernode", "register"])
                .arg(key.with_extension("pub"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "flwr supernode register failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        key
    }

    /// `flwr run` of the test app over `nodes` nodes for `rounds` rounds;
    /// its output.
    fn run(&self, nodes: usize, rounds: usize) -> String {
        let mut cmd = self.flwr();
        cmd.arg("run")
            .arg(flower_app())
            .args(["local", "--stream", "--run-config"])
            .arg(format!("num-server-rounds={rounds} min-nodes={nodes}"));
        let mut run = Proc::spawn(cmd, self.dir.path(), "flwr-run");
        let status = wait(&mut run.child, "flwr run", Duration::from_secs(600));
        let out = run.log();
        assert!(
            status.success(),
            "flwr run failed:\n{out}\nSuperLink:\n{}",
            self.superlink.log()
        );
        out
    }
}

/// Asserts every round's aggregate has `nodes` replies, no errors and
/// matches NumPy's weighted mean; then that the run finished.
fn check_rounds(out: &str, nodes: usize, rounds: usize) {
    for r in 1..=rounds {
        let prefix = format!("PETAL-CHECK round {r}: ");
        let line = out
            .lines()
            .find_map(|l| l.split_once(&prefix).map(|(_, rest)| rest))
            .unwrap_or_else(|| panic!("no check of round {r}:\n{out}"));
        assert!(
            line.starts_with(&format!("{nodes} replies, 0 errors,")),
            "round {r}: {line}"
        );
        let diff: f64 = line
            .split("= ")
            .nth(1)
            .and_then(|d| d.split_whitespace().next())
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("round {r}: no difference in {line:?}"));
        assert!(diff < 1e-5, "round {r}: aggregate differs by {diff}");
    }
    assert!(out.contains("PETAL-DONE"), "the run did not finish:\n{out}");
}

/// The replies a stopped node reports (`node stopped after N replies (F failed)`).
fn replies(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .rev()
        .find_map(|l| l.split_once("node stopped after ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("the node did not stop cleanly:\n{log}"));
    let num = |s: &str| {
        s.trim_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .unwrap()
    };
    let mut words = line.split_whitespace();
    let n = num(words.next().unwrap());
    let f = num(words.nth(1).unwrap());
    (n, f)
}

#[test]
fn petal_nodes_train_beside_a_flower_supernode() {
    if skip() {
        return;
    }
    let fed = Federation::start(false);
    let supernode_port = free_port().to_string();
    let mut supernode = flower("flower-supernode", &fed.path("flwr-home"));
    supernode
        .current_dir(fed.dir.path())
        .args(["--insecure", "--superlink", &fed.addr])
        .args(["--port", &supernode_port]);
    let _supernode = Proc::spawn(supernode, fed.dir.path(), "supernode");
    // One node with its model in the process; two nodes sharing another
    // process, each message in a worker process.
    let one = fed.petal_node(0, 3, "none", &["--heartbeat-interval", "10"]);
    let two = fed.petal_node(1, 3, "subprocess", &["--nodes", "2"]);
    let mut nodes = [
        (Proc::spawn(one, fed.dir.path(), "petal-node-0"), 1),
        (Proc::spawn(two, fed.dir.path(), "petal-nodes-1-2"), 2),
    ];

    let rounds = 3;
    let out = fed.run(4, rounds);
    check_rounds(&out, 4, rounds);

    for (node, k) in &mut nodes {
        let status = node.terminate();
        let log = node.log();
        assert!(status.success(), "{} failed:\n{log}", node.name);
        // One train and one evaluate reply per node and round, none failed.
        assert_eq!(replies(&log), (2 * rounds as u64 * *k, 0), "{log}");
    }
}

/// A Flower user's NumPyClient joins a SuperLink through Petal nodes (two
/// in one process, each step in a process forked from a warm Python
/// parent), beside a Python SuperNode; every aggregate checked.
#[test]
fn python_learners_join_a_flower_federation_through_petal_nodes() {
    if skip() {
        return;
    }
    let fed = Federation::start(false);
    let supernode_port = free_port().to_string();
    let mut supernode = flower("flower-supernode", &fed.path("flwr-home"));
    supernode
        .current_dir(fed.dir.path())
        .args(["--insecure", "--superlink", &fed.addr])
        .args(["--port", &supernode_port]);
    let _supernode = Proc::spawn(supernode, fed.dir.path(), "supernode");
    let learner = format!(
        "python:{}:make",
        fixture("fleet", "numpy_learner.py").display()
    );
    let py = python();
    let mut cmd = fed.petal_node(0, 2, "subprocess", &["--nodes", "2", "--learner", &learner]);
    cmd.arg("--python").arg(&py).env("PYTHONPATH", flower_app());
    let mut node = Proc::spawn(cmd, fed.dir.path(), "petal-python-nodes");
    let rounds = 2;
    let out = fed.run(3, rounds);
    check_rounds(&out, 3, rounds);
    let status = node.terminate();
    let log = node.log();
    assert!(status.success(), "the node failed:\n{log}");
    assert_eq!(replies(&log), (2 * 2 * rounds as u64, 0), "{log}");
}

#[test]
fn petal_nodes_join_over_tls_with_node_authentication() {
    if skip() {
        return;
    }
    let fed = Federation::start(true);
    // Two nodes in one process, each with its own registered key.
    let (k0, k1) = (fed.key("node0", true), fed.key("node1", true));
    let keys = [
        "--auth-key",
        k0.to_str().unwrap(),
        "--auth-key",
        k1.to_str().unwrap(),
    ];
    let cmd = fed.petal_node(0, 2, "none", &[&["--nodes", "2"], &keys[..]].concat());
    let mut nodes = Proc::spawn(cmd, fed.dir.path(), "petal-nodes");

    // A key the SuperLink does not know is turned away with a clear reason.
    let rogue = fed.key("rogue", false);
    let out = fed
        .petal_node(2, 3, "none", &["--auth-key", rogue.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unregistered node joined:\n{err}");
    assert!(
        err.contains("activate-node") && err.contains("flwr supernode register"),
        "{err}"
    );

    let rounds = 2;
    let out = fed.run(2, rounds);
    check_rounds(&out, 2, rounds);
    assert!(nodes.terminate().success(), "{}", nodes.log());
    assert_eq!(replies(&nodes.log()), (2 * 2 * rounds as u64, 0));
}

#[test]
fn a_petal_node_rejoins_a_restarted_superlink() {
    if skip() {
        return;
    }
    let mut fed = Federation::start(false);
    let cmd = fed.petal_node(0, 1, "none", &["--connect-attempts", "60"]);
    let mut node = Proc::spawn(cmd, fed.dir.path(), "petal-node");
    fed.wait_online(1);
    // The new SuperLink knows nothing of the node: it must notice and join
    // again by itself (after retrying while the SuperLink was down).
    fed.restart_superlink();
    let out = fed.run(1, 1);
    check_rounds(&out, 1, 1);
    let status = node.terminate();
    let log = node.log();
    assert!(status.success(), "{log}");
    assert!(log.contains("joining again"), "{log}");
    assert_eq!(replies(&log), (2, 0), "{log}");
}
