//! [`Redis`]: a real `redis-server` on `127.0.0.1` and a port chosen at run time, with no
//! persistence unless it is given a directory for snapshots. Stopped (SIGKILL) when it drops.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::Proc;

/// How long a starting redis-server may take to answer.
const START_WAIT: Duration = Duration::from_secs(10);

pub struct Redis {
    pub port: u16,
    /// Set: Redis runs with `--requirepass`, and servers started on it get `--redis-password`.
    pub password: Option<String>,
    /// Set: `SAVE` writes a snapshot here, and a restart loads it.
    dir: Option<PathBuf>,
    proc: Option<Proc>,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(None, None)
    }

    /// A Redis that refuses every client without this password.
    pub fn start_with_password(password: &str) -> Redis {
        Redis::start_with(Some(password), None)
    }

    /// A Redis whose snapshots (`SAVE`) go to `dir` (`snapshot.rdb`), and which loads the
    /// snapshot there when it is restarted: a restore from a backup.
    pub fn start_in(dir: &Path) -> Redis {
        Redis::start_with(None, Some(dir))
    }

    fn start_with(password: Option<&str>, dir: Option<&Path>) -> Redis {
        let mut r = Redis {
            port: crate::free_port(),
            password: password.map(str::to_owned),
            dir: dir.map(Path::to_path_buf),
            proc: None,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Starts (again) on the same port: empty, or from its directory's snapshot.
    pub fn restart(&mut self) {
        assert!(self.proc.is_none(), "redis is already running");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            // `DEBUG SLEEP` for the fault run (from this machine only).
            .args(["--enable-debug-command", "local"]);
        if let Some(password) = &self.password {
            cmd.args(["--requirepass", password]);
        }
        if let Some(dir) = &self.dir {
            cmd.arg("--dir").arg(dir).args(["--dbfilename", "snapshot.rdb"]);
        }
        self.proc = Some(Proc::spawn("", cmd, false));
        crate::wait_until("redis-server to answer (is it installed? apt-get install redis-server)", START_WAIT, || {
            // Without the password a protected Redis answers -NOAUTH: it is up all the same.
            let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
            s.write_all(b"PING\r\n").map_err(|e| e.to_string())?;
            let mut buf = [0u8; 7];
            s.read_exact(&mut buf).map_err(|e| e.to_string())?;
            if &buf == b"+PONG\r\n" || &buf == b"-NOAUTH" { Ok(()) } else { Err(String::from_utf8_lossy(&buf).into()) }
        });
    }

    /// Runs `redis-cli` against this server, with its password if it has one; returns its
    /// output, errors included.
    pub fn cli(&self, args: &[&str]) -> String {
        self.cli_as(self.password.as_deref(), args)
    }

    /// Runs `redis-cli` with `password` (none: as a client that does not know it); returns its
    /// output, errors included.
    pub fn cli_as(&self, password: Option<&str>, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &self.port.to_string()]).args(args).env_remove("REDISCLI_AUTH");
        if let Some(password) = password {
            // From the environment, so it is not on a command line.
            cmd.env("REDISCLI_AUTH", password);
        }
        let out = cmd.output().expect("redis-cli must be installed");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        self.proc = None;
    }
}
