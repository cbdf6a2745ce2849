//! Real processes the operator tests start: the operator itself, and for the connections test a
//! redis-server and a wsfleet-server on loopback. Every one is killed by its pid when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A binary of this workspace, built by `make test-cluster` before the tests run.
pub fn workspace_binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("debug").join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --bins` (make test-cluster does)", path.display());
    path
}

/// A child process that is killed when dropped; its stderr is echoed with a prefix, and the
/// first line containing `listening` is kept for address discovery.
pub struct Proc {
    child: Option<Child>,
    pub listening: String,
}

impl Proc {
    pub fn spawn(label: &str, mut cmd: Command, wait_for_listening: bool) -> Proc {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {label}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        let label = label.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    let _ = tx.send(line.clone());
                }
                eprintln!("[{label}] {line}");
            }
        });
        let listening = if wait_for_listening {
            rx.recv_timeout(Duration::from_secs(30)).expect("no `listening` line")
        } else {
            String::new()
        };
        Proc { child: Some(child), listening }
    }

    /// The address logged as `<field>=ADDR` in the listening line.
    pub fn addr(&self, field: &str) -> SocketAddr {
        let start = self.listening.find(&format!("{field}=")).expect("field in listening line") + field.len() + 1;
        self.listening[start..].split_whitespace().next().unwrap().parse().expect("address")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-KILL", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where the operators of these tests put tuning DaemonSets (one namespace for all: each
/// DaemonSet is named after its cluster's namespace, and each operator sweeps only its own).
pub const TUNING_NAMESPACE: &str = "e2e-wsfleet-tuning";

/// The operator, watching one namespace, with its Lease in that namespace and its tuning
/// DaemonSets in [`TUNING_NAMESPACE`].
pub fn operator(namespace: &str, extra: &[&str]) -> Proc {
    crate::ensure_namespace(TUNING_NAMESPACE);
    let mut cmd = Command::new(workspace_binary("wsfleet-operator"));
    cmd.args(["--watch-namespace", namespace, "--lease-namespace", namespace, "--http-listen", "127.0.0.1:0"])
        .args(["--resync-seconds", "2", "--tuning-namespace", TUNING_NAMESPACE])
        .args(extra)
        .env("KUBECONFIG", crate::kubeconfig());
    Proc::spawn("operator", cmd, true)
}

/// GET over plain HTTP/1.0 on loopback: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes());
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// One metric's value from a `/metrics` page (0 when absent).
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    http_get(addr, "/metrics")
        .1
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
