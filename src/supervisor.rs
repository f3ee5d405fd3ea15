//! Runs a [`Plan`]: starts NATS (unless external), the workers and the api-server, waits until
//! the api-server counts every worker, supervises, and on Ctrl-C / SIGTERM or a fatal exit
//! stops everything in order, leaving no process behind.
//!
//! Policy:
//! - During start-up any child exit is fatal (the deployment would not be what was asked).
//! - Afterwards a worker exit is reported and the worker started again ([`crate::restart`]:
//!   after a doubling delay, given up after a run of exits right after starting); meanwhile
//!   the api-server drops it once its heartbeats stop (or at once, when it left saying so, as
//!   a worker whose GPU failed does) and routes around it. The api-server's or our
//!   nats-server's exit is fatal.
//! - Stopping: SIGTERM to workers and api-server together (workers finish in-flight requests
//!   while the api-server still streams them out), SIGKILL after the grace period or on a
//!   second signal, then the nats-server last, since the others need it to drain.
//! - Part of a deployment (`--only`, one host of several): without an api-server here there
//!   is no /health to wait for, so the workers count as started once spawned (a worker failing
//!   to load is reported like any later exit) and the launcher ends, with an error, when none
//!   of its workers is left. An api-server alone is ready once it answers /health at all: its
//!   workers join from other hosts, whenever they come.
//!
//! All of this runs on the main thread (single-threaded runtime), which children's
//! `PR_SET_PDEATHSIG` requires (see `child`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::child::{Child, Echo, describe};
use crate::health::{self, Probe, StartUp, Verdict};
use crate::nats;
use crate::plan::{KvSecretSource, Plan};
use crate::restart::{AfterExit, RestartPolicy, Restarts};

/// The programs to start.
#[derive(Debug, Clone)]
pub struct Programs {
    pub worker: PathBuf,
    pub api_server: PathBuf,
    /// `None` when NATS is external.
    pub nats_server: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub ready_timeout: Duration,
    pub shutdown_grace: Duration,
    /// When exited workers are started again.
    pub restarts: RestartPolicy,
}

/// How often children and /health are looked at.
const TICK: Duration = Duration::from_millis(100);
/// A second stop signal this soon after the first is the same request delivered twice.
const DUPLICATE_SIGNAL_WINDOW: Duration = Duration::from_secs(1);
/// How long the nats-server gets to stop before SIGKILL.
const NATS_GRACE: Duration = Duration::from_secs(5);

/// SIGINT and SIGTERM, taken over from their default action for the launcher's lifetime.
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    pub fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// The next signal's name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

struct Worker {
    child: Child,
    /// Takes generation jobs (`both` or `decode`), as opposed to prefill only.
    generates: bool,
    /// Its command line and extra environment, to start it again.
    args: Vec<std::ffi::OsString>,
    env: Vec<(String, String)>,
    /// When the current process started.
    started: Instant,
    /// Exited; to be started again at this time.
    restart_at: Option<Instant>,
    /// Exited and given up: it keeps failing right after starting.
    given_up: bool,
    restarts: Restarts,
}

impl Worker {
    /// Running, or about to be started again.
    fn in_service(&self) -> bool {
        !self.given_up
    }

    /// Looks at the process: an exit is logged and a restart scheduled (or the worker given
    /// up); a scheduled restart that is due is done.
    async fn supervise(&mut self, program: &std::path::Path, policy: &RestartPolicy) {
        if self.given_up {
            return;
        }
        if let Some(at) = self.restart_at {
            if Instant::now() >= at {
                self.restart(program, policy);
            }
            return;
        }
        let Some(status) = self.child.poll_exit() else {
            return;
        };
        self.child.flush_output().await;
        self.on_exit(&describe(status), policy);
    }

