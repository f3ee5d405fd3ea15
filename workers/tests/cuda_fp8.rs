//! FP8 weights on the GPU against the CPU on the same FP8 weights: the `tiny` model's shapes
//! with random FP8 projections (and, where `TANDEM_GPU_TEST_MODEL_FP8` names one, a model of
//! real shapes); and an FP8 KV cache on the GPU against the CPU's FP8 cache on the same 16-bit
//! weights (the `tiny` model, and the models `TANDEM_GPU_TEST_MODELS_KV` lists). The CPU dequantizes the weights and rounds each projection's input through
//! FP8 as the GPU quantizes it, so the two compute the same products up to f32 summation
//! order and the GPU's bf16 activations. Decode steps of one sequence run the FP8 GEMV kernel,
//! prompts of 3 tokens `skinny.cu`'s FP8 kernel on Hopper (elsewhere cuBLASLt), a prompt of 150
//! tokens cuBLASLt's FP8 GEMM. Needs an NVIDIA GPU with FP8 (compute
//! capability 8.9+); skipped visibly without a CUDA driver.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tandem_model::quantization::{Fp8Scheme, WeightScales};
use tandem_model::random_weights::{GENERATOR_VERSION, RandomWeights};
use tandem_model::{CONFIG_FILE, ModelConfig, RANDOM_WEIGHTS_FILE, WeightDType, write_json};
use tandem_test_skip::skip;
use tandem_workers::backend::Backend;
use tandem_workers::backend::cpu::{CpuBackend, CpuOptions};
use tandem_workers::backend::cuda::{CudaBackend, CudaOptions, driver_present};
use tandem_workers::kv_cache::KvDType;
use tandem_workers::model::{ForwardBatch, Model, ModelOptions};

fn no_gpu() -> bool {
    if driver_present() {
        return false;
    }
    skip("no CUDA driver on this machine");
    true
}

/// The tiny model's config and tokenizer with FP8 projections generated at load (seed 5).
fn tiny_fp8(dir: &Path) -> PathBuf {
    let tiny = tandem_test_kit::model_dir("tiny");
    let out = dir.join("tiny-fp8");
    std::fs::create_dir_all(&out).unwrap();
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(tiny.join(file), out.join(file)).unwrap();
    }
    let mut config = ModelConfig::load(&tiny).unwrap();
    config.torch_dtype = Some("bfloat16".into());
    config.quantization_config = Some(Fp8Scheme::compressed_tensors_config(
        WeightScales::PerTensor,
        &["lm_head".to_string()],
    ));
    write_json(&out.join(CONFIG_FILE), &config).unwrap();
    let spec = RandomWeights {
        seed: 5,
        dtype: WeightDType::F8E4M3,
        generator: GENERATOR_VERSION,
    };
    write_json(&out.join(RANDOM_WEIGHTS_FILE), &spec).unwrap();
    out
}

