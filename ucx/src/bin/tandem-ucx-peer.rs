//! Serves one registered region filled with the test pattern, for the two-process tests and the
//! pull benchmark: prints the region's handle line on stdout, then progresses its worker until
//! stdin is closed. Transports come from the environment (`UCX_TLS`).
//!
//! Usage: `tandem-ucx-peer <bytes> <seed> [vec|ucx]`: the region is a registered `Vec`
//! (default) or memory allocated by UCX ([`MemoryRegion::allocate`]).
//!
//! The handle line starts with `HANDLE ` because UCX writes its own log lines to stdout.

use anyhow::{Context as _, bail};
use tandem_ucx::{Context, MemoryRegion, RegionHandle, Worker, pattern};
use tokio::io::AsyncReadExt;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (bytes, seed, allocation) = match &args[..] {
        [bytes, seed] => (bytes, seed, "vec"),
        [bytes, seed, allocation] => (bytes, seed, allocation.as_str()),
        _ => bail!("usage: tandem-ucx-peer <bytes> <seed> [vec|ucx]"),
    };
    let ucx_allocated = match allocation {
        "vec" => false,
        "ucx" => true,
        other => bail!("allocation must be vec or ucx, not {other:?}"),
    };
    let bytes: usize = bytes.parse().context("bytes")?;
    let seed: u64 = seed.parse().context("seed")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(serve(bytes, seed, ucx_allocated))
}

async fn serve(bytes: usize, seed: u64, ucx_allocated: bool) -> anyhow::Result<()> {
    let context = Context::new().context("creating the UCX context")?;
    let worker = Worker::new(&context).context("creating the UCX worker")?;
    let region = if ucx_allocated {
        let mut region =
            MemoryRegion::allocate(&context, bytes).context("allocating the region")?;
        let bytes = region
            .bytes_mut()
            .context("a UCX-allocated region has owned bytes")?;
        pattern::fill(bytes, seed, 0);
        region
    } else {
        let mut buffer = vec![0u8; bytes];
        pattern::fill(&mut buffer, seed, 0);
        MemoryRegion::from_vec(&context, buffer).context("registering the region")?
    };
    let handle = RegionHandle {
        worker_address: worker.address()?,
        region_address: region.address(),
        region_length: region.len(),
        rkey: region.pack_rkey()?,
    };
    println!("HANDLE {}", handle.to_line());
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    let wait_for_eof = async {
        while stdin.read(&mut sink).await? > 0 {}
        anyhow::Ok(())
    };
    tokio::select! {
        result = worker.progress_loop() => { result?; }
        result = wait_for_eof => result?,
    }
    Ok(())
}
