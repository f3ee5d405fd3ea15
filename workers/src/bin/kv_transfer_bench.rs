//! KV pull bandwidth between two processes through the workers' UCX transport (what a decode
//! worker does with a context worker's handle), for real KV layouts.
//!
//!   kv_transfer_bench [--tokens 2048] [--iters 20]
//!
//! For each layout (SmolLM2-135M bf16, Llama-3.1-8B bf16) and block size (16, 64 tokens) it
//! starts a child process (this binary with `--export`) that exports a prompt's K/V the way a
//! context worker does, and pulls it: once as tandem pulls (the blocks are one contiguous
//! staged buffer, so adjacent regions coalesce into one get), once block by block (every other
//! block, so no two regions are adjacent: one get per block, as a read straight out of a paged
//! cache would be), each into a fresh `Vec` and into a slice of a pool (as a decode worker
//! with `--kv-transfer-pool-mb` pulls), and each pull reads the export's seal after the K/V
//! and checks it, as a decode worker does. Run it under `UCX_TLS=shm` and `UCX_TLS=tcp` to
//! compare transports; the child inherits the environment.
//!
//! Before the pulls it times the context worker's side for the same requests: the K/V copied
//! out of a cache into a fresh `Vec` and exported from there (a second copy, into UCX's
//! memory), against the copy going straight into memory the transport reserved, in a region
//! mapped for the export or in a slice of the transfer pool (what the context worker does).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tandem_workers::transfer::pool::SLICE_ALIGN;
use tandem_workers::transfer::seal::Seal;
use tandem_workers::transfer::ucx::UcxTransport;
use tandem_workers::transfer::{KvTransport, RemoteKv, RemoteMemory, from_hex, to_hex};

struct Layout {
    name: &'static str,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
}

const LAYOUTS: [Layout; 2] = [
    Layout {
        name: "smollm2-135m",
        layers: 30,
        kv_heads: 3,
        head_dim: 64,
    },
    Layout {
        name: "llama-3.1-8b",
        layers: 32,
        kv_heads: 8,
        head_dim: 128,
    },
];

fn block_bytes(layout: &Layout, block_tokens: usize) -> usize {
    // [layer][k|v][token][kv_head][head_dim] in bf16.
    layout.layers * 2 * block_tokens * layout.kv_heads * layout.head_dim * 2
}

fn arg(args: &[String], name: &str, default: usize) -> anyhow::Result<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name} takes a number")),
        None => Ok(default),
    }
}

/// Child: exports `bytes` bytes and prints `address rkey addr len seal_addr seal_nonce`, then
/// waits for stdin to close (serving gets meanwhile from its progress loop).
fn export(bytes: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let transport = UcxTransport::start().context("starting UCX")?;
    let data: Vec<u8> = (0..bytes).map(|i| (i * 131 % 251) as u8).collect();
    let exported = runtime
        .block_on(transport.export(data))
        .context("exporting")?;
    let RemoteMemory::Registered { address, rkey } = &exported.memory else {
        bail!("a UCX export is registered host memory");
    };
    let seal = exported.seal.context("every export is sealed")?;
    println!(
        "{} {} {} {} {} {}",
        to_hex(address),
        to_hex(rkey),
        exported.addr(),
        exported.len(),
        seal.addr,
        to_hex(&seal.nonce)
    );
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    drop(exported);
    Ok(())
}

