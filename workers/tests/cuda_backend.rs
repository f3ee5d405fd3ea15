//! The CUDA backend against the CPU backend on the same model (the `tiny` random model of
//! `scripts/test-models`). Needs an NVIDIA GPU: without the CUDA driver every test here passes
//! without running (CI has no GPU), each printing a `SKIPPED <test>: <reason>` line
//! (tandem-test-skip) that the device scripts count; on the device machine they run (see
//! docs/benchmarks.md, "GPU").

mod parity_support;

use std::path::PathBuf;
use std::process::Command;

use tandem_test_skip::skip;
use tandem_workers::backend::cpu::{CpuBackend, CpuOptions};
use tandem_workers::backend::cuda::{CudaBackend, CudaOptions, driver_present};
use tandem_workers::backend::{Backend, DeviceSampler, KvBlockIo, KvBytes, KvBytesMut};
use tandem_workers::kv_cache::KvDType;
use tandem_workers::model::{ForwardBatch, Model, ModelOptions, RowLogprobs};

fn model_dir() -> PathBuf {
    tandem_test_kit::model_dir("tiny")
}

fn no_gpu() -> bool {
    if driver_present() {
        return false;
    }
    skip("no CUDA driver on this machine");
    true
}

/// A bf16 KV cache, the layout of real transfers and of the GPU's default.
fn bf16_kv() -> ModelOptions {
    ModelOptions {
        kv_dtype: Some(KvDType::Bf16),
        ..ModelOptions::default()
    }
}

/// An FP8 KV cache (e4m3 codes, keys rotated), on either backend.
fn fp8_kv() -> ModelOptions {
    ModelOptions {
        kv_dtype: Some(KvDType::Fp8),
        ..ModelOptions::default()
    }
}

fn rel_l2(a: &[f32], reference: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(reference)
        .map(|(&x, &r)| (x as f64 - r as f64).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|&r| (r as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

/// Logits of `prompt` and then of each of `forced` fed one at a time (teacher forcing).
fn logits_along<B: Backend>(model: &Model<B>, prompt: &[u32], forced: &[u32]) -> Vec<Vec<f32>> {
    let mut kv = model.alloc_kv_cache(16, 64).unwrap();
    let table: Vec<u32> = (0..64).collect();
    let mut batch = ForwardBatch::default();
    batch.push(prompt, 0, table.clone(), true);
    let mut all = model.forward(&batch, &mut kv).unwrap();
    for (s, &token) in forced.iter().enumerate() {
        let mut batch = ForwardBatch::default();
        batch.push(&[token], prompt.len() + s, table.clone(), true);
        all.push(model.forward(&batch, &mut kv).unwrap().remove(0));
    }
    all
}

#[test]
fn cuda_logits_and_greedy_tokens_match_the_cpu() {
    if no_gpu() {
        return;
    }
    // The tiny model (head dim 16: the warp-per-key decode attention) and, where the device
    // script names one, a model of head dim 64 or 128 (the tensor-core kernel).
    let extra = std::env::var_os("TANDEM_GPU_TEST_MODEL").map(PathBuf::from);
    // Both ways of running the projections: cuBLAS's own choice, and cuBLASLt's algorithms
    // of one block per cluster (what an MPS client with a share of the SMs runs).
    for dir in std::iter::once(model_dir()).chain(extra) {
        for gemm_clusters in [true, false] {
            eprintln!("model {}, cuBLAS clusters {gemm_clusters}", dir.display());
            let cuda = CudaOptions {
                gemm_clusters,
                ..CudaOptions::from_env(0)
            };
            // The GPU rounds what it adds to the residual (o_proj, down) to bf16, as it
            // rounds every activation between ops; the CPU keeps f32 throughout. On an H100
            // the worst step was 3.9e-3 on the tiny model and 1.02e-2 on SmolLM2 (prompt of
            // 3, step 0; 1e-2 held before that rounding).
            cuda_matches_cpu_on(&dir, &cuda, 1.5e-2);
        }
    }
}

/// Qwen3's per-head q/k norms (the committed tiny Qwen3, its norms random, head_dim 32 apart
/// from hidden/heads, weights rounded to bf16 for both backends): the GPU's prefill and
/// decode steps against the CPU's, in f32 rows (decode sizes) and bf16 rows (the 150-token
/// prompt), with the norm kernel launched once a layer a forward.
#[test]
fn qwen3_head_norms_on_the_gpu_match_the_cpu() {
    if no_gpu() {
        return;
    }
    let dir = parity_support::bf16_copy("tiny-qwen3");
    let launches = cuda_matches_cpu_on(&dir, &CudaOptions::from_env(0), 1.5e-2);
    let norms = launches.get("head_rms_norm").copied().unwrap_or(0);
    let forwards = launches.get("embedding").copied().unwrap_or(0)
        + launches.get("embedding_bf16").copied().unwrap_or(0);
    assert!(forwards > 0, "no forward counted");
    assert_eq!(
        norms,
        2 * forwards,
        "two layers: one norm launch each a forward"
    );
}

/// The residual stream held in bf16 between layers (`residual_stream_bf16`): the same
/// comparison with the CPU, each residual add now rounding its sum to bf16 too, so a bound
/// twice the f32 stream's; and it runs (the bf16 embedding's launches counted), prefill-sized
/// (the 150-token prompt: o_proj and down written in bf16) and decode-sized (GEMV outputs in
/// f32). A wrong row or a stale value puts the logits off by their whole spread.
#[test]
fn residual_stream_in_bf16_stays_near_the_f32_stream() {
    if no_gpu() {
        return;
    }
    let extra = std::env::var_os("TANDEM_GPU_TEST_MODEL").map(PathBuf::from);
    for dir in std::iter::once(model_dir()).chain(extra) {
        eprintln!("model {}", dir.display());
        let cuda = CudaOptions {
            residual_stream_bf16: true,
            ..CudaOptions::from_env(0)
        };
        let launches = cuda_matches_cpu_on(&dir, &cuda, 3e-2);
        let embeddings = launches.get("embedding_bf16").copied().unwrap_or(0);
        assert!(embeddings > 0, "the bf16 embedding never ran");
        assert_eq!(launches.get("embedding").copied().unwrap_or(0), 0);
    }
}

/// The GPU model under `cuda` against the CPU along the CPU's greedy continuations of two
/// prompts: every step's logits within `bound` (relative L2) and its pick the CPU's or tied
/// with it within the step's noise. Returns the GPU's launches by op.
fn cuda_matches_cpu_on(
    dir: &std::path::Path,
    cuda: &CudaOptions,
    bound: f64,
) -> std::collections::HashMap<&'static str, u64> {
    let dir = dir.to_path_buf();
    let options = bf16_kv();
    let cpu = Model::load(
        &dir,
        CpuBackend::new(&CpuOptions::default()).unwrap(),
        &options,
    )
    .unwrap();
    let gpu = Model::load(&dir, CudaBackend::new(cuda).unwrap(), &options).unwrap();
    gpu.backend().count_launches(true);
    for prompt in [
        vec![1u32, 5, 9],
        (0..150).map(|i| (i * 7 + 3) % 200).collect(),
    ] {
        // The CPU's greedy continuation, then both models along it (decode steps replay CUDA
        // graphs on the GPU after the first two).
        let mut greedy = Vec::new();
        let mut c = logits_along(&cpu, &prompt, &[]);
        for _ in 0..24 {
            greedy.push(argmax(c.last().unwrap()) as u32);
            c = logits_along(&cpu, &prompt, &greedy);
        }
        let g = logits_along(&gpu, &prompt, &greedy[..24]);
        let worst = g
            .iter()
            .zip(&c)
            .map(|(gl, cl)| rel_l2(gl, cl))
            .fold(0f64, f64::max);
        eprintln!(
            "prompt of {}: worst relative L2 over {} steps {worst:.3e}",
            prompt.len(),
            g.len()
        );
        for (step, (gl, cl)) in g.iter().zip(&c).enumerate() {
            let l2 = rel_l2(gl, cl);
            assert!(
                l2 < bound,
                "prompt of {}, step {step}: relative L2 {l2:.3e}",
                prompt.len()
            );
            // The GPU's pick must be the CPU's, or tie with it within this step's own noise
            // (random weights give near-ties): its CPU logit at most 3x the step's measured
            // deviation (relative L2 times the logits' RMS, the typical error of one logit),
            // and at least 1% of the RMS, below. A wrong pick from a real fault (a wrong row,
            // a stale K/V) is off by the logits' spread, tens of times more.
            let (pick, best) = (argmax(gl), argmax(cl));
            let rms = (cl.iter().map(|x| x * x).sum::<f32>() / cl.len() as f32).sqrt();
            let tie = (3.0 * l2 as f32).max(0.01) * rms;
            assert!(
                cl[pick] >= cl[best] - tie,
                "prompt of {}, step {step}: GPU picks {pick} ({}), CPU {best} ({}), relative L2 {l2:.3e}, RMS {rms}",
                prompt.len(),
                cl[pick],
                cl[best]
            );
        }
    }
    gpu.backend().launch_counts()
}

/// The models the decode attention tests run on: `TANDEM_GPU_TEST_MODEL` (head dim 64 or 128)
/// and `TANDEM_GPU_TEST_MODEL_D128`, those set; `None` (the test skipped, saying why) without
/// a GPU or either.
fn decode_attention_models() -> Option<Vec<PathBuf>> {
    if no_gpu() {
        return None;
    }
    let dirs: Vec<PathBuf> = ["TANDEM_GPU_TEST_MODEL", "TANDEM_GPU_TEST_MODEL_D128"]
        .into_iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .collect();
    if dirs.is_empty() {
        skip("neither TANDEM_GPU_TEST_MODEL nor TANDEM_GPU_TEST_MODEL_D128 is set");
        return None;
    }
    Some(dirs)
}

/// The tensor-core decode attention (`decode_mma.cu`) and the vectorized kernel it replaces,
/// each against the CPU on the same weights: a decode batch of sequences whose contexts end
/// before, on and after a 64-key tile's edge and span up to a dozen tiles, in 64-token blocks,
/// so that the batch splits its contexts and the shortest sequences get empty splits. The
/// tensor-core kernel must be as close to the CPU as the vectorized one (within a quarter),
/// and both within `gpu_bench check`'s bound: bf16 weights and K/V put the GPU ~1e-2 from the
/// CPU on two Llama-3.1-8B layers of random weights whichever kernel runs (docs/benchmarks.md).
/// Runs on the model `TANDEM_GPU_TEST_MODEL` names (head dim 64 or 128), and on a second one
/// that `TANDEM_GPU_TEST_MODEL_D128` may name; skipped without either.
#[test]
fn decode_attention_on_tensor_cores_matches_the_cpu() {
    let Some(dirs) = decode_attention_models() else {
        return;
    };
    let options = bf16_kv();
    for dir in dirs {
        eprintln!("model {}", dir.display());
        let cpu = Model::load(
            &dir,
            CpuBackend::new(&CpuOptions::default()).unwrap(),
            &options,
        )
        .unwrap();
        let reference = decode_batch_logits(&cpu);
        let mut worst_of = Vec::new();
        for decode_mma in [true, false] {
            let backend = CudaBackend::new(&CudaOptions {
                decode_mma,
                ..CudaOptions::from_env(0)
            })
            .unwrap();
            let gpu = Model::load(&dir, backend, &options).unwrap();
            let got = decode_batch_logits(&gpu);
            assert_eq!(got.len(), reference.len());
            let mut worst = 0f64;
            for (step, (a, b)) in got.iter().zip(&reference).enumerate() {
                for (seq, (x, y)) in a.iter().zip(b).enumerate() {
                    let l2 = rel_l2(x, y);
                    worst = worst.max(l2);
                    assert!(
                        l2 < 2e-2,
                        "tensor cores {decode_mma}: step {step}, sequence {seq}: relative L2 {l2:.3e}"
                    );
                }
            }
            eprintln!("tensor cores {decode_mma}: worst relative L2 against the CPU {worst:.3e}");
            worst_of.push(worst);
        }
        let (mma, vectorized) = (worst_of[0], worst_of[1]);
        assert!(
            mma <= 1.25 * vectorized,
            "tensor cores {mma:.3e} against the CPU, the vectorized kernel {vectorized:.3e}"
        );
    }
}

/// The tensor-core decode kernels for caches of whole 64-key tiles (the GPU's default block
/// size) find a tile's block once; built with `DM_WHOLE_TILES=0` they look every key's block
/// up as the kernels for other block sizes do. Same keys, same order, same arithmetic: the
/// logits of decode steps over sequences that end inside, at and past a block's edge are the
/// same bits, over a bf16 and an FP8 cache. Runs on `TANDEM_GPU_TEST_MODEL` (and
/// `TANDEM_GPU_TEST_MODEL_D128`); skipped without either.
#[test]
fn decode_attention_over_whole_tiles_gives_the_bits_of_the_lookup_per_key() {
    let Some(dirs) = decode_attention_models() else {
        return;
    };
    for dir in dirs {
        for kv_dtype in [KvDType::Bf16, KvDType::Fp8] {
            let options = ModelOptions {
                kv_dtype: Some(kv_dtype),
                ..ModelOptions::default()
            };
            let logits = |defines: Vec<String>| {
                let backend = CudaBackend::new(&CudaOptions {
                    decode_mma: true,
                    kernel_defines: defines,
                    ..CudaOptions::from_env(0)
                })
                .unwrap();
                decode_batch_logits(&Model::load(&dir, backend, &options).unwrap())
            };
            let whole_tiles = logits(Vec::new());
            let per_key = logits(vec!["DM_WHOLE_TILES=0".to_owned()]);
            assert!(
                whole_tiles == per_key,
                "{} with a {kv_dtype:?} cache: the whole-tile kernel's logits differ",
                dir.display()
            );
            eprintln!("{} {kv_dtype:?}: bitwise equal", dir.display());
        }
    }
}

/// [`decode_batch_logits`] of the model in `dir` on the GPU over an FP8 cache with the
/// tensor-core decode attention, no context split (every decode launch is one the persistent
/// kernel takes), the persistent kernel on or off (`blocks`: its cap), and how many times the
/// persistent kernel ran.
fn unsplit_fp8_decode(
    dir: &std::path::Path,
    persistent: bool,
    blocks: Option<usize>,
) -> (Vec<Vec<Vec<f32>>>, u64) {
    let backend = CudaBackend::new(&CudaOptions {
        decode_mma: true,
        decode_persistent: persistent,
        decode_persistent_blocks: blocks,
        attn_split_keys: Some(1 << 20),
        ..CudaOptions::from_env(0)
    })
    .unwrap();
    let model = Model::load(dir, backend, &fp8_kv()).unwrap();
    model.backend().count_launches(true);
    let logits = decode_batch_logits(&model);
    let counts = model.backend().launch_counts();
    model.backend().count_launches(false);
    let launches = counts.get("paged_attention_warps").copied().unwrap_or(0);
    (logits, launches)
}

/// The persistent-warp decode attention over an FP8 cache (`decode_mma_warps.cu`: each warp
/// walks its (token, KV head) items alone, 16 keys at a time) against the per-item kernel on
/// the decode steps above with no context split: its sums run in another order, so within
/// 2e-2 (relative L2) of the per-item kernel's logits at every step and sequence, and no
/// further from the CPU's (same FP8 cache) than 1.25x the per-item kernel's worst; its blocks
/// capped at 3 (each warp walks several items) and at what the multiprocessors hold; and it
/// runs there (its launches counted), and not when it is off. Runs on `TANDEM_GPU_TEST_MODEL`
/// (and `TANDEM_GPU_TEST_MODEL_D128`); skipped without either.
#[test]
fn persistent_warp_fp8_decode_attention_matches_the_per_block_kernels() {
    let Some(dirs) = decode_attention_models() else {
        return;
    };
    for dir in dirs {
        let cpu = Model::load(
            &dir,
            CpuBackend::new(&CpuOptions::default()).unwrap(),
            &fp8_kv(),
        )
        .unwrap();
        let reference = decode_batch_logits(&cpu);
        let worst_against = |got: &[Vec<Vec<f32>>], want: &[Vec<Vec<f32>>]| {
            assert_eq!(got.len(), want.len());
            got.iter()
                .zip(want)
                .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| rel_l2(x, y)))
                .fold(0f64, f64::max)
        };
        let (per_item, none) = unsplit_fp8_decode(&dir, false, None);
        assert_eq!(
            none,
            0,
            "{}: warp launches while the persistent kernel is off",
            dir.display()
        );
        let per_item_from_cpu = worst_against(&per_item, &reference);
        for blocks in [Some(3), None] {
            let (logits, warps) = unsplit_fp8_decode(&dir, true, blocks);
            assert!(
                warps > 0,
                "{} (blocks {blocks:?}): the persistent warps never ran",
                dir.display()
            );
            let from_per_item = worst_against(&logits, &per_item);
            let from_cpu = worst_against(&logits, &reference);
            eprintln!(
                "{} blocks {blocks:?}: {warps} warp launches, worst relative L2 {from_per_item:.3e} \
                 from the per-item kernel, {from_cpu:.3e} from the CPU (per-item kernel \
                 {per_item_from_cpu:.3e})",
                dir.display()
            );
            assert!(
                from_per_item < 2e-2,
                "{}: {from_per_item:.3e}",
                dir.display()
            );
            assert!(
                from_cpu <= 1.25 * per_item_from_cpu,
                "{}: {from_cpu:.3e} from the CPU against the per-item kernel's {per_item_from_cpu:.3e}",
                dir.display()
            );
        }
    }
}

