//! LoRA adapters on the CPU backend, against the same adapters merged into the weights
//! (`model-prep lora merge`): a sequence that names an adapter computes what the merged model
//! computes, beside sequences of the base model and of other adapters in one batch, each row
//! as it is alone; the prefix cache never hands one adapter's blocks to another or to the base
//! model; and adapters that do not fit the model are refused by name.

mod engine_support;
mod parity_support;

use std::path::{Path, PathBuf};

use engine_support::{Recorder, run_to_idle};
use model_prep::lora::{RandomAdapterOptions, merge_adapter, random_adapter};
use parity_support::{argmax, rel_l2};
use tandem_model::WeightDType;
use tandem_model::lora::Target;
use tandem_protocol::config::LoraModule;
use tandem_workers::backend::cpu::{CpuBackend, CpuOptions};
use tandem_workers::engine::{
    AdapterRef, Engine, EngineConfig, FinishReason, GenerationRequest, ModelRunner,
};
use tandem_workers::model::{ForwardBatch, Model, ModelOptions};

const BLOCK: usize = 16;

/// The f32 fixture model: the merged copy then holds `W + scale * B A` without rounding.
fn base_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/tiny-llama")
}

fn tmp(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("lora-{name}"))
}

/// A random adapter (`targets`, rank 4, `seed`) for the fixture, and the fixture with it
/// merged.
fn adapter(name: &str, targets: &[Target], seed: u64) -> (PathBuf, PathBuf) {
    let dir = tmp(name);
    random_adapter(
        &base_dir(),
        &dir,
        &RandomAdapterOptions {
            rank: 4,
            alpha: 8.0,
            targets: targets.to_vec(),
            seed,
            dtype: WeightDType::F32,
            strength: 0.25,
        },
        true,
    )
    .expect("a random adapter");
    let merged = tmp(&format!("{name}-merged"));
    merge_adapter(&base_dir(), &dir, &merged, true).expect("merged");
    (dir, merged)
}

fn backend() -> CpuBackend {
    CpuBackend::new(&CpuOptions {
        threads: 2,
        ..Default::default()
    })
    .expect("cpu backend")
}

fn load(dir: &Path, adapters: &[(&str, &Path)]) -> Model<CpuBackend> {
    let mut model = Model::load(dir, backend(), &ModelOptions::default()).expect("model");
    let modules: Vec<LoraModule> = adapters
        .iter()
        .map(|(name, path)| LoraModule {
            name: name.to_string(),
            path: path.to_path_buf(),
        })
        .collect();
    model
        .load_adapters(&modules, "base-fingerprint")
        .expect("adapters");
    model
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 37 + salt * 11 + 3) % 512)
        .collect()
}

/// The logits of a prompt's last token, then of `steps` greedy decode steps, of one sequence
/// alone computing with `adapter`.
fn greedy_logits(
    model: &Model<CpuBackend>,
    prompt: &[u32],
    adapter: Option<u32>,
    steps: usize,
) -> Vec<Vec<f32>> {
    let blocks = (prompt.len() + steps).div_ceil(BLOCK) + 1;
    let mut kv = model.alloc_kv_cache(BLOCK, blocks).expect("kv");
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut out = Vec::new();
    let mut tokens = prompt.to_vec();
    let mut cached = 0;
    for _ in 0..=steps {
        let mut batch = ForwardBatch::default();
        batch.push(&tokens[cached..], cached, table.clone(), true);
        batch.set_adapter_from(0, adapter);
        let row = model.forward(&batch, &mut kv).expect("forward").remove(0);
        cached = tokens.len();
        tokens.push(argmax(&row));
        out.push(row);
    }
    out
}

#[test]
fn an_adapter_computes_what_its_weights_merged_compute() {
    // k_proj untargeted: its zero block of the fused q/k/v factors is exercised too.
    let targets = [
        Target::Q,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];
    let (dir, merged_dir) = adapter("merge", &targets, 1);
    let served = load(&base_dir(), &[("sql", &dir)]);
    let merged = load(&merged_dir, &[]);
    for (len, salt) in [(5, 0), (17, 1), (40, 2)] {
        let p = prompt(len, salt);
        let with_adapter = greedy_logits(&served, &p, Some(0), 6);
        let reference = greedy_logits(&merged, &p, None, 6);
        let base = greedy_logits(&served, &p, None, 0);
        for (step, (got, want)) in with_adapter.iter().zip(&reference).enumerate() {
            let err = rel_l2(got, want);
            assert!(
                err < 1e-5,
                "prompt of {len}, step {step}: relative L2 {err:e} against the merged weights"
            );
            assert_eq!(argmax(got), argmax(want), "prompt of {len}, step {step}");
        }
        // The adapter changes the model: a build that ignored it would fail above.
        let moved = rel_l2(&base[0], &reference[0]);
        assert!(
            moved > 0.05,
            "prompt of {len}: the adapter moves the logits by only {moved:e}"
        );
    }
}