/// The exporter's cost per request for each layout: copy out of a (stand-in) cache into a
/// fresh `Vec` then `export` it, against `reserve` and one copy into the reserved memory (a
/// region of its own, or a slice of the transfer pool).
fn export_costs(
    runtime: &tokio::runtime::Runtime,
    transport: &UcxTransport,
    tokens: usize,
    iters: usize,
) -> anyhow::Result<()> {
    println!(
        "| layout | request MiB | via Vec + export ms | reserved region ms | pool slice ms |\n|---|---|---|---|---|"
    );
    for layout in &LAYOUTS {
        let bytes = block_bytes(layout, 16) * tokens.div_ceil(16);
        // Room for the export's seal too (a page, as slices start on pages).
        let pooled = UcxTransport::start_with_pool(bytes + SLICE_ALIGN)
            .context("starting UCX with a pool")?;
        let cache: Vec<u8> = (0..bytes).map(|i| (i * 131 % 251) as u8).collect();
        let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
            f()?;
            let start = Instant::now();
            for _ in 0..iters {
                f()?;
            }
            Ok(start.elapsed().as_secs_f64() * 1e3 / iters as f64)
        };
        let via_vec = time(&mut || {
            let mut kv = vec![0u8; bytes];
            kv.copy_from_slice(&cache);
            let exported = runtime.block_on(transport.export(kv))?;
            drop(exported);
            Ok(())
        })?;
        let reserved_in = |transport: &UcxTransport| {
            time(&mut || {
                let mut buffer = runtime.block_on(transport.reserve(bytes))?;
                buffer
                    .host_bytes_mut()
                    .context("UCX exports host memory")?
                    .copy_from_slice(&cache);
                drop(buffer.finish()?);
                Ok(())
            })
        };
        let reserved = reserved_in(transport)?;
        let slice = reserved_in(&pooled)?;
        println!(
            "| {} | {:.1} | {via_vec:.2} | {reserved:.2} | {slice:.2} |",
            layout.name,
            bytes as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "kv_transfer_bench [--tokens N] [--iters N]: KV pull bandwidth between two processes \
             over the workers' UCX transport, for SmolLM2 and Llama-3.1-8B layouts and 16/64-token \
             blocks, coalesced (as tandem pulls) and block by block. Set UCX_TLS to pick the transport."
        );
        return Ok(());
    }
    if let Some(i) = args.iter().position(|a| a == "--export") {
        let bytes = args.get(i + 1).context("--export BYTES")?.parse()?;
        return export(bytes);
    }
    let tokens = arg(&args, "--tokens", 2048)?;
    let iters = arg(&args, "--iters", 20)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let puller = UcxTransport::start().context("starting UCX")?;
    println!(
        "UCX_TLS={} prompt={tokens} tokens iters={iters}",
        std::env::var("UCX_TLS").unwrap_or_else(|_| "(default)".into())
    );
    export_costs(&runtime, &puller, tokens, iters)?;
    // A decode worker's puller: into a fresh Vec per pull, or into a slice of its pool.
    let largest = LAYOUTS
        .iter()
        .map(|l| block_bytes(l, 64) * tokens.div_ceil(64))
        .max()
        .unwrap_or(0);
    let pool_puller = UcxTransport::start_with_pool(largest).context("starting UCX with a pool")?;
    println!(
        "| layout | block tokens | block bytes | request MiB | gets | Vec ms | Vec GB/s | pool ms | pool GB/s |\n|---|---|---|---|---|---|---|---|---|"
    );
    for layout in &LAYOUTS {
        for block_tokens in [16usize, 64] {
            let block = block_bytes(layout, block_tokens);
            let blocks = tokens.div_ceil(block_tokens);
            // Twice the blocks, so every other one can be read on its own.
            let mut child = Command::new(std::env::current_exe()?)
                .args(["--export", &(2 * blocks * block).to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting the exporter")?;
            let mut line = String::new();
            BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() != 6 {
                bail!("the exporter printed {line:?}");
            }
            let (address, rkey) = (from_hex(fields[0])?, from_hex(fields[1])?);
            let base: u64 = fields[2].parse()?;
            let seal = Seal::from_wire(&tandem_protocol::messages::KvSeal {
                addr: fields[4].parse()?,
                nonce: fields[5].into(),
            })?;
            for (label, stride) in [("coalesced", 1u64), ("per block", 2)] {
                let remote = RemoteKv {
                    memory: RemoteMemory::Registered {
                        address: address.clone(),
                        rkey: rkey.clone(),
                    },
                    regions: (0..blocks as u64)
                        .map(|i| (base + i * stride * block as u64, block as u64))
                        .collect(),
                    seal: Some(seal),
                };
                let gets = remote.coalesced().len();
                let mean_seconds = |puller: &UcxTransport, lent: bool| -> anyhow::Result<f64> {
                    // Warm-up: connection and registration caches.
                    runtime.block_on(puller.pull(remote.clone(), Duration::from_secs(30)))?;
                    let start = Instant::now();
                    for _ in 0..iters {
                        let pulled = runtime
                            .block_on(puller.pull(remote.clone(), Duration::from_secs(30)))?;
                        assert_eq!(pulled.len(), blocks * block);
                        assert_eq!(pulled.is_lent(), lent);
                    }
                    Ok(start.elapsed().as_secs_f64() / iters as f64)
                };
                let into_vec = mean_seconds(&puller, false)?;
                let into_pool = mean_seconds(&pool_puller, true)?;
                let bytes = (blocks * block) as f64;
                println!(
                    "| {} | {block_tokens} | {block} | {:.1} | {gets} ({label}) | {:.2} | {:.2} | {:.2} | {:.2} |",
                    layout.name,
                    bytes / (1 << 20) as f64,
                    into_vec * 1e3,
                    bytes / into_vec / 1e9,
                    into_pool * 1e3,
                    bytes / into_pool / 1e9
                );
            }
            drop(child.stdin.take());
            child.wait()?;
        }
    }
    Ok(())
}