/// Logits of 8 decode steps of six sequences at once (prompts of 1, 63, 64, 65, 200 and 700
/// tokens, prefilled together; forced tokens), in 64-token blocks.
fn decode_batch_logits<B: Backend>(model: &Model<B>) -> Vec<Vec<Vec<f32>>> {
    const BLOCK: usize = 64;
    const BLOCKS_PER_SEQ: usize = 16;
    let lens = [1usize, 63, 64, 65, 200, 700];
    let mut kv = model
        .alloc_kv_cache(BLOCK, lens.len() * BLOCKS_PER_SEQ)
        .unwrap();
    let table = |i: usize| -> Vec<u32> {
        ((i * BLOCKS_PER_SEQ) as u32..((i + 1) * BLOCKS_PER_SEQ) as u32).collect()
    };
    let mut batch = ForwardBatch::default();
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            (0..n)
                .map(|j| ((j * 13 + i * 5 + 1) % 150) as u32)
                .collect()
        })
        .collect();
    for (i, prompt) in prompts.iter().enumerate() {
        batch.push(prompt, 0, table(i), false);
    }
    model.forward(&batch, &mut kv).unwrap();
    (0..8)
        .map(|step| {
            let mut batch = ForwardBatch::default();
            for (i, &n) in lens.iter().enumerate() {
                let token = ((step * 31 + i * 7 + 2) % 150) as u32;
                batch.push(&[token], n + step, table(i), true);
            }
            model.forward(&batch, &mut kv).unwrap()
        })
        .collect()
}

/// Row log-probabilities (prompt logprobs) of every row of a 150-token prompt (three groups
/// of 64 rows through the lm_head), and the top alternatives of each.
fn row_logprobs<B: Backend>(
    model: &Model<B>,
    prompt: &[u32],
    top_k: usize,
) -> Vec<tandem_workers::model::TokenLogprob> {
    let mut kv = model.alloc_kv_cache(16, 64).unwrap();
    let mut batch = ForwardBatch::default();
    batch.push(prompt, 0, (0..64).collect(), true);
    batch.want_row_logprobs(RowLogprobs {
        first: 0,
        targets: prompt[1..].to_vec(),
        top_k,
    });
    let mut out = tandem_workers::model::RowOutputs::default();
    let logits = model
        .forward_with_row_outputs(&batch, &mut kv, &mut out)
        .unwrap();
    assert_eq!(logits.len(), 1, "the last row's logits as well");
    assert_eq!(out.logprobs.len(), 1);
    out.logprobs.remove(0)
}

fn log_softmax(row: &[f32], token: usize) -> f64 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = row
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    row[token] as f64 - z
}

/// On the CPU, a prompt row's logprob is the log-softmax of the logits the same prefix gives
/// as a last row (the generation path): the rows' own gather, norm and lm_head agree with it.
#[test]
fn row_logprobs_equal_the_logits_of_each_prefix_on_the_cpu() {
    let cpu = Model::load(
        &model_dir(),
        CpuBackend::new(&CpuOptions::default()).unwrap(),
        &ModelOptions::default(),
    )
    .unwrap();
    let prompt: Vec<u32> = (0..150).map(|i| (i * 7 + 3) % 200).collect();
    let rows = row_logprobs(&cpu, &prompt, 3);
    assert_eq!(rows.len(), 149);
    for p in [0usize, 1, 63, 64, 65, 127, 128, 148] {
        let logits = logits_along(&cpu, &prompt[..p + 1], &[]);
        let expected = log_softmax(logits.last().unwrap(), prompt[p + 1] as usize);
        assert!(
            (rows[p].logprob as f64 - expected).abs() < 1e-4,
            "row {p}: {} vs {expected}",
            rows[p].logprob
        );
        let best = argmax(logits.last().unwrap()) as u32;
        assert_eq!(rows[p].top_logprobs.len(), 3);
        assert_eq!(rows[p].top_logprobs[0].0, best, "row {p}");
    }
}

/// The CUDA backend's row logprobs (its `gather_rows` over an uploaded index list, groups of
/// 64 rows) match the CPU's.
#[test]
fn cuda_row_logprobs_match_the_cpu() {
    if no_gpu() {
        return;
    }
    let options = bf16_kv();
    let cpu = Model::load(
        &model_dir(),
        CpuBackend::new(&CpuOptions::default()).unwrap(),
        &options,
    )
    .unwrap();
    let gpu = Model::load(
        &model_dir(),
        CudaBackend::new(&CudaOptions::from_env(0)).unwrap(),
        &options,
    )
    .unwrap();
    let prompt: Vec<u32> = (0..150).map(|i| (i * 11 + 5) % 200).collect();
    let c = row_logprobs(&cpu, &prompt, 2);
    let g = row_logprobs(&gpu, &prompt, 2);
    assert_eq!(g.len(), c.len());
    for (p, (g, c)) in g.iter().zip(&c).enumerate() {
        assert!(
            (g.logprob - c.logprob).abs() < 2e-2 * c.logprob.abs().max(1.0),
            "row {p}: GPU {} CPU {}",
            g.logprob,
            c.logprob
        );
        assert_eq!(g.top_logprobs.len(), 2);
    }
}