/// The FP8 models the tests run: the tiny one (written under `dir`), and the model of real
/// shapes `TANDEM_GPU_TEST_MODEL_FP8` names, if any.
fn fp8_models(dir: &Path) -> Vec<PathBuf> {
    let extra = std::env::var_os("TANDEM_GPU_TEST_MODEL_FP8").map(PathBuf::from);
    std::iter::once(tiny_fp8(dir)).chain(extra).collect()
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

/// Logits of `prompt` and then of each of `forced` fed one at a time.
fn logits_along<B: Backend>(model: &Model<B>, prompt: &[u32], forced: &[u32]) -> Vec<Vec<f32>> {
    logits_with_adapter(model, prompt, forced, None)
}

/// [`logits_along`] with the sequence computed with LoRA adapter `adapter` (`None`: the base
/// model).
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

#[test]
fn fp8_logits_on_the_gpu_match_the_cpu_on_the_same_fp8_weights() {
    if no_gpu() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    for dir in fp8_models(scratch.path()) {
        let options = ModelOptions {
            kv_dtype: Some(KvDType::Bf16),
            ..ModelOptions::default()
        };
        let cpu = Model::load(
            &dir,
            CpuBackend::new(&CpuOptions::default()).unwrap(),
            &options,
        )
        .unwrap();
        let gpu = Model::load(
            &dir,
            CudaBackend::new(&CudaOptions::from_env(0)).unwrap(),
            &options,
        )
        .unwrap();
        assert_eq!(gpu.weight_dtype(), WeightDType::F8E4M3);
        let vocab = cpu.config().vocab_size as u32;
        let (mut worst, mut agree, mut steps) = (0f64, 0usize, 0usize);
        for prompt in [
            vec![1u32, 5, 9],
            (0..150).map(|i| (i * 7 + 3) % vocab.min(200)).collect(),
        ] {
            let mut greedy = Vec::new();
            let mut c = logits_along(&cpu, &prompt, &[]);
            for _ in 0..16 {
                greedy.push(argmax(c.last().unwrap()) as u32);
                c = logits_along(&cpu, &prompt, &greedy);
            }
            let g = logits_along(&gpu, &prompt, &greedy[..16]);
            for (step, (gl, cl)) in g.iter().zip(&c).enumerate() {
                let l2 = rel_l2(gl, cl);
                worst = worst.max(l2);
                steps += 1;
                agree += usize::from(argmax(gl) == argmax(cl));
                // Far wider than the bf16 test's 1.5e-2, and not from the kernels: the
                // projections match the host's arithmetic to 1e-7 (GEMV) and bf16's rounding
                // (cuBLASLt) in the test below. Two FP8 computations whose inputs differ at all
                // drift apart to FP8's own rounding noise: an input that the GPU and the CPU
                // round to neighbouring bf16 values lands on FP8 codes 1/16 apart about once in
                // 16 such values, so a difference d between them becomes about sqrt(d / 16)
                // after one projection, and layers take it to FP8's few percent. On an H100
                // the worst step was 2.9e-2 on the tiny model and 1.05e-1 on two
                // Llama-3.1-8B layers of random weights (near-uniform logits); a wrong scale
                // or row is off by the logits' whole size (docs/benchmarks.md).
                assert!(
                    l2 < 0.2,
                    "{}: prompt of {}, step {step}: relative L2 {l2:.3e}",
                    dir.display(),
                    prompt.len()
                );
                let (pick, best) = (argmax(gl), argmax(cl));
                let rms = (cl.iter().map(|x| x * x).sum::<f32>() / cl.len() as f32).sqrt();
                let tie = (3.0 * l2 as f32).max(0.01) * rms;
                assert!(
                    cl[pick] >= cl[best] - tie,
                    "{}: prompt of {}, step {step}: GPU picks {pick}, CPU {best}, relative L2 \
                     {l2:.3e}",
                    dir.display(),
                    prompt.len()
                );
            }
        }
        eprintln!(
            "{}: FP8 GPU against CPU: worst relative L2 {worst:.3e}, top-1 {agree}/{steps}",
            dir.display()
        );
        // Random weights make near-ties common; a broken kernel agrees at chance (1/vocab).
        assert!(
            agree * 10 >= steps * 6,
            "{}: top-1 agreement {agree}/{steps}",
            dir.display()
        );
    }
}

/// LoRA adapters over FP8 weights on the GPU (the adapters' bf16 products read the
/// projections' inputs, which the norms and silu_mul then keep as values beside the FP8 codes)
/// against the CPU's on the same weights: for two adapters, prompts of 3, 150 and 600 tokens
/// (`skinny.cu` or cuBLASLt, silu_mul's own codes past 512 rows; each adapter's rows through
/// GEMMs) and 8 decode steps each (the FP8 GEMV, the stacked pass, replayed from a CUDA graph
/// and run eagerly). The GPU with the adapter must be far closer to the CPU with it than the
/// GPU without it is, so an adapter whose products were skipped or read the wrong rows fails
/// where FP8's own noise would pass.
#[test]
fn lora_adapters_over_fp8_weights_on_the_gpu_match_the_cpu() {
    use model_prep::lora::{RandomAdapterOptions, random_adapter};
    use tandem_model::lora::Target;
    use tandem_protocol::config::LoraModule;
    if no_gpu() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let dir = tiny_fp8(scratch.path());
    let adapter = |name: &str, rank: usize, targets: &[Target], seed: u64| {
        let path = scratch.path().join(format!("lora-{name}"));
        let options = RandomAdapterOptions {
            rank,
            alpha: 2.0 * rank as f64,
            targets: targets.to_vec(),
            seed,
            dtype: WeightDType::Bf16,
            strength: 1.0,
        };
        random_adapter(&dir, &path, &options, true).unwrap();
        LoraModule {
            name: name.into(),
            path,
        }
    };
    let modules = [
        adapter("a", 8, &Target::ALL, 3),
        adapter("b", 4, &[Target::Q, Target::V, Target::Down], 5),
    ];
    let options = ModelOptions {
        kv_dtype: Some(KvDType::Bf16),
        ..ModelOptions::default()
    };
    let mut cpu = Model::load(
        &dir,
        CpuBackend::new(&CpuOptions::default()).unwrap(),
        &options,
    )
    .unwrap();
    cpu.load_adapters(&modules, "fp").unwrap();
    let gpu_with = |graphs: bool| {
        let cuda = CudaOptions {
            cuda_graphs: graphs,
            ..CudaOptions::from_env(0)
        };
        let mut gpu = Model::load(&dir, CudaBackend::new(&cuda).unwrap(), &options).unwrap();
        gpu.load_adapters(&modules, "fp").unwrap();
        gpu
    };
    let (gpu, eager) = (gpu_with(true), gpu_with(false));
    assert_eq!(gpu.weight_dtype(), WeightDType::F8E4M3);
    let vocab = cpu.config().vocab_size as u32;
    for adapter in [0u32, 1] {
        let (mut worst, mut agree, mut steps) = (0f64, 0usize, 0usize);
        let (mut off_with, mut off_without, mut worst_eager) = (0f64, 0f64, 0f64);
        for len in [3u32, 150, 600] {
            let prompt: Vec<u32> = (0..len).map(|i| (i * 7 + 3) % vocab.min(200)).collect();
            let mut fed = Vec::new();
            let mut c = logits_with_adapter(&cpu, &prompt, &[], Some(adapter));
            for _ in 0..8 {
                fed.push(argmax(c.last().unwrap()) as u32);
                c = logits_with_adapter(&cpu, &prompt, &fed, Some(adapter));
            }
            let g = logits_with_adapter(&gpu, &prompt, &fed[..8], Some(adapter));
            let e = logits_with_adapter(&eager, &prompt, &fed[..8], Some(adapter));
            let base = logits_with_adapter(&gpu, &prompt, &fed[..8], None);
            for (step, (gl, cl)) in g.iter().zip(&c).enumerate() {
                let l2 = rel_l2(gl, cl);
                worst = worst.max(l2);
                off_with += l2;
                off_without += rel_l2(&base[step], cl);
                worst_eager = worst_eager.max(rel_l2(&e[step], gl));
                steps += 1;
                agree += usize::from(argmax(gl) == argmax(cl));
                // FP8's own drift between two computations (the weights' test above).
                assert!(
                    l2 < 0.2,
                    "adapter {adapter}, prompt of {len}, step {step}: relative L2 {l2:.3e}"
                );
            }
        }
        eprintln!(
            "LoRA adapter {adapter} over FP8 weights, GPU against CPU: worst relative L2 \
             {worst:.3e}, mean {:.3e} (the GPU without the adapter: {:.3e}), top-1 \
             {agree}/{steps}; graph replays against eager steps: {worst_eager:.3e}",
            off_with / steps as f64,
            off_without / steps as f64
        );
        assert!(
            off_with * 3.0 < off_without,
            "adapter {adapter}: the GPU with the adapter is {:.3e} from the CPU with it on \
             average, without it {:.3e}",
            off_with / steps as f64,
            off_without / steps as f64
        );
        assert!(
            agree * 10 >= steps * 6,
            "adapter {adapter}: top-1 agreement {agree}/{steps}"
        );
        // The same kernels, launched one by one or replayed: the same bits.
        assert!(
            worst_eager < 1e-5,
            "adapter {adapter}: graph replays against eager steps {worst_eager:.3e}"
        );
    }
}

/// Logits of `model` along `prompt` and 16 tokens it is fed: those `reference` picks greedily.
fn greedy_along<B: Backend, R: Backend>(
    model: &Model<B>,
    reference: &Model<R>,
    prompt: &[u32],
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut greedy = Vec::new();
    let mut r = logits_along(reference, prompt, &[]);
    for _ in 0..16 {
        greedy.push(argmax(r.last().unwrap()) as u32);
        r = logits_along(reference, prompt, &greedy);
    }
    (logits_along(model, prompt, &greedy), r)
}

/// Worst relative L2 and top-1 agreements of `a` against `b`, step by step.
fn compare(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f64, usize, usize) {
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| rel_l2(x, y))
        .fold(0.0, f64::max);
    let agree = a
        .iter()
        .zip(b)
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count();
    (worst, agree, a.len())
}

