//! Helpers shared by the tests: a current-thread runtime with a `LocalSet` (the UCX types are
//! `!Send`), the peer process serving a patterned region, and a block-wise pull.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use tandem_ucx::{Endpoint, GetOp, RegionHandle, RemoteKey, Result};

/// Runs `future` on a current-thread runtime inside a `LocalSet`, as a tandem UCX thread does.
pub fn run_local<F: Future>(future: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread tokio runtime builds");
    tokio::task::LocalSet::new().block_on(&runtime, future)
}

/// A `tandem-ucx-peer` process serving `bytes` of the pattern for `seed` over the transports in
/// `tls`. Killed when dropped, so a failing test leaves no process behind.
pub struct Peer {
    child: Child,
    /// Closing it tells the peer to exit; kept open while the peer must serve.
    stdin: Option<ChildStdin>,
    pub handle: RegionHandle,
}

impl Peer {
    /// `allocation`: `vec` (registered user memory) or `ucx` (allocated by UCX).
    pub fn spawn(tls: &str, bytes: usize, seed: u64, allocation: &str) -> Peer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tandem-ucx-peer"))
            .args([bytes.to_string(), seed.to_string(), allocation.to_string()])
            .env("UCX_TLS", tls)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning tandem-ucx-peer");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("peer stdout is piped");
        let mut peer = Peer {
            child,
            stdin,
            handle: RegionHandle {
                worker_address: Vec::new(),
                region_address: 0,
                region_length: 0,
                rkey: Vec::new(),
            },
        };
        // The peer prints its handle line (among UCX's own log lines), or exits (EOF) on failure:
        // this loop ends either way.
        let mut lines = BufReader::new(stdout).lines();
        let line = loop {
            match lines.next() {
                Some(Ok(line)) => match line.strip_prefix("HANDLE ") {
                    Some(handle) => break handle.to_string(),
                    None => eprintln!("peer: {line}"),
                },
                Some(Err(e)) => panic!("reading the peer's stdout: {e}"),
                None => panic!("the peer (UCX_TLS={tls}) exited without printing its handle"),
            }
        };
        peer.handle = RegionHandle::parse_line(&line)
            .unwrap_or_else(|e| panic!("peer (UCX_TLS={tls}) printed {line:?}: {e}"));
        assert_eq!(peer.handle.region_length, bytes);
        peer
    }

    /// Kills the peer with SIGKILL (no chance to close its endpoints) and reaps it.
    pub fn kill(&mut self) {
        self.child.kill().expect("killing the peer");
        self.child.wait().expect("reaping the peer");
    }

    /// Closes the peer's stdin and waits for it to exit; returns whether it exited cleanly.
    pub fn finish(mut self) -> bool {
        drop(self.stdin.take());
        self.child
            .wait()
            .map(|status| status.success())
            .unwrap_or(false)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Pulls the whole region of `handle` through `endpoint` in blocks of `block_bytes`, every block
/// a separate get, all in flight at once.
pub async fn pull_region(
    endpoint: &Endpoint,
    handle: &RegionHandle,
    block_bytes: usize,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let rkey = RemoteKey::unpack(
        endpoint,
        &handle.rkey,
        handle.region_address,
        handle.region_length,
    )?;
    let mut buffer = vec![0u8; handle.region_length];
    let ops = buffer
        .chunks_mut(block_bytes)
        .enumerate()
        .map(|(i, local)| GetOp {
            local,
            remote_address: handle.region_address + (i * block_bytes) as u64,
            rkey: rkey.clone(),
        })
        .collect();
    // SAFETY: awaited right here, never leaked.
    unsafe { endpoint.get_all(ops, timeout) }.await?;
    Ok(buffer)
}

/// Panics with the first wrong byte unless `buffer` is the pattern for `seed`.
pub fn assert_pattern(buffer: &[u8], seed: u64) {
    if let Some(index) = tandem_ucx::pattern::first_mismatch(buffer, seed, 0) {
        panic!(
            "byte {index} of {} differs: got {:#04x}, expected {:#04x}",
            buffer.len(),
            buffer[index],
            tandem_ucx::pattern::byte_at(seed, index as u64)
        );
    }
}