/// `worker generate --json` of the tiny model on `device` with `args` after the prompt; its
/// output token ids. This build's worker, or TANDEM_WORKER_BIN's on the device machine.
fn generated_ids(device: &str, max_tokens: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(tandem_test_kit::bin("worker"))
        .args(["generate", "--model"])
        .arg(model_dir())
        .args([
            "--prompt",
            "the sea and the sky",
            "--max-tokens",
            max_tokens,
        ])
        .args(["--json", "--device", device])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{device} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["output_ids"].clone()
}

#[test]
fn worker_generate_on_cuda_equals_cpu() {
    if no_gpu() {
        return;
    }
    assert_eq!(
        generated_ids("cuda:0", "24", &[]),
        generated_ids("cpu", "24", &[])
    );
}

/// Two tensor-parallel ranks on cuda:0 and cuda:1 (half the heads and MLP channels each,
/// summed over NCCL after each attention and MLP) generate what one GPU does, greedy and
/// drawn with a seed, and the CPU's greedy tokens, through the engine with device sampling
/// and overlapped steps. Needs two GPUs and libnccl; skipped otherwise.
#[test]
fn worker_generate_on_two_gpus_equals_one_gpu() {
    if no_gpu() {
        return;
    }
    let gpus = cudarc::driver::CudaContext::device_count().unwrap_or(0);
    let nccl = tandem_workers::backend::cuda::nccl_present();
    if gpus < 2 || !nccl {
        skip(format!(
            "needs two GPUs and libnccl: {gpus} GPU(s), NCCL present: {nccl}"
        ));
        return;
    }
    let run = |device: &str, ranks: &str, sampling: &[&str]| {
        generated_ids(
            device,
            "32",
            &[&["--tensor-parallel", ranks], sampling].concat(),
        )
    };
    let greedy: &[&str] = &[];
    let drawn: &[&str] = &["--temperature", "0.8", "--seed", "7"];
    let two = run("cuda:0", "2", greedy);
    assert_eq!(two, run("cuda:0", "1", greedy));
    assert_eq!(two, run("cpu", "1", greedy));
    // Draws: one GPU's against two (the CPU's logits differ from bf16 GPUs' in more than the
    // last bits, enough to move a draw that lands near a boundary).
    assert_eq!(run("cuda:0", "2", drawn), run("cuda:0", "1", drawn));
}

#[test]
fn a_missing_device_is_a_clear_error() {
    if no_gpu() {
        return;
    }
    let err = CudaBackend::new(&CudaOptions::from_env(99))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("cuda:99 does not exist"), "{err}");
}

/// Rows of a Llama-3 sized vocabulary: smooth random logits, a peaked one, one with many equal
/// values at the candidate boundary, one with fewer finite values than candidates.
fn sampling_rows(vocab: usize) -> Vec<Vec<f32>> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut rows = Vec::new();
    for scale in [1.0f32, 3.0, 8.0] {
        rows.push(
            (0..vocab)
                .map(|_| rng.random::<f32>() * scale * 4.0 - 2.0)
                .collect(),
        );
    }
    let mut peaked: Vec<f32> = (0..vocab).map(|_| rng.random::<f32>()).collect();
    peaked[777] = 30.0;
    peaked[vocab - 1] = 29.5;
    rows.push(peaked);
    // 428 equal logits where the 64th best falls: the lowest ids among them are kept.
    let mut ties: Vec<f32> = (0..vocab)
        .map(|i| if i % 300 == 0 { 1.5 } else { 0.25 })
        .collect();
    ties[10] = 4.0;
    rows.push(ties);
    let mut sparse = vec![f32::NEG_INFINITY; vocab];
    for i in [3usize, 99, 5000, vocab - 2] {
        sparse[i] = i as f32 * 1e-4;
    }
    rows.push(sparse);
    rows
}

#[test]
fn sampling_summaries_on_the_device_equal_the_host_reference() {
    use tandem_workers::sampler::device::{RowRequest, summarize_row};
    if no_gpu() {
        return;
    }
    let backend = CudaBackend::new(&CudaOptions::from_env(0)).unwrap();
    let vocab = 128_256;
    let rows = sampling_rows(vocab);
    let mut all_rows = Vec::new();
    let mut requests = Vec::new();
    for row in &rows {
        for (k, (temperature, candidates)) in
            [(0.0, false), (1.0, false), (0.7, true), (1e-3, true)]
                .iter()
                .enumerate()
        {
            all_rows.push(row.clone());
            requests.push(RowRequest {
                temperature: *temperature,
                uniform: (k as f64 * 0.29 + 0.13) % 1.0,
                candidates: *candidates,
                truncation: None,
            });
        }
    }
    let logits = backend.upload_rows(&all_rows).unwrap();
    let got = backend.summarize_rows(&logits, &requests).unwrap();
    for (i, ((row, request), got)) in all_rows.iter().zip(&requests).zip(&got).enumerate() {
        let want = summarize_row(row, request);
        let what = format!("row {i} ({request:?})");
        assert_eq!(got.non_finite, 0, "{what}");
        assert_eq!(
            (got.max_logit, got.argmax),
            (want.max_logit, want.argmax),
            "{what}"
        );
        assert!((got.sum_exp / want.sum_exp - 1.0).abs() < 1e-5, "{what}");
        assert!(
            (got.sum_exp_temperature / want.sum_exp_temperature - 1.0).abs() < 1e-5,
            "{what}"
        );
        assert_eq!(got.drawn, want.drawn, "{what}");
        assert_eq!(got.drawn_logit, want.drawn_logit, "{what}");
        match (&got.candidates, &want.candidates) {
            (Some(g), Some(w)) => assert_eq!(g, w, "{what}"),
            (None, None) => {}
            other => panic!("{what}: candidates {other:?}"),
        }
    }

    // More equal values at the boundary than the device collects: the host takes the row.
    let overflow: Vec<f32> = (0..vocab)
        .map(|i| if i % 3 == 0 { 1.5 } else { 0.25 })
        .collect();
    let logits = backend.upload_rows(&[overflow]).unwrap();
    let request = RowRequest {
        temperature: 1.0,
        uniform: 0.5,
        candidates: true,
        truncation: None,
    };
    let got = backend.summarize_rows(&logits, &[request]).unwrap();
    assert_eq!(got[0].candidates, None);

    // NaN rows are reported, not summarised.
    let mut bad = rows[0].clone();
    bad[5] = f32::NAN;
    bad[6] = f32::INFINITY;
    let logits = backend.upload_rows(&[bad]).unwrap();
    let got = backend.summarize_rows(&logits, &[request]).unwrap();
    assert_eq!(got[0].non_finite, 2);
}

/// Top-k, top-p and min-p drawn on the device (`sample_rank.cu`) pick what the host's sampler
/// picks from the full row with the same uniform: within the ranked head and past it (wide
/// nuclei of flat rows through buckets, top-k past the head, nearly flat rows and ties
/// overflowing a bucket through the key search), and in id order (min-p alone).
#[test]
fn truncated_draws_on_the_device_equal_the_host_sampler() {
    use rand::{RngExt, SeedableRng};
    use tandem_workers::sampler::device::{RowRequest, Truncation, summarize_row};
    if no_gpu() {
        return;
    }
    let backend = CudaBackend::new(&CudaOptions::from_env(0)).unwrap();
    let vocab = 128_256;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
    let mut rows = sampling_rows(vocab);
    // A language model's row: a few likely tokens over a long tail.
    let mut lm: Vec<f32> = (0..vocab)
        .map(|_| {
            let x: f32 = rng.random::<f32>();
            x * x * 8.0 - 4.0
        })
        .collect();
    for (i, id) in [17usize, 4242, 90_001, 128_000].iter().enumerate() {
        lm[*id] = 12.0 - i as f32;
    }
    rows.push(lm);
    // Nearly flat: every logit in the first bucket of (max - l) / T, too many to sort alone.
    rows.push(
        (0..vocab)
            .map(|_| 5.0 + rng.random::<f32>() * 0.01)
            .collect(),
    );
    // Ties far more than the head holds, where the 64th best falls.
    rows.push(
        (0..vocab)
            .map(|i| if i % 3 == 0 { 1.5 } else { 0.25 })
            .collect(),
    );
    let t = |top_k: u32, top_p: f32, min_p: f32| Truncation {
        top_k,
        top_p,
        min_p,
    };
    let truncations = [
        t(1, 1.0, 0.0),
        t(40, 1.0, 0.0),
        t(64, 1.0, 0.0),
        t(65, 1.0, 0.0),
        t(1000, 1.0, 0.0),
        t(0, 0.5, 0.0),
        t(0, 0.9, 0.0),
        t(0, 0.99, 0.0),
        t(0, 1.0, 0.05),
        t(0, 1.0, 0.6),
        t(200, 0.9, 0.02),
        t(40, 1.0, 0.1),
        t(0, 0.95, 0.01),
        t(vocab as u32 - 1, 1.0, 0.0),
    ];
    let mut all_rows = Vec::new();
    let mut requests = Vec::new();
    for row in &rows {
        for (j, truncation) in truncations.iter().enumerate() {
            for k in 0..3 {
                all_rows.push(row.clone());
                requests.push(RowRequest {
                    temperature: [0.7, 1.0, 1.3][(j + k) % 3],
                    uniform: rng.random::<f64>(),
                    candidates: false,
                    truncation: Some(*truncation),
                });
            }
        }
    }
    let logits = backend.upload_rows(&all_rows).unwrap();
    let got = backend.summarize_rows(&logits, &requests).unwrap();
    for (i, ((row, request), got)) in all_rows.iter().zip(&requests).zip(&got).enumerate() {
        let want = summarize_row(row, request);
        let what = format!("row {} ({request:?})", i / (3 * truncations.len()));
        assert_eq!(got.drawn, want.drawn, "{what}");
        assert_eq!(got.drawn_logit, want.drawn_logit, "{what}");
    }
}

/// The tiny model on the GPU with a bf16 KV cache (the layout of real transfers).
fn tiny_bf16_kv_on_the_gpu() -> Model<CudaBackend> {
    let gpu = CudaBackend::new(&CudaOptions::from_env(0)).unwrap();
    let options = bf16_kv();
    Model::load(&model_dir(), gpu, &options).unwrap()
}

