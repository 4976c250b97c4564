//! Child processes the harness owns: started with their output in a log file, checked for an
//! early exit while we wait on them, and stopped (SIGTERM, then SIGKILL) when dropped.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{Error, Result};

/// How long a stopped process gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Proxy variables that must not reach the control plane: the apiserver's webhook client
/// honours them and would send loopback calls to a proxy.
const PROXY_VARS: [&str; 6] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
];

/// A child process with its log file, stopped on drop.
#[derive(Debug)]
pub struct Supervised {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Supervised {
    /// Starts `command` with stdout and stderr appended to `log` and no proxy variables.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| Error::io(format!("open log {}", log.display()), source))?;
        let err = out
            .try_clone()
            .map_err(|source| Error::io(format!("open log {}", log.display()), source))?;
        for var in PROXY_VARS {
            command.env_remove(var);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| Error::io(format!("start {name}"), source))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Fails with the log's tail if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Err(self.exited(None));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.child = None;
                Err(self.exited(Some(status)))
            }
            Err(source) => Err(Error::io(format!("wait for {}", self.name), source)),
        }
    }

    fn exited(&self, status: Option<ExitStatus>) -> Error {
        Error::Exited {
            name: self.name.clone(),
            status: status.map_or_else(|| "stopped".to_owned(), |s| s.to_string()),
            log_tail: log_tail(&self.log),
        }
    }

    /// Sends SIGTERM, waits up to the grace period, then SIGKILLs. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let Ok(raw) = i32::try_from(child.id()) else {
            return;
        };
        let pid = Pid::from_raw(raw);
        // ESRCH means it already exited; reaping below handles that.
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(name = %self.name, "Did not stop within the grace period; killing");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last lines of a log file, for error messages (empty if unreadable).
pub fn log_tail(path: &Path) -> String {
    const TAIL_BYTES: u64 = 4096;
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Ports [`free_port`] hands out: below Linux's default ephemeral range (32768–60999), so that
/// no outgoing connection's source port can take one between the check and the child's bind.
/// With the kernel's own pick (bind to port 0) the port came from that range, and under the
/// e2e traffic a connection once took the apiserver's port first ("address already in use").
const FREE_PORTS: std::ops::Range<u16> = 20_000..32_768;

/// A TCP port on 127.0.0.1 that was free a moment ago, outside the ephemeral range. The small
/// race until the child binds it — against another test's listener only — is accepted for test
/// infrastructure (envtest does the same).
pub fn free_port() -> Result<u16> {
    let span = u32::from(FREE_PORTS.end - FREE_PORTS.start);
    // A start that differs between processes and calls, so parallel test binaries rarely probe
    // the same ports.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761);
    let mut last = None;
    for i in 0..256u32 {
        let offset = seed.wrapping_add(i.wrapping_mul(7_919)) % span;
        let port = FREE_PORTS.start + u16::try_from(offset).unwrap_or(0);
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(_) => return Ok(port),
            Err(e) => last = Some(e),
        }
    }
    Err(Error::io(
        "find a free port below the ephemeral range",
        last.unwrap_or_else(|| std::io::Error::other("no port tried")),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exited_process_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sh.log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo boom-from-child; exit 3"]);
        let mut proc = Supervised::spawn("sh", cmd, &log).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = loop {
            match proc.ensure_running() {
                Ok(()) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(()) => panic!("sh did not exit"),
                Err(err) => break err,
            }
        };
        let text = err.to_string();
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.contains("boom-from-child"), "{text}");
    }

    #[test]
    fn stop_terminates_a_running_process() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let mut proc = Supervised::spawn("sleep", cmd, &dir.path().join("s.log")).unwrap();
        proc.ensure_running().unwrap();
        proc.stop();
        assert!(proc.pid().is_none());
        assert!(proc.ensure_running().is_err());
    }
}
