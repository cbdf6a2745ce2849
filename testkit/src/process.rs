//! [`Proc`]: a child process that is killed by its pid and reaped when its handle drops. Its
//! stdout is discarded; its stderr is read by a thread of its own (so the child never blocks on
//! a full pipe), kept line by line up to [`LOG_LINES_KEPT`] and, with a label, echoed to this
//! process's stderr as `[label] line`. The first line that contains `listening` is where a
//! wsfleet binary says the addresses it bound (`websocket=ADDR http=ADDR`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Log lines kept per process, at most (the rest are only echoed).
pub const LOG_LINES_KEPT: usize = 10_000;
/// How long a process may take to log its `listening` line.
pub const LISTENING_WAIT: Duration = Duration::from_secs(30);

pub struct Proc {
    child: Option<Child>,
    pid: u32,
    /// The first log line containing `listening` (empty when not waited for).
    pub listening: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `cmd`. With `wait_for_listening`, returns once it logged its `listening` line
    /// (panics, with what it logged, if it exits or takes longer than [`LISTENING_WAIT`]). An
    /// empty `label` keeps the lines without echoing them.
    pub fn spawn(label: &str, mut cmd: Command, wait_for_listening: bool) -> Proc {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {label} ({cmd:?}): {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (kept, label_owned) = (log.clone(), label.to_owned());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    let _ = tx.send(line.clone());
                }
                if !label_owned.is_empty() {
                    eprintln!("[{label_owned}] {line}");
                }
                let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
                if kept.len() < LOG_LINES_KEPT {
                    kept.push(line);
                }
            }
        });
        let pid = child.id();
        let mut proc = Proc { child: Some(child), pid, listening: String::new(), log };
        if wait_for_listening {
            match rx.recv_timeout(LISTENING_WAIT) {
                Ok(line) => proc.listening = line,
                Err(e) => panic!("{label} logged no `listening` line ({e}); it logged:\n{}", proc.log()),
            }
        }
        proc
    }

    /// The address logged as `<field>=ADDR` in the `listening` line.
    pub fn addr(&self, field: &str) -> SocketAddr {
        let at = self.listening.find(&format!("{field}=")).unwrap_or_else(|| {
            panic!("no {field}= in the listening line {:?}", self.listening);
        });
        let value = self.listening[at + field.len() + 1..].split_whitespace().next().unwrap_or_default();
        value.parse().unwrap_or_else(|e| panic!("{field}={value}: {e}"))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether it has not been killed or seen to exit (through this handle).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// What it has logged so far (its first [`LOG_LINES_KEPT`] lines).
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }

    /// Waits (at most `limit`) until a log line contains `text`; returns that line.
    pub fn wait_for_log(&self, text: &str, limit: Duration) -> String {
        crate::wait_until(&format!("a log line with {text:?}"), limit, || {
            let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            log.iter().find(|l| l.contains(text)).cloned().ok_or_else(|| format!("{} lines", log.len()))
        })
    }

    /// Sends `sig` (`-STOP`, `-CONT`, `-TERM`, ...) while it runs.
    pub fn signal(&self, sig: &str) {
        if self.child.is_some() {
            signal(self.pid, sig);
        }
    }

    /// SIGKILL, and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "-KILL");
            let _ = child.wait();
        }
    }

    /// Waits for it to exit; `None` if it did not within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().ok()? {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Its resident memory now, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        rss_bytes(self.pid)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `sig` to `pid` with kill(1) (the workspace forbids `unsafe`, so no libc call).
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// The resident memory of `pid` in bytes (`VmRSS`); 0 when it is gone.
pub fn rss_bytes(pid: u32) -> u64 {
    proc_bytes(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// A `<field> <n> kB` line of a `/proc` file (`/proc/meminfo`, `/proc/<pid>/status`), in bytes
/// (0 when missing).
pub fn proc_bytes(path: &str, field: &str) -> u64 {
    1024 * std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_read_killed_and_reaped() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'ready: listening websocket=127.0.0.1:9 http=127.0.0.1:10' >&2; exec sleep 30"]);
        let mut proc = Proc::spawn("", cmd, true);
        assert_eq!(proc.addr("http"), "127.0.0.1:10".parse().unwrap());
        assert!(proc.log().contains("ready"));
        assert!(rss_bytes(proc.pid()) > 0);
        let pid = proc.pid();
        proc.kill();
        assert!(!proc.is_running());
        assert_eq!(rss_bytes(pid), 0, "reaped");
    }

    #[test]
    fn a_process_that_exits_without_listening_is_reported_with_its_log() {
        let err = std::panic::catch_unwind(|| {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "echo 'bad flag --x' >&2; exit 2"]);
            Proc::spawn("", cmd, true).pid()
        })
        .unwrap_err();
        let message = *err.downcast::<String>().unwrap();
        assert!(message.contains("bad flag --x"), "{message}");
    }
}