/// The batched KV block copies (pinned staging, in chunks when a request is larger than the
/// staging buffer) move the same bytes as one-block copies, in the order asked for, and a
/// prompt's K/V written into another cache reproduces its logits.
#[test]
fn kv_blocks_round_trip_through_pinned_staging() {
    if no_gpu() {
        return;
    }
    let model = tiny_bf16_kv_on_the_gpu();
    let layout = model.kv_layout(16);
    let block_bytes = layout.block_bytes();
    // Enough blocks that one request spans several 64 MiB staging chunks.
    let num_blocks = ((160usize << 20) / block_bytes).max(8);
    let mut kv = model.alloc_kv_cache(16, num_blocks).unwrap();
    let backend = model.backend();
    let blocks: Vec<u32> = (0..num_blocks as u32).rev().collect();
    let bytes: Vec<u8> = (0..blocks.len() * block_bytes)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    backend
        .write_kv_blocks(&mut kv, &blocks, KvBytes::Host(&bytes))
        .unwrap();
    let mut back = vec![0u8; bytes.len()];
    backend
        .read_kv_blocks(&kv, &blocks, KvBytesMut::Host(&mut back))
        .unwrap();
    assert!(back == bytes, "batched write then read changed the bytes");
    // One-block reads see each block where the batched write put it.
    let mut one = vec![0u8; block_bytes];
    for (i, &b) in blocks.iter().enumerate().step_by(97) {
        backend.read_kv_block(&kv, b, &mut one).unwrap();
        assert!(
            one == bytes[i * block_bytes..(i + 1) * block_bytes],
            "block {b} differs"
        );
    }
    // A wrong length or a block outside the cache is refused.
    assert!(
        backend
            .read_kv_blocks(
                &kv,
                &blocks[..2],
                KvBytesMut::Host(&mut back[..block_bytes])
            )
            .is_err()
    );
    assert!(
        backend
            .write_kv_blocks(
                &mut kv,
                &[num_blocks as u32],
                KvBytes::Host(&bytes[..block_bytes])
            )
            .is_err()
    );

    // A prompt prefilled in one cache, its blocks copied into another cache's other blocks:
    // the next step's logits are the same.
    let prompt: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 200).collect();
    let mut source = model.alloc_kv_cache(16, 8).unwrap();
    let mut batch = ForwardBatch::default();
    batch.push(&prompt, 0, vec![0, 1, 2], false);
    model.forward(&batch, &mut source).unwrap();
    let mut staged = vec![0u8; 3 * block_bytes];
    backend
        .read_kv_blocks(&source, &[0, 1, 2], KvBytesMut::Host(&mut staged))
        .unwrap();
    let mut dest = model.alloc_kv_cache(16, 8).unwrap();
    backend
        .write_kv_blocks(&mut dest, &[5, 3, 6], KvBytes::Host(&staged))
        .unwrap();
    let next = |kv: &mut _, table: Vec<u32>| {
        let mut b = ForwardBatch::default();
        b.push(&[17], prompt.len(), table, true);
        model.forward(&b, kv).unwrap().remove(0)
    };
    let expected = next(&mut source, vec![0, 1, 2, 7]);
    let got = next(&mut dest, vec![5, 3, 6, 7]);
    assert_eq!(got, expected, "logits after the copied K/V differ");
}

/// A cache of 24 blocks of 16 tokens whose even blocks, in reverse order (`blocks`), hold
/// `bytes`, and whose odd blocks (`others`) are free to be written.
struct Filled {
    kv: tandem_workers::backend::cuda::CudaKvCache,
    block_bytes: usize,
    blocks: Vec<u32>,
    others: Vec<u32>,
    bytes: Vec<u8>,
}

fn filled_cache(model: &Model<CudaBackend>) -> Filled {
    let block_bytes = model.kv_layout(16).block_bytes();
    let num_blocks = 24;
    let mut kv = model.alloc_kv_cache(16, num_blocks).unwrap();
    let blocks: Vec<u32> = (0..num_blocks as u32).step_by(2).rev().collect();
    let others: Vec<u32> = (1..num_blocks as u32).step_by(2).collect();
    let bytes: Vec<u8> = (0..blocks.len() * block_bytes)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    model
        .backend()
        .write_kv_blocks(&mut kv, &blocks, KvBytes::Host(&bytes))
        .unwrap();
    Filled {
        kv,
        block_bytes,
        blocks,
        others,
        bytes,
    }
}

/// Host memory pinned in place (the transfer pool's role) is copied to and from directly,
/// and the bytes are those of the staged path.
#[test]
fn kv_blocks_copy_straight_into_and_out_of_pinned_host_memory() {
    if no_gpu() {
        return;
    }
    let model = tiny_bf16_kv_on_the_gpu();
    let backend = model.backend();
    let Filled {
        mut kv,
        block_bytes,
        blocks,
        others,
        bytes,
    } = filled_cache(&model);

    // A region pinned in place (the transfer pool's role), with the transfer's slice at an
    // offset inside it; kept for the rest of the process, as the pool is.
    let region: &'static mut [u8] =
        Box::leak(vec![0u8; (blocks.len() + 3) * block_bytes].into_boxed_slice());
    let range = tandem_workers::backend::HostRange {
        ptr: region.as_mut_ptr(),
        len: region.len(),
    };
    // SAFETY: leaked above, so mapped until the process exits.
    assert!(unsafe { backend.pin_host_memory(range) }.unwrap());
    let slice = &mut region[block_bytes + 100..block_bytes + 100 + bytes.len()];
    backend
        .read_kv_blocks(&kv, &blocks, KvBytesMut::Host(&mut *slice))
        .unwrap();
    assert!(
        *slice == bytes[..],
        "direct read from pinned memory differs"
    );

    // Written back from pinned memory into other blocks: a staged read sees the same bytes.
    backend
        .write_kv_blocks(&mut kv, &others, KvBytes::Host(slice))
        .unwrap();
    let mut staged = vec![0u8; bytes.len()];
    backend
        .read_kv_blocks(&kv, &others, KvBytesMut::Host(&mut staged))
        .unwrap();
    assert!(staged == bytes, "direct write from pinned memory differs");
}

/// A prompt's blocks through two CUDA IPC pools, never leaving device memory: copied out of
/// the cache into a pool-slice export (one kernel; workers export in place instead, next test),
/// pulled into the reader's pool, written into other blocks; the bytes arrive unchanged.
/// Handles of another host or outside the allocation (the one they announce, or the one
/// actually mapped) are refused, and a full pool says so. The export's seal: checked after the copy,
/// cleared when the export is freed, so a pull of a freed export, or of one whose slice holds
/// the next export's K/V, fails instead of handing that K/V on.
/// What a CUDA IPC pull holds, as the cache reads it back: written into `blocks` of `kv`,
/// then read to the host (`len` bytes).
fn through_cache(
    backend: &CudaBackend,
    kv: &mut <CudaBackend as Backend>::KvCache,
    blocks: &[u32],
    pulled: &tandem_workers::transfer::PulledKv,
    len: usize,
) -> Vec<u8> {
    let KvBytes::Device(range) = pulled.bytes() else {
        panic!("a CUDA IPC pull is device memory");
    };
    backend
        .write_kv_blocks(kv, blocks, KvBytes::Device(range))
        .unwrap();
    let mut back = vec![0u8; len];
    backend
        .read_kv_blocks(kv, blocks, KvBytesMut::Host(&mut back))
        .unwrap();
    back
}

#[test]
fn kv_blocks_move_through_cuda_ipc_pools_device_to_device() {
    use tandem_workers::transfer::cuda_ipc::CudaIpcTransport;
    use tandem_workers::transfer::{KvTransport, RemoteKv, RemoteMemory, TransferError};

    if no_gpu() {
        return;
    }
    let model = tiny_bf16_kv_on_the_gpu();
    let backend = model.backend();
    let Filled {
        mut kv,
        block_bytes,
        blocks,
        others,
        bytes,
    } = filled_cache(&model);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let len = bytes.len();
    // Room for one export (and its seal) after a first slice, so the export sits at an
    // offset.
    let exporter = CudaIpcTransport::start(0, 2 * len + 8192, "this-host".into()).unwrap();
    let first = runtime.block_on(exporter.reserve(4096)).unwrap();
    let mut export = runtime.block_on(exporter.reserve(len)).unwrap();
    let KvBytesMut::Device(range) = export.bytes_mut() else {
        panic!("a CUDA IPC export is device memory");
    };
    backend
        .read_kv_blocks(&kv, &blocks, KvBytesMut::Device(range))
        .unwrap();
    let exported = export.finish().unwrap();
    assert!(
        exported.addr() >= 4096,
        "the export is a slice at an offset"
    );
    let seal = exported.seal.expect("a CUDA IPC export is sealed");
    assert_eq!(
        seal.addr,
        exported.addr() + len as u64,
        "the seal follows the K/V"
    );
    let RemoteMemory::CudaIpc(sources) = exported.memory.clone() else {
        panic!("the export describes its allocation");
    };
    let [source] = &sources[..] else {
        panic!("one allocation")
    };
    assert_eq!(source.alloc_bytes as usize, 2 * len + 8192);
    assert!(
        matches!(
            runtime.block_on(exporter.reserve(len + 8192)),
            Err(TransferError::Unavailable(_))
        ),
        "a full pool refuses the export"
    );

    let puller = CudaIpcTransport::start(0, len, "this-host".into()).unwrap();
    let remote = RemoteKv {
        memory: RemoteMemory::CudaIpc(vec![source.clone()]),
        regions: (0..blocks.len() as u64)
            .map(|i| (exported.addr() + i * block_bytes as u64, block_bytes as u64))
            .collect(),
        seal: Some(seal),
    };
    let pull = |remote: RemoteKv| {
        runtime.block_on(puller.pull(remote, std::time::Duration::from_secs(10)))
    };
    let pulled = pull(remote.clone()).unwrap();
    assert!(pulled.is_lent(), "the pull reads into the reader's pool");
    let back = through_cache(backend, &mut kv, &others, &pulled, len);
    assert!(
        back == bytes,
        "the K/V changed on its way through the pools"
    );
    // The pool is lent out: a second pull gets device memory of its own, same bytes.
    let second = pull(remote.clone()).unwrap();
    assert!(!second.is_lent());
    // `first` stays: the export's slice, once freed, is then the first that fits.
    drop((pulled, second));

    let mut elsewhere = remote.clone();
    elsewhere.memory = RemoteMemory::CudaIpc(vec![tandem_workers::transfer::CudaIpcSource {
        host_id: "another-host".into(),
        ..source.clone()
    }]);
    let err = pull(elsewhere).unwrap_err().to_string();
    assert!(err.contains("another host"), "{err}");
    let mut outside = remote.clone();
    outside.regions = vec![(source.alloc_bytes - 16, 32)];
    let err = pull(outside).unwrap_err().to_string();
    assert!(err.contains("outside the exported allocation"), "{err}");
    // A handle that overstates its allocation reaches no further: the reader bounds the
    // regions by the size of the memory it mapped, not by the handle's word.
    let mut overstated = remote.clone();
    overstated.memory = RemoteMemory::CudaIpc(vec![tandem_workers::transfer::CudaIpcSource {
        alloc_bytes: 1 << 40,
        ..source.clone()
    }]);
    overstated.regions = vec![(source.alloc_bytes - 16, 32)];
    let err = pull(overstated).unwrap_err().to_string();
    assert!(err.contains("outside the memory the handle maps"), "{err}");

    // A seal that holds another nonce: the memory is another export's now. Nothing read is
    // handed out.
    let mut other = remote.clone();
    if let Some(seal) = &mut other.seal {
        seal.nonce[0] ^= 0xff;
    }
    let err = pull(other).unwrap_err();
    assert!(
        matches!(err, TransferError::ExportGone(_)) && err.to_string().contains("another"),
        "{err}"
    );
    // Freed: the seal is cleared (on the device, synchronized) before the slice goes back,
    // so the export's own handle reads as gone.
    drop(exported);
    let err = pull(remote.clone()).unwrap_err();
    assert!(
        matches!(err, TransferError::ExportGone(_)) && err.to_string().contains("cleared"),
        "{err}"
    );
    // Reused: the next export of that size lands in the freed slice. Checked, the old
    // handle is refused; read unchecked, its regions hold the new export's K/V.
    let different: Vec<u8> = bytes.iter().map(|b| b ^ 0x5a).collect();
    backend
        .write_kv_blocks(&mut kv, &others, KvBytes::Host(&different))
        .unwrap();
    let mut reused = runtime.block_on(exporter.reserve(len)).unwrap();
    let KvBytesMut::Device(range) = reused.bytes_mut() else {
        panic!("a CUDA IPC export is device memory");
    };
    backend
        .read_kv_blocks(&kv, &others, KvBytesMut::Device(range))
        .unwrap();
    let reused = reused.finish().unwrap();
    assert_eq!(
        reused.addr(),
        remote.regions[0].0,
        "the freed slice is reused"
    );
    let err = pull(remote.clone()).unwrap_err();
    assert!(
        matches!(err, TransferError::ExportGone(_)) && err.to_string().contains("another"),
        "{err}"
    );
    let unchecked = pull(RemoteKv {
        seal: None,
        ..remote.clone()
    })
    .unwrap();
    let back = through_cache(backend, &mut kv, &blocks, &unchecked, len);
    assert!(
        back == different,
        "what the seal keeps out: the old handle's regions hold the new export's K/V"
    );
    drop((unchecked, reused, first));
}

