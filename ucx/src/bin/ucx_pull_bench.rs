//! Pull bandwidth between two processes: spawns `tandem-ucx-peer` (next to this binary) serving a
//! patterned region, then pulls the whole region in blocks, every block a separate `ucp_get_nbx`,
//! all in flight at once, as a decode worker pulls a request's KV blocks. Prints GB/s (1e9 B/s).
//! Transports come from the environment (`UCX_TLS`), which the peer inherits.
//!
//! Usage: `ucx_pull_bench <region_bytes> <block_bytes> [pulls] [vec|ucx]`: the peer's region is
//! registered user memory (`vec`, default) or allocated by UCX (`ucx`).
//!
//! KV bytes per token: SmolLM2-135M 30 layers * 2 * 3 KV heads * 64 * 2 B = 23040 B;
//! Llama-3.1-8B 32 * 2 * 8 * 128 * 2 B = 131072 B. A block of N tokens is N times that.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tandem_ucx::{Context, Endpoint, GetOp, RegionHandle, RemoteKey, Worker, pattern};

const SEED: u64 = 0xbe7c;
const PULL_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: ucx_pull_bench <region_bytes> <block_bytes> [pulls] [vec|ucx]";
    let (region, block, pulls, allocation) = match &args[..] {
        [region, block] => (region, block, "5", "vec"),
        [region, block, pulls] => (region, block, pulls.as_str(), "vec"),
        [region, block, pulls, allocation] => (region, block, pulls.as_str(), allocation.as_str()),
        _ => bail!(usage),
    };
    let region_bytes: usize = region.parse().context("region_bytes")?;
    let block_bytes: usize = block.parse().context("block_bytes")?;
    let pulls: usize = pulls.parse().context("pulls")?;
    if region_bytes == 0 || block_bytes == 0 || pulls == 0 {
        bail!("region_bytes, block_bytes and pulls must be positive");
    }
    let peer_exe = std::env::current_exe()?
        .with_file_name("tandem-ucx-peer")
        .with_extension(std::env::consts::EXE_EXTENSION);
    let mut peer = PeerGuard(
        Command::new(&peer_exe)
            .args([
                region_bytes.to_string(),
                SEED.to_string(),
                allocation.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", peer_exe.display()))?,
    );
    let stdout = peer.0.stdout.take().context("peer stdout")?;
    // UCX logs to stdout too: the handle is the line starting with `HANDLE `.
    let line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.strip_prefix("HANDLE ").map(str::to_string))
        .context("the peer exited without printing its handle")?;
    let handle = RegionHandle::parse_line(&line).context("the peer's handle line")?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let seconds = local.block_on(&runtime, pull_repeatedly(&handle, block_bytes, pulls))?;
    let tls = std::env::var("UCX_TLS").unwrap_or_else(|_| "(default)".into());
    let gigabytes = region_bytes as f64 / 1e9;
    let best = seconds.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = seconds.iter().sum::<f64>() / seconds.len() as f64;
    println!(
        "UCX_TLS={tls} {allocation} region {region_bytes} B, block {block_bytes} B ({} gets): \
         best {:.2} GB/s, mean {:.2} GB/s over {pulls} pulls",
        region_bytes.div_ceil(block_bytes),
        gigabytes / best,
        gigabytes / mean,
    );
    Ok(())
}

/// Pulls the region `pulls` times; returns each pull's seconds. The first pull's bytes are
/// checked against the pattern, so a broken transfer cannot pass as a fast one.
async fn pull_repeatedly(
    handle: &RegionHandle,
    block_bytes: usize,
    pulls: usize,
) -> anyhow::Result<Vec<f64>> {
    let context = Context::new().context("ucp_init")?;
    let worker = Worker::new(&context)?;
    let progress = worker.clone();
    tokio::task::spawn_local(async move { progress.progress_loop().await });
    let endpoint = Endpoint::connect(&worker, &handle.worker_address)?;
    let rkey = RemoteKey::unpack(
        &endpoint,
        &handle.rkey,
        handle.region_address,
        handle.region_length,
    )?;
    let mut buffer = vec![0u8; handle.region_length];
    // Touch the destination once so page faults are not timed.
    buffer.iter_mut().step_by(4096).for_each(|b| *b = 1);
    let mut seconds = Vec::with_capacity(pulls);
    for pull in 0..pulls {
        let ops = buffer
            .chunks_mut(block_bytes)
            .enumerate()
            .map(|(i, local)| GetOp {
                local,
                remote_address: handle.region_address + (i * block_bytes) as u64,
                rkey: rkey.clone(),
            })
            .collect();
        let started = Instant::now();
        // SAFETY: awaited right here, never leaked.
        unsafe { endpoint.get_all(ops, PULL_TIMEOUT) }.await?;
        seconds.push(started.elapsed().as_secs_f64());
        if pull == 0
            && let Some(index) = pattern::first_mismatch(&buffer, SEED, 0)
        {
            bail!("pulled byte {index} differs from the peer's");
        }
        buffer.fill(0);
    }
    Ok(seconds)
}

/// Ends the peer (closing its stdin, then killing it if needed) however the benchmark ends.
struct PeerGuard(Child);

impl Drop for PeerGuard {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        for _ in 0..50 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