/// An FP8 KV cache on the GPU (written by the rope kernel, read by the prefill and decode
/// attention kernels over FP8) against the CPU's FP8 cache on the same weights, for prompts of
/// 3 and 150 tokens and 16 decode steps each; and how far the FP8 cache moves the GPU's own
/// logits from its bf16 cache's. The tiny model (head dim 16) runs the warp-per-key kernel,
/// the models of `TANDEM_GPU_TEST_MODELS_KV` (colon-separated, head dims 64 and 128) the
/// vectorized one and the tensor-core prefill.
#[test]
fn fp8_kv_cache_on_the_gpu_matches_the_cpu_fp8_cache() {
    if no_gpu() {
        return;
    }
    let extra: Vec<PathBuf> = std::env::var("TANDEM_GPU_TEST_MODELS_KV")
        .map(|list| list.split(':').map(PathBuf::from).collect())
        .unwrap_or_default();
    for dir in std::iter::once(tandem_test_kit::model_dir("tiny")).chain(extra) {
        let with = |kv: KvDType| ModelOptions {
            kv_dtype: Some(kv),
            ..ModelOptions::default()
        };
        let cpu = Model::load(
            &dir,
            CpuBackend::new(&CpuOptions::default()).unwrap(),
            &with(KvDType::Fp8),
        )
        .unwrap();
        let gpu = Model::load(
            &dir,
            CudaBackend::new(&CudaOptions::from_env(0)).unwrap(),
            &with(KvDType::Fp8),
        )
        .unwrap();
        let gpu_bf16 = Model::load(
            &dir,
            CudaBackend::new(&CudaOptions::from_env(0)).unwrap(),
            &with(KvDType::Bf16),
        )
        .unwrap();
        assert_eq!(gpu.kv_layout(16).dtype, KvDType::Fp8);
        let vocab = cpu.config().vocab_size as u32;
        let (mut worst, mut agree, mut steps) = (0f64, 0, 0);
        let (mut worst_vs_bf16, mut agree_vs_bf16) = (0f64, 0);
        for prompt in [
            vec![1u32, 5, 9],
            (0..150).map(|i| (i * 7 + 3) % vocab.min(200)).collect(),
        ] {
            let (g, c) = greedy_along(&gpu, &cpu, &prompt);
            let (w, a, n) = compare(&g, &c);
            worst = worst.max(w);
            agree += a;
            steps += n;
            // The same tokens through the GPU's bf16 cache.
            let fed: Vec<u32> = c[..c.len() - 1].iter().map(|l| argmax(l) as u32).collect();
            let b = logits_along(&gpu_bf16, &prompt, &fed);
            let (w, a, _) = compare(&g, &b);
            worst_vs_bf16 = worst_vs_bf16.max(w);
            agree_vs_bf16 += a;
        }
        eprintln!(
            "{}: FP8 KV cache, GPU against CPU: worst relative L2 {worst:.3e}, top-1 \
             {agree}/{steps}; GPU FP8 against GPU bf16 cache: {worst_vs_bf16:.3e}, top-1 \
             {agree_vs_bf16}/{steps}",
            dir.display()
        );
        // Two FP8 roundings of K/V computed in bf16 (GPU) and f32 (CPU) land on neighbouring
        // codes now and then (see the weights' test above); a kernel reading the codes wrong
        // (a wrong byte order, block or scale) is off by the logits' whole size.
        assert!(worst < 0.2, "{}: relative L2 {worst:.3e}", dir.display());
        assert!(
            agree * 10 >= steps * 6,
            "{}: top-1 agreement {agree}/{steps}",
            dir.display()
        );
    }
}