/// The hand-over without copies on the GPU: the CUDA backend's cache is one
/// `cuMemAlloc` allocation that CUDA IPC can share, so a transport without any pool exposes it
/// once and an export is the prompt's blocks where they lie, one region per block, its seal in
/// the cache's export slab. A reader gathers the blocks into its own memory, device to device,
/// and they arrive unchanged; dropping the export clears its seal before the blocks are
/// unpinned, and a later export in the same slot carries another nonce. Slot 0 of the slab is
/// the exporter's liveness word, rewritten every second until the exposure is dropped.
#[test]
fn kv_blocks_are_read_in_place_out_of_a_cache_shared_over_cuda_ipc() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tandem_workers::backend::KvMemory;
    use tandem_workers::transfer::cuda_ipc::CudaIpcTransport;
    use tandem_workers::transfer::ipc_liveness;
    use tandem_workers::transfer::{KvTransport, RemoteKv, RemoteMemory, TransferError};

    struct Unpinned(Arc<AtomicUsize>);
    impl Drop for Unpinned {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    if no_gpu() {
        return;
    }
    let model = tiny_bf16_kv_on_the_gpu();
    let backend = model.backend();
    let Filled {
        mut kv,
        block_bytes,
        blocks,
        others,
        bytes,
    } = filled_cache(&model);
    let memory = backend
        .kv_cache_memory(&kv)
        .expect("a CUDA cache describes itself");
    let KvMemory::Device(range) = memory.memory else {
        panic!("a CUDA cache is device memory");
    };
    assert_eq!(memory.num_blocks, 24);
    assert_eq!(
        memory.slab_offset,
        25 * block_bytes,
        "after the scratch block"
    );
    assert!(range.len >= memory.slab_offset + memory.slab_bytes());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let exporter = CudaIpcTransport::start(0, 0, "this-host".into()).unwrap();
    // SAFETY: `kv` outlives the exposed cache (dropped before it below).
    let exposed = runtime
        .block_on(unsafe { exporter.expose_cache(memory, Box::new(())) })
        .unwrap()
        .expect("CUDA IPC shares a device cache");
    let unpinned = Arc::new(AtomicUsize::new(0));
    let exported = exposed
        .export(&blocks, Box::new(Unpinned(Arc::clone(&unpinned))))
        .unwrap();
    let RemoteMemory::CudaIpc(sources) = exported.memory.clone() else {
        panic!("the export names the cache's IPC handle");
    };
    let [source] = &sources[..] else {
        panic!("one allocation")
    };
    assert_eq!(source.alloc_bytes as usize, range.len, "the whole cache");
    assert_eq!(
        exported.regions[0],
        (blocks[0] as u64 * block_bytes as u64, block_bytes as u64),
        "block offsets in the cache"
    );
    let seal = exported.seal.expect("sealed");
    assert_eq!(
        seal.addr as usize,
        memory.slot_offset(1),
        "slot 0 holds the liveness word"
    );
    assert_eq!(source.liveness_offset, Some(memory.slot_offset(0) as u64));
    // The exporter rewrites its liveness word every second while it runs.
    let liveness = |what: &str| {
        backend.context().bind_to_thread().unwrap();
        let mut word = [0u8; ipc_liveness::WORD_BYTES];
        // SAFETY: the slot lies inside the cache allocation, alive until `kv` is dropped.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_sync(
                &mut word,
                range.ptr + memory.slot_offset(0) as u64,
            )
        }
        .unwrap();
        let count = u64::from_le_bytes(word[..8].try_into().unwrap());
        assert_eq!(word, ipc_liveness::word(count), "{what}: a liveness word");
        count
    };
    let first = liveness("at the exposure");
    std::thread::sleep(ipc_liveness::LIVENESS_PERIOD + std::time::Duration::from_millis(500));
    assert!(liveness("a period later") > first, "the word moves");

    let puller = CudaIpcTransport::start(0, bytes.len(), "this-host".into()).unwrap();
    let remote = RemoteKv {
        memory: exported.memory.clone(),
        regions: exported.regions.clone(),
        seal: Some(seal),
    };
    let pull = |remote: RemoteKv| {
        runtime.block_on(puller.pull(remote, std::time::Duration::from_secs(10)))
    };
    let pulled = pull(remote.clone()).unwrap();
    let back = through_cache(backend, &mut kv, &others, &pulled, bytes.len());
    assert!(back == bytes, "the K/V changed on its way out of the cache");
    drop(pulled);
    assert_eq!(unpinned.load(Ordering::SeqCst), 0, "pinned while exported");

    drop(exported);
    assert_eq!(
        unpinned.load(Ordering::SeqCst),
        1,
        "unpinned once the seal is clear"
    );
    let err = pull(remote.clone()).unwrap_err();
    assert!(
        matches!(err, TransferError::ExportGone(_)) && err.to_string().contains("cleared"),
        "{err}"
    );
    let again = exposed.export(&blocks, Box::new(())).unwrap();
    assert_eq!(again.seal.unwrap().addr, seal.addr, "the slot is reused");
    let err = pull(remote).unwrap_err();
    assert!(err.to_string().contains("another"), "{err}");
    drop((again, exposed));
    // Dropping the exposure stops the writer: the word stays still from then on.
    let last = liveness("once the exposure is dropped");
    std::thread::sleep(ipc_liveness::LIVENESS_PERIOD + std::time::Duration::from_millis(500));
    assert_eq!(
        liveness("a period after the drop"),
        last,
        "nothing writes it"
    );
    drop(kv);
}

/// A tensor-parallel group's cache as its ranks hold it: rank `r` of `ranks` keeps KV heads
/// `r*H/ranks ..` of every row (a token's K or V of one layer) of every block.
fn shard_rows(whole: &[u8], whole_row: usize, ranks: usize) -> Vec<Vec<u8>> {
    let part = whole_row / ranks;
    (0..ranks)
        .map(|r| {
            whole
                .chunks_exact(whole_row)
                .flat_map(|row| row[r * part..(r + 1) * part].to_vec())
                .collect()
        })
        .collect()
}

/// CUDA IPC between tensor-parallel groups: a context worker's ranks share their caches (one
/// IPC handle each) and a decode worker of another tensor-parallel size copies the blocks
/// straight into the blocks it reserved, the heads re-laid on the way (2 ranks to 1, 1 to 2,
/// 2 to 2 and 1 to 1). On a machine with two GPUs the ranks sit on both, and the copies cross
/// them. What lands in each destination rank is exactly its heads of every block; a cleared
/// seal fails the pull.
#[test]
fn kv_blocks_move_between_tensor_parallel_splits_straight_into_the_cache_over_cuda_ipc() {
    use tandem_workers::backend::{DeviceRange, KvCacheMemory, KvMemory};
    use tandem_workers::kv_cache::KvLayout;
    use tandem_workers::transfer::cuda_ipc::{CacheBlocks, CudaIpcTransport};
    use tandem_workers::transfer::{RemoteKv, TransferError};

    if no_gpu() {
        return;
    }
    // Held for the whole test: a primary context whose last holder lets go is destroyed, and
    // the allocations made in it with it.
    let contexts: Vec<_> = (0..cudarc::driver::CudaContext::device_count().unwrap().min(2))
        .map(|g| cudarc::driver::CudaContext::new(g as usize).unwrap())
        .collect();
    let gpus = contexts.len();
    eprintln!(
        "{gpus} GPU(s) used: ranks on {}",
        if gpus > 1 {
            "cuda:0 and cuda:1"
        } else {
            "cuda:0"
        }
    );
    let layout = KvLayout {
        num_layers: 3,
        num_kv_heads: 4,
        head_dim: 64,
        block_size: 16,
        dtype: KvDType::Bf16,
    };
    let whole_row = layout.num_kv_heads * layout.head_dim * 2;
    let capacity = 12usize;
    // A cache of `ranks` parts on the GPUs from `first`, each holding `whole`'s blocks at
    // `ids` (or zeros), its export slab after the blocks.
    let allocate = |ranks: usize, first: usize, whole: Option<&[u8]>, ids: &[u32]| {
        let block = layout.block_bytes() / ranks;
        let len = capacity * block + capacity * 16;
        (0..ranks)
            .map(|r| {
                let ordinal = (first + r) % gpus;
                contexts[ordinal].bind_to_thread().unwrap();
                let mut host = vec![0u8; len];
                if let Some(whole) = whole {
                    let parts = shard_rows(whole, whole_row, ranks);
                    for (i, &id) in ids.iter().enumerate() {
                        host[id as usize * block..][..block]
                            .copy_from_slice(&parts[r][i * block..][..block]);
                    }
                }
                // SAFETY: a plain allocation, written at once, freed at the end of the test.
                let ptr = unsafe { cudarc::driver::result::malloc_sync(len) }.unwrap();
                unsafe { cudarc::driver::result::memcpy_htod_sync(ptr, &host) }.unwrap();
                (
                    ordinal,
                    KvCacheMemory {
                        memory: KvMemory::Device(DeviceRange { ptr, len }),
                        block_bytes: block,
                        num_blocks: capacity,
                        slab_offset: capacity * block,
                    },
                )
            })
            .collect::<Vec<_>>()
    };
    let read_back = |part: &(usize, KvCacheMemory)| {
        let KvMemory::Device(range) = part.1.memory else {
            unreachable!()
        };
        contexts[part.0].bind_to_thread().unwrap();
        let mut host = vec![0u8; range.len];
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut host, range.ptr) }.unwrap();
        host
    };
    let transport = |parts: &[(usize, KvCacheMemory)]| {
        let ordinals: Vec<usize> = parts.iter().map(|p| p.0).collect();
        CudaIpcTransport::start_group(&ordinals, "this-host".into()).unwrap()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let whole: Vec<u8> = (0..5 * layout.block_bytes())
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8)
        .collect();
    let (src_ids, dst_ids) = ([2u32, 3, 4, 9, 0], [7u32, 8, 1, 2, 3]);
    for (n, m) in [(2, 1), (1, 2), (2, 2), (1, 1)] {
        let source = allocate(n, 0, Some(&whole), &src_ids);
        // The destination starts on the other GPU, where there are two.
        let dest = allocate(m, 1, None, &[]);
        let exporter = transport(&source);
        // SAFETY: the allocations outlive the exposure (freed after it is dropped).
        let exposed =
            unsafe { exporter.expose_ranks(source.iter().map(|p| p.1).collect(), Box::new(())) }
                .unwrap();
        let exported = exposed.export(&src_ids, Box::new(())).unwrap();
        let remote = RemoteKv {
            memory: exported.memory.clone(),
            regions: exported.regions.clone(),
            seal: exported.seal,
        };
        let puller = transport(&dest);
        let into = CacheBlocks {
            layout,
            shards: dest.iter().map(|p| p.1).collect(),
            blocks: dst_ids.to_vec(),
        };
        let started = std::time::Instant::now();
        // SAFETY: `dest` is ours, its blocks touched by nothing else.
        let moved = runtime
            .block_on(unsafe { puller.pull_into_cache(remote.clone(), into.clone()) })
            .unwrap();
        eprintln!("{n} ranks to {m}: {moved} bytes in {:?}", started.elapsed());
        assert_eq!(moved as usize, whole.len(), "{n} to {m}: every byte once");
        let expected = shard_rows(&whole, whole_row, m);
        let block = layout.block_bytes() / m;
        for (r, part) in dest.iter().enumerate() {
            let got = read_back(part);
            for (i, &id) in dst_ids.iter().enumerate() {
                assert!(
                    got[id as usize * block..][..block] == expected[r][i * block..][..block],
                    "{n} ranks to {m}: rank {r}, block {i} (id {id}) differs"
                );
            }
            let untouched: Vec<usize> = (0..capacity)
                .filter(|b| !dst_ids.contains(&(*b as u32)))
                .collect();
            assert!(
                untouched
                    .iter()
                    .all(|&b| got[b * block..][..block].iter().all(|&x| x == 0)),
                "{n} ranks to {m}: only the reserved blocks are written"
            );
        }
        drop(exported);
        let err = runtime
            .block_on(unsafe { puller.pull_into_cache(remote, into) })
            .unwrap_err();
        assert!(matches!(err, TransferError::ExportGone(_)), "{err}");
        drop(exposed);
        for (ordinal, part) in source.iter().chain(&dest) {
            let KvMemory::Device(range) = part.memory else {
                unreachable!()
            };
            contexts[*ordinal].bind_to_thread().unwrap();
            unsafe { cudarc::driver::result::free_sync(range.ptr) }.unwrap();
        }
    }
}