    fn on_exit(&mut self, how: &str, policy: &RestartPolicy) {
        let ran = self.started.elapsed();
        let name = &self.child.name;
        match self.restarts.on_exit(ran, policy) {
            AfterExit::RestartIn(delay) => {
                tracing::error!(
                    "{name} exited ({how}) after {:.1} s; the api-server routes requests around \
                     it; starting it again in {} s (restart {})",
                    ran.as_secs_f64(),
                    delay.as_secs(),
                    self.restarts.total
                );
                self.restart_at = Some(Instant::now() + delay);
            }
            AfterExit::RestartsOff => {
                tracing::error!(
                    "{name} exited ({how}) after {:.1} s; not starting it again \
                     (--worker-restarts 0)",
                    ran.as_secs_f64()
                );
                self.given_up = true;
            }
            AfterExit::GiveUp { quick_exits } => {
                tracing::error!(
                    "{name} exited ({how}) after {:.1} s, {quick_exits} times in a row within \
                     {} s of starting: not starting it again (its output above says why)",
                    ran.as_secs_f64(),
                    policy.healthy_after.as_secs()
                );
                self.given_up = true;
            }
        }
    }

    fn restart(&mut self, program: &std::path::Path, policy: &RestartPolicy) {
        self.restart_at = None;
        self.started = Instant::now();
        match Child::spawn_with_env(&self.child.name, program, &self.args, &self.env, Echo::All) {
            Ok(child) => {
                tracing::info!(
                    "started {} again (pid {}; restart {})",
                    child.name,
                    child.pid(),
                    self.restarts.total
                );
                self.child = child;
            }
            Err(e) => {
                let how = format!("could not start: {e:#}");
                self.on_exit(&how, policy);
            }
        }
    }
}

/// The running processes.
#[derive(Default)]
struct Deployment {
    nats: Option<Child>,
    workers: Vec<Worker>,
    api_server: Option<Child>,
    /// "No generation worker left" has been logged.
    no_worker_warned: bool,
}

/// Serves until a signal (`Ok`) or a failure (`Err`); everything is stopped either way.
pub async fn run(
    plan: &Plan,
    programs: &Programs,
    timing: Timing,
    signals: &mut Signals,
) -> anyhow::Result<()> {
    let mut deployment = Deployment::default();
    let outcome = start_and_supervise(plan, programs, timing, signals, &mut deployment).await;
    if let Err(e) = &outcome {
        tracing::error!("{}", tandem_cli::error_report(e));
    }
    deployment.stop(timing.shutdown_grace, signals).await;
    outcome
}

/// The environment the workers get for their KV secret (the api-server gets none: it never
/// reads K/V), and says where the secret comes from.
fn kv_secret_env(source: &KvSecretSource) -> anyhow::Result<Vec<(String, String)>> {
    match source {
        KvSecretSource::Generated => {
            tracing::info!(
                "KV handles are signed with a fresh secret of this deployment's (in the \
                 workers' environment)"
            );
            let secret = crate::secrets::random_hex(32, "KV secret")?;
            Ok(vec![(tandem_cli::args::KV_SECRET_VAR.to_string(), secret)])
        }
        KvSecretSource::File(path) => {
            tracing::info!(
                "KV handles are signed with the secret in {}",
                path.display()
            );
            Ok(Vec::new())
        }
        KvSecretSource::Environment => {
            tracing::info!(
                "KV handles are signed with the secret in this launcher's environment \
                 (TANDEM_KV_SECRET_FILE or TANDEM_KV_SECRET)"
            );
            Ok(Vec::new())
        }
        KvSecretSource::NotNeeded => Ok(Vec::new()),
    }
}

