//! The servers of a deployment, started the way tests need them: nats-server and the
//! api-server on free ports, workers joined to a NATS server. Each is handed over once it
//! serves (see the crate's guarantees); what the tests of one crate set differently (served
//! model name, timeouts, threads) is theirs to pass.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::http::Http;
use crate::paths::{bin, nats_server_path};
use crate::ports::free_port;
use crate::process::Proc;

/// How long a server may take to listen, and a worker to join (2 shared cores, and every test
/// of a binary starting its processes at once).
const START_LIMIT: Duration = Duration::from_secs(120);

/// Starts a server on a free port and waits until `ready(port)` says it serves. A port can
/// still be taken between its pick and the server's bind (by another process, or as the
/// ephemeral port of an outgoing connection), so a server that exits before listening is
/// started again on another port, up to three times.
pub fn spawn_listening(
    name: &str,
    mut command: impl FnMut(u16) -> Command,
    ready: impl Fn(u16) -> bool,
) -> (Proc, u16) {
    let mut failures = Vec::new();
    for _ in 0..3 {
        let port = free_port();
        let mut proc = Proc::spawn(name, command(port));
        let start = Instant::now();
        loop {
            if let Some(status) = proc.try_wait() {
                failures.push(format!(
                    "exited before listening on {port}: {status}\n{}",
                    proc.output()
                ));
                break;
            }
            // The listener is the child's only if the child is still alive.
            if ready(port) && proc.try_wait().is_none() {
                return (proc, port);
            }
            assert!(
                start.elapsed() < START_LIMIT,
                "{name} did not listen on {port} within {START_LIMIT:?}:\n{}",
                proc.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!(
        "{name} failed to start three times: {}",
        failures.join("; ")
    );
}

/// nats-server can accept and reset connections while it starts: ready once it greets.
fn nats_greets(port: u16) -> bool {
    tandem_protocol::ready::nats_greets(([127, 0, 0, 1], port).into(), Duration::from_secs(2))
}

/// Ready once it answers HTTP: a bare TCP accept can come from a listener that is not the
/// server's yet, or before its workers run (a request then gets a reset).
fn answers_http(port: u16) -> bool {
    tandem_protocol::ready::http_answers(([127, 0, 0, 1], port).into(), Duration::from_secs(2))
}

/// A nats-server of the test's own on 127.0.0.1, killed on drop.
pub struct Nats {
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    pub port: u16,
    proc: Proc,
}

impl Nats {
    pub fn start() -> Self {
        Self::start_with(|port| {
            let mut command = Command::new(nats_server_path());
            command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
            command
        })
    }

    /// A nats-server whose config file (written into `dir`) adds `config` (e.g. an
    /// `authorization { ... }` block) to its listen address.
    pub fn start_with_config(dir: &Path, config: &str) -> Self {
        Self::start_with(|port| {
            let file = dir.join(format!("nats-{port}.conf"));
            std::fs::write(&file, format!("listen: \"127.0.0.1:{port}\"\n{config}\n"))
                .expect("the test's directory is writable");
            let mut command = Command::new(nats_server_path());
            command.arg("-c").arg(&file);
            command
        })
    }

    /// The nats-server `command(port)` starts, once it greets on 127.0.0.1.
    fn start_with(command: impl Fn(u16) -> Command) -> Self {
        let (proc, port) = spawn_listening("nats", command, nats_greets);
        Nats {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            proc,
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// What the server has logged so far.
    pub fn output(&self) -> String {
        self.proc.output()
    }

    /// Kills the server (-9: clients see the connection drop, nothing is flushed) and, after
    /// `down`, starts a plain one on the same port; returns once it greets. Fault tests of
    /// reconnection.
    pub fn restart(&mut self, down: Duration) {
        self.proc.kill();
        std::thread::sleep(down);
        let port = self.port;
        let mut command = Command::new(nats_server_path());
        command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        let start = Instant::now();
        loop {
            self.proc = Proc::spawn("nats", command);
            while self.proc.try_wait().is_none() && start.elapsed() < START_LIMIT {
                if nats_greets(port) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // Exited (the port not yet free): once more, until the limit.
            assert!(
                start.elapsed() < START_LIMIT,
                "nats-server did not listen again on {port}:\n{}",
                self.proc.output()
            );
            std::thread::sleep(Duration::from_millis(100));
            command = Command::new(nats_server_path());
            command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        }
    }
}

/// A `worker --role ROLE` to start with [`start_worker`]: the flags every test sets, and any
/// others in `extra`.
#[derive(Debug, Clone)]
pub struct WorkerSpec<'a> {
    /// `both`, `context` or `decode`.
    pub role: &'a str,
    /// `--worker-id`, also the name its output lines carry.
    pub worker_id: &'a str,
    pub served_model_name: &'a str,
    /// `--threads` of the CPU backend.
    pub threads: u32,
    pub heartbeat_ms: u64,
    pub extra: &'a [&'a str],
}

impl WorkerSpec<'_> {
    /// The command line: `worker --role .. --model MODEL --nats URL ...`, logging what the
    /// tests wait for (`joined the deployment`, per-job debug lines).
    pub fn command(&self, nats_url: &str, model: &Path) -> Command {
        let mut command = Command::new(bin("worker"));
        command
            .args(["--role", self.role, "--model"])
            .arg(model)
            .args([
                "--nats",
                nats_url,
                "--served-model-name",
                self.served_model_name,
                "--worker-id",
                self.worker_id,
                "--threads",
                &self.threads.to_string(),
                "--heartbeat-ms",
                &self.heartbeat_ms.to_string(),
            ])
            .args(self.extra)
            .env("RUST_LOG", "info,tandem_workers=debug");
        command
    }
}

/// Starts `spec`'s worker on `model`, joined to the NATS server at `nats_url`; returns once
/// it has joined the deployment.
pub fn start_worker(nats_url: &str, model: &Path, spec: &WorkerSpec) -> Proc {
    let mut proc = Proc::spawn(spec.worker_id, spec.command(nats_url, model));
    proc.wait_for_line("joined the deployment", START_LIMIT);
    proc
}

/// The api-server on a free port, ready (it answers HTTP); killed on drop.
pub struct ApiServer {
    pub port: u16,
    /// A client for it.
    pub http: Http,
    pub proc: Proc,
}

impl ApiServer {
    /// `api-server --model MODEL --served-model-name NAME --port <free> --nats URL FLAGS`,
    /// logging warnings only.
    pub fn start(nats: &Nats, model: &Path, served_model_name: &str, flags: &[&str]) -> Self {
        let (proc, port) = spawn_listening(
            "api-server",
            |port| {
                let mut command = Command::new(bin("api-server"));
                command
                    .arg("--model")
                    .arg(model)
                    .args([
                        "--served-model-name",
                        served_model_name,
                        "--port",
                        &port.to_string(),
                        "--nats",
                        &nats.url,
                    ])
                    .args(flags)
                    .env("RUST_LOG", "warn");
                command
            },
            answers_http,
        );
        ApiServer {
            port,
            http: Http::new(&format!("http://127.0.0.1:{port}")),
            proc,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_serves_once_started_and_is_gone_once_dropped() {
        let nats = Nats::start();
        assert_eq!(nats.url, format!("nats://127.0.0.1:{}", nats.port));
        assert!(nats_greets(nats.port));
        let pid = nats.pid();
        assert!(crate::process::is_running(pid));
        drop(nats);
        assert!(
            !crate::process::children_of(std::process::id()).contains(&pid),
            "nats-server is reaped on drop"
        );
    }
}
