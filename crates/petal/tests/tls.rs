//! TLS and node authentication on the legacy gRPC transport (issue 20),
//! over loopback: mutual TLS, the two TLS mismatches (each names the side
//! that speaks plaintext and the flag that fixes it, and gives up after a
//! few attempts), signed joins (an unlisted key is refused, named on both
//! sides), and plaintext beyond loopback refused without --insecure.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::{Server, history, petal};

fn certs(dir: &Path) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/tls/make-certs.sh");
    let out = dir.join("certs");
    let ok = Command::new("bash")
        .arg(script)
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .expect("bash runs");
    assert!(ok.success(), "make-certs.sh failed");
    out
}

fn key(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let ok = petal()
        .args(["keys", "generate", "--out"])
        .arg(&path)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    path
}

fn tls_server(certs: &Path, out: &Path, extra: &[&str]) -> Server {
    let mut cmd = petal();
    cmd.args(["server", "--address", "127.0.0.1:0"])
        .arg("--ssl-certfile")
        .arg(certs.join("server.pem"))
        .arg("--ssl-keyfile")
        .arg(certs.join("server.key"))
        .args(["--rounds", "1", "--dataset", "synthetic"])
        .args(["--min-available-clients", "1", "--fit-clients", "1"])
        .arg("--out")
        .arg(out)
        .args(extra);
    Server::start_cmd(cmd)
}

/// `petal client` against `addr`, finished within a minute.
fn client(addr: &str, args: &[&std::ffi::OsStr]) -> Output {
    let mut cmd = petal();
    cmd.env("RUST_LOG", "info")
        .args(["client", "--server", addr, "--dataset", "synthetic"])
        .args(["--isolation", "none", "--connect-attempts", "20"])
        .args(args)
        .stdin(Stdio::null());
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(60));
        let _ = Command::new("kill").arg(pid.to_string()).status();
    });
    let out = child.wait_with_output().unwrap();
    drop(watchdog);
    out
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

#[test]
fn mutual_tls_needs_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let out = dir.path().join("run");
    let ca = certs.join("ca.crt").into_os_string();
    let mut srv = tls_server(
        &certs,
        &out,
        &["--ssl-ca-certfile", certs.join("ca.crt").to_str().unwrap()],
    );
    assert!(srv.log().contains("(TLS) listening on"), "{}", srv.log());

    let without = client(&srv.addr, &[os("--root-certificates"), &ca]);
    let err = text(&without);
    assert!(!without.status.success(), "{err}");
    assert!(
        err.contains("pass --ssl-certfile and --ssl-keyfile"),
        "names the missing flags:\n{err}"
    );
    assert!(
        err.contains("after 3 attempts"),
        "gives up after a few attempts:\n{err}"
    );

    let (cert, k) = (certs.join("client.pem"), certs.join("client.key"));
    let with = client(
        &srv.addr,
        &[
            os("--root-certificates"),
            &ca,
            os("--ssl-certfile"),
            cert.as_os_str(),
            os("--ssl-keyfile"),
            k.as_os_str(),
        ],
    );
    assert!(with.status.success(), "{}", text(&with));
    assert!(srv.wait(Duration::from_secs(30)).success(), "{}", srv.log());
    assert_eq!(history(&out)["rounds"][0]["fit_results"], 1);
}

#[test]
fn a_plaintext_client_of_a_tls_server_is_told_which_flag_fixes_it() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let srv = tls_server(&certs, &dir.path().join("run"), &[]);
    let o = client(&srv.addr, &[]);
    let err = text(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("if it uses TLS, pass --root-certificates CA"),
        "{err}"
    );
    assert!(err.contains("after 3 attempts"), "{err}");
}

#[test]
fn a_tls_client_of_a_plaintext_server_is_told_which_flag_fixes_it() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let run = dir.path().join("run");
    let srv = Server::start(&["--dataset", "synthetic", "--out", run.to_str().unwrap()]);
    let ca = certs.join("ca.crt").into_os_string();
    let o = client(&srv.addr, &[os("--root-certificates"), &ca]);
    let err = text(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("the server speaks plaintext, not TLS: drop --root-certificates"),
        "{err}"
    );
    assert!(err.contains("after 3 attempts"), "{err}");
}

#[test]
fn only_clients_with_listed_keys_join() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let listed = key(dir.path(), "listed");
    let stranger = key(dir.path(), "stranger");
    let authorized = dir.path().join("authorized_keys");
    std::fs::write(
        &authorized,
        format!(
            "# one key per line\n\n{}",
            std::fs::read_to_string(listed.with_extension("pub")).unwrap()
        ),
    )
    .unwrap();
    let out = dir.path().join("run");
    let mut srv = tls_server(&certs, &out, &["--auth-keys", authorized.to_str().unwrap()]);
    let ca = certs.join("ca.crt").into_os_string();

    let o = client(
        &srv.addr,
        &[
            os("--root-certificates"),
            &ca,
            os("--auth-key"),
            stranger.as_os_str(),
        ],
    );
    let err = text(&o);
    assert!(!o.status.success(), "{err}");
    let fingerprint = err
        .split("signing joins with key ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_string();
    assert!(
        err.contains(&format!(
            "the server refused this client: key {fingerprint} is not in the server's --auth-keys"
        )),
        "{err}"
    );
    assert!(
        support::eventually(Duration::from_secs(10), || srv
            .log()
            .contains(&format!("refused a client: key {fingerprint}"))),
        "the server names the refused key:\n{}",
        srv.log()
    );

    let o = client(&srv.addr, &[os("--root-certificates"), &ca]);
    let err = text(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("this server requires node authentication (start the client with --auth-key)"),
        "{err}"
    );

    let o = client(
        &srv.addr,
        &[
            os("--root-certificates"),
            &ca,
            os("--auth-key"),
            listed.as_os_str(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(srv.wait(Duration::from_secs(30)).success(), "{}", srv.log());
    assert_eq!(history(&out)["rounds"][0]["fit_results"], 1);
}

#[test]
fn plaintext_beyond_loopback_needs_insecure() {
    let o = petal()
        .args(["server", "--address", "0.0.0.0:0", "--dataset", "synthetic"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("is reachable from other machines: give --ssl-certfile and --ssl-keyfile for TLS, or --insecure"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = petal();
    cmd.args(["server", "--address", "0.0.0.0:0", "--insecure"])
        .args(["--dataset", "synthetic", "--out"])
        .arg(dir.path().join("run"));
    let srv = Server::start_cmd(cmd);
    assert!(srv.log().contains("listening on 0.0.0.0:"), "{}", srv.log());
}
