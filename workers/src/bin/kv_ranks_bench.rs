//! A prompt's hand-over over CUDA IPC between tensor-parallel splits, as workers do it: the
//! context side's caches (one per rank) shared once, an export of the prompt's blocks in
//! place, and the decode side's copies straight into the blocks its engine reserved, the KV
//! heads re-laid for its own ranks on the way.
//!
//!   kv_ranks_bench [--tokens 3000] [--iters 10] [--layout 70b|8b] [--pairs 2:0,1=1:1 ...]
//!
//! A pair `N:FROM=M:TO` moves from N ranks on the GPUs listed in FROM to M ranks on those
//! in TO (`2:0,1=1:1`: a context worker of two ranks on cuda:0-1 to a decode worker on
//! cuda:1). Both sides live in this process, so each allocation is reached at its own
//! address instead of through `cuIpcOpenMemHandle`, with peer access enabled between the GPUs
//! as the mapping does between processes: the same copies, on the same copy engines. The destination's bytes are checked once against
//! what its ranks would hold, then the pull is timed (median of `--iters`), against the
//! bytes moved.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use cudarc::driver::CudaContext;
use tandem_workers::backend::{DeviceRange, KvCacheMemory, KvMemory};
use tandem_workers::kv_cache::{KvDType, KvLayout};
use tandem_workers::transfer::RemoteKv;
use tandem_workers::transfer::cuda_ipc::{CacheBlocks, CudaIpcTransport};

#[derive(Parser)]
struct Args {
    /// Prompt tokens handed over.
    #[arg(long, default_value_t = 3000)]
    tokens: usize,
    /// Timed pulls per pair (the median is reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// KV layout: Llama-3.1-70B (80 layers) or Llama-3.1-8B (32), 8 KV heads of 128, bf16.
    #[arg(long, default_value = "70b")]
    layout: String,
    /// Tokens per block (the GPU workers' default).
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// Hand-overs to time, `N:FROM=M:TO`.
    #[arg(long, value_delimiter = ' ', num_args = 1.., default_values_t = vec![
        "1:0=1:0".to_string(), "1:0=1:1".to_string(), "2:0,1=1:1".to_string(),
        "1:0=2:0,1".to_string(), "2:0,1=2:0,1".to_string(),
    ])]
    pairs: Vec<String>,
}

/// One side of a hand-over: its ranks' GPUs.
fn parse_side(text: &str) -> Result<Vec<usize>> {
    let (ranks, gpus) = text.split_once(':').context("a side is RANKS:GPU,GPU")?;
    let ranks: usize = ranks.parse()?;
    let gpus = gpus
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<usize>, _>>()?;
    ensure!(gpus.len() == ranks, "{ranks} ranks on {} GPUs", gpus.len());
    Ok(gpus)
}

/// A cache of `gpus.len()` parts of `blocks` blocks, one on each GPU, filled from `fill`.
/// `contexts` (one per GPU of the machine) must outlive it: a primary context whose last
/// holder lets go is destroyed, with its allocations.
fn allocate(
    contexts: &[Arc<CudaContext>],
    layout: &KvLayout,
    gpus: &[usize],
    blocks: usize,
    fill: impl Fn(usize) -> Vec<u8>,
) -> Result<Vec<KvCacheMemory>> {
    let block = layout.block_bytes() / gpus.len();
    gpus.iter()
        .enumerate()
        .map(|(r, &ordinal)| {
            contexts[ordinal].bind_to_thread()?;
            let len = blocks * block + blocks * 16;
            let mut host = fill(r);
            host.resize(len, 0);
            // SAFETY: a plain allocation, written at once, freed at the end.
            let ptr = unsafe { cudarc::driver::result::malloc_sync(len) }?;
            unsafe { cudarc::driver::result::memcpy_htod_sync(ptr, &host) }?;
            Ok(KvCacheMemory {
                memory: KvMemory::Device(DeviceRange { ptr, len }),
                block_bytes: block,
                num_blocks: blocks,
                slab_offset: blocks * block,
            })
        })
        .collect()
}

/// Frees the caches `allocate` made.
fn free(contexts: &[Arc<CudaContext>], parts: &[KvCacheMemory], gpus: &[usize]) -> Result<()> {
    for (part, &ordinal) in parts.iter().zip(gpus) {
        contexts[ordinal].bind_to_thread()?;
        if let KvMemory::Device(range) = part.memory {
            unsafe { cudarc::driver::result::free_sync(range.ptr) }?;
        }
    }
    Ok(())
}

/// Peer access between every pair of GPUs. Between processes, mapping an exporter's memory
/// enables it (`CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`); in one process the allocations are
/// reached at their own addresses, and without it a copy between GPUs is staged through the
/// host instead of going over NVLink.
fn enable_peer_access(contexts: &[Arc<CudaContext>]) -> Result<()> {
    use cudarc::driver::sys::{CUresult, cuCtxEnablePeerAccess};
    for (a, ctx) in contexts.iter().enumerate() {
        ctx.bind_to_thread()?;
        for (b, peer) in contexts.iter().enumerate() {
            if a == b {
                continue;
            }
            // SAFETY: both contexts are alive (held by `contexts`).
            match unsafe { cuCtxEnablePeerAccess(peer.cu_ctx(), 0) } {
                CUresult::CUDA_SUCCESS | CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {}
                other => bail!("peer access from cuda:{a} to cuda:{b}: {other:?}"),
            }
        }
    }
    Ok(())
}