/// Greedy tokens of `prompts` through one CUDA engine that runs up to `max_seqs` of them at
/// once, in the order of `prompts`.
fn cuda_engine_greedy(prompts: &[Vec<u32>], max_seqs: usize, new_tokens: usize) -> Vec<Vec<u32>> {
    let run = EngineRun {
        max_seqs,
        overlap: true,
        graphs: true,
        all_at_once: false,
    };
    let greedy = |_| tandem_workers::sampler::SamplingParams::greedy();
    cuda_engine_tokens(prompts, run, |_| new_tokens, greedy).0
}

/// How [`cuda_engine_tokens`] runs its requests.
#[derive(Clone, Copy)]
struct EngineRun {
    /// Sequences a batch holds.
    max_seqs: usize,
    /// Steps overlapped (`Engine::set_overlap`).
    overlap: bool,
    /// Decode steps replayed from CUDA graphs.
    graphs: bool,
    /// Every request queued at once (admitted as others end: batches mixing prefills and
    /// decodes), or `max_seqs` at a time, each group run to its end.
    all_at_once: bool,
}

/// Every request's tokens through an engine on the GPU, request `i` generating
/// `max_tokens(i)` tokens sampled as `sampling(i)`; and how many steps were overlapped.
fn cuda_engine_tokens(
    prompts: &[Vec<u32>],
    run: EngineRun,
    max_tokens: impl Fn(usize) -> usize,
    sampling: impl Fn(usize) -> tandem_workers::sampler::SamplingParams,
) -> (Vec<Vec<u32>>, u64) {
    let (tokens, overlapped, _) =
        cuda_engine_tokens_predicted(prompts, run, max_tokens, sampling, &[], true);
    (tokens, overlapped)
}

/// [`cuda_engine_tokens`] with request `i` predicting `predictions[i]` (none past the list's
/// end), sampling on the device or from host rows; also the engine's progress.
fn cuda_engine_tokens_predicted(
    prompts: &[Vec<u32>],
    run: EngineRun,
    max_tokens: impl Fn(usize) -> usize,
    sampling: impl Fn(usize) -> tandem_workers::sampler::SamplingParams,
    predictions: &[Vec<u32>],
    device_sampling: bool,
) -> (Vec<Vec<u32>>, u64, tandem_workers::engine::EngineProgress) {
    use tandem_workers::engine::{Engine, EngineConfig, EventKind, GenerationRequest, ModelRunner};
    let options = CudaOptions {
        cuda_graphs: run.graphs,
        device_sampling,
        ..CudaOptions::from_env(0)
    };
    let gpu = CudaBackend::new(&options).unwrap();
    let model = Model::load(&model_dir(), gpu, &ModelOptions::default()).unwrap();
    let longest = (0..prompts.len())
        .map(|i| prompts[i].len() + max_tokens(i))
        .max()
        .unwrap_or(0);
    let config = EngineConfig {
        block_size: 16,
        num_blocks: run.max_seqs * longest.div_ceil(16),
        max_num_batched_tokens: 8192,
        max_num_seqs: run.max_seqs,
        max_model_len: None,
        growth_reserve_tokens: Some(tandem_workers::engine::DEFAULT_GROWTH_RESERVE_TOKENS),
        prefix_caching: true,
        ..EngineConfig::default()
    };
    let runner = ModelRunner::new(model, config.block_size, config.num_blocks).unwrap();
    let mut engine = Engine::new(runner, config, None).unwrap();
    engine.set_overlap(run.overlap);
    let mut tokens = vec![Vec::new(); prompts.len()];
    let mut ids = std::collections::HashMap::new();
    let mut run_all = |engine: &mut Engine<_>, ids: &mut std::collections::HashMap<_, usize>| {
        while engine.has_work() {
            for ev in engine.step() {
                match ev.kind {
                    EventKind::Token { id, .. } => tokens[ids[&ev.request_id]].push(id),
                    EventKind::Finished { reason, .. } => assert_eq!(
                        reason,
                        tandem_workers::engine::FinishReason::Length,
                        "request {} ended early",
                        ids[&ev.request_id]
                    ),
                    EventKind::RoomReserved { .. } => panic!("room reserved for a plain request"),
                    EventKind::PromptLogprobs { .. } => panic!("prompt logprobs not asked for"),
                    EventKind::Hidden { .. } => panic!("a hidden state not asked for"),
                }
            }
        }
    };
    let group = if run.all_at_once {
        prompts.len()
    } else {
        run.max_seqs
    };
    for chunk in (0..prompts.len()).collect::<Vec<_>>().chunks(group) {
        for &i in chunk {
            let request = GenerationRequest {
                // Random weights: EOS may come early; the comparison wants every token.
                ignore_eos: true,
                sampling: sampling(i),
                prediction: predictions.get(i).cloned().unwrap_or_default(),
                ..GenerationRequest::greedy(prompts[i].clone(), max_tokens(i))
            };
            ids.insert(engine.add_request(request).unwrap(), i);
        }
        run_all(&mut engine, &mut ids);
    }
    (tokens, engine.steps_overlapped(), engine.progress())
}

/// Predictions on the GPU: each request predicting its own tokens verifies drafts of up to 8
/// in one-token decodes over its blocks, sampled from device summaries (and, to compare, from
/// host rows), and gets the tokens it gets without a prediction; greedy and seeded, batched.
#[test]
fn predicted_tokens_are_the_tokens_without_a_prediction_on_the_gpu() {
    use tandem_workers::sampler::SamplingParams;
    if no_gpu() {
        return;
    }
    let prompts: Vec<Vec<u32>> = (0..12)
        .map(|s: usize| {
            let len = 3 + (s * 11) % 30;
            (0..len)
                .map(|i| ((i * 13 + s * 41 + 7) % 512) as u32)
                .collect()
        })
        .collect();
    let sampling = |i: usize| match i % 2 {
        0 => SamplingParams::greedy(),
        _ => SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            seed: Some(i as u64),
            ..SamplingParams::default()
        },
    };
    let max_tokens = |i: usize| 24 + i % 5;
    let run = EngineRun {
        max_seqs: 4,
        overlap: true,
        graphs: true,
        all_at_once: true,
    };
    let (plain, _, none) =
        cuda_engine_tokens_predicted(&prompts, run, max_tokens, sampling, &[], true);
    assert_eq!(none.draft_tokens, 0);
    for device_sampling in [true, false] {
        let (predicted, _, progress) = cuda_engine_tokens_predicted(
            &prompts,
            run,
            max_tokens,
            sampling,
            &plain,
            device_sampling,
        );
        let differing: Vec<usize> = (0..prompts.len())
            .filter(|&i| predicted[i] != plain[i])
            .collect();
        assert!(
            differing.is_empty(),
            "device sampling {device_sampling}: {differing:?} differ, first {:?} vs {:?}",
            differing.first().map(|&i| &predicted[i]),
            differing.first().map(|&i| &plain[i]),
        );
        assert!(
            progress.accepted_draft_tokens * 10 > progress.draft_tokens * 9,
            "device sampling {device_sampling}: {progress:?}"
        );
        eprintln!("device sampling {device_sampling}: {progress:?}");
    }
}

/// Steps queued before the previous one is collected (their decodes' tokens written on the
/// device from the previous step's sampling summaries, `chain_tokens`) give every request
/// the tokens of steps run one at a time: greedy, seeded draws over the whole vocabulary,
/// and top-p requests that the host decides (a batch holding one is not overlapped); decode
/// batches replayed from CUDA graphs and run eagerly, and batches mixing prefills with
/// chained decodes.
#[test]
fn overlapped_steps_give_the_tokens_of_steps_run_one_at_a_time() {
    use tandem_workers::sampler::SamplingParams;
    if no_gpu() {
        return;
    }
    let prompts: Vec<Vec<u32>> = (0..96)
        .map(|s: usize| {
            let len = 1 + (s * 29) % 40;
            (0..len)
                .map(|i| ((i * 17 + s * 53 + 3) % 512) as u32)
                .collect()
        })
        .collect();
    let sampling = |i: usize| match i % 3 {
        0 => SamplingParams::greedy(),
        1 => SamplingParams {
            temperature: 1.0,
            seed: Some(i as u64),
            ..SamplingParams::default()
        },
        _ if i < 48 => SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            seed: Some(i as u64),
            ..SamplingParams::default()
        },
        _ => SamplingParams {
            temperature: 0.7,
            seed: Some(i as u64),
            ..SamplingParams::default()
        },
    };
    let max_tokens = |i: usize| 12 + (i * 7) % 17;
    for (graphs, all_at_once) in [(true, false), (false, false), (true, true)] {
        let run = |overlap| EngineRun {
            max_seqs: 32,
            overlap,
            graphs,
            all_at_once,
        };
        let (one_at_a_time, none) = cuda_engine_tokens(&prompts, run(false), max_tokens, sampling);
        let (overlapped, steps) = cuda_engine_tokens(&prompts, run(true), max_tokens, sampling);
        let case = format!("graphs {graphs}, all at once {all_at_once}");
        assert_eq!(none, 0);
        assert!(steps > 10, "{case}: only {steps} steps overlapped");
        let differing: Vec<usize> = (0..prompts.len())
            .filter(|&i| overlapped[i] != one_at_a_time[i])
            .collect();
        assert!(
            differing.is_empty(),
            "{case}: {} of {} requests differ, first {:?}: {:?} vs {:?}",
            differing.len(),
            prompts.len(),
            differing.first(),
            differing.first().map(|&i| &overlapped[i]),
            differing.first().map(|&i| &one_at_a_time[i]),
        );
    }
}

