//! A LAN of network namespaces: hosts `h0`, `h1`, ... each with one
//! interface (`eth0`, 10.77.0.(i+1)/24) on a bridge in a switch namespace.
//! Taking a host's switch port down cuts its link without a FIN, as a
//! pulled cable does. Needs root and iproute2; everything is deleted on drop.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A switch and its hosts.
pub struct Lan {
    prefix: String,
    hosts: usize,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lan {
    /// A LAN of `hosts` hosts, or why it cannot be made (not root, no
    /// iproute2, no namespaces in this kernel).
    pub fn new(hosts: usize) -> Result<Lan, String> {
        let prefix = format!(
            "petal{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let lan = Lan { prefix, hosts: 0 };
        let sw = lan.switch();
        ip(&["netns", "add", &sw])?;
        let mut lan = lan;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..hosts {
            let ns = lan.ns(i);
            ip(&["netns", "add", &ns])?;
            lan.hosts = i + 1;
            let port = format!("p{i}");
            ip(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &sw,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            let addr = format!("{}/24", lan.ip(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lan)
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    /// Host `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("{}-h{i}", self.prefix)
    }

    /// Host `i`'s address.
    pub fn ip(&self, i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    /// `program` run on host `i`.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i)]).arg(program);
        c
    }

    /// Connects or cuts host `i`'s link (its switch port): no FIN, no RST.
    pub fn link(&self, i: usize, up: bool) {
        let port = format!("p{i}");
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.switch(), "link", "set", &port, state]).expect("link state changes");
    }

    /// Runs `tc ARGS` on host `i`'s interface; false when the kernel lacks
    /// the queueing discipline.
    pub fn tc(&self, i: usize, args: &[&str]) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(i), "tc"])
            .args(args)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for i in 0..self.hosts {
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["netns", "del", &self.switch()]);
    }
}
