//! The launcher's own nats-server, when the deployment names no NATS server: bound to
//! 127.0.0.1 on a free port, ready once it accepts connections. Its log stays quiet unless it
//! warns or fails.
//!
//! Its `max_payload` (the largest message it carries) is [`MAX_PAYLOAD_BYTES`], 8 MiB instead
//! of nats-server's 1 MiB: a job carries its prompt's token ids (a 128k-token prompt of a
//! 128k-token vocabulary is about 900 KB of them), a migrated job also the tokens generated so
//! far, and a decode job the KV handle besides (one region per block for readers that ask
//! for that: about 40 bytes each).
//!
//! It requires a fresh random token, so that another local user cannot join the bus (read
//! prompts and tokens, inject or cancel). The token reaches nats-server in a config file only
//! the launcher's user can read (removed once the server is up) and the children in their
//! environment (`TANDEM_NATS_TOKEN`), never on a command line, which every local user can
//! read.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::child::{Child, Echo, describe};

/// How long a nats-server may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

/// The `max_payload` of the launcher's nats-server: NATS recommends at most 8 MB, and a job
/// of a prompt filling a 1M-token context (7 bytes per token id at most) still fits.
pub const MAX_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;

/// The launcher's nats-server: the process, its URL and the token clients must present.
pub struct OwnNats {
    pub child: Child,
    pub url: String,
    pub token: String,
}

/// A fresh token: 32 hex digits from the kernel's random source.
fn random_token() -> anyhow::Result<String> {
    crate::secrets::random_hex(16, "NATS token")
}

/// nats-server's config: listen address, largest message, token.
fn config_text(port: u16, token: &str) -> String {
    format!(
        "listen: \"127.0.0.1:{port}\"\nmax_payload: {MAX_PAYLOAD_BYTES}\n\
         authorization {{\n  token: \"{token}\"\n}}\n"
    )
}

/// Writes nats-server's config ([`config_text`]) into a new directory only this user can
/// enter; returns the directory (the caller removes it) and the file.
fn write_config(port: u16, token: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let dir = std::env::temp_dir().join(format!("tandem-nats-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join("nats.conf");
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .with_context(|| format!("creating {}", file.display()))?;
    use std::io::Write as _;
    out.write_all(config_text(port, token).as_bytes())
        .with_context(|| format!("writing {}", file.display()))?;
    Ok((dir, file))
}

/// Starts nats-server, requiring a fresh token, and returns it with its URL and token.
/// Retries on another port if the free port was taken between the probe and the server's
/// bind.
pub async fn start(program: &Path) -> anyhow::Result<OwnNats> {
    let mut failures = Vec::new();
    let token = random_token()?;
    for _ in 0..3 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let (dir, config) = write_config(port, &token)?;
        let args = ["-c".into(), config.into_os_string()];
        let spawned = Child::spawn("nats", program, &args, Echo::NatsProblems);
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let outcome = wait_until_listening(&mut child, program, port).await;
        // Read at start-up: the token need not stay on disk.
        let _ = std::fs::remove_dir_all(&dir);
        match outcome? {
            Some(url) => {
                tracing::info!(
                    "started nats-server (pid {}) at {url} (max_payload {MAX_PAYLOAD_BYTES} \
                     bytes), clients need its token",
                    child.pid()
                );
                return Ok(OwnNats { child, url, token });
            }
            None => failures.push(format!(
                "{} exited before listening on port {port}:\n{}",
                program.display(),
                child.tail()
            )),
        }
    }
    bail!("nats-server failed to start: {}", failures.join("\n"))
}

/// Waits until nats-server greets on `port`: `Some(url)`, or `None` when it exited first
/// (another process took the port); an error when it neither exits nor listens in time.
async fn wait_until_listening(
    child: &mut Child,
    program: &Path,
    port: u16,
) -> anyhow::Result<Option<String>> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.poll_exit() {
            child.flush_output().await;
            tracing::debug!("nats-server exited ({}) before listening", describe(status));
            return Ok(None);
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
            return Ok(Some(format!("nats://127.0.0.1:{port}")));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_raises_max_payload_and_requires_the_token() {
        let text = config_text(4222, "abc");
        assert!(text.contains("listen: \"127.0.0.1:4222\""), "{text}");
        assert!(text.contains("max_payload: 8388608\n"), "{text}");
        assert!(text.contains("token: \"abc\""), "{text}");
    }
}
