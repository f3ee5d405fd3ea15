//! The launcher's own nats-server, when the deployment names no NATS server: bound to
//! 127.0.0.1 on a free port, ready once it accepts connections. Its log stays quiet unless it
//! warns or fails.

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::child::{Child, Echo, describe};

/// How long a nats-server may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

/// Starts nats-server and returns it with its URL. Retries on another port if the free port
/// was taken between the probe and the server's bind.
pub async fn start(program: &Path) -> anyhow::Result<(Child, String)> {
    let mut failures = Vec::new();
    for _ in 0..3 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let args = [
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string().into(),
        ];
        let mut child = Child::spawn("nats", program, &args, Echo::NatsProblems)?;
        let started = Instant::now();
        loop {
            if let Some(status) = child.poll_exit() {
                child.flush_output().await;
                failures.push(format!(
                    "{} exited ({}) before listening on port {port}:\n{}",
                    program.display(),
                    describe(status),
                    child.tail()
                ));
                break;
            }
            // Ready once it greets clients: a starting nats-server can accept and reset
            // connections.
            let addr = ([127, 0, 0, 1], port).into();
            let greeted = tokio::task::spawn_blocking(move || {
                tandem_protocol::ready::nats_greets(addr, Duration::from_secs(2))
            })
            .await
            .unwrap_or(false);
            if greeted {
                let url = format!("nats://127.0.0.1:{port}");
                tracing::info!("started nats-server (pid {}) at {url}", child.pid());
                return Ok((child, url));
            }
            if started.elapsed() > LISTEN_TIMEOUT {
                child.signal(libc::SIGKILL);
                bail!(
                    "{} did not listen on port {port} within {LISTEN_TIMEOUT:?}:\n{}",
                    program.display(),
                    child.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    bail!("nats-server failed to start: {}", failures.join("\n"))
}