/// A `[rows, k]` bf16 activation made the way the forward makes one (embedding + norm), and
/// its values on the host.
fn bf16_activation(
    gpu: &CudaBackend,
    rows: usize,
    k: usize,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> (<CudaBackend as Backend>::Tensor, Vec<f32>) {
    use rand::RngExt;
    use tandem_workers::backend::{BatchPlan, HostTensor};
    let values: Vec<u8> = (0..rows * k)
        .flat_map(|_| half::bf16::from_f32(rng.random::<f32>() - 0.5).to_le_bytes())
        .collect();
    let table = gpu
        .upload_weight(&[HostTensor::new(WeightDType::Bf16, &[rows, k], &values)])
        .unwrap();
    let ones: Vec<u8> = (0..k).flat_map(|_| 1.0f32.to_le_bytes()).collect();
    let norm = gpu
        .upload_weight(&[HostTensor::new(WeightDType::F32, &[k], &ones)])
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

/// One FP8 projection against the host's arithmetic on the same operands: the weight's codes
/// and per-row scales times the input rows, summed in f64. Rows up to the FP8 GEMVs' limits
/// run a GEMV kernel, which reads the bf16 input as it is: `gemv_fp8_mma` (2-8 rows, inputs a
/// multiple of 64; one row too with `TANDEM_FP8_GEMV_MMA_ONE_ROW=1`), else `gemv_fp8_m*` (up
/// to 2 rows, and all with `TANDEM_FP8_GEMV_MMA=0`); more run, on the input quantized as
/// `round_row_through_fp8` does (per token, or by a static scale), `skinny.cu`'s FP8 kernel on
/// Hopper up to 64 rows (f32 sums), and cuBLASLt past that and elsewhere (its bf16 output
/// bounds the error).
#[test]
fn fp8_projections_match_the_same_arithmetic_on_the_host() {
    use rand::{RngExt, SeedableRng};
    use tandem_workers::backend::fp8::round_row_through_fp8;
    use tandem_workers::backend::{HostTensor, InputScale, QuantScales};
    if no_gpu() {
        return;
    }
    let options = CudaOptions::from_env(0);
    // Rows an FP8 GEMV kernel takes for `k` inputs (`fp8_projection.rs`): up to 8 on the
    // tensor-core one (inputs a multiple of 64), 2 on the plain one.
    let gemv_rows = |k: usize| {
        let kernel_rows = if options.fp8_gemv_mma && k.is_multiple_of(64) {
            8
        } else {
            2
        };
        options.fp8_gemv_max_rows.min(kernel_rows)
    };
    let gpu = CudaBackend::new(&options).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
    for (rows, n, k, input) in [
        (1, 256, 512, InputScale::PerToken),
        (2, 128, 4096, InputScale::PerToken),
        // The tensor-core GEMV: a partial tile of 16 rows, 9 chunks of 64 inputs over 8 warps;
        // more rows than one pass of its grid... and inputs not a multiple of 64 (the plain GEMV).
        (1, 200, 576, InputScale::PerToken),
        (2, 4100, 1024, InputScale::PerToken),
        (2, 72, 1040, InputScale::PerToken),
        (3, 128, 4096, InputScale::PerToken),
        (8, 96, 1024, InputScale::Static(0.004)),
        (9, 256, 512, InputScale::PerToken),
        (130, 384, 1024, InputScale::PerToken),
        // skinny.cu on Hopper: K split over blocks (2 tiles of 128 outputs, 64 steps of 128
        // inputs), a partial tile and a K tail of 16 inputs.
        (17, 256, 8192, InputScale::PerToken),
        (64, 200, 1040, InputScale::PerToken),
        (300, 128, 256, InputScale::Static(0.002)),
        // More elements than a capped elementwise grid covers in one pass (65,535 blocks of
        // 256): the widening of cuBLASLt's bf16 result must stride.
        (4200, 4096, 64, InputScale::PerToken),
        // The down projection's 14,336 inputs: cuBLASLt's fast accumulation (no promotion of
        // the tensor cores' partial sums to f32 along K) would show here first.
        (256, 256, 14336, InputScale::PerToken),
    ] {
        // Codes of every finite e4m3 value (0x7f and 0xff are NaN), a scale per row.
        let codes: Vec<u8> = (0..n * k)
            .map(|_| {
                let c: u8 = rng.random();
                if c & 0x7f == 0x7f { c - 1 } else { c }
            })
            .collect();
        let row_scales: Vec<f32> = (0..n)
            .map(|_| rng.random_range(0.5f32..2.0) / 448.0)
            .collect();
        let w = gpu
            .upload_weight(&[HostTensor {
                dtype: WeightDType::F8E4M3,
                shape: &[n, k],
                bytes: &codes,
                scales: QuantScales {
                    weight: &row_scales,
                    input,
                },
            }])
            .unwrap();
        let (x, mut xs) = bf16_activation(&gpu, rows, k, &mut rng);
        // The GEMV's rows read the bf16 input as it is.
        if rows > gemv_rows(k) {
            for row in xs.chunks_mut(k) {
                round_row_through_fp8(row, input);
            }
        }
        let wf: Vec<f64> = codes
            .iter()
            .enumerate()
            .map(|(i, &c)| WeightDType::F8E4M3.decode(&[c]) as f64 * row_scales[i / k] as f64)
            .collect();
        let reference: Vec<f32> = (0..rows)
            .flat_map(|r| {
                let (xr, wf) = (&xs[r * k..(r + 1) * k], &wf);
                (0..n).map(move |o| {
                    xr.iter()
                        .zip(&wf[o * k..(o + 1) * k])
                        .map(|(&a, &b)| a as f64 * b)
                        .sum::<f64>() as f32
                })
            })
            .collect();
        let y = gpu.to_host(&gpu.linear(&x, &w, None).unwrap()).unwrap();
        assert_eq!((y.len(), y[0].len()), (rows, n));
        let err = rel_l2(&y.concat(), &reference);
        eprintln!("{rows} rows, {n}x{k}, {input:?}: relative L2 {err:.2e}");
        // The GEMV's f32 sums: ~1e-7; skinny.cu's f32 sums of the quantized input: ~5e-4 (a
        // few inputs the host and the device round to neighbouring codes, subnormals among
        // them); cuBLASLt's bf16 output: ~2e-3.
        let bound = if rows <= gemv_rows(k) {
            1e-4
        } else if gpu.has_skinny_fp8() && rows <= 64 {
            1e-3
        } else {
            4e-3
        };
        assert!(
            err < bound,
            "{rows} rows, {n}x{k}: relative L2 {err:.2e} against the host"
        );
    }
}

/// The norms and silu_mul quantize their output rows for the FP8 projections that read them
/// (`fp8_fused_quant`) into the very codes the projection's own quantization makes, with
/// their bf16 rows beside the codes and without them (`fp8_codes_only`): the logits of a
/// prefill of 600 tokens (quantized rows, silu_mul's among them) and of decode steps (the
/// GEMV's bf16 rows) are bitwise the same with it on and off, on the tiny FP8 model and the
/// extra one the device script passes; and with `fp8_codes_only`, every norm and silu_mul of
/// the prefill writes only the codes.
#[test]
fn fused_fp8_quantization_gives_the_projections_the_same_codes() {
    if no_gpu() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let models = fp8_models(scratch.path());
    for (dir, codes_only) in models.iter().flat_map(|d| [(d, true), (d, false)]) {
        let options = ModelOptions {
            kv_dtype: Some(KvDType::Bf16),
            ..ModelOptions::default()
        };
        let gpu = Model::load(
            dir,
            CudaBackend::new(&CudaOptions {
                fp8_fused_quant: true,
                fp8_codes_only: codes_only,
                ..CudaOptions::from_env(0)
            })
            .unwrap(),
            &options,
        )
        .unwrap();
        let vocab = gpu.config().vocab_size as u32;
        // Past the rows from which silu_mul quantizes too (512).
        let prompt: Vec<u32> = (0..600).map(|i| (i * 11 + 5) % vocab.min(300)).collect();
        let forced = [3u32, 7, 1];
        gpu.backend().count_launches(true);
        let fused = logits_along(&gpu, &prompt, &forced);
        let launches = gpu.backend().launch_counts();
        gpu.backend().count_launches(false);
        let count = |op: &str| launches.get(op).copied().unwrap_or(0);
        let layers = gpu.config().num_hidden_layers as u64;
        let codes = (
            count("rms_norm_codes") + count("add_rms_norm_codes"),
            count("silu_mul_quant_codes"),
        );
        let expected = if codes_only {
            (2 * layers, layers)
        } else {
            (0, 0)
        };
        assert_eq!(
            codes,
            expected,
            "{}: (norms, silu_mul) writing FP8 codes only, codes_only {codes_only}; launches \
             {launches:?}",
            dir.display()
        );
        let mut options = gpu.backend().options();
        options.fp8_fused_quant = false;
        gpu.backend().set_options(&options).unwrap();
        let separate = logits_along(&gpu, &prompt, &forced);
        assert_eq!(fused.len(), separate.len());
        for (step, (a, b)) in fused.iter().zip(&separate).enumerate() {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{}: logits of step {step} differ with fused quantization, codes_only \
                 {codes_only} (relative L2 {:.2e})",
                dir.display(),
                rel_l2(a, b)
            );
        }
        eprintln!(
            "{}: fused FP8 quantization (codes only: {codes_only}), {} steps bitwise equal",
            dir.display(),
            fused.len()
        );
    }
}

/// Logits of a batch mixing decodes with prompt chunks (FP8 weights): two prompts
/// prefilled alone, then twice their decodes beside a chunk of a third prompt (the second chunk
/// reads the first from the cache), every row's logits.
fn mixed_batch_logits(model: &Model<CudaBackend>) -> Vec<Vec<f32>> {
    const BLOCKS_PER_SEQ: usize = 48;
    let mut kv = model.alloc_kv_cache(16, 3 * BLOCKS_PER_SEQ).unwrap();
    let vocab = model.config().vocab_size.min(250);
    let table = |i: usize| -> Vec<u32> {
        ((i * BLOCKS_PER_SEQ) as u32..((i + 1) * BLOCKS_PER_SEQ) as u32).collect()
    };
    let prompt = |i: usize, n: usize| -> Vec<u32> {
        (0..n)
            .map(|j| ((j * 17 + i * 3 + 2) % vocab) as u32)
            .collect()
    };
    let mut logits = Vec::new();
    let lens = [200usize, 150];
    for (i, &n) in lens.iter().enumerate() {
        let mut batch = ForwardBatch::default();
        batch.push(&prompt(i, n), 0, table(i), true);
        logits.extend(model.forward(&batch, &mut kv).unwrap());
    }
    let third = prompt(2, 560);
    for (step, chunk) in third.chunks(280).enumerate() {
        let mut batch = ForwardBatch::default();
        for (i, &n) in lens.iter().enumerate() {
            batch.push(&[(step * 5 + i + 1) as u32], n + step, table(i), true);
        }
        batch.push(chunk, step * 280, table(2), true);
        logits.extend(model.forward(&batch, &mut kv).unwrap());
    }
    logits
}

/// `rope_cache_write` rotating rows in shared memory (`rope_shared`), and writing the prefill
/// rows' q as the warpgroup kernel's bf16 (`prefill_q_bf16`), give the bits of rows rotated in
/// global memory: the logits of prompts alone and of batches mixing decodes with prompt
/// chunks, over an FP8 and a bf16 cache, on the tiny FP8 model and the head-dim-128 one the
/// device script names (where, on Hopper over the FP8 cache, the warpgroup kernel reads the
/// bf16 q).
#[test]
fn rope_in_shared_memory_and_bf16_prefill_q_give_the_same_bits() {
    if no_gpu() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let models = fp8_models(scratch.path());
    for (dir, kv_dtype) in models
        .iter()
        .flat_map(|d| [(d, KvDType::Fp8), (d, KvDType::Bf16)])
    {
        let run = |rope_shared: bool, prefill_q_bf16: bool| {
            let gpu = Model::load(
                dir,
                CudaBackend::new(&CudaOptions {
                    rope_shared,
                    prefill_q_bf16,
                    ..CudaOptions::from_env(0)
                })
                .unwrap(),
                &ModelOptions {
                    kv_dtype: Some(kv_dtype),
                    ..ModelOptions::default()
                },
            )
            .unwrap();
            gpu.backend().count_launches(true);
            let logits = mixed_batch_logits(&gpu);
            let launches = gpu.backend().launch_counts();
            let count = |op: &str| launches.get(op).copied().unwrap_or(0);
            let counts = (
                count("rope_cache_write"),
                count("rope_cache_write_shared"),
                count("rope_cache_write_prefill_q_bf16"),
            );
            let wgmma = gpu.backend().has_flash_wgmma()
                && gpu.config().head_dim() == 128
                && kv_dtype == KvDType::Fp8;
            (logits, counts, wgmma)
        };
        let (global, counts, _) = run(false, false);
        assert_eq!(
            (counts.1, counts.2),
            (0, 0),
            "{}: {counts:?}",
            dir.display()
        );
        let (shared, counts, _) = run(true, false);
        assert!(
            counts.1 > 0 && counts.2 == 0,
            "{}: {counts:?}",
            dir.display()
        );
        let (q16, counts, wgmma) = run(true, true);
        if wgmma {
            assert!(counts.2 > 0, "{}: {counts:?}", dir.display());
        } else {
            assert_eq!(counts.2, 0, "{}: {counts:?}", dir.display());
        }
        for (name, other) in [("shared", &shared), ("prefill q bf16", &q16)] {
            assert_eq!(global.len(), other.len());
            for (row, (a, b)) in global.iter().zip(other).enumerate() {
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{}: logits row {row} differ with {name} (relative L2 {:.2e})",
                    dir.display(),
                    rel_l2(a, b)
                );
            }
        }
        eprintln!(
            "{}, {kv_dtype:?} cache: rope in shared memory{}: {} logits rows bitwise equal; \
             launches {counts:?}",
            dir.display(),
            if wgmma { " and bf16 prefill q" } else { "" },
            global.len()
        );
    }
}

