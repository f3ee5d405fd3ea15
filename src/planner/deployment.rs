//! The deployment a profile is measured on: one aggregated worker (`generation_servers`, one
//! instance of role both) started as a `tandem serve` child with a generated config, handed
//! over once it serves, and stopped with SIGTERM.
//!
//! Guarantees: the child cannot outlive the planner (`PR_SET_PDEATHSIG = SIGTERM`; it runs
//! in its own process group, so a Ctrl-C at the terminal reaches only the planner, whose
//! death then stops it once); a deployment that is dropped without [`Deployment::stop`] (an
//! error mid-profile) is stopped the same way; its output goes to a log file, whose tail an
//! error quotes.

use std::fmt::Write as _;
use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The line `tandem serve` prints once every worker is live behind the api-server.
const READY_LINE: &str = "tandem: serving";
/// How long the launcher gets to stop its children after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// The launcher's own grace for its workers (it has nothing in flight by then).
const SHUTDOWN_GRACE_S: u64 = 10;
/// Lines of the log an error quotes.
const TAIL_LINES: usize = 30;
/// Attempts at a free port (another process may take the one picked before the launcher
/// binds it).
const PORT_ATTEMPTS: usize = 3;

/// The one worker of a profiling deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSpec {
    /// Its first rank's device (`cpu`, `cuda:K`).
    pub device: String,
    pub tensor_parallel_size: usize,
    pub max_batch_size: usize,
    pub max_num_tokens: usize,
    pub block_size: usize,
    /// `kv_cache_config.free_gpu_memory_fraction` (GPU workers).
    pub gpu_memory_fraction: Option<f64>,
    /// `kv_cache_config.max_tokens`.
    pub kv_cache_tokens: Option<usize>,
}

impl WorkerSpec {
    /// The deployment config: no context workers, so the one generation worker prefills
    /// and decodes its own requests (role both).
    pub fn config(&self, port: u16) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# tandem plan: one aggregated worker, profiled");
        let _ = writeln!(out, "hostname: 127.0.0.1");
        let _ = writeln!(out, "port: {port}");
        let _ = writeln!(out, "context_servers:");
        let _ = writeln!(out, "  num_instances: 0");
        let _ = writeln!(out, "generation_servers:");
        let _ = writeln!(out, "  num_instances: 1");
        let _ = writeln!(out, "  device: {:?}", self.device);
        let _ = writeln!(out, "  tensor_parallel_size: {}", self.tensor_parallel_size);
        let _ = writeln!(out, "  max_batch_size: {}", self.max_batch_size);
        // Every request of a ladder rung is sent at once: none may be refused.
        let _ = writeln!(out, "  max_queued_requests: 0");
        let _ = writeln!(out, "  max_num_tokens: {}", self.max_num_tokens);
        let _ = writeln!(out, "  kv_cache_config:");
        let _ = writeln!(out, "    block_size: {}", self.block_size);
        if let Some(fraction) = self.gpu_memory_fraction {
            let _ = writeln!(out, "    free_gpu_memory_fraction: {fraction}");
        }
        if let Some(tokens) = self.kv_cache_tokens {
            let _ = writeln!(out, "    max_tokens: {tokens}");
        }
        out
    }
}

/// A running `tandem serve`.
pub struct Deployment {
    child: Child,
    url: String,
    log: PathBuf,
    stopped: bool,
}