/// Batches past the largest CUDA-graph size and up to 512 sequences: every request's greedy
/// tokens equal those of the same request run alone (256 sequences once faulted).
#[test]
fn batches_of_256_and_512_sequences_give_each_request_its_tokens_alone() {
    if no_gpu() {
        return;
    }
    const NEW_TOKENS: usize = 6;
    let prompts: Vec<Vec<u32>> = (0..512)
        .map(|s: usize| {
            let len = 1 + (s * 37) % 45;
            (0..len)
                .map(|i| ((i * 31 + s * 97 + 5) % 512) as u32)
                .collect()
        })
        .collect();
    let alone = cuda_engine_greedy(&prompts, 1, NEW_TOKENS);
    for batch in [256, 512] {
        let batched = cuda_engine_greedy(&prompts, batch, NEW_TOKENS);
        let differing: Vec<usize> = (0..prompts.len())
            .filter(|&i| batched[i] != alone[i])
            .collect();
        assert!(
            differing.is_empty(),
            "batch {batch}: {} of {} requests differ from their run alone, first {:?}: {:?} vs {:?}",
            differing.len(),
            prompts.len(),
            differing.first(),
            differing.first().map(|&i| &batched[i]),
            differing.first().map(|&i| &alone[i]),
        );
    }
}

