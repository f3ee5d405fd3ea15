//! One supervised child process: started so that it cannot outlive the launcher, its output
//! re-emitted line by line under a `[name] ` prefix, signalled and reaped by the launcher.
//!
//! Guarantees:
//! - The child gets `PR_SET_PDEATHSIG = SIGTERM`: if the launcher dies, even by SIGKILL, the
//!   kernel sends the child SIGTERM. The flag is tied to the thread that forked, so children
//!   are only spawned from the launcher's main thread (its runtime is single-threaded).
//! - The child runs in its own process group, so a Ctrl-C at the terminal reaches only the
//!   launcher, which then stops the children once and in order (a worker that got the
//!   terminal's SIGINT and then the launcher's SIGTERM would take the second signal as "stop
//!   now" and abandon its draining requests).
//! - A signal is only ever sent to a child that has not been reaped yet, so it can never hit
//!   a recycled pid.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::Write as _;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::task::JoinHandle;

/// Which of the launcher's streams a child's line goes to.
#[derive(Debug, Clone, Copy)]
enum Sink {
    Stdout,
    Stderr,
}

/// What to do with a child's output lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// Every line, prefixed.
    All,
    /// Only warnings and errors in nats-server's log format (`[WRN]`, `[ERR]`, `[FTL]`); the
    /// rest is kept for the report if the process fails.
    NatsProblems,
}

/// Lines kept per child for an error report.
const TAIL_LINES: usize = 40;

pub struct Child {
    pub name: String,
    child: tokio::process::Child,
    pid: u32,
    status: Option<ExitStatus>,
    tail: Arc<Mutex<VecDeque<String>>>,
    forwarders: Vec<JoinHandle<()>>,
}

impl Child {
    /// Starts `program args`, output echoed per `echo`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[OsString],
        echo: Echo,
    ) -> anyhow::Result<Child> {
        Self::spawn_with_env(name, program, args, &[], echo)
    }

    /// [`Self::spawn`] with `env` added to the launcher's environment.
    pub fn spawn_with_env(
        name: &str,
        program: &Path,
        args: &[OsString],
        env: &[(String, String)],
        echo: Echo,
    ) -> anyhow::Result<Child> {
        let mut command = std::process::Command::new(program);
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let launcher = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // system calls (setpgid, prctl, getppid); it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The launcher died before the flag was set: nobody would stop us later.
                // (A raw OS error: allocating between fork and exec is not safe.)
                if libc::getppid() != launcher {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut child = tokio::process::Command::from(command)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let pid = child
            .id()
            .expect("a child that was just spawned has not been reaped");
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let mut forwarders = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            forwarders.push(forward(stdout, name, Sink::Stdout, echo, &tail));
        }
        if let Some(stderr) = child.stderr.take() {
            forwarders.push(forward(stderr, name, Sink::Stderr, echo, &tail));
        }
        tracing::debug!("started {name} (pid {pid}): {} {args:?}", program.display());
        Ok(Child {
            name: name.to_string(),
            child,
            pid,
            status: None,
            tail,
            forwarders,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status, once it has exited (reaping it then).
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            self.status = Some(status);
        }
        self.status
    }

    pub fn running(&mut self) -> bool {
        self.poll_exit().is_none()
    }

    /// Sends `signal` if the child still runs.
    pub fn signal(&mut self, signal: libc::c_int) {
        if self.running() {
            // SAFETY: kill(2) on our own unreaped child; the pid cannot have been reused.
            unsafe {
                libc::kill(self.pid as libc::pid_t, signal);
            }
        }
    }

    /// The last lines it printed (echoed or not), for an error report.
    pub fn tail(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Waits (briefly) until its output has been re-emitted, after it exited.
    pub async fn flush_output(&mut self) {
        for forwarder in self.forwarders.drain(..) {
            // A grandchild could hold the pipe open; never wait on it for long.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), forwarder).await;
        }
    }
}

fn forward(
    stream: impl AsyncRead + Unpin + Send + 'static,
    name: &str,
    sink: Sink,
    echo: Echo,
    tail: &Arc<Mutex<VecDeque<String>>>,
) -> JoinHandle<()> {
    let prefix = format!("[{name}] ");
    let tail = Arc::clone(tail);
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream);
        let mut buffer = Vec::new();
        loop {
            buffer.clear();
            match reader.read_until(b'\n', &mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buffer);
            let line = line.trim_end_matches(['\n', '\r']);
            let show = match echo {
                Echo::All => true,
                Echo::NatsProblems => ["[WRN]", "[ERR]", "[FTL]"].iter().any(|l| line.contains(l)),
            };
            if show {
                // A closed launcher stream must not panic the forwarder.
                let _ = match sink {
                    Sink::Stdout => writeln!(std::io::stdout().lock(), "{prefix}{line}"),
                    Sink::Stderr => writeln!(std::io::stderr().lock(), "{prefix}{line}"),
                };
            }
            let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.to_string());
        }
    })
}

/// `exit code 1`, `killed by SIGKILL, signal 9`.
pub fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit code {code}");
    }
    match status.signal() {
        Some(signal) => {
            let core = if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            };
            format!("killed by {}, signal {signal}{core}", signal_name(signal))
        }
        None => status.to_string(),
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_words() {
        assert_eq!(describe(ExitStatus::from_raw(1 << 8)), "exit code 1");
        assert_eq!(
            describe(ExitStatus::from_raw(libc::SIGKILL)),
            "killed by SIGKILL, signal 9"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_child_is_reaped_and_its_output_kept() {
        let mut child = Child::spawn(
            "t",
            Path::new("/bin/sh"),
            &["-c".into(), "echo one; echo '[ERR] two' >&2; exit 3".into()],
            Echo::NatsProblems,
        )
        .unwrap();
        let status = loop {
            if let Some(status) = child.poll_exit() {
                break status;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        child.flush_output().await;
        assert_eq!(status.code(), Some(3));
        let tail = child.tail();
        assert!(tail.contains("one") && tail.contains("[ERR] two"), "{tail}");
        // Reaped: signalling is a no-op, never a stray kill.
        child.signal(libc::SIGKILL);
        assert!(!child.running());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_child_runs_in_its_own_process_group() {
        let mut child = Child::spawn(
            "t",
            Path::new("/bin/sh"),
            &["-c".into(), "sleep 30".into()],
            Echo::All,
        )
        .unwrap();
        // SAFETY: getpgid on our own running child.
        let group = unsafe { libc::getpgid(child.pid() as libc::pid_t) };
        assert_eq!(group, child.pid() as libc::pid_t);
        child.signal(libc::SIGTERM);
        let status = loop {
            if let Some(status) = child.poll_exit() {
                break status;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }
}
