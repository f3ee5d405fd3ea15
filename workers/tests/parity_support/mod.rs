//! Shared helpers of the parity tests: reading the reference fixtures written by
//! `scripts/fixtures/parity_reference.py`, and driving a model through prefill chunks and
//! greedy decode steps on a paged cache whose blocks are deliberately out of order.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tandem_workers::backend::cpu::{CpuBackend, CpuOptions};
use tandem_workers::model::{ForwardBatch, Model, ModelOptions};

pub const BLOCK_SIZE: usize = 16;

#[derive(Debug, Deserialize)]
pub struct Prompt {
    pub name: String,
    pub ids: Vec<u32>,
    pub top_ids: Vec<u32>,
    pub top_logits: Vec<f32>,
    #[serde(default)]
    pub greedy: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub vocab_size: usize,
    /// Ids transformers' `generate(min_new_tokens=N)` masked while producing `greedy`.
    #[serde(default)]
    pub eos_suppressed_in_greedy: Vec<u32>,
    pub prompts: Vec<Prompt>,
    /// Full last-position logits per prompt, filled from `logits.f32`.
    #[serde(skip)]
    pub logits: Vec<Vec<f32>>,
}

pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(name)
}

/// A bf16 copy of a committed f32 fixture model (weights rounded to bf16), in the test tmpdir.
pub fn bf16_copy(name: &str) -> PathBuf {
    let src = fixture_dir(name);
    let dst = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-bf16"));
    std::fs::create_dir_all(&dst).expect("tmp dir");
    let bytes = std::fs::read(src.join("model.safetensors")).expect("fixture weights");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("fixture safetensors");
    let mut converted = Vec::new();
    for (name, view) in st.iter() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        let data: Vec<u8> = view
            .data()
            .chunks_exact(4)
            .flat_map(|b| {
                half::bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes()
            })
            .collect();
        converted.push((name.to_string(), view.shape().to_vec(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = converted
        .iter()
        .map(|(n, shape, data)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, shape.clone(), data)
                    .expect("view");
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors"))
        .expect("write bf16");
    std::fs::copy(src.join("config.json"), dst.join("config.json")).expect("config");
    dst
}

/// `$TANDEM_TEST_MODELS/<name>` (default `<workspace>/target/test-models/<name>`), which
/// `scripts/test-models` prepares; panics with that instruction when it is missing.
pub fn test_model_dir(name: &str) -> PathBuf {
    tandem_test_kit::model_dir(name)
}

pub fn read_reference(dir: &Path) -> Reference {
    let json = std::fs::read_to_string(dir.join("reference.json"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join("reference.json").display()));
    let mut reference: Reference = serde_json::from_str(&json).expect("reference.json parses");
    let bytes = std::fs::read(dir.join("logits.f32")).expect("logits.f32 readable");
    let floats: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(floats.len(), reference.prompts.len() * reference.vocab_size);
    reference.logits = floats
        .chunks(reference.vocab_size)
        .map(<[f32]>::to_vec)
        .collect();
    reference
}

pub fn load_cpu(dir: &Path) -> Model<CpuBackend> {
    load_cpu_with(dir, CpuOptions::default().quant_activations)
}

/// [`load_cpu`] with `codes` per activation in products with GGUF blocks kept.
#[allow(dead_code)] // Not every test binary that includes this module uses it.
pub fn load_cpu_with(
    dir: &Path,
    codes: tandem_workers::backend::cpu::quant::ActivationCodes,
) -> Model<CpuBackend> {
    let backend = CpuBackend::new(&CpuOptions {
        threads: 2,
        quant_activations: codes,
        ..Default::default()
    })
    .expect("cpu backend");
    Model::load(dir, backend, &ModelOptions::default())
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

/// `||a - b|| / ||b||`.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den).sqrt()
}

pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// One sequence on its own cache, with a block table in scrambled order.
pub struct Session<'m> {
    model: &'m Model<CpuBackend>,
    kv: <CpuBackend as tandem_workers::backend::Backend>::KvCache,
    table: Vec<u32>,
    pub len: usize,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Model<CpuBackend>, max_tokens: usize) -> Self {
        let blocks = max_tokens.div_ceil(BLOCK_SIZE) + 1;
        let kv = model.alloc_kv_cache(BLOCK_SIZE, blocks).expect("kv cache");
        // Reverse order: logical block i lives in physical block (blocks - 1 - i).
        let table = (0..blocks as u32).rev().collect();
        Session {
            model,
            kv,
            table,
            len: 0,
        }
    }

    /// Feeds `tokens` as one chunk; returns the last token's logits.
    pub fn feed(&mut self, tokens: &[u32]) -> Vec<f32> {
        let mut batch = ForwardBatch::default();
        batch.push(tokens, self.len, self.table.clone(), true);
        let mut rows = self.model.forward(&batch, &mut self.kv).expect("forward");
        self.len += tokens.len();
        assert_eq!(rows.len(), 1);
        rows.pop().expect("one row")
    }

    /// Prefills `prompt` in chunks of the given sizes (the remainder in a last chunk).
    pub fn prefill_chunked(&mut self, prompt: &[u32], chunks: &[usize]) -> Vec<f32> {
        let mut start = 0;
        for &c in chunks {
            let end = (start + c).min(prompt.len());
            if end > start && end < prompt.len() {
                self.feed(&prompt[start..end]);
                start = end;
            }
        }
        self.feed(&prompt[start..])
    }
}

/// Greedy generation: prefill, then one decode step at a time; the `suppressed` ids are never
/// picked (as `min_new_tokens` does for end-of-sequence ids).
pub fn greedy(
    model: &Model<CpuBackend>,
    prompt: &[u32],
    new_tokens: usize,
    suppressed: &[u32],
) -> Vec<u32> {
    let mut session = Session::new(model, prompt.len() + new_tokens);
    let mut logits = session.feed(prompt);
    let mut out = Vec::with_capacity(new_tokens);
    for _ in 0..new_tokens {
        for &id in suppressed {
            logits[id as usize] = f32::NEG_INFINITY;
        }
        let next = argmax(&logits);
        out.push(next);
        if out.len() < new_tokens {
            logits = session.feed(&[next]);
        }
    }
    out
}