/// A `[rows, k]` bf16 activation on the device made the way the forward makes one (embedding,
/// then the norm that writes bf16), and its values on the host.
fn bf16_activation(
    gpu: &CudaBackend,
    rows: usize,
    k: usize,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> (<CudaBackend as Backend>::Tensor, Vec<f32>) {
    use rand::RngExt;
    use tandem_workers::backend::{BatchPlan, HostTensor, WeightDType};
    let values: Vec<u8> = (0..rows * k)
        .flat_map(|_| half::bf16::from_f32(rng.random::<f32>() - 0.5).to_le_bytes())
        .collect();
    let table = gpu
        .upload_weight(&[HostTensor {
            scales: Default::default(),
            dtype: WeightDType::Bf16,
            shape: &[rows, k],
            bytes: &values,
        }])
        .unwrap();
    let ones: Vec<u8> = (0..k).flat_map(|_| 1.0f32.to_le_bytes()).collect();
    let norm = gpu
        .upload_weight(&[HostTensor {
            scales: Default::default(),
            dtype: WeightDType::F32,
            shape: &[k],
            bytes: &ones,
        }])
        .unwrap();
    let tokens: Vec<u32> = (0..rows as u32).collect();
    let mut batch = ForwardBatch::default();
    batch.push(&tokens, 0, vec![0; rows.div_ceil(16)], false);
    let plan = BatchPlan::new(&batch, 16, &[1.0f32; 2]);
    let meta = gpu.prepare_batch(&plan).unwrap();
    let x = gpu
        .rms_norm(&gpu.embedding(&table, &meta).unwrap(), &norm, 1e-5)
        .unwrap();
    let host = gpu.to_host(&x).unwrap().concat();
    (x, host)
}

/// Projections of 5..=256 rows (skinny.cu's warpgroup GEMM on Hopper; cuBLAS elsewhere)
/// against a CPU reference of the same bf16 operands, on random shapes with N and K multiples
/// of 64 (N past a 128-output tile, K of one step to splits of many), and the same output at
/// every run (the split K's partials summed in a fixed order).
#[test]
fn projections_of_decode_batches_match_a_cpu_reference() {
    use rand::{RngExt, SeedableRng};
    use tandem_workers::backend::{HostTensor, WeightDType};
    if no_gpu() {
        return;
    }
    let gpu = CudaBackend::new(&CudaOptions::from_env(0)).unwrap();
    eprintln!(
        "skinny.cu {}",
        if gpu.has_skinny_gemm() {
            "on"
        } else {
            "absent or off: cuBLAS checked"
        }
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(15);
    // (rows, n, k): the edges first (one K step; 5 rows, past the GEMV kernel's; half a tile; one tile with K split 16
    // ways; the widest rows), then random shapes.
    let mut shapes = vec![
        (9, 64, 64),
        (5, 128, 256),
        (256, 192, 448),
        (17, 128, 4096),
        (130, 320, 1024),
    ];
    for _ in 0..8 {
        shapes.push((
            rng.random_range(9..=256usize),
            64 * rng.random_range(1..=24usize),
            64 * rng.random_range(1..=40usize),
        ));
    }
    for (rows, n, k) in shapes {
        let w_bf16: Vec<half::bf16> = (0..n * k)
            .map(|_| half::bf16::from_f32(rng.random::<f32>() - 0.5))
            .collect();
        let bytes: Vec<u8> = w_bf16.iter().flat_map(|v| v.to_le_bytes()).collect();
        let w = gpu
            .upload_weight(&[HostTensor {
                scales: Default::default(),
                dtype: WeightDType::Bf16,
                shape: &[n, k],
                bytes: &bytes,
            }])
            .unwrap();
        let (x, xs) = bf16_activation(&gpu, rows, k, &mut rng);
        let wf: Vec<f32> = w_bf16.iter().map(|v| v.to_f32()).collect();
        let reference: Vec<f32> = (0..rows)
            .flat_map(|r| {
                let (xr, wf) = (&xs[r * k..(r + 1) * k], &wf);
                (0..n).map(move |o| {
                    let wr = &wf[o * k..(o + 1) * k];
                    xr.iter()
                        .zip(wr)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>() as f32
                })
            })
            .collect();
        let y = gpu.to_host(&gpu.linear(&x, &w, None).unwrap()).unwrap();
        assert_eq!((y.len(), y[0].len()), (rows, n));
        let y = y.concat();
        let err = rel_l2(&y, &reference);
        assert!(
            err < 1e-4,
            "{rows} rows, {n}x{k}: relative L2 {err:.2e} against the CPU"
        );
        let again = gpu
            .to_host(&gpu.linear(&x, &w, None).unwrap())
            .unwrap()
            .concat();
        assert!(
            y.iter()
                .zip(&again)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{rows} rows, {n}x{k}: two runs differ"
        );
    }
}

/// The hidden states of embedding requests run through an engine on `backend` beside greedy
/// generations, in two rounds (the second finding the first round's prompts cached), and
/// each generation's tokens.
fn engine_embeddings<B: tandem_workers::backend::KvBlockIo>(
    backend: B,
    prompts: &[Vec<u32>],
) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    use tandem_workers::engine::{Engine, EngineConfig, EventKind, GenerationRequest, ModelRunner};
    let model = Model::load(&model_dir(), backend, &bf16_kv()).unwrap();
    let config = EngineConfig {
        block_size: 16,
        num_blocks: 256,
        max_num_batched_tokens: 8192,
        max_num_seqs: 16,
        max_model_len: None,
        prefix_caching: true,
        ..EngineConfig::default()
    };
    let runner = ModelRunner::new(model, config.block_size, config.num_blocks).unwrap();
    let mut engine = Engine::new(runner, config, None).unwrap();
    engine.set_overlap(true);
    let mut hidden = vec![Vec::new(); 2 * prompts.len()];
    let mut tokens = vec![Vec::new(); prompts.len()];
    for round in 0..2 {
        let mut ids = std::collections::HashMap::new();
        for (i, prompt) in prompts.iter().enumerate() {
            if round == 0 {
                let generate = GenerationRequest {
                    ignore_eos: true,
                    ..GenerationRequest::greedy(prompt.clone(), 8)
                };
                ids.insert(engine.add_request(generate).unwrap(), (false, i));
            }
            let embed = GenerationRequest {
                embedding: true,
                ..GenerationRequest::greedy(prompt.clone(), 0)
            };
            ids.insert(
                engine.add_request(embed).unwrap(),
                (true, round * prompts.len() + i),
            );
        }
        while engine.has_work() {
            for ev in engine.step() {
                let (embedding, i) = ids[&ev.request_id];
                match ev.kind {
                    EventKind::Hidden { vector } => {
                        assert!(embedding, "a hidden state for a generation");
                        hidden[i] = vector;
                    }
                    EventKind::Token { id, .. } => {
                        assert!(!embedding, "a token for an embedding");
                        tokens[i].push(id);
                    }
                    EventKind::Finished { reason, .. } => {
                        assert_eq!(reason, tandem_workers::engine::FinishReason::Length)
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }
    (hidden, tokens)
}

/// Embedding requests on the GPU (device sampling, overlapped steps and decode graphs on for
/// the generations beside them): each prompt's last hidden state matches the CPU's, the
/// same in a round that finds the prompts cached, and the generations keep the tokens they
/// have on the GPU without embeddings beside them.
#[test]
fn embeddings_on_the_gpu_match_the_cpu() {
    if no_gpu() {
        return;
    }
    let prompts: Vec<Vec<u32>> = [7usize, 40, 150]
        .iter()
        .enumerate()
        .map(|(k, &len)| {
            (0..len as u32)
                .map(|i| (i * 13 + 7 * k as u32 + 1) % 200)
                .collect()
        })
        .collect();
    let (cpu, _) = engine_embeddings(CpuBackend::new(&CpuOptions::default()).unwrap(), &prompts);
    let options = CudaOptions {
        cuda_graphs: true,
        device_sampling: true,
        ..CudaOptions::from_env(0)
    };
    let (gpu, gpu_tokens) = engine_embeddings(CudaBackend::new(&options).unwrap(), &prompts);
    for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
        assert_eq!(g.len(), c.len(), "input {i}");
        let distance = rel_l2(g, c);
        eprintln!("embedding {i}: GPU against CPU relative L2 {distance:.2e}");
        assert!(distance < 3e-2, "input {i}: relative L2 {distance}");
    }
    let n = prompts.len();
    for i in 0..n {
        let cached = rel_l2(&gpu[n + i], &gpu[i]);
        assert!(cached < 1e-2, "input {i}: cached round {cached}");
    }
    let alone = cuda_engine_greedy(&prompts, 16, 8);
    assert_eq!(gpu_tokens, alone, "generations beside embeddings");
}

/// Logits of `prompt` and then of each of `forced` fed one at a time, computing with
/// `adapter` (an index into the model's LoRA adapters).
fn logits_with_adapter<B: Backend>(
    model: &Model<B>,
    prompt: &[u32],
    forced: &[u32],
    adapter: Option<u32>,
) -> Vec<Vec<f32>> {
    let mut kv = model.alloc_kv_cache(16, 64).unwrap();
    let table: Vec<u32> = (0..64).collect();
    let mut batch = ForwardBatch::default();
    batch.push(prompt, 0, table.clone(), true);
    batch.set_adapter_from(0, adapter);
    let mut all = model.forward(&batch, &mut kv).unwrap();
    for (s, &token) in forced.iter().enumerate() {
        let mut batch = ForwardBatch::default();
        batch.push(&[token], prompt.len() + s, table.clone(), true);
        batch.set_adapter_from(0, adapter);
        all.push(model.forward(&batch, &mut kv).unwrap().remove(0));
    }
    all
}

/// A random adapter of the `tiny` model: rank `rank` over `targets`.
fn tiny_adapter(
    name: &str,
    rank: usize,
    targets: &[tandem_model::lora::Target],
    seed: u64,
) -> tandem_protocol::config::LoraModule {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cuda-lora-{name}"));
    model_prep::lora::random_adapter(
        &model_dir(),
        &path,
        &model_prep::lora::RandomAdapterOptions {
            rank,
            alpha: 2.0 * rank as f64,
            targets: targets.to_vec(),
            seed,
            dtype: tandem_model::WeightDType::Bf16,
            strength: 0.25,
        },
        true,
    )
    .unwrap();
    tandem_protocol::config::LoraModule {
        name: name.into(),
        path,
    }
}

/// Two adapters of the `tiny` model: `a` of rank 8 over every projection, `b` of rank 4 over
/// q, v and down only (so its stacked pairs are padded, and zero for o and gate/up).
fn tiny_adapters() -> Vec<tandem_protocol::config::LoraModule> {
    use tandem_model::lora::Target;
    vec![
        tiny_adapter("a", 8, &Target::ALL, 3),
        tiny_adapter("b", 4, &[Target::Q, Target::V, Target::Down], 5),
    ]
}

/// LoRA adapters on the GPU (bf16 factors, products added to f32 and bf16 projection outputs)
/// against the CPU's f32 ones: teacher-forced logits of prompts of 7, 40, 150 and 600 tokens
/// (each adapter's rows through GEMMs) and 8 decode steps each (the stacked pass), for two
/// adapters; a prompt step and a decode step mixing both adapters and the base model, and a
/// step of a decode row and a prompt of two adapters, against each alone; decode steps with adapter rows replayed from a CUDA graph; and an
/// engine with graphs and overlapped steps giving every request the tokens it gets without
/// them, the base model's requests those they get alone.
#[test]
fn lora_adapters_on_the_gpu_match_the_cpu() {
    if no_gpu() {
        return;
    }
    let modules = tiny_adapters();
    let mut cpu = Model::load(
        &model_dir(),
        CpuBackend::new(&CpuOptions::default()).unwrap(),
        &bf16_kv(),
    )
    .unwrap();
    cpu.load_adapters(&modules, "fp").unwrap();
    let options = CudaOptions {
        cuda_graphs: true,
        ..CudaOptions::from_env(0)
    };
    let mut gpu = Model::load(
        &model_dir(),
        CudaBackend::new(&options).unwrap(),
        &bf16_kv(),
    )
    .unwrap();
    gpu.load_adapters(&modules, "fp").unwrap();
    let prompts: Vec<Vec<u32>> = [7usize, 40, 150, 600]
        .iter()
        .enumerate()
        .map(|(k, &len)| {
            (0..len as u32)
                .map(|i| (i * 17 + 5 * k as u32 + 2) % 200)
                .collect()
        })
        .collect();
    for adapter in [0u32, 1] {
        let (mut worst, mut agree, mut total) = (0f64, 0, 0);
        for prompt in &prompts {
            let forced: Vec<u32> = (0..8).map(|i| (i * 29 + 3) % 200).collect();
            let want = logits_with_adapter(&cpu, prompt, &forced, Some(adapter));
            let got = logits_with_adapter(&gpu, prompt, &forced, Some(adapter));
            let base = logits_with_adapter(&gpu, prompt, &forced, None);
            for (step, (g, w)) in got.iter().zip(&want).enumerate() {
                let d = rel_l2(g, w);
                worst = worst.max(d);
                agree += usize::from(argmax(g) == argmax(w));
                total += 1;
                assert!(
                    d < 5e-2,
                    "adapter {adapter}, prompt of {}: step {step} relative L2 {d}",
                    prompt.len()
                );
                let moved = rel_l2(&base[step], g);
                assert!(
                    moved > 0.02,
                    "adapter {adapter}, prompt of {}: the adapter moved the GPU's logits by {moved}",
                    prompt.len()
                );
            }
        }
        eprintln!(
            "LoRA adapter {adapter} on the GPU against the CPU: worst relative L2 {worst:.2e}, top-1 {agree}/{total}"
        );
        assert!(
            agree * 10 >= total * 9,
            "adapter {adapter}: top-1 {agree}/{total}"
        );
    }

    // One batch: both adapters' sequences and the base model's, each against itself alone.
    let mut kv = gpu.alloc_kv_cache(16, 96).unwrap();
    let mut batch = ForwardBatch::default();
    batch.push(&prompts[1], 0, (0..32).collect(), true);
    batch.set_adapter_from(0, Some(0));
    batch.push(&prompts[2], 0, (32..64).collect(), true);
    batch.push(&prompts[0], 0, (64..96).collect(), true);
    batch.set_adapter_from(2, Some(1));
    let rows = gpu.forward(&batch, &mut kv).unwrap();
    let alone = [
        logits_with_adapter(&gpu, &prompts[1], &[], Some(0)).remove(0),
        logits_with_adapter(&gpu, &prompts[2], &[], None).remove(0),
        logits_with_adapter(&gpu, &prompts[0], &[], Some(1)).remove(0),
    ];
    for (i, (row, alone)) in rows.iter().zip(&alone).enumerate() {
        let d = rel_l2(row, alone);
        eprintln!("batched against alone, sequence {i}: {d:.2e}");
        assert!(d < 1e-2, "sequence {i}: {d}");
    }
    // Their next token in one decode step: the stacked pass over rows of adapter a, the base
    // model and adapter b.
    let next = [11u32, 12, 13];
    let mut step = ForwardBatch::default();
    for (i, (prompt, adapter)) in [
        (&prompts[1], Some(0)),
        (&prompts[2], None),
        (&prompts[0], Some(1)),
    ]
    .into_iter()
    .enumerate()
    {
        let table = (32 * i as u32..32 * (i as u32 + 1)).collect();
        step.push(&next[i..=i], prompt.len(), table, true);
        step.set_adapter_from(i, adapter);
    }
    let rows = gpu.forward(&step, &mut kv).unwrap();
    let alone = [
        logits_with_adapter(&gpu, &prompts[1], &next[0..1], Some(0)).remove(1),
        logits_with_adapter(&gpu, &prompts[2], &next[1..2], None).remove(1),
        logits_with_adapter(&gpu, &prompts[0], &next[2..3], Some(1)).remove(1),
    ];
    for (i, (row, alone)) in rows.iter().zip(&alone).enumerate() {
        let d = rel_l2(row, alone);
        eprintln!("decode step batched against alone, sequence {i}: {d:.2e}");
        assert!(d < 1e-2, "decode step, sequence {i}: {d}");
    }
    // A step with a prompt: the first sequence's next token (the stacked pass, over the
    // rows before the prompt's) beside a prompt for adapter b (its GEMMs), each against
    // itself alone.
    let mut step = ForwardBatch::default();
    step.push(&[21], prompts[1].len() + 1, (0..32).collect(), true);
    step.set_adapter_from(0, Some(0));
    step.push(&prompts[2], 0, (32..64).collect(), true);
    step.set_adapter_from(1, Some(1));
    let rows = gpu.forward(&step, &mut kv).unwrap();
    let alone = [
        logits_with_adapter(&gpu, &prompts[1], &[next[0], 21], Some(0)).remove(2),
        logits_with_adapter(&gpu, &prompts[2], &[], Some(1)).remove(0),
    ];
    for (i, (row, alone)) in rows.iter().zip(&alone).enumerate() {
        let d = rel_l2(row, alone);
        eprintln!("decode and prompt step against alone, sequence {i}: {d:.2e}");
        assert!(d < 1e-2, "decode and prompt step, sequence {i}: {d}");
    }

    // Decode steps of a sequence with an adapter: the first of a graph shape runs eagerly,
    // the second captures, later ones replay (launching nothing one by one). The graphs the
    // steps above captured are dropped first (switching graphs off and on again), since this
    // step's shape may be one of theirs.
    let no_graphs = CudaOptions {
        cuda_graphs: false,
        ..options.clone()
    };
    gpu.backend().set_options(&no_graphs).unwrap();
    gpu.backend().set_options(&options).unwrap();
    let mut kv = gpu.alloc_kv_cache(16, 64).unwrap();
    let table: Vec<u32> = (0..64).collect();
    let mut batch = ForwardBatch::default();
    batch.push(&prompts[1], 0, table.clone(), true);
    batch.set_adapter_from(0, Some(1));
    gpu.forward(&batch, &mut kv).unwrap();
    let mut shrinks = Vec::new();
    for step in 0..4 {
        let mut batch = ForwardBatch::default();
        batch.push(
            &[(step * 31 + 7) % 200],
            prompts[1].len() + step as usize,
            table.clone(),
            true,
        );
        batch.set_adapter_from(0, Some(1));
        gpu.backend().count_launches(true);
        gpu.forward(&batch, &mut kv).unwrap();
        shrinks.push(
            gpu.backend()
                .launch_counts()
                .get("lora_shrink")
                .copied()
                .unwrap_or(0),
        );
        gpu.backend().count_launches(false);
    }
    eprintln!("lora_shrink launches by decode step: {shrinks:?}");
    assert!(
        shrinks[0] > 0,
        "the eager step runs the adapter's products: {shrinks:?}"
    );
    assert_eq!(
        shrinks[2..],
        [0, 0],
        "later steps replay the graph: {shrinks:?}"
    );

    // Through the engine: graphs and overlapped steps on, then off.
    let engine_tokens = |graphs: bool| -> Vec<Vec<u32>> {
        use tandem_workers::engine::{
            AdapterRef, Engine, EngineConfig, EventKind, GenerationRequest, ModelRunner,
        };
        let options = CudaOptions {
            cuda_graphs: graphs,
            device_sampling: true,
            ..CudaOptions::from_env(0)
        };
        let mut model = Model::load(
            &model_dir(),
            CudaBackend::new(&options).unwrap(),
            &bf16_kv(),
        )
        .unwrap();
        model.load_adapters(&modules, "fp").unwrap();
        let fingerprints: Vec<String> = model
            .adapters()
            .iter()
            .map(|a| a.fingerprint.clone())
            .collect();
        let config = EngineConfig {
            block_size: 16,
            num_blocks: 512,
            max_num_batched_tokens: 8192,
            max_num_seqs: 16,
            max_model_len: None,
            ..EngineConfig::default()
        };
        let runner = ModelRunner::new(model, config.block_size, config.num_blocks).unwrap();
        let mut engine = Engine::new(runner, config, None).unwrap();
        engine.set_overlap(graphs);
        let mut ids = Vec::new();
        // Each prompt with adapter a, with adapter b, then with the base model.
        for (i, prompt) in prompts.iter().cycle().take(3 * prompts.len()).enumerate() {
            let adapter = (i < 2 * prompts.len()).then(|| {
                let index = (i / prompts.len()) as u32;
                AdapterRef {
                    index,
                    fingerprint: fingerprints[index as usize].clone(),
                }
            });
            let request = GenerationRequest {
                ignore_eos: true,
                adapter,
                ..GenerationRequest::greedy(prompt.clone(), 12)
            };
            ids.push(engine.add_request(request).unwrap());
        }
        let mut tokens = std::collections::HashMap::new();
        while engine.has_work() {
            for event in engine.step() {
                if let EventKind::Token { id, .. } = event.kind {
                    tokens
                        .entry(event.request_id)
                        .or_insert_with(Vec::new)
                        .push(id);
                }
            }
        }
        ids.iter()
            .map(|id| tokens.remove(id).unwrap_or_default())
            .collect()
    };
    let with_graphs = engine_tokens(true);
    let eager = engine_tokens(false);
    assert_eq!(
        with_graphs, eager,
        "adapter and base requests, graphs on and off"
    );
    let n = prompts.len();
    assert_ne!(
        with_graphs[..n],
        with_graphs[2 * n..],
        "adapter a changes the answers"
    );
    assert_ne!(
        with_graphs[n..2 * n],
        with_graphs[2 * n..],
        "adapter b changes the answers"
    );
    let alone = cuda_engine_greedy(&prompts, 16, 12);
    assert_eq!(
        with_graphs[2 * n..],
        alone[..],
        "base requests beside the adapters'"
    );
}
