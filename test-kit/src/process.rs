//! Child processes of a test, and what /proc says about processes.
//!
//! A [`Proc`] is killed (SIGKILL) and reaped when dropped, also while a panicking test unwinds,
//! so a failed test leaves no server running. Its stdout and stderr are read line by line by
//! two threads: each line is kept (for [`Proc::wait_for_line`] and [`Proc::output`]) and echoed
//! to the test's stderr with the process's name, which the test harness shows when a test
//! fails.
//!
//! A [`Proc`] does not inherit the variables that change what tandem's programs do
//! ([`clear_tandem_env`]): what a test checks does not depend on the environment of whoever
//! runs it. A test that sets one on purpose sets it on its command, which then keeps it.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A child process with its output captured; killed and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

/// Inherited variables of ours that are passed on all the same: where things are installed,
/// not how they behave. `TANDEM_NATS_SERVER` names the nats-server the kit starts
/// ([`crate::nats_server_path`]), and the launcher must find the same one.
const PASSED_ON: &[&str] = &["TANDEM_NATS_SERVER"];

/// Whether the inherited environment variable `name` changes what a process the kit starts
/// does: tandem's own (`TANDEM_*`: the binaries' flags, engine and CUDA switches, test-only
/// fault injection, the launcher's model cache), the log filter the tests read lines through
/// (`RUST_LOG`), the API key `tandem bench` and the example client send (`OPENAI_*`), and
/// `PYTHONOPTIMIZE`, under which a Python check written as `assert` would vanish.
fn changes_behaviour(name: &str) -> bool {
    (name.starts_with("TANDEM_") && !PASSED_ON.contains(&name))
        || name.starts_with("OPENAI_")
        || matches!(name, "RUST_LOG" | "PYTHONOPTIMIZE")
}

/// Removes from `command`'s environment every inherited variable that changes what tandem's
/// programs do (see `changes_behaviour`) and that `command` does not set (or remove) itself: a
/// developer's `TANDEM_MAX_LOCAL_PREFILL_LENGTH` or `TANDEM_OVERLAP=0` cannot change what a test
/// checks, while a test that sets `TANDEM_TEST_DELAY_PULL_MS` on its command keeps it.
/// [`Proc::spawn`] and [`crate::python`] do this to every command; use it on other commands a
/// test runs itself.
pub fn clear_tandem_env(command: &mut Command) -> &mut Command {
    let own: HashSet<OsString> = command
        .get_envs()
        .map(|(name, _)| name.to_owned())
        .collect();
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(changes_behaviour) && !own.contains(&name) {
            command.env_remove(&name);
        }
    }
    command
}