/// Rank `r` of `ranks`'s part of every row of `whole` (rows of `row` bytes).
fn rank_part(whole: &[u8], row: usize, ranks: usize, r: usize) -> Vec<u8> {
    let part = row / ranks;
    whole
        .chunks_exact(row)
        .flat_map(|bytes| bytes[r * part..(r + 1) * part].iter().copied())
        .collect()
}

fn main() -> Result<()> {
    tandem_cli::init_logging("warn");
    let args = Args::parse();
    let layout = KvLayout {
        num_layers: match args.layout.as_str() {
            "70b" => 80,
            "8b" => 32,
            other => bail!("unknown layout {other} (70b or 8b)"),
        },
        num_kv_heads: 8,
        head_dim: 128,
        block_size: args.block_size,
        dtype: KvDType::Bf16,
    };
    let blocks = layout.blocks_for(args.tokens);
    let row = layout.num_kv_heads * layout.head_dim * 2;
    let whole: Vec<u8> = (0..blocks * layout.block_bytes())
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let gpus = CudaContext::device_count()? as usize;
    let contexts = (0..gpus)
        .map(CudaContext::new)
        .collect::<Result<Vec<_>, _>>()?;
    enable_peer_access(&contexts)?;
    println!(
        "{} tokens of Llama-3.1-{} K/V ({:.1} MB, {blocks} blocks of {}), {gpus} GPU(s)",
        args.tokens,
        args.layout.to_uppercase(),
        whole.len() as f64 / 1e6,
        layout.block_size
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for pair in &args.pairs {
        let (from, to) = pair.split_once('=').context("a pair is FROM=TO")?;
        let (from, to) = (parse_side(from)?, parse_side(to)?);
        if from.iter().chain(&to).any(|&g| g >= gpus) {
            println!("{pair}: skipped, this machine has {gpus} GPU(s)");
            continue;
        }
        // The prompt at blocks 0.. on the context side; reserved at the end of a cache twice
        // as large on the decode side (the engines hand out different blocks).
        let source = allocate(&contexts, &layout, &from, blocks, |r| {
            rank_part(&whole, row, from.len(), r)
        })?;
        let dest = allocate(&contexts, &layout, &to, 2 * blocks, |_| Vec::new())?;
        let exporter = CudaIpcTransport::start_group(&from, "bench".into())?;
        // SAFETY: the caches outlive the exposure (freed after it is dropped).
        let exposed = unsafe { exporter.expose_ranks(source.clone(), Box::new(())) }?;
        let ids: Vec<u32> = (0..blocks as u32).collect();
        let exported = exposed.export(&ids, Box::new(()))?;
        let remote = RemoteKv {
            memory: exported.memory.clone(),
            regions: exported.regions.clone(),
            seal: exported.seal,
        };
        let puller = CudaIpcTransport::start_group(&to, "bench".into())?;
        let into = CacheBlocks {
            layout,
            shards: dest.clone(),
            blocks: (blocks as u32..2 * blocks as u32).collect(),
        };
        let pull = || -> Result<f64> {
            let started = Instant::now();
            // SAFETY: `dest` is this bench's, its blocks touched by nothing else.
            let moved = runtime
                .block_on(unsafe { puller.pull_into_cache(remote.clone(), into.clone()) })?;
            ensure!(moved as usize == whole.len(), "moved {moved} bytes");
            Ok(started.elapsed().as_secs_f64())
        };
        pull()?;
        let block = layout.block_bytes() / to.len();
        for (r, (part, &ordinal)) in dest.iter().zip(&to).enumerate() {
            contexts[ordinal].bind_to_thread()?;
            let KvMemory::Device(range) = part.memory else {
                unreachable!()
            };
            let mut got = vec![0u8; blocks * block];
            unsafe {
                cudarc::driver::result::memcpy_dtoh_sync(
                    &mut got,
                    range.ptr + (blocks * block) as u64,
                )
            }?;
            ensure!(
                got == rank_part(&whole, row, to.len(), r),
                "{pair}: rank {r} holds other bytes than its heads of the prompt"
            );
        }
        let mut times = (0..args.iters)
            .map(|_| pull())
            .collect::<Result<Vec<_>>>()?;
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "{pair:>14}: {:7.2} ms  {:6.1} GB/s  (min {:.2} ms)  checked",
            median * 1e3,
            whole.len() as f64 / median / 1e9,
            times[0] * 1e3
        );
        drop((exported, exposed));
        free(&contexts, &source, &from)?;
        free(&contexts, &dest, &to)?;
    }
    Ok(())
}