#[test]
fn a_batch_mixes_adapters_and_the_base_model_row_for_row() {
    let (a, _) = adapter("mix-a", &Target::ALL, 2);
    let (b, _) = adapter("mix-b", &[Target::Q, Target::Down], 3);
    let model = load(&base_dir(), &[("a", &a), ("b", &b)]);
    let blocks_each = 4;
    let mut kv = model.alloc_kv_cache(BLOCK, 4 * blocks_each).expect("kv");
    let table = |s: usize| -> Vec<u32> {
        (0..blocks_each as u32)
            .map(|i| (s * blocks_each) as u32 + i)
            .collect()
    };
    // Four sequences: adapter a, the base model, adapter b, adapter a again.
    let adapters = [Some(0), None, Some(1), Some(0)];
    let prompts: Vec<Vec<u32>> = (0..4).map(|s| prompt(9 + 5 * s, s as u32)).collect();
    let mut batch = ForwardBatch::default();
    for (s, p) in prompts.iter().enumerate() {
        batch.push(p, 0, table(s), true);
        batch.set_adapter_from(s, adapters[s]);
    }
    let rows = model.forward(&batch, &mut kv).expect("mixed prefill");
    let mut next: Vec<u32> = rows.iter().map(|r| argmax(r)).collect();
    // Then two decode steps of all four together.
    let mut all_rows = vec![rows];
    let mut lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    for _ in 0..2 {
        let mut batch = ForwardBatch::default();
        for s in 0..4 {
            batch.push(&[next[s]], lens[s], table(s), true);
            batch.set_adapter_from(s, adapters[s]);
            lens[s] += 1;
        }
        let rows = model.forward(&batch, &mut kv).expect("mixed decode");
        next = rows.iter().map(|r| argmax(r)).collect();
        all_rows.push(rows);
    }
    for s in 0..4 {
        let alone = greedy_logits(&model, &prompts[s], adapters[s], 2);
        for (step, rows) in all_rows.iter().enumerate() {
            assert_eq!(
                rows[s], alone[step],
                "sequence {s} (adapter {:?}), step {step}: batched differs from alone",
                adapters[s]
            );
        }
    }
    // The two adapters and the base model answer differently.
    let first = |adapter| greedy_logits(&model, &prompts[0], adapter, 0).remove(0);
    assert!(rel_l2(&first(Some(0)), &first(None)) > 0.05);
    assert!(rel_l2(&first(Some(1)), &first(Some(0))) > 0.05);
}

/// One request of `prompt` through an engine with prefix caching: its tokens and the prompt
/// tokens it found cached.
fn engine_run(
    engine: &mut Engine<ModelRunner<CpuBackend>>,
    prompt: &[u32],
    adapter: Option<AdapterRef>,
) -> (Vec<u32>, u64) {
    let before = engine.prefix_cache_stats().hit_tokens;
    let request = GenerationRequest {
        ignore_eos: true,
        adapter,
        ..GenerationRequest::greedy(prompt.to_vec(), 8)
    };
    let id = engine.add_request(request).expect("admitted");
    let mut recorder = Recorder::default();
    run_to_idle(engine, &mut recorder);
    let out = recorder.get(id);
    assert_eq!(out.reason, Some(FinishReason::Length));
    (
        out.tokens.clone(),
        engine.prefix_cache_stats().hit_tokens - before,
    )
}