async fn start_and_supervise(
    plan: &Plan,
    programs: &Programs,
    timing: Timing,
    signals: &mut Signals,
    deployment: &mut Deployment,
) -> anyhow::Result<()> {
    // The environment every child gets on top of the launcher's: our own nats-server's token.
    let mut bus_env: Vec<(String, String)> = Vec::new();
    let nats_url = match (&plan.external_nats, &programs.nats_server) {
        (Some(url), _) => {
            tracing::info!("using the NATS server at {url}");
            url.clone()
        }
        (None, Some(program)) => {
            let own = nats::start(program).await?;
            deployment.nats = Some(own.child);
            bus_env.push((tandem_cli::args::NATS_TOKEN_VAR.to_string(), own.token));
            own.url
        }
        (None, None) => bail!("no NATS URL and no nats-server to start"),
    };

    let kv_env = kv_secret_env(&plan.kv_secret)?;
    for spec in &plan.workers {
        let args = plan.worker_args(spec, &nats_url).to_args();
        let env: Vec<(String, String)> = spec
            .env
            .iter()
            .chain(&bus_env)
            .chain(&kv_env)
            .cloned()
            .collect();
        let child = Child::spawn_with_env(&spec.name, &programs.worker, &args, &env, Echo::All)?;
        let share = spec
            .env
            .iter()
            .find(|(k, _)| k == crate::plan::MPS_PERCENT_VAR)
            .map(|(_, v)| format!(" (MPS client, {v}% of the SMs)"))
            .unwrap_or_default();
        tracing::info!(
            "started {} (pid {}): role {} on {}{share}",
            spec.name,
            child.pid(),
            spec.role(),
            spec.device()
        );
        deployment.workers.push(Worker {
            child,
            generates: spec.role().generates(),
            args,
            env,
            started: Instant::now(),
            restart_at: None,
            given_up: false,
            restarts: Restarts::default(),
        });
    }
    if !plan.api_server {
        return supervise_workers_only(plan, programs, timing, &nats_url, signals, deployment)
            .await;
    }
    // API keys go in the environment, never in argv (visible to every local user).
    let api_args = plan.api_server_args(&nats_url);
    let api_env: Vec<(String, String)> = api_args
        .api_keys_env()
        .into_iter()
        .chain(bus_env.iter().cloned())
        .collect();
    let api_server = Child::spawn_with_env(
        "api-server",
        &programs.api_server,
        &api_args.to_args(),
        &api_env,
        Echo::All,
    )?;
    tracing::info!(
        "started api-server (pid {}) on {}:{}",
        api_server.pid(),
        plan.host,
        plan.port
    );
    deployment.api_server = Some(api_server);

    let (context, generation) = plan.expected_workers();
    let alone = plan.workers.is_empty();
    let mut start_up = StartUp::new(
        context,
        generation,
        alone,
        Instant::now() + timing.ready_timeout,
    );
    loop {
        tokio::select! {
            name = signals.next() => {
                tracing::info!("{name} received during start-up: stopping");
                return Ok(());
            }
            _ = tokio::time::sleep(TICK) => {}
        }
        if let Some((name, status)) = deployment.first_exit().await {
            bail!(
                "{name} exited during start-up ({}); stopping the deployment",
                describe(status)
            );
        }
        let probe = health::probe(plan.client_host(), plan.port, Duration::from_secs(2)).await;
        match start_up.judge(&probe, Instant::now()) {
            Verdict::Wait => {}
            Verdict::Ready => break,
            Verdict::TimedOut => {
                let seen = match probe {
                    Probe::Unreachable(reason) => format!("no answer from /health ({reason})"),
                    Probe::Answered { status, body, .. } => {
                        format!("/health said {status}: {body}")
                    }
                };
                bail!(
                    "the deployment was not ready within {} s ({} expected; {seen}); stopping it \
                     (raise --ready-timeout-s for a slow model load)",
                    timing.ready_timeout.as_secs(),
                    plan.describe_workers()
                );
            }
        }
    }
    if alone {
        say(&format!(
            "tandem: serving {} at {} (api-server only; workers join over NATS at {nats_url})",
            plan.served_name,
            plan.base_url(),
        ));
    } else {
        say(&format!(
            "tandem: serving {} at {} ({})",
            plan.served_name,
            plan.base_url(),
            plan.describe_workers()
        ));
    }

    loop {
        tokio::select! {
            name = signals.next() => {
                tracing::info!("{name} received: stopping the deployment");
                return Ok(());
            }
            _ = tokio::time::sleep(TICK) => {}
        }
        for worker in &mut deployment.workers {
            worker.supervise(&programs.worker, &timing.restarts).await;
        }
        if !alone
            && !deployment.no_worker_warned
            && deployment
                .workers
                .iter()
                .all(|w| !w.in_service() || !w.generates)
        {
            deployment.no_worker_warned = true;
            tracing::warn!(
                "no generation worker of this launcher is left; requests fail with 503 until \
                 one joins over NATS at {nats_url}"
            );
        }
        if let Some(api_server) = &mut deployment.api_server
            && let Some(status) = api_server.poll_exit()
        {
            api_server.flush_output().await;
            bail!(
                "the api-server exited ({}); stopping the deployment",
                describe(status)
            );
        }
        if let Some(nats) = &mut deployment.nats
            && let Some(status) = nats.poll_exit()
        {
            nats.flush_output().await;
            bail!(
                "the nats-server exited ({}); stopping the deployment. Its last lines:\n{}",
                describe(status),
                nats.tail()
            );
        }
    }
}