/// Logits of `steps` decode steps of `seqs` sequences at once (prompts of 300 + 7i tokens,
/// prefilled one at a time; forced tokens), in 16-token blocks, with the kernel launches of
/// the decode steps by operation.
fn batch_decode_logits(
    model: &Model<CudaBackend>,
    seqs: usize,
    steps: usize,
) -> (Vec<Vec<Vec<f32>>>, HashMap<&'static str, u64>) {
    const BLOCKS_PER_SEQ: usize = 32;
    let mut kv = model.alloc_kv_cache(16, seqs * BLOCKS_PER_SEQ).unwrap();
    let vocab = model.config().vocab_size.min(150);
    let table = |i: usize| -> Vec<u32> {
        ((i * BLOCKS_PER_SEQ) as u32..((i + 1) * BLOCKS_PER_SEQ) as u32).collect()
    };
    let lens: Vec<usize> = (0..seqs).map(|i| 300 + 7 * i).collect();
    for (i, &n) in lens.iter().enumerate() {
        let prompt: Vec<u32> = (0..n)
            .map(|j| ((j * 13 + i * 5 + 1) % vocab) as u32)
            .collect();
        let mut batch = ForwardBatch::default();
        batch.push(&prompt, 0, table(i), false);
        model.forward(&batch, &mut kv).unwrap();
    }
    model.backend().count_launches(true);
    let logits = (0..steps)
        .map(|step| {
            let mut batch = ForwardBatch::default();
            for (i, &n) in lens.iter().enumerate() {
                let token = ((step * 31 + i * 7 + 2) % vocab) as u32;
                batch.push(&[token], n + step, table(i), true);
            }
            model.forward(&batch, &mut kv).unwrap()
        })
        .collect();
    let launches = model.backend().launch_counts();
    model.backend().count_launches(false);
    (logits, launches)
}