#[test]
fn the_prefix_cache_keeps_each_adapters_blocks_apart() {
    let (a, merged_a) = adapter("cache-a", &Target::ALL, 4);
    let (b, _) = adapter("cache-b", &Target::ALL, 5);
    let model = load(&base_dir(), &[("a", &a), ("b", &b)]);
    let config = EngineConfig {
        block_size: BLOCK,
        num_blocks: 64,
        max_num_batched_tokens: 64,
        max_num_seqs: 4,
        prefix_caching: true,
        cache_namespace: "base-fingerprint".into(),
        ..EngineConfig::default()
    };
    let runner = ModelRunner::new(model, BLOCK, 64).expect("kv");
    let mut engine = Engine::new(runner, config.clone(), None).expect("engine");
    let fingerprint = |index: u32| {
        let model = engine_model_fingerprints(&[("a", &a), ("b", &b)]);
        AdapterRef {
            index,
            fingerprint: model[index as usize].clone(),
        }
    };
    let p = prompt(50, 7);
    let (base_tokens, hits) = engine_run(&mut engine, &p, None);
    assert_eq!(hits, 0);
    // The same prompt for adapter a: nothing of the base model's blocks is taken.
    let (a_tokens, hits) = engine_run(&mut engine, &p, Some(fingerprint(0)));
    assert_eq!(hits, 0, "adapter a found the base model's blocks");
    // For adapter b: nothing of a's either.
    let (b_tokens, hits) = engine_run(&mut engine, &p, Some(fingerprint(1)));
    assert_eq!(hits, 0, "adapter b found adapter a's blocks");
    // Adapter a again: its own blocks, and the same tokens.
    let (again, hits) = engine_run(&mut engine, &p, Some(fingerprint(0)));
    assert_eq!(hits, 48, "three full blocks of a's own");
    assert_eq!(again, a_tokens);
    assert_ne!(a_tokens, base_tokens);
    assert_ne!(b_tokens, a_tokens);
    // And a's tokens are the merged model's.
    let merged = Model::load(&merged_a, backend(), &ModelOptions::default()).expect("merged");
    let runner = ModelRunner::new(merged, BLOCK, 64).expect("kv");
    let mut merged_engine = Engine::new(runner, config, None).expect("engine");
    let (merged_tokens, _) = engine_run(&mut merged_engine, &p, None);
    assert_eq!(a_tokens, merged_tokens);
}

/// The fingerprints a model loading `adapters` gives them, in order.
fn engine_model_fingerprints(adapters: &[(&str, &Path)]) -> Vec<String> {
    load(&base_dir(), adapters)
        .adapters()
        .iter()
        .map(|a| a.fingerprint.clone())
        .collect()
}

#[test]
fn adapters_that_do_not_fit_are_refused_by_name() {
    let load_err = |modules: Vec<LoraModule>| {
        let mut model = Model::load(&base_dir(), backend(), &ModelOptions::default()).unwrap();
        model
            .load_adapters(&modules, "fp")
            .expect_err("refused")
            .to_string()
    };
    let module = |name: &str, path: &Path| LoraModule {
        name: name.into(),
        path: path.to_path_buf(),
    };
    // An adapter made for another model's shapes (the Qwen2 fixture's hidden size).
    let other = tmp("other-model");
    random_adapter(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/tiny-qwen3"),
        &other,
        &RandomAdapterOptions {
            rank: 4,
            alpha: 8.0,
            targets: vec![Target::Q],
            seed: 0,
            dtype: WeightDType::Bf16,
            strength: 0.25,
        },
        true,
    )
    .unwrap();
    let err = load_err(vec![module("other", &other)]);
    assert!(
        err.contains("LoRA adapter `other`") && err.contains("q_proj.lora_"),
        "{err}"
    );
    // A DoRA adapter.
    let (fits, _) = adapter("dora", &[Target::Q], 6);
    let dora = tmp("dora-config");
    std::fs::create_dir_all(&dora).unwrap();
    std::fs::copy(
        fits.join("adapter_model.safetensors"),
        dora.join("adapter_model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        dora.join("adapter_config.json"),
        r#"{"r": 4, "lora_alpha": 8, "use_dora": true}"#,
    )
    .unwrap();
    let err = load_err(vec![module("dora", &dora)]);
    assert!(err.contains("use_dora"), "{err}");
    // A directory without an adapter, and one name twice.
    let err = load_err(vec![module("none", &tmp("absent"))]);
    assert!(
        err.contains("adapter_config.json") && err.contains("`none`"),
        "{err}"
    );
    let err = load_err(vec![module("x", &fits), module("x", &fits)]);
    assert!(err.contains("given twice"), "{err}");
}