/// One line on stdout, at once (scripts and tests wait for it).
fn say(line: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// Supervises workers started without an api-server on this host: until a signal, or until
/// every one of them has exited (an error: this host no longer serves).
async fn supervise_workers_only(
    plan: &Plan,
    programs: &Programs,
    timing: Timing,
    nats_url: &str,
    signals: &mut Signals,
    deployment: &mut Deployment,
) -> anyhow::Result<()> {
    say(&format!(
        "tandem: started {} of {} joining NATS at {nats_url} (no api-server on this host)",
        plan.describe_workers(),
        plan.served_name,
    ));
    loop {
        tokio::select! {
            name = signals.next() => {
                tracing::info!("{name} received: stopping the workers");
                return Ok(());
            }
            _ = tokio::time::sleep(TICK) => {}
        }
        for worker in &mut deployment.workers {
            worker.supervise(&programs.worker, &timing.restarts).await;
        }
        if deployment.workers.iter().all(|w| !w.in_service()) {
            bail!("every worker of this launcher has exited and was given up; stopping");
        }
    }
}

impl Deployment {
    /// The first child found to have exited, by name.
    async fn first_exit(&mut self) -> Option<(String, std::process::ExitStatus)> {
        let children = self
            .nats
            .iter_mut()
            .chain(self.workers.iter_mut().map(|w| &mut w.child))
            .chain(self.api_server.iter_mut());
        for child in children {
            if let Some(status) = child.poll_exit() {
                // Its last words come before the error that names it.
                child.flush_output().await;
                let name = if child.name == "nats" {
                    format!("nats-server (last lines:\n{}\n)", child.tail())
                } else {
                    child.name.clone()
                };
                return Some((name, status));
            }
        }
        None
    }

    /// Stops every child, in order, and reaps them all.
    async fn stop(&mut self, grace: Duration, signals: &mut Signals) {
        let mut services: Vec<&mut Child> = self
            .workers
            .iter_mut()
            .map(|w| &mut w.child)
            .chain(self.api_server.iter_mut())
            .collect();
        for child in services.iter_mut() {
            child.signal(libc::SIGTERM);
        }
        let running = services
            .iter_mut()
            .filter_map(|c| c.running().then_some(()))
            .count();
        if running > 0 {
            tracing::info!(
                "stopping {running} process(es): workers finish their in-flight requests \
                 (up to {} s; Ctrl-C again to stop them at once)",
                grace.as_secs()
            );
        }
        stop_all(&mut services, grace, signals).await;
        if let Some(nats) = &mut self.nats {
            nats.signal(libc::SIGTERM);
            stop_all(&mut [nats], NATS_GRACE, signals).await;
        }
        let all = self
            .workers
            .iter_mut()
            .map(|w| &mut w.child)
            .chain(self.api_server.iter_mut())
            .chain(self.nats.iter_mut());
        for child in all {
            child.flush_output().await;
            if let Some(status) = child.poll_exit() {
                tracing::debug!("{} stopped ({})", child.name, describe(status));
            }
        }
    }
}

/// Waits until every child has exited, SIGKILLing them after `grace` or on a signal, and
/// reaps them.
async fn stop_all(children: &mut [&mut Child], grace: Duration, signals: &mut Signals) {
    let started = Instant::now();
    let deadline = started + grace;
    while children.iter_mut().any(|c| c.running()) {
        if Instant::now() >= deadline {
            let names: Vec<String> = children
                .iter_mut()
                .filter_map(|c| c.running().then(|| c.name.clone()))
                .collect();
            tracing::warn!(
                "still running after {} s, killing: {}",
                grace.as_secs(),
                names.join(", ")
            );
            break;
        }
        tokio::select! {
            name = signals.next() => {
                // One stop request often arrives twice at once (a wrapper such as `timeout`
                // forwarding the signal it also got, a terminal signalling a whole process
                // group): only a later one means "now".
                if started.elapsed() < DUPLICATE_SIGNAL_WINDOW {
                    tracing::debug!("{name} received again right away: taken as the same request");
                    continue;
                }
                tracing::warn!("{name} received again: killing what is still running");
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    for child in children.iter_mut() {
        child.signal(libc::SIGKILL);
    }
    // SIGKILL cannot be ignored; this only waits for the kernel to deliver it.
    while children.iter_mut().any(|c| c.running()) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