/// The [gate | up] GEMV writing silu(gate) * up (`gemv_silu`: the bf16 GEMV at 1 row, the
/// plain FP8 GEMV at 1 row, the tensor-core FP8 GEMV at 2-8) gives the bits of the projection
/// and `silu_mul` after it, and runs exactly there (no `silu_mul` left; none of it where the
/// projection is not on those GEMVs). Decode steps of 1, 2, 3, 4 and 8 sequences, eager, captured and
/// replayed, on the tiny model in bf16 and FP8 (and the FP8 model the device script names),
/// with a bf16 and an FP8 cache.
#[test]
fn the_gate_up_gemv_with_silu_gives_the_bits_of_the_two_launches() {
    if no_gpu() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let extra = std::env::var_os("TANDEM_GPU_TEST_MODEL_FP8").map(PathBuf::from);
    let dirs = [tandem_test_kit::model_dir("tiny"), tiny_fp8(scratch.path())];
    for dir in dirs.into_iter().chain(extra) {
        for kv_dtype in [KvDType::Bf16, KvDType::Fp8] {
            let options = ModelOptions {
                kv_dtype: Some(kv_dtype),
                ..ModelOptions::default()
            };
            let gpu = Model::load(
                &dir,
                CudaBackend::new(&CudaOptions::from_env(0)).unwrap(),
                &options,
            )
            .unwrap();
            let mut on = gpu.backend().options();
            on.gemv_silu = true;
            let off = CudaOptions {
                gemv_silu: false,
                ..on.clone()
            };
            for seqs in [1, 2, 3, 4, 8] {
                let what = format!("{}, {kv_dtype:?} cache, {seqs} sequences", dir.display());
                gpu.backend().set_options(&on).unwrap();
                let (fused, fused_launches) = batch_decode_logits(&gpu, seqs, 4);
                gpu.backend().set_options(&off).unwrap();
                let (separate, separate_launches) = batch_decode_logits(&gpu, seqs, 4);
                let count = |launches: &HashMap<&str, u64>, op: &str| {
                    launches.get(op).copied().unwrap_or(0)
                };
                // FP8 projections on a GEMV, or bf16 ones on the GEMV at one row.
                let fp8_gemv = count(&separate_launches, "gemv_fp8")
                    + count(&separate_launches, "gemv_fp8_mma")
                    > 0;
                let expected = fp8_gemv || (seqs == 1 && count(&separate_launches, "gemv") > 0);
                let fused_silu: u64 = ["gemv_silu", "gemv_fp8_silu", "gemv_fp8_mma_silu"]
                    .iter()
                    .map(|op| count(&fused_launches, op))
                    .sum();
                if expected {
                    assert!(fused_silu > 0, "{what}: {fused_launches:?}");
                    assert_eq!(
                        count(&fused_launches, "silu_mul"),
                        0,
                        "{what}: {fused_launches:?}"
                    );
                } else {
                    assert_eq!(fused_silu, 0, "{what}: {fused_launches:?}");
                }
                for (step, (a, b)) in fused.iter().zip(&separate).enumerate() {
                    let (a, b) = (a.concat(), b.concat());
                    assert!(
                        !a.is_empty() && a.iter().all(|x| x.is_finite()),
                        "{what}: step {step}'s logits"
                    );
                    assert!(
                        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{what}: step {step}'s logits differ with the fused kernel (relative L2 \
                         {:.2e})",
                        rel_l2(&a, &b)
                    );
                }
                eprintln!("{what}: bitwise equal; fused launches {fused_launches:?}");
            }
        }
    }
}