impl Proc {
    /// Starts `command` (stdin closed, `NO_COLOR=1`, stdout and stderr captured), without the
    /// inherited variables [`clear_tandem_env`] removes.
    pub fn spawn(name: &str, mut command: Command) -> Self {
        clear_tandem_env(&mut command);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1");
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({command:?}): {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        for reader in [
            Box::new(stdout) as Box<dyn Read + Send>,
            Box::new(stderr) as Box<dyn Read + Send>,
        ] {
            let lines = Arc::clone(&lines);
            let name = name.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    eprintln!("[{name}] {line}");
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
        }
        Proc {
            name: name.to_owned(),
            child,
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far (stdout and stderr, by line as they came).
    pub fn output(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// Lines printed so far that contain `needle`.
    pub fn count_lines(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until a line contains `needle`; panics (with the output) if the process exits
    /// or `limit` passes first.
    pub fn wait_for_line(&mut self, needle: &str, limit: Duration) {
        let start = Instant::now();
        while self.count_lines(needle) == 0 {
            if let Some(status) = self.try_wait() {
                panic!(
                    "{} exited ({status}) before printing `{needle}`:\n{}",
                    self.name,
                    self.output()
                );
            }
            assert!(
                start.elapsed() < limit,
                "{} did not print `{needle}` within {limit:?}:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`libc::SIGTERM`, ...) to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid, which is not reaped before drop.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "signalling {}", self.name);
    }

    /// Kills the process now (SIGKILL) and reaps it, as dropping it would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the exit; panics (with the output) if it takes longer than `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "{} did not exit within {limit:?}:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Parent pid and state of a process, from /proc; `None` once it is gone.
fn stat(pid: u32) -> Option<(u32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Whether `pid` runs (exists and is not a zombie).
pub fn is_running(pid: u32) -> bool {
    stat(pid).is_some_and(|(_, state)| state != 'Z')
}

/// The command name of `pid` (`/proc/PID/comm`); empty once it is gone.
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// What `pid` was started with (`/proc/PID/cmdline`, NULs as spaces); empty once it is gone.
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " "))
        .unwrap_or_default()
}

/// Panics when `secret` is on the command line of `root` or of any process below it (a
/// command line is visible to every local user in `ps`).
pub fn assert_no_command_line_shows(root: u32, secret: &str) {
    for pid in descendants(root).into_iter().chain([root]) {
        let line = cmdline(pid);
        assert!(!line.contains(secret), "pid {pid} shows a secret: {line}");
    }
}

/// Every running process as (pid, parent pid).
fn running_processes() -> Vec<(u32, u32)> {
    std::fs::read_dir("/proc")
        .expect("/proc is readable")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let (ppid, state) = stat(pid)?;
            (state != 'Z').then_some((pid, ppid))
        })
        .collect()
}

/// The running children of `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    running_processes()
        .into_iter()
        .filter(|&(_, ppid)| ppid == parent)
        .map(|(pid, _)| pid)
        .collect()
}

/// The running descendants of `root` (children, their children, ...), `root` excluded.
pub fn descendants(root: u32) -> Vec<u32> {
    let processes = running_processes();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            processes
                .iter()
                .filter(|&&(_, ppid)| ppid == parent)
                .map(|&(pid, _)| pid),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// Waits until none of `pids` runs; panics naming the survivors after `limit`.
pub fn assert_all_gone(pids: &[u32], limit: Duration) {
    let start = Instant::now();
    loop {
        let alive: Vec<String> = pids
            .iter()
            .filter(|&&pid| is_running(pid))
            .map(|&pid| format!("{pid} ({})", comm(pid)))
            .collect();
        if alive.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "processes left behind after {limit:?}: {}",
            alive.join(", ")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_captured_and_a_dropped_process_is_killed_and_reaped() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo ready; echo oops >&2; exec sleep 600"]);
        let mut proc = Proc::spawn("sleeper", command);
        proc.wait_for_line("ready", Duration::from_secs(10));
        proc.wait_for_line("oops", Duration::from_secs(10));
        let pid = proc.pid();
        assert!(is_running(pid));
        assert_eq!(comm(pid), "sleep");
        assert!(children_of(std::process::id()).contains(&pid));
        assert!(descendants(std::process::id()).contains(&pid));
        drop(proc);
        // Reaped, not a zombie: the pid is gone from /proc (or reused by someone else's).
        assert!(stat(pid).is_none_or(|(ppid, _)| ppid != std::process::id()));
    }

    #[test]
    fn a_panicking_test_still_kills_its_processes() {
        let pid = Arc::new(Mutex::new(0));
        let seen = Arc::clone(&pid);
        let result = std::panic::catch_unwind(move || {
            let mut command = Command::new("sleep");
            command.arg("600");
            let proc = Proc::spawn("doomed", command);
            *seen.lock().unwrap() = proc.pid();
            panic!("the test fails");
        });
        assert!(result.is_err());
        let pid = *pid.lock().unwrap();
        assert!(stat(pid).is_none_or(|(ppid, _)| ppid != std::process::id()));
    }

    #[test]
    fn tandem_variables_are_not_inherited_unless_the_command_sets_them() {
        // SAFETY: std serializes its own reads and writes of the environment (a spawn's
        // included), and nothing in this test binary reads it through libc.
        unsafe {
            std::env::set_var("TANDEM_KIT_SELF_TEST_INHERITED", "leaked");
            std::env::set_var("TANDEM_KIT_SELF_TEST_SET", "leaked");
            std::env::set_var("TANDEM_NATS_SERVER_KIT_SELF_TEST", "leaked");
        }
        let mut command = Command::new("sh");
        command
            .args([
                "-c",
                "env | grep -E '^(TANDEM_|RUST_LOG=)' | sort; echo done",
            ])
            .env("TANDEM_KIT_SELF_TEST_SET", "explicit")
            .env("RUST_LOG", "debug");
        let mut proc = Proc::spawn("env", command);
        proc.wait_for_line("done", Duration::from_secs(10));
        let seen = proc.output();
        assert!(!seen.contains("TANDEM_KIT_SELF_TEST_INHERITED"), "{seen}");
        assert!(!seen.contains("TANDEM_NATS_SERVER_KIT_SELF_TEST"), "{seen}");
        assert!(seen.contains("TANDEM_KIT_SELF_TEST_SET=explicit"), "{seen}");
        assert!(seen.contains("RUST_LOG=debug"), "{seen}");
        for name in PASSED_ON {
            if let Some(value) = std::env::var_os(name) {
                let line = format!("{name}={}", value.to_string_lossy());
                assert!(seen.contains(&line), "{name} is passed on: {seen}");
            }
        }
    }

    #[test]
    fn waits_report_an_early_exit_with_the_output() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo bye; exit 3"]);
        let mut proc = Proc::spawn("quitter", command);
        let status = proc.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(3));
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            proc.wait_for_line("never", Duration::from_secs(10))
        }))
        .unwrap_err();
        let message = panic.downcast_ref::<String>().expect("a formatted panic");
        assert!(message.contains("quitter exited"), "{message}");
    }
}
