//! Batch invariance at the forward level: every sequence gets bitwise the same logits (hence
//! the same greedy tokens) whether it runs alone, prefilled in one chunk and decoded one token
//! per step, or batched with 7 others of different lengths, prefilled in chunks of its own size,
//! with prefill chunks and decode steps of other sequences in the same forward. Checked for the
//! f32 path (f32 weights, f32 cache) and the bf16 path (bf16 weights, bf16 cache), on the
//! committed tiny Llama and Qwen2 models.

mod parity_support;

use std::path::Path;

use parity_support::*;
use tandem_workers::backend::cpu::CpuBackend;
use tandem_workers::model::{ForwardBatch, Model};

const NEW_TOKENS: usize = 6;

struct Seq {
    prompt: Vec<u32>,
    /// Prefill chunk size of this sequence when batched.
    chunk: usize,
    /// Step at which it joins the batch.
    start_step: usize,
    fed: usize,
    generated: Vec<u32>,
    table: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    [13usize, 1, 40, 7, 25, 3, 60, 9]
        .iter()
        .enumerate()
        .map(|(s, &len)| {
            (0..len)
                .map(|i| ((i * 31 + s * 97 + 5) as u32) % vocab)
                .collect()
        })
        .collect()
}

/// Alone: one prefill chunk, then one token per step; the logits at each step.
fn alone(model: &Model<CpuBackend>, prompt: &[u32]) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut session = Session::new(model, prompt.len() + NEW_TOKENS);
    let mut all = vec![session.feed(prompt)];
    let mut tokens = Vec::new();
    while tokens.len() < NEW_TOKENS {
        let next = argmax(all.last().expect("logits"));
        tokens.push(next);
        if tokens.len() < NEW_TOKENS {
            all.push(session.feed(&[next]));
        }
    }
    (tokens, all)
}

fn batched(model: &Model<CpuBackend>, prompts: &[Vec<u32>]) -> Vec<Seq> {
    let blocks_each = (60 + NEW_TOKENS).div_ceil(BLOCK_SIZE) + 1;
    let mut kv = model
        .alloc_kv_cache(BLOCK_SIZE, blocks_each * prompts.len())
        .expect("kv cache");
    let mut seqs: Vec<Seq> = prompts
        .iter()
        .enumerate()
        .map(|(s, p)| Seq {
            prompt: p.clone(),
            chunk: 5 + 3 * s,
            start_step: s % 3,
            fed: 0,
            generated: Vec::new(),
            // Interleaved physical blocks: sequence s owns blocks s, s + 8, s + 16, ...
            table: (0..blocks_each)
                .map(|b| (b * prompts.len() + s) as u32)
                .collect(),
            logits: Vec::new(),
        })
        .collect();
    let mut step = 0;
    while seqs.iter().any(|s| s.generated.len() < NEW_TOKENS) {
        let mut batch = ForwardBatch::default();
        let mut members = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            if step < s.start_step || s.generated.len() >= NEW_TOKENS {
                continue;
            }
            if s.fed < s.prompt.len() {
                let end = (s.fed + s.chunk).min(s.prompt.len());
                let last = end == s.prompt.len();
                batch.push(&s.prompt[s.fed..end], s.fed, s.table.clone(), last);
                members.push((i, end - s.fed, last));
            } else {
                let token = *s.generated.last().expect("decoding after a token");
                batch.push(&[token], s.fed, s.table.clone(), true);
                members.push((i, 1, true));
            }
        }
        let rows = model.forward(&batch, &mut kv).expect("forward");
        let mut rows = rows.into_iter();
        for (i, fed, wants) in members {
            let s = &mut seqs[i];
            s.fed += fed;
            if wants {
                let logits = rows.next().expect("a row per wanting sequence");
                s.generated.push(argmax(&logits));
                s.logits.push(logits);
            }
        }
        step += 1;
    }
    seqs
}

fn check(model_dir: &Path) {
    let model = load_cpu(model_dir);
    let prompts = prompts(model.config().vocab_size as u32);
    let seqs = batched(&model, &prompts);
    for (s, seq) in seqs.iter().enumerate() {
        let (tokens, logits) = alone(&model, &seq.prompt);
        assert_eq!(
            seq.generated,
            tokens,
            "{}: sequence {s} tokens",
            model_dir.display()
        );
        assert_eq!(seq.logits.len(), logits.len());
        for (step, (a, b)) in seq.logits.iter().zip(&logits).enumerate() {
            assert!(
                a == b,
                "{}: sequence {s} step {step}: logits differ",
                model_dir.display()
            );
        }
    }
}

#[test]
fn f32_llama_is_batch_invariant() {
    check(&fixture_dir("tiny-llama"));
}

#[test]
fn f32_qwen2_is_batch_invariant() {
    check(&fixture_dir("tiny-qwen2"));
}

#[test]
fn f32_qwen3_is_batch_invariant() {
    check(&fixture_dir("tiny-qwen3"));
}

#[test]
fn bf16_llama_is_batch_invariant() {
    let dir = bf16_copy("tiny-llama");
    let model = load_cpu(&dir);
    assert_eq!(
        model.weight_dtype(),
        tandem_workers::backend::WeightDType::Bf16
    );
    drop(model);
    check(&dir);
}