/// The sweep of cuBLASLt's FP8 configurations behind `gpu_bench fp8-tactics`: the heuristic's
/// configuration (what the projections run) comes first, alone of its kind, and is the
/// reference of the others' results; every configuration listed ran and was timed; and some
/// configuration beside the heuristic's computes the same product (within 1e-2, relative L2),
/// or the sweep would compare nothing.
#[test]
fn fp8_gemm_tactics_time_the_heuristics_configuration_against_others() {
    use rand::{RngExt, SeedableRng};
    if no_gpu() {
        return;
    }
    let gpu = CudaBackend::new(&CudaOptions::from_env(0)).unwrap();
    let stream = gpu.stream();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(33);
    let mut codes = |len: usize| {
        let values: Vec<f32> = (0..len)
            .map(|_| 4.0 * (rng.random::<f32>() - 0.5))
            .collect();
        stream
            .clone_htod(&WeightDType::F8E4M3.encode(&values))
            .unwrap()
    };
    let (rows, k, n) = (256, 1024, 512);
    let (x, w) = (codes(rows * k), codes(n * k));
    let x_scales = stream.clone_htod(&vec![1.0f32 / 64.0; rows]).unwrap();
    let w_scales = stream.clone_htod(&vec![1.0f32 / 32.0; n]).unwrap();
    let tactics = gpu
        .fp8_gemm_tactics(&x, &x_scales, &w, &w_scales, rows, k, n, 2)
        .unwrap();
    let agreeing = tactics.iter().filter(|t| t.rel_l2 < 1e-2).count();
    eprintln!(
        "[{rows}x{k}]·[{n}x{k}]ᵀ: {} configurations ran, {agreeing} within 1e-2 of the \
         heuristic's result; heuristic {:?}",
        tactics.len(),
        tactics.first()
    );
    assert!(
        tactics
            .first()
            .is_some_and(|t| t.heuristic && t.rel_l2 == 0.0),
        "the heuristic's configuration is not the first timed: {:?}",
        tactics.first()
    );
    assert_eq!(tactics.iter().filter(|t| t.heuristic).count(), 1);
    assert!(
        tactics
            .iter()
            .all(|t| t.seconds > 0.0 && t.rel_l2.is_finite())
    );
    assert!(
        agreeing > 1,
        "no configuration but the heuristic's computes its product ({} ran)",
        tactics.len()
    );
}