impl Deployment {
    /// Starts `tandem serve` (`tandem` is this executable) on `model` with `spec`, its
    /// config and log in `dir`, and returns once it serves (or fails with the log's tail).
    pub fn start(
        tandem: &Path,
        model: &Path,
        spec: &WorkerSpec,
        dir: &Path,
        ready_timeout: Duration,
    ) -> anyhow::Result<Deployment> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let name = format!("tp{}", spec.tensor_parallel_size);
        let mut last_error = None;
        for attempt in 1..=PORT_ATTEMPTS {
            let port = free_port()?;
            let config = dir.join(format!("{name}.yaml"));
            std::fs::write(&config, spec.config(port))
                .with_context(|| format!("writing {}", config.display()))?;
            let log = dir.join(format!("{name}.log"));
            let mut deployment = Self::spawn(tandem, model, &config, &log, port)?;
            match deployment.wait_ready(ready_timeout) {
                Ok(()) => return Ok(deployment),
                Err(e) if attempt < PORT_ATTEMPTS && tail(&log).contains("cannot listen on") => {
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.expect("every attempt failed with an error"))
    }

    fn spawn(
        tandem: &Path,
        model: &Path,
        config: &Path,
        log: &Path,
        port: u16,
    ) -> anyhow::Result<Deployment> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("opening {} twice", log.display()))?;
        let mut command = Command::new(tandem);
        command
            .arg("serve")
            .arg("-c")
            .arg(config)
            .arg("--model")
            .arg(model)
            .args(["--shutdown-grace-s", &SHUTDOWN_GRACE_S.to_string()])
            .args(["--worker-restarts", "0"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let planner = std::process::id() as libc::pid_t;
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
                // The planner died before the flag was set: nobody would stop us later.
                if libc::getppid() != planner {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {} serve", tandem.display()))?;
        Ok(Deployment {
            child,
            url: format!("http://127.0.0.1:{port}/v1"),
            log: log.to_owned(),
            stopped: false,
        })
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for tandem serve")? {
                self.stopped = true;
                bail!(
                    "tandem serve exited ({status}) before serving; the end of {}:\n{}",
                    self.log.display(),
                    tail(&self.log)
                );
            }
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.contains(READY_LINE) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                let _ = self.terminate();
                bail!(
                    "tandem serve did not serve within {} s; the end of {}:\n{}",
                    timeout.as_secs(),
                    self.log.display(),
                    tail(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The API root, `http://127.0.0.1:PORT/v1`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops the deployment (SIGTERM; SIGKILL if it has not exited within a minute). An
    /// exit status other than success is an error naming the log.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let status = self.terminate()?;
        if !status.success() {
            bail!(
                "tandem serve stopped with {status}; the end of {}:\n{}",
                self.log.display(),
                tail(&self.log)
            );
        }
        Ok(())
    }

    fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait().context("waiting for tandem serve")? {
            self.stopped = true;
            return Ok(status);
        }
        // SAFETY: kill(2) has no memory effects; the child is not reaped yet (checked
        // above), so the pid is still this child's and cannot be a recycled one.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for tandem serve")? {
                self.stopped = true;
                return Ok(status);
            }
            if started.elapsed() > STOP_TIMEOUT {
                let _ = self.child.kill();
                let status = self.child.wait().context("reaping tandem serve")?;
                self.stopped = true;
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.terminate();
        }
    }
}

/// A port of 127.0.0.1 that had no listener a moment ago.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("finding a free port")?;
    Ok(listener.local_addr().context("finding a free port")?.port())
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_protocol::config::{DeploymentConfig, DeviceSpec};

    #[test]
    fn the_profiling_config_is_one_aggregated_worker() {
        let spec = WorkerSpec {
            device: "cuda:2".into(),
            tensor_parallel_size: 2,
            max_batch_size: 64,
            max_num_tokens: 2048,
            block_size: 64,
            gpu_memory_fraction: Some(0.9),
            kv_cache_tokens: None,
        };
        let config = DeploymentConfig::parse(&spec.config(8123), "test").unwrap();
        assert_eq!(config.port, 8123);
        assert_eq!(config.context_servers.instances(), 0);
        let g = &config.generation_servers;
        assert_eq!(g.instances(), 1);
        assert_eq!(g.device, DeviceSpec::All("cuda:2".into()));
        assert_eq!(g.tensor_parallel_size, Some(2));
        assert_eq!((g.max_batch_size, g.max_num_tokens), (Some(64), Some(2048)));
        assert_eq!(g.max_queued_requests, Some(0));
        assert_eq!(g.kv_cache_config.block_size, Some(64));
        assert_eq!(g.kv_cache_config.free_gpu_memory_fraction, Some(0.9));
        assert!(config.ignored_keys().is_empty());
    }
}
