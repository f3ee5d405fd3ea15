//! Engine logic against a fake model whose "KV cache" stores the tokens themselves: the
//! logits of a sequence are a hash of the context read back through its block table, so a
//! wrong block table, a lost token or a bad recompute after preemption changes the output.
//! (The real model is exercised by `tests/engine_*.rs`.)

use super::*;
use crate::backend::KvBytesMut;
use crate::model::ModelError;
use crate::sampler::SampledToken;
use crate::sampler::SamplingParams;
use crate::sampler::device::RowRequest;
use crate::scheduler::SeqStatus;

const VOCAB: usize = 32;
const EOS: u32 = 0;

struct FakeModel {
    block_size: usize,
    /// `slots[block][offset]`: the token written there.
    slots: Vec<Vec<Option<u32>>>,
    fail_next: bool,
    /// The next forward fails as a lost device would.
    lose_device_next: bool,
    max_model_len: usize,
    /// Tokens run through forward passes, since the model was made.
    tokens_computed: usize,
    /// The last forward's row outputs, until taken.
    row_outputs: crate::model::RowOutputs,
}

impl FakeModel {
    fn new(block_size: usize, num_blocks: usize) -> Self {
        Self {
            block_size,
            slots: vec![vec![None; block_size]; num_blocks],
            fail_next: false,
            lose_device_next: false,
            max_model_len: 1 << 20,
            tokens_computed: 0,
            row_outputs: Default::default(),
        }
    }

    /// The logits of the token after position `last` of `seq`: a hash of the context up to
    /// it, read back through the block table.
    fn logits_after(
        &self,
        seq: &crate::model::SequenceSlice,
        last: usize,
    ) -> Result<Vec<f32>, ModelError> {
        let mut h: u64 = 0xcbf29ce484222325;
        for pos in 0..=last {
            let block = seq.block_table[pos / self.block_size] as usize;
            let t = self.slots[block][pos % self.block_size]
                .ok_or_else(|| ModelError::InvalidBatch(format!("position {pos} unwritten")))?;
            h = (h ^ t as u64).wrapping_mul(0x100000001b3);
        }
        Ok((0..VOCAB as u64)
            .map(|v| {
                let x = (h ^ v.wrapping_mul(0x9E3779B97F4A7C15)).wrapping_mul(0xff51afd7ed558ccd);
                // Keep EOS unlikely so sequences run to max_tokens mostly.
                let bias = if v == EOS as u64 { -3.0 } else { 0.0 };
                (x >> 40) as f32 / (1u64 << 24) as f32 * 4.0 + bias
            })
            .collect())
    }
}

impl StepModel for FakeModel {
    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        vec![EOS]
    }

    fn kv_layout(&self) -> crate::kv_cache::KvLayout {
        // One u32 token id per slot, stored in the K half of a one-element head.
        crate::kv_cache::KvLayout {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 1,
            block_size: self.block_size,
            dtype: crate::kv_cache::KvDType::F32,
        }
    }

    fn read_kv_blocks(
        &self,
        blocks: &[crate::kv_cache::block_pool::BlockId],
        dst: KvBytesMut<'_>,
    ) -> Result<(), ModelError> {
        let KvBytesMut::Host(dst) = dst else {
            return Err(ModelError::InvalidBatch("no device memory here".into()));
        };
        let block_bytes = self.kv_layout().block_bytes();
        for (&block, chunk) in blocks.iter().zip(dst.chunks_exact_mut(block_bytes)) {
            chunk.fill(0);
            for (slot, token) in self.slots[block as usize].iter().enumerate() {
                let value = token.map_or(u32::MAX, |t| t);
                chunk[slot * 4..slot * 4 + 4].copy_from_slice(&value.to_le_bytes());
            }
        }
        Ok(())
    }

    fn write_kv_blocks(
        &mut self,
        blocks: &[crate::kv_cache::block_pool::BlockId],
        src: crate::backend::KvBytes<'_>,
    ) -> Result<(), ModelError> {
        let crate::backend::KvBytes::Host(src) = src else {
            return Err(ModelError::InvalidBatch("no device memory here".into()));
        };
        let block_bytes = self.kv_layout().block_bytes();
        for (&block, chunk) in blocks.iter().zip(src.chunks_exact(block_bytes)) {
            for slot in 0..self.block_size {
                let value = u32::from_le_bytes(chunk[slot * 4..slot * 4 + 4].try_into().unwrap());
                self.slots[block as usize][slot] = (value != u32::MAX).then_some(value);
            }
        }
        Ok(())
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<Vec<f32>>, ModelError> {
        if std::mem::take(&mut self.fail_next) {
            return Err(ModelError::InvalidBatch("injected failure".into()));
        }
        if std::mem::take(&mut self.lose_device_next) {
            return Err(ModelError::Backend(
                crate::backend::BackendError::DeviceLost {
                    op: "forward",
                    detail: "injected loss".into(),
                },
            ));
        }
        let mut rows = Vec::new();
        self.tokens_computed += batch.tokens.len();
        for seq in &batch.sequences {
            let new = &batch.tokens[seq.token_start..seq.token_start + seq.token_count];
            for (i, &t) in new.iter().enumerate() {
                let pos = seq.cached_len + i;
                let block = seq.block_table[pos / self.block_size] as usize;
                self.slots[block][pos % self.block_size] = Some(t);
            }
        }
        self.row_outputs.clear();
        for seq in &batch.sequences {
            if let Some(asked) = &seq.row_logprobs {
                let mut list = Vec::new();
                for (i, &target) in asked.targets.iter().enumerate() {
                    let row = self.logits_after(seq, seq.cached_len + asked.first + i)?;
                    list.push(crate::sampler::token_logprob(&row, target, asked.top_k));
                }
                self.row_outputs.logprobs.push(list);
            }
            if seq.wants_hidden {
                // The fake's hidden state: its logits row, a hash of the whole context.
                let hidden = self.logits_after(seq, seq.context_len() - 1)?;
                self.row_outputs.hidden.push(hidden);
            }
            if seq.wants_logits {
                rows.push(self.logits_after(seq, seq.context_len() - 1)?);
            }
        }
        Ok(rows)
    }

    fn take_row_outputs(&mut self) -> crate::model::RowOutputs {
        std::mem::take(&mut self.row_outputs)
    }
}

/// An engine of `num_blocks` 4-token blocks that admits on the first prompt chunk alone, so
/// that the small caches of these tests preempt (the room to grow is tested on its own).
fn engine(budget: usize, num_blocks: usize) -> Engine<FakeModel> {
    Engine::new(
        FakeModel::new(4, num_blocks),
        first_chunk_admission(budget, num_blocks),
        None,
    )
    .unwrap()
}

/// The same engine computing every prompt in full.
fn engine_without_prefix_cache(budget: usize, num_blocks: usize) -> Engine<FakeModel> {
    let config = EngineConfig {
        prefix_caching: false,
        ..first_chunk_admission(budget, num_blocks)
    };
    Engine::new(FakeModel::new(4, num_blocks), config, None).unwrap()
}

fn first_chunk_admission(budget: usize, num_blocks: usize) -> EngineConfig {
    EngineConfig {
        block_size: 4,
        num_blocks,
        max_num_batched_tokens: budget,
        max_num_seqs: budget.min(8),
        max_model_len: None,
        growth_reserve_tokens: None,
        prefix_caching: true,
        ..EngineConfig::default()
    }
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 1 + (i * 7 + salt * 13) % 31)
        .collect()
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

type Outcomes = HashMap<RequestId, (Vec<u32>, FinishReason)>;

/// Adds a step's events to per-request tokens and finish reasons.
fn absorb(out: &mut Outcomes, events: Vec<EngineEvent>) {
    for ev in events {
        let entry = out
            .entry(ev.request_id)
            .or_insert_with(|| (vec![], FinishReason::Cancelled));
        match ev.kind {
            EventKind::Token { id, .. } => entry.0.push(id),
            EventKind::Finished { reason, .. } => entry.1 = reason,
            EventKind::RoomReserved { .. }
            | EventKind::PromptLogprobs { .. }
            | EventKind::Hidden { .. } => {}
        }
    }
}

/// Runs until idle; per request: generated tokens and finish reason.
fn run(e: &mut Engine<FakeModel>) -> Outcomes {
    let mut out = Outcomes::new();
    run_into(e, &mut out);
    out
}

fn run_into(e: &mut Engine<FakeModel>, out: &mut Outcomes) {
    let mut steps = 0;
    while e.has_work() {
        absorb(out, e.step());
        steps += 1;
        assert!(steps < 100_000, "engine made no progress");
    }
}

fn request(prompt_ids: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> GenerationRequest {
    GenerationRequest {
        sampling,
        ..GenerationRequest::greedy(prompt_ids, max_tokens)
    }
}

#[test]
fn same_tokens_alone_batched_and_under_preemption() {
    for params in [SamplingParams::greedy(), sampled(1234)] {
        let mut alone = engine(64, 64);
        let id = alone
            .add_request(request(prompt(13, 0), 20, params.clone()))
            .unwrap();
        let reference = run(&mut alone).remove(&id).unwrap();

        // Batched with 7 others, small budget (chunked prefill mixes with decodes), and a
        // cache so small that sequences get preempted and recomputed.
        for num_blocks in [64, 14] {
            let mut e = engine(6, num_blocks);
            let mut ids = vec![];
            for (k, len) in [5usize, 30, 1, 17, 9, 2, 22].iter().enumerate() {
                ids.push(
                    e.add_request(request(prompt(*len, k as u32 + 1), 15, sampled(k as u64)))
                        .unwrap(),
                );
            }
            let id = e
                .add_request(request(prompt(13, 0), 20, params.clone()))
                .unwrap();
            let out = run(&mut e);
            assert_eq!(out[&id], reference, "{num_blocks} blocks, {params:?}");
            if num_blocks == 14 {
                assert!(
                    e.num_preemptions() > 0,
                    "the small cache must force preemptions"
                );
            }
            assert_eq!(e.free_blocks(), num_blocks, "blocks leaked");
        }
    }
}

/// A context worker's prefill-only requests never grow, whatever their `max_tokens`: room
/// to grow is not kept for them, so as many prompts are prefilled at once as the cache holds.
#[test]
fn prefill_only_requests_keep_no_room_to_grow() {
    // 12 blocks of 4 tokens: two 20-token prompts (5 blocks each) fit, but not with room
    // for 256 more tokens each.
    let config = EngineConfig {
        growth_reserve_tokens: Some(DEFAULT_GROWTH_RESERVE_TOKENS),
        prefix_caching: true,
        ..first_chunk_admission(64, 12)
    };
    let mut e = Engine::new(FakeModel::new(4, 12), config, None).unwrap();
    for k in 0..2 {
        e.add_request(GenerationRequest {
            prefill_only: true,
            ..request(prompt(20, k), 100, SamplingParams::greedy())
        })
        .unwrap();
    }
    let finished = e
        .step()
        .into_iter()
        .filter(|ev| matches!(ev.kind, EventKind::Finished { .. }))
        .count();
    assert_eq!(finished, 2, "both prefilled in the first step");
    assert_eq!(e.num_preemptions(), 0);
}

/// The same small cache with room to grow kept at admission: every request reaches its end
/// (at most 45 tokens, 12 of the 14 blocks) without anyone being preempted, and gets the
/// tokens it gets alone.
#[test]
fn room_to_grow_kept_at_admission_means_no_preemption_and_the_same_tokens() {
    let prompts = [5usize, 30, 1, 17, 9, 2, 22, 13];
    let mut reference = Outcomes::new();
    for (k, len) in prompts.iter().enumerate() {
        let mut alone = engine(64, 64);
        let id = alone
            .add_request(request(prompt(*len, k as u32), 15, sampled(k as u64)))
            .unwrap();
        reference.insert(k as u64, run(&mut alone).remove(&id).unwrap());
    }
    let config = EngineConfig {
        growth_reserve_tokens: Some(DEFAULT_GROWTH_RESERVE_TOKENS),
        prefix_caching: true,
        ..first_chunk_admission(6, 14)
    };
    let mut e = Engine::new(FakeModel::new(4, 14), config, None).unwrap();
    let ids: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(k, len)| {
            e.add_request(request(prompt(*len, k as u32), 15, sampled(k as u64)))
                .unwrap()
        })
        .collect();
    let out = run(&mut e);
    for (k, id) in ids.iter().enumerate() {
        assert_eq!(out[id], reference[&(k as u64)], "request {k}");
    }
    assert_eq!(e.num_preemptions(), 0);
    assert_eq!(e.free_blocks(), 14, "blocks leaked");
}

/// The samples of one request (a group) prefill the prompt once and share its full blocks,
/// and each generates what it would alone (the fake model reads every position's token from
/// the cache through the block table, so a wrong shared block changes the logits), with and
/// without preemptions; every block comes back.
#[test]
fn samples_of_a_group_share_the_prompt_and_generate_what_they_would_alone() {
    let samples = [
        sampled(11),
        sampled(12),
        sampled(13),
        SamplingParams::greedy(),
    ];
    let grouped = |params: &SamplingParams| GenerationRequest {
        sample_group: Some("cmpl-1".into()),
        ..request(prompt(13, 0), 10, params.clone())
    };
    // Alone and without the prefix cache, every sample computes the whole prompt.
    let mut alone = engine_without_prefix_cache(64, 64);
    let mut reference = Vec::new();
    for params in &samples {
        let id = alone
            .add_request(request(prompt(13, 0), 10, params.clone()))
            .unwrap();
        reference.push(run(&mut alone).remove(&id).unwrap());
    }
    let computed_alone = alone.model().tokens_computed;
    let mut e = engine(64, 64);
    let ids: Vec<_> = samples
        .iter()
        .map(|p| e.add_request(grouped(p)).unwrap())
        .collect();
    let out = run(&mut e);
    for (id, expected) in ids.iter().zip(&reference) {
        assert_eq!(&out[id], expected);
    }
    // 13 prompt tokens: three full blocks (12 tokens) computed once instead of four times.
    assert_eq!(e.model().tokens_computed + 3 * 12, computed_alone);
    assert_eq!(e.free_blocks(), 64);

    // Under memory pressure, mixed with other requests: preempted samples recompute (or share
    // again) and still generate the same tokens.
    let mut e = engine(6, 14);
    let others: Vec<_> = [5usize, 17, 9]
        .iter()
        .enumerate()
        .map(|(k, len)| {
            e.add_request(request(prompt(*len, k as u32 + 1), 12, sampled(k as u64)))
                .unwrap()
        })
        .collect();
    let ids: Vec<_> = samples
        .iter()
        .map(|p| e.add_request(grouped(p)).unwrap())
        .collect();
    let out = run(&mut e);
    for (id, expected) in ids.iter().zip(&reference) {
        assert_eq!(&out[id], expected);
    }
    assert!(others.iter().all(|id| out.contains_key(id)));
    assert!(
        e.num_preemptions() > 0,
        "the small cache must force preemptions"
    );
    assert_eq!(e.free_blocks(), 14, "blocks leaked");
    // Another prompt under the same group name is not served from the first prompt's blocks.
    let mut e = engine(64, 64);
    let first = e.add_request(grouped(&samples[3])).unwrap();
    let other = e
        .add_request(GenerationRequest {
            sample_group: Some("cmpl-1".into()),
            ..request(prompt(13, 5), 10, SamplingParams::greedy())
        })
        .unwrap();
    let mut e_ref = engine(64, 64);
    let other_ref = e_ref
        .add_request(request(prompt(13, 5), 10, SamplingParams::greedy()))
        .unwrap();
    let out = run(&mut e);
    assert_eq!(out[&first], reference[3]);
    assert_eq!(out[&other], run(&mut e_ref)[&other_ref]);
}

/// One reported prompt position: (position, logprob, alternatives).
type PromptEntry = (usize, f32, Vec<(u32, f32)>);

/// Per request: its prompt logprobs (position, logprob, alternatives) in the order reported,
/// its tokens with their logprobs, its finish reason and usage; and whether it was ever
/// preempted while running.
#[derive(Debug, Default)]
struct Echoed {
    prompt: Vec<PromptEntry>,
    /// An embedding request's hidden state ([`EventKind::Hidden`]).
    hidden: Option<Vec<f32>>,
    tokens: Vec<(u32, f32)>,
    end: Option<(FinishReason, Usage)>,
    preempted: bool,
}

fn run_echoed(e: &mut Engine<FakeModel>) -> HashMap<RequestId, Echoed> {
    let mut out: HashMap<RequestId, Echoed> = HashMap::new();
    let mut steps = 0;
    while e.has_work() {
        for ev in e.step() {
            let entry = out.entry(ev.request_id).or_default();
            match ev.kind {
                EventKind::PromptLogprobs { start, logprobs } => {
                    assert!(entry.tokens.is_empty(), "prompt logprobs after a token");
                    for (i, l) in logprobs.into_iter().enumerate() {
                        entry.prompt.push((start + i, l.logprob, l.top_logprobs));
                    }
                }
                EventKind::Hidden { vector } => {
                    assert!(entry.hidden.is_none(), "a second hidden state");
                    assert!(entry.end.is_none(), "a hidden state after the end");
                    entry.hidden = Some(vector);
                }
                EventKind::Token { id, logprob, .. } => entry.tokens.push((id, logprob)),
                EventKind::Finished { reason, usage, .. } => entry.end = Some((reason, usage)),
                EventKind::RoomReserved { .. } => {}
            }
        }
        let ids: Vec<RequestId> = e.seqs.keys().copied().collect();
        for id in ids {
            if e.scheduler.num_preemptions(id).unwrap_or(0) > 0 {
                out.entry(id).or_default().preempted = true;
            }
        }
        steps += 1;
        assert!(steps < 100_000, "engine made no progress");
    }
    out
}

fn echo_request(prompt_ids: Vec<u32>, max_tokens: usize, top: u32) -> GenerationRequest {
    GenerationRequest {
        prompt_logprobs: Some(top),
        ..GenerationRequest::greedy(prompt_ids, max_tokens)
    }
}

fn embedding_request(prompt_ids: Vec<u32>) -> GenerationRequest {
    GenerationRequest {
        embedding: true,
        ..GenerationRequest::greedy(prompt_ids, 0)
    }
}

/// An embedding request reports its prompt's last hidden state once and ends (`Length`, no
/// token, its prompt counted), with the same vector whether the prompt is one chunk or many,
/// batched beside generations, preempted, or found in the prefix cache; and that vector is
/// the one a generation of the same prompt samples its first token from (the fake's hidden
/// state is its logits row).
#[test]
fn an_embedding_reports_its_prompt_s_last_hidden_state_and_ends() {
    let long = prompt(23, 3);
    let mut alone = engine(64, 64);
    let id = alone.add_request(embedding_request(long.clone())).unwrap();
    let first = alone
        .add_request(GenerationRequest::greedy(long.clone(), 1))
        .unwrap();
    let mut out = run_echoed(&mut alone);
    let reference = out.remove(&id).unwrap();
    let hidden = reference.hidden.clone().expect("the hidden state");
    assert!(reference.tokens.is_empty() && reference.prompt.is_empty());
    let (reason, usage) = reference.end.clone().unwrap();
    assert_eq!(
        (reason, usage.prompt_tokens, usage.completion_tokens),
        (FinishReason::Length, 23, 0)
    );
    let greedy = out.remove(&first).unwrap().tokens[0].0;
    let argmax = (0..hidden.len())
        .max_by(|&a, &b| hidden[a].total_cmp(&hidden[b]))
        .unwrap();
    assert_eq!(
        greedy as usize, argmax,
        "the generation's first token is the hidden state's argmax"
    );
    assert_eq!(alone.free_blocks(), 64);

    // Chunks of 5 tokens beside generations, in a cache small enough to preempt; then again,
    // the prompt's blocks cached by the first run.
    for num_blocks in [64, 13] {
        let mut e = engine(5, num_blocks);
        for round in 0..2 {
            let others: Vec<_> = [9usize, 14, 3]
                .iter()
                .enumerate()
                .map(|(k, len)| {
                    e.add_request(request(prompt(*len, k as u32 + 7), 12, sampled(k as u64)))
                        .unwrap()
                })
                .collect();
            let id = e.add_request(embedding_request(long.clone())).unwrap();
            let mut out = run_echoed(&mut e);
            let embedded = out.remove(&id).unwrap();
            assert_eq!(
                embedded.hidden.as_ref(),
                Some(&hidden),
                "blocks {num_blocks}, round {round}"
            );
            let (reason, usage) = embedded.end.unwrap();
            assert_eq!(reason, FinishReason::Length);
            assert_eq!(usage.prompt_tokens, 23);
            if round == 1 && num_blocks == 64 {
                assert!(
                    usage.cached_tokens > 0,
                    "the second round finds the prompt cached"
                );
            }
            for other in others {
                assert_eq!(out[&other].end.as_ref().unwrap().0, FinishReason::Length);
            }
            assert_eq!(e.free_blocks(), num_blocks);
        }
    }

    // An embedding generates nothing.
    let mut e = engine(64, 64);
    let generating = GenerationRequest {
        embedding: true,
        ..GenerationRequest::greedy(long.clone(), 3)
    };
    assert!(matches!(
        e.add_request(generating),
        Err(EngineError::EmbeddingGenerates)
    ));
}

/// Prompt logprobs: one per prompt position after the first, in order and exactly once,
/// whether the prompt is one chunk, many chunks, or recomputed after preemptions; equal to
/// what the sampler reports for the same token generated after the same prefix.
#[test]
fn prompt_logprobs_cover_each_position_once_across_chunks_and_preemption() {
    let long = prompt(23, 3);
    let mut alone = engine(64, 64);
    let id = alone.add_request(echo_request(long.clone(), 6, 2)).unwrap();
    let reference = run_echoed(&mut alone).remove(&id).unwrap();
    let positions: Vec<usize> = reference.prompt.iter().map(|p| p.0).collect();
    assert_eq!(positions, (1..23).collect::<Vec<_>>());
    assert!(reference.prompt.iter().all(|p| p.2.len() == 2));
    assert_eq!(reference.tokens.len(), 6);
    assert_eq!(alone.free_blocks(), 64);

    // Chunks of 5 tokens (the prompt over five steps, chunk ends inside blocks), and a cache
    // so small that running sequences are preempted and recomputed.
    for num_blocks in [64, 13] {
        let mut e = engine(5, num_blocks);
        let others: Vec<_> = [9usize, 14, 3]
            .iter()
            .enumerate()
            .map(|(k, len)| {
                e.add_request(request(prompt(*len, k as u32 + 7), 12, sampled(k as u64)))
                    .unwrap()
            })
            .collect();
        let id = e.add_request(echo_request(long.clone(), 6, 2)).unwrap();
        let mut out = run_echoed(&mut e);
        let got = out.remove(&id).unwrap();
        assert_eq!(got.prompt, reference.prompt, "{num_blocks} blocks");
        assert_eq!(got.tokens, reference.tokens, "{num_blocks} blocks");
        assert!(others.iter().all(|o| out[o].prompt.is_empty()));
        if num_blocks == 13 {
            assert!(got.preempted, "the echoed request must be recomputed once");
        }
        assert_eq!(e.free_blocks(), num_blocks, "blocks leaked");
    }

    // The logprob of a generated token equals that token's prompt logprob once it is part of
    // a prompt: both are the same row, reduced the same way.
    let prefix = prompt(11, 5);
    let mut e = engine(64, 64);
    let id = e
        .add_request(request(prefix.clone(), 1, SamplingParams::greedy()))
        .unwrap();
    let generated = run_echoed(&mut e).remove(&id).unwrap();
    let (token, logprob) = generated.tokens[0];
    let mut extended = prefix;
    extended.push(token);
    let id = e.add_request(echo_request(extended, 1, 0)).unwrap();
    let echoed = run_echoed(&mut e).remove(&id).unwrap();
    assert_eq!(echoed.prompt.last().unwrap(), &(11, logprob, vec![]));
}

/// `max_tokens` 0 with prompt logprobs: the prompt's logprobs, then the end (`Length`, no
/// token); without prompt logprobs it is refused, and such requests never share a group's
/// blocks (each reports its own positions).
#[test]
fn a_prompt_only_request_ends_after_its_prompt() {
    let mut e = engine(4, 64);
    let p = prompt(10, 1);
    let grouped = |max_tokens| GenerationRequest {
        sample_group: Some("g".into()),
        ..echo_request(p.clone(), max_tokens, 1)
    };
    let a = e.add_request(grouped(0)).unwrap();
    let b = e.add_request(grouped(0)).unwrap();
    let out = run_echoed(&mut e);
    for id in [a, b] {
        let got = &out[&id];
        assert_eq!(got.prompt.len(), 9);
        assert!(got.tokens.is_empty());
        assert_eq!(
            got.end,
            Some((
                FinishReason::Length,
                Usage {
                    cached_tokens: 0,
                    prompt_tokens: 10,
                    completion_tokens: 0,
                    prediction: None,
                }
            ))
        );
    }
    assert_eq!(out[&a].prompt, out[&b].prompt);
    assert_eq!(e.free_blocks(), 64);
    // A one-token prompt has no position to report, and still ends.
    let id = e.add_request(echo_request(vec![5], 0, 1)).unwrap();
    let got = run_echoed(&mut e).remove(&id).unwrap();
    assert!(got.prompt.is_empty() && got.tokens.is_empty());
    assert_eq!(got.end.unwrap().0, FinishReason::Length);
    assert!(matches!(
        e.add_request(GenerationRequest::greedy(vec![5, 6], 0)),
        Err(EngineError::ZeroMaxTokens)
    ));
    assert!(matches!(
        e.add_request(GenerationRequest {
            prefill_only: true,
            ..echo_request(vec![5, 6], 1, 0)
        }),
        Err(EngineError::PromptLogprobsNeedLocalPrefill)
    ));
}

#[test]
fn stop_token_max_tokens_and_context_limit_end_requests() {
    let mut e = engine(64, 64);
    // Greedy never picks EOS with its bias; make EOS a stop token through the request instead
    // by stopping on whatever greedy picks first.
    let probe = e
        .add_request(request(prompt(5, 3), 1, SamplingParams::greedy()))
        .unwrap();
    let first = run(&mut e)[&probe].0[0];
    let stop = e
        .add_request(GenerationRequest {
            stop_token_ids: vec![first],
            ..request(prompt(5, 3), 10, SamplingParams::greedy())
        })
        .unwrap();
    let out = run(&mut e);
    assert_eq!(out[&stop], (vec![first], FinishReason::Stop));

    let length = e
        .add_request(request(prompt(5, 3), 4, SamplingParams::greedy()))
        .unwrap();
    let out = run(&mut e);
    assert_eq!(out[&length].0.len(), 4);
    assert_eq!(out[&length].1, FinishReason::Length);

    let mut small = Engine::new(
        FakeModel {
            max_model_len: 9,
            ..FakeModel::new(4, 64)
        },
        EngineConfig {
            block_size: 4,
            num_blocks: 64,
            ..EngineConfig::default()
        },
        None,
    )
    .unwrap();
    let ctx = small
        .add_request(request(prompt(5, 3), 100, SamplingParams::greedy()))
        .unwrap();
    let out = run(&mut small);
    assert_eq!(
        out[&ctx].0.len(),
        4,
        "5 prompt + 4 generated = context limit 9"
    );
    assert_eq!(out[&ctx].1, FinishReason::Length);
    assert_eq!(small.free_blocks(), 64);
    assert_eq!(e.free_blocks(), 64);
}

#[test]
fn cancellation_mid_prefill_and_mid_decode_frees_blocks() {
    let mut e = engine(4, 32);
    let prefill = e
        .add_request(request(prompt(30, 1), 5, SamplingParams::greedy()))
        .unwrap();
    let decode = e
        .add_request(request(prompt(2, 2), 50, SamplingParams::greedy()))
        .unwrap();
    let waiting = e
        .add_request(request(prompt(3, 3), 5, SamplingParams::greedy()))
        .unwrap();
    e.step(); // 4 tokens of the long prompt
    assert!(e.free_blocks() < 32);
    assert!(e.cancel(prefill));
    assert!(!e.cancel(prefill), "a second cancel is a no-op");
    let events = e.step();
    assert!(events.iter().any(|ev| ev.request_id == prefill
        && matches!(&ev.kind, EventKind::Finished { reason: FinishReason::Cancelled, usage, .. } if usage.completion_tokens == 0)));
    let mut decoded = 0;
    for _ in 0..4 {
        decoded += e
            .step()
            .iter()
            .filter(|ev| ev.request_id == decode && !ev.is_finished())
            .count();
    }
    assert!(decoded > 0, "it was decoding");
    assert!(e.cancel(decode));
    assert!(e.cancel(waiting));
    let out = run(&mut e);
    assert_eq!(out[&decode].1, FinishReason::Cancelled);
    assert_eq!(e.free_blocks(), 32);
    assert!(!e.cancel(decode), "ended requests cannot be cancelled");
}

#[test]
fn prefill_only_requests_retain_blocks_until_released() {
    let mut e = engine(64, 16);
    let id = e
        .add_request(GenerationRequest {
            prefill_only: true,
            ..request(prompt(9, 4), 100, SamplingParams::greedy())
        })
        .unwrap();
    let mut finished = None;
    while e.has_work() {
        for ev in e.step() {
            if let EventKind::Finished {
                reason,
                retained_kv,
                usage,
            } = ev.kind
            {
                finished = Some((reason, retained_kv, usage));
            }
        }
    }
    let (reason, retained, usage) = finished.unwrap();
    assert_eq!(reason, FinishReason::Length);
    assert_eq!(usage.completion_tokens, 1);
    let retained = retained.expect("prefill-only keeps its KV");
    assert_eq!(retained.num_tokens, 9);
    assert_eq!(retained.block_table.len(), 3);
    assert_eq!(e.free_blocks(), 13);
    assert!(!e.cancel(id), "a retained request is not active");
    e.release_kv(id).unwrap();
    assert_eq!(e.free_blocks(), 16);
    assert!(e.release_kv(id).is_err(), "released twice");
}

#[test]
fn a_prefill_only_request_says_how_long_it_queued_and_how_long_its_prefill_took() {
    use std::time::Duration;
    // Far apart, so that neither can pass for the other on a loaded machine.
    const QUEUED: Duration = Duration::from_millis(150);
    const BETWEEN_CHUNKS: Duration = Duration::from_millis(15);
    // Chunks of 4 tokens: the 9-token prompt takes three steps, its first token the third.
    let mut e = engine(4, 16);
    e.add_request(GenerationRequest {
        prefill_only: true,
        ..request(prompt(9, 4), 100, SamplingParams::greedy())
    })
    .unwrap();
    std::thread::sleep(QUEUED);
    let mut retained = None;
    let mut steps = 0;
    while e.has_work() {
        if steps > 0 {
            std::thread::sleep(BETWEEN_CHUNKS);
        }
        steps += 1;
        for ev in e.step() {
            if let EventKind::Finished { retained_kv, .. } = ev.kind {
                retained = retained_kv;
            }
        }
    }
    assert_eq!(steps, 3);
    let retained = retained.expect("prefill-only keeps its KV");
    // The wait before its first step is the queue's; the waits between its chunks are the
    // prefill's, and the queue's is not.
    assert!(retained.queued >= QUEUED, "{retained:?}");
    assert!(retained.prefill >= 2 * BETWEEN_CHUNKS, "{retained:?}");
    assert!(retained.prefill < QUEUED, "{retained:?}");
}

/// Runs a prefill-only request on `e` and returns its first token and retained K/V.
fn prefill_and_take(e: &mut Engine<FakeModel>, req: GenerationRequest) -> (SampledToken, Vec<u8>) {
    let id = e
        .add_request(GenerationRequest {
            prefill_only: true,
            ..req
        })
        .unwrap();
    let mut first = None;
    while e.has_work() {
        for ev in e.step() {
            if let EventKind::Token {
                id,
                logprob,
                top_logprobs,
                ..
            } = ev.kind
            {
                first = Some(SampledToken {
                    id,
                    logprob,
                    top_logprobs,
                });
            }
        }
    }
    let kv = e.take_retained_kv(id).unwrap();
    (first.unwrap(), kv)
}

#[test]
fn imported_prefills_continue_exactly_like_local_ones() {
    for sampling in [SamplingParams::greedy(), sampled(77)] {
        let req = |salt| request(prompt(21, salt), 12, sampling.clone());
        // Reference: one engine, whole requests.
        let mut local = engine(64, 64);
        let ids: Vec<_> = (0..3).map(|s| local.add_request(req(s)).unwrap()).collect();
        let expected = run(&mut local);

        // Context engine prefills; decode engine imports, with other traffic running.
        let mut context = engine(64, 64);
        let mut decode = engine(64, 64);
        let other = decode.add_request(req(9)).unwrap();
        let mut got = Outcomes::new();
        let mut imported = Vec::new();
        for s in 0..3 {
            let (first, kv) = prefill_and_take(&mut context, req(s));
            let id = decode
                .import_request(
                    req(s),
                    ImportedPrefill {
                        kv: ImportedKv::Bytes(Box::new(kv)),
                        num_tokens: 21,
                        first_token: first,
                    },
                )
                .unwrap();
            imported.push(id);
            absorb(&mut got, decode.step());
        }
        assert_eq!(context.free_blocks(), 64, "the context engine kept nothing");
        run_into(&mut decode, &mut got);
        for (i, id) in imported.iter().enumerate() {
            assert_eq!(got[id], expected[&ids[i]], "request {i}, {sampling:?}");
        }
        assert!(got.contains_key(&other));
        assert_eq!(decode.free_blocks(), 64);
    }
}

#[test]
fn imports_wait_for_room_and_bad_imports_are_refused() {
    let mut context = engine(64, 64);
    let (first, kv) = prefill_and_take(
        &mut context,
        request(prompt(7, 1), 4, SamplingParams::greedy()),
    );
    // 5 blocks of 4 tokens: a running request of 15 + 4 tokens takes 4 of them at once, so the
    // 2-block import waits until it ends.
    let mut decode = engine(64, 5);
    let busy = decode
        .add_request(request(prompt(15, 2), 4, SamplingParams::greedy()))
        .unwrap();
    let mut got = Outcomes::new();
    absorb(&mut got, decode.step());
    absorb(&mut got, decode.step());
    let id = decode
        .import_request(
            request(prompt(7, 1), 4, SamplingParams::greedy()),
            ImportedPrefill {
                kv: ImportedKv::Bytes(Box::new(kv.clone())),
                num_tokens: 7,
                first_token: first.clone(),
            },
        )
        .unwrap();
    absorb(&mut got, decode.step());
    assert!(!got.contains_key(&id), "no room yet: {got:?}");
    run_into(&mut decode, &mut got);
    assert_eq!(got[&id].0.len(), 4, "{got:?}");
    assert_eq!(got[&id].0[0], first.id);
    assert_eq!(got[&busy].0.len(), 4);
    assert_eq!(decode.free_blocks(), 5);

    let wrong_len = decode.import_request(
        request(prompt(6, 1), 4, SamplingParams::greedy()),
        ImportedPrefill {
            kv: ImportedKv::Bytes(Box::new(kv.clone())),
            num_tokens: 7,
            first_token: first.clone(),
        },
    );
    assert!(
        matches!(wrong_len, Err(EngineError::ImportMismatch(_))),
        "{wrong_len:?}"
    );
    let short = decode.import_request(
        request(prompt(7, 1), 4, SamplingParams::greedy()),
        ImportedPrefill {
            kv: ImportedKv::Bytes(Box::new(kv[1..].to_vec())),
            num_tokens: 7,
            first_token: first,
        },
    );
    assert!(
        matches!(short, Err(EngineError::ImportMismatch(_))),
        "{short:?}"
    );
    assert_eq!(decode.free_blocks(), 5);
}

/// The requests of `events` that got their room reserved, in order.
fn reserved_in(events: &[EngineEvent]) -> Vec<RequestId> {
    events
        .iter()
        .filter(|ev| matches!(ev.kind, EventKind::RoomReserved { .. }))
        .map(|ev| ev.request_id)
        .collect()
}

#[test]
fn reservations_wait_for_room_in_order_and_their_imports_continue_like_local_prefills() {
    let req = |salt| request(prompt(21, salt), 12, sampled(5 + salt as u64));
    let mut local = engine(64, 64);
    let ids: Vec<_> = (0..3).map(|s| local.add_request(req(s)).unwrap()).collect();
    let expected = run(&mut local);
    let mut context = engine(64, 64);
    let prefilled: Vec<_> = (0..3)
        .map(|s| prefill_and_take(&mut context, req(s)))
        .collect();

    // 14 blocks of 4 tokens: two prompts of 21 tokens (6 blocks each) fit, the third waits
    // until one ends, and a request grows to 9 blocks (preemptions happen).
    let mut decode = engine(64, 14);
    let reserved: Vec<_> = (0..3)
        .map(|s| decode.reserve_import(req(s)).unwrap())
        .collect();
    assert_eq!(
        decode.num_waiting(),
        3,
        "waiting for room counts as waiting"
    );
    let mut got = Outcomes::new();
    let mut granted = Vec::new();
    let mut steps = 0;
    while decode.has_work() {
        let events = decode.step();
        for id in reserved_in(&events) {
            // The worker pulls only now, into the room reserved for it.
            let i = reserved.iter().position(|&r| r == id).unwrap();
            granted.push(id);
            let (first, kv) = prefilled[i].clone();
            decode.import_reserved(
                id,
                ImportedPrefill {
                    kv: ImportedKv::Bytes(Box::new(kv)),
                    num_tokens: 21,
                    first_token: first,
                },
            );
        }
        absorb(&mut got, events);
        if steps == 0 {
            assert_eq!(granted, reserved[..2], "two fit at once, in arrival order");
            assert_eq!((decode.imports_waiting(), decode.num_waiting()), (1, 1));
        }
        steps += 1;
        assert!(steps < 10_000);
    }
    assert_eq!(granted, reserved, "granted in arrival order");
    assert_eq!(decode.imports_waited(), 1, "the third waited for room");
    for (i, id) in reserved.iter().enumerate() {
        assert_eq!(got[id], expected[&ids[i]], "request {i}");
    }
    assert!(
        decode.num_preemptions() > 0,
        "the cache was tight enough to preempt"
    );
    assert_eq!(decode.free_blocks(), 14);
    assert_eq!(decode.num_active(), 0);
}

#[test]
fn k_v_written_into_the_reserved_blocks_by_the_transfer_continues_like_a_local_prefill() {
    let req = |salt| request(prompt(21, salt), 12, sampled(70 + salt as u64));
    let mut local = engine(64, 64);
    let ids: Vec<_> = (0..2).map(|s| local.add_request(req(s)).unwrap()).collect();
    let expected = run(&mut local);
    let mut context = engine(64, 64);
    let prefilled: Vec<_> = (0..2)
        .map(|s| prefill_and_take(&mut context, req(s)))
        .collect();

    let mut decode = engine(64, 32);
    let reserved: Vec<_> = (0..2)
        .map(|s| decode.reserve_import(req(s)).unwrap())
        .collect();
    let mut got = Outcomes::new();
    let mut steps = 0;
    while decode.has_work() {
        let events = decode.step();
        for event in &events {
            let EventKind::RoomReserved { blocks, .. } = &event.kind else {
                continue;
            };
            assert_eq!(
                blocks.len(),
                6,
                "21 tokens in blocks of 4, in the prompt's order"
            );
            let i = reserved
                .iter()
                .position(|&r| r == event.request_id)
                .unwrap();
            let (first, kv) = prefilled[i].clone();
            // What a transport that reaches the cache does: the K/V straight into the
            // reserved blocks, beside the engine.
            decode
                .model
                .write_kv_blocks(blocks, crate::backend::KvBytes::Host(&kv))
                .unwrap();
            decode.import_reserved(
                event.request_id,
                ImportedPrefill {
                    kv: ImportedKv::InReservedBlocks,
                    num_tokens: 21,
                    first_token: first,
                },
            );
        }
        absorb(&mut got, events);
        steps += 1;
        assert!(steps < 10_000);
    }
    for (i, id) in reserved.iter().enumerate() {
        assert_eq!(got[id], expected[&ids[i]], "request {i}");
    }
    assert_eq!(decode.free_blocks(), 32);

    // Only a reservation has blocks for a transfer to have written into.
    let (first, _) = prefilled[0].clone();
    let refused = decode.import_request(
        req(0),
        ImportedPrefill {
            kv: ImportedKv::InReservedBlocks,
            num_tokens: 21,
            first_token: first,
        },
    );
    assert!(
        matches!(&refused, Err(EngineError::ImportMismatch(m)) if m.contains("reserved none")),
        "{refused:?}"
    );
}

/// Reserves room for `req` on `decode` and, once reserved, imports `prefilled` (a context
/// engine's whole prompt) less the blocks the reservation took from the prefix cache, or
/// (`None`) prefills the prompt there instead. Returns those cached blocks and the request's
/// outcome.
fn import_after_cache(
    decode: &mut Engine<FakeModel>,
    req: GenerationRequest,
    prefilled: Option<(SampledToken, Vec<u8>)>,
) -> (usize, (Vec<u32>, FinishReason)) {
    let block_bytes = decode.kv_layout().block_bytes();
    let num_tokens = req.prompt_ids.len();
    let id = decode.reserve_import(req).unwrap();
    let mut got = Outcomes::new();
    let mut cached = None;
    while decode.has_work() {
        let events = decode.step();
        for event in &events {
            let EventKind::RoomReserved { cached_blocks, .. } = event.kind else {
                continue;
            };
            cached = Some(cached_blocks);
            match &prefilled {
                Some((first, kv)) => decode.import_reserved(
                    id,
                    ImportedPrefill {
                        kv: ImportedKv::Bytes(Box::new(kv[cached_blocks * block_bytes..].to_vec())),
                        num_tokens,
                        first_token: first.clone(),
                    },
                ),
                None => decode.prefill_reserved(id).unwrap(),
            }
        }
        absorb(&mut got, events);
    }
    (cached.expect("room was reserved"), got.remove(&id).unwrap())
}

#[test]
fn a_next_turn_pulls_only_the_blocks_its_decode_engine_does_not_hold() {
    let first_turn = prompt(21, 4);
    let mut second_turn = first_turn.clone();
    second_turn.extend(prompt(20, 9));
    let req = |p: &[u32], seed| request(p.to_vec(), 6, sampled(seed));
    let mut local = engine(64, 64);
    let id = local.add_request(req(&second_turn, 31)).unwrap();
    let expected = run(&mut local).remove(&id).unwrap();
    let mut context = engine(64, 64);
    let first_prefill = prefill_and_take(&mut context, req(&first_turn, 30));
    let second_prefill = prefill_and_take(&mut context, req(&second_turn, 31));

    let mut decode = engine(64, 32);
    let (cached, _) = import_after_cache(&mut decode, req(&first_turn, 30), Some(first_prefill));
    assert_eq!(cached, 0, "nothing cached before the first turn");
    // The second turn starts with the first's 5 full blocks: only its other 6 arrive.
    let (cached, got) =
        import_after_cache(&mut decode, req(&second_turn, 31), Some(second_prefill));
    assert_eq!(cached, 5);
    assert_eq!(got, expected, "the same tokens as a local prefill");
    assert_eq!(decode.prefix_cache_stats().hit_tokens, 20);
    // A pull that fails after such a reservation prefills the rest here: 10 blocks of 41
    // tokens cached now, the last token computed, the same tokens again.
    let (cached, got) = import_after_cache(&mut decode, req(&second_turn, 31), None);
    assert_eq!(cached, 10);
    assert_eq!(got, expected, "a local prefill after the cached blocks");
    assert_eq!(decode.free_blocks(), 32);
}

#[test]
fn a_reservation_cancelled_while_its_blocks_are_lent_keeps_them_until_handed_back() {
    let req = |salt| request(prompt(13, salt), 6, sampled(90 + salt as u64));
    // 6 blocks: one 13-token prompt (4 blocks) at a time.
    let mut decode = engine(64, 6);
    let a = decode.reserve_import(req(0)).unwrap();
    assert_eq!(reserved_in(&decode.step()), [a]);
    assert!(decode.cancel(a));
    let b = decode.reserve_import(req(1)).unwrap();
    let mut got = Outcomes::new();
    run_into(&mut decode, &mut got);
    assert_eq!(
        got[&a],
        (vec![], FinishReason::Cancelled),
        "the cancel is answered at once"
    );
    assert_eq!(
        decode.free_blocks(),
        2,
        "a transfer may still be writing the blocks: nobody gets them"
    );
    assert_eq!(decode.imports_waiting(), 1, "the next reservation waits");
    // The transfer is done with them (here: it was cancelled before it began).
    decode.return_reservation(a);
    assert_eq!(decode.free_blocks(), 6);
    assert_eq!(reserved_in(&decode.step()), [b]);
    decode.return_reservation(b);
    assert!(decode.cancel(b));
    run_into(&mut decode, &mut Outcomes::new());
    assert_eq!((decode.free_blocks(), decode.num_active()), (6, 0));
}

#[test]
fn a_reservation_can_prefill_locally_be_cancelled_or_refuse_a_bad_import() {
    let req = |salt| request(prompt(13, salt), 6, sampled(40 + salt as u64));
    let mut local = engine(64, 64);
    let ids: Vec<_> = (0..2).map(|s| local.add_request(req(s)).unwrap()).collect();
    let expected = run(&mut local);

    // 6 blocks: one 13-token prompt (4 blocks) at a time.
    let mut decode = engine(64, 6);
    let a = decode.reserve_import(req(0)).unwrap();
    let b = decode.reserve_import(req(1)).unwrap();
    let events = decode.step();
    assert_eq!(reserved_in(&events), [a]);
    assert_eq!(decode.free_blocks(), 2);
    // A's pull failed: prefilled here, in its reserved blocks. B's took too long: it joins
    // the queue of local prefills.
    decode.prefill_reserved(a).unwrap();
    decode.prefill_reserved(b).unwrap();
    assert!(decode.prefill_reserved(b).is_err(), "no reservation left");
    let mut got = Outcomes::new();
    absorb(&mut got, events);
    run_into(&mut decode, &mut got);
    assert_eq!(got[&a], expected[&ids[0]]);
    assert_eq!(got[&b], expected[&ids[1]]);
    assert_eq!(decode.free_blocks(), 6);

    // Cancelled with room reserved, and while waiting for it: both give everything back, and
    // K/V arriving after the cancel is dropped.
    let c = decode.reserve_import(req(0)).unwrap();
    let d = decode.reserve_import(req(1)).unwrap();
    assert_eq!(reserved_in(&decode.step()), [c]);
    assert!(decode.cancel(c) && decode.cancel(d));
    let mut context = engine(64, 64);
    let (first, kv) = prefill_and_take(&mut context, req(0));
    decode.import_reserved(
        c,
        ImportedPrefill {
            kv: ImportedKv::Bytes(Box::new(kv.clone())),
            num_tokens: 13,
            first_token: first.clone(),
        },
    );
    let mut got = Outcomes::new();
    run_into(&mut decode, &mut got);
    assert_eq!(got[&c], (vec![], FinishReason::Cancelled));
    assert_eq!(got[&d], (vec![], FinishReason::Cancelled));
    assert_eq!((decode.free_blocks(), decode.num_active()), (6, 0));

    // K/V that does not fit the prompt ends the request with an error and frees its room.
    let e = decode.reserve_import(req(0)).unwrap();
    assert_eq!(reserved_in(&decode.step()), [e]);
    decode.import_reserved(
        e,
        ImportedPrefill {
            kv: ImportedKv::Bytes(Box::new(kv[4..].to_vec())),
            num_tokens: 13,
            first_token: first,
        },
    );
    let mut got = Outcomes::new();
    run_into(&mut decode, &mut got);
    assert!(
        matches!(&got[&e], (tokens, FinishReason::Error(m)) if tokens.is_empty() && m.contains("bytes of K/V")),
        "{got:?}"
    );
    assert_eq!((decode.free_blocks(), decode.num_active()), (6, 0));
}

#[test]
fn a_failed_forward_ends_the_scheduled_requests_with_an_error() {
    let mut e = engine(64, 16);
    let a = e
        .add_request(request(prompt(5, 1), 5, SamplingParams::greedy()))
        .unwrap();
    e.model.fail_next = true;
    let events = e.step();
    assert!(events.iter().any(|ev| ev.request_id == a
        && matches!(&ev.kind, EventKind::Finished { reason: FinishReason::Error(m), .. } if m.contains("injected"))));
    assert_eq!(e.free_blocks(), 16);
    assert!(!e.has_work());
}

/// A lost device ends every request, scheduled or still queued, frees their blocks, and
/// makes the engine refuse new ones (plain failures end only the step's requests, above).
#[test]
fn a_lost_device_ends_every_request_and_refuses_new_ones() {
    let mut e = engine(8, 16);
    let running = e
        .add_request(request(prompt(5, 1), 5, SamplingParams::greedy()))
        .unwrap();
    let first = e.step();
    assert!(first.iter().all(|ev| !ev.is_finished()));
    // A prompt longer than the step's token budget still waits behind the running request.
    let queued = e
        .add_request(request(prompt(30, 2), 5, SamplingParams::greedy()))
        .unwrap();
    e.model.lose_device_next = true;
    let events = e.step();
    for id in [running, queued] {
        assert!(
            events.iter().any(|ev| ev.request_id == id
                && matches!(&ev.kind, EventKind::Finished { reason: FinishReason::Error(m), .. }
                    if m.contains("injected loss") && m.contains("until the worker restarts"))),
            "request {id} did not end with the device error: {events:?}"
        );
    }
    assert_eq!(e.free_blocks(), 16);
    assert!(!e.has_work());
    assert!(e.device_lost().is_some_and(|m| m.contains("injected loss")));
    let refused = e.add_request(request(prompt(3, 3), 2, SamplingParams::greedy()));
    assert!(
        matches!(refused, Err(EngineError::DeviceLost(_))),
        "{refused:?}"
    );
}

#[test]
fn bad_requests_are_refused_without_taking_blocks() {
    let mut e = engine(64, 4);
    assert!(matches!(
        e.add_request(request(vec![1, 99], 5, SamplingParams::greedy())),
        Err(EngineError::TokenOutOfRange { token: 99, .. })
    ));
    assert!(matches!(
        e.add_request(request(vec![1], 0, SamplingParams::greedy())),
        Err(EngineError::ZeroMaxTokens)
    ));
    assert!(matches!(
        e.add_request(GenerationRequest {
            stop_strings: vec!["x".into()],
            ..request(vec![1], 3, SamplingParams::greedy())
        }),
        Err(EngineError::StopStringsNeedTokenizer)
    ));
    assert!(matches!(
        e.add_request(request(vec![1; 16], 3, SamplingParams::greedy())),
        Err(EngineError::Config(SchedulerError::PromptTooLong { .. }))
    ));
    assert!(matches!(
        e.add_request(request(
            vec![1],
            3,
            SamplingParams {
                top_p: 0.0,
                ..SamplingParams::default()
            }
        )),
        Err(EngineError::Sampling(_))
    ));
    assert!(!e.has_work());
    assert_eq!(e.free_blocks(), 4);
}

/// Text double: token `t` is the letter `'a' + t % 26`; stop strings held back while a
/// suffix of the text could start one.
struct Letters;
struct LetterStream {
    held: String,
    stops: Vec<String>,
    /// Letters still to come that no stop string may end in (`min_tokens`).
    unchecked_tokens: usize,
}

impl TextDecoder for Letters {
    fn start(&self, _: &[u32], options: &TextOptions<'_>) -> Result<Box<dyn TextStream>, String> {
        Ok(Box::new(LetterStream {
            held: String::new(),
            stops: options.stop_strings.to_vec(),
            unchecked_tokens: options.min_tokens,
        }))
    }
}

impl TextStream for LetterStream {
    fn push(&mut self, token: u32) -> Result<TextStep, String> {
        let letter = (b'a' + (token % 26) as u8) as char;
        if self.unchecked_tokens > 0 {
            self.unchecked_tokens -= 1;
            return Ok(TextStep {
                delta: letter.to_string(),
                stopped: false,
            });
        }
        self.held.push(letter);
        for stop in &self.stops {
            if let Some(at) = self.held.find(stop.as_str()) {
                let delta = self.held[..at].to_owned();
                self.held.clear();
                return Ok(TextStep {
                    delta,
                    stopped: true,
                });
            }
        }
        let keep = (1..=self.held.len())
            .rev()
            .find(|&n| {
                self.stops
                    .iter()
                    .any(|s| s.starts_with(&self.held[self.held.len() - n..]))
            })
            .unwrap_or(0);
        let delta = self.held[..self.held.len() - keep].to_owned();
        self.held.drain(..self.held.len() - keep);
        Ok(TextStep {
            delta,
            stopped: false,
        })
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

fn text_of(events: &[EngineEvent]) -> String {
    events
        .iter()
        .filter_map(|ev| match &ev.kind {
            EventKind::Token { text_delta, .. } => Some(text_delta.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn stop_strings_cut_the_text_and_held_text_is_flushed_at_the_end() {
    let config = EngineConfig {
        block_size: 4,
        num_blocks: 16,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(FakeModel::new(4, 16), config, Some(Arc::new(Letters))).unwrap();
    let free = e
        .add_request(request(prompt(4, 1), 8, SamplingParams::greedy()))
        .unwrap();
    let mut events = vec![];
    while e.has_work() {
        events.extend(e.step());
    }
    let full = text_of(&events);
    assert_eq!(full.len(), 8);
    assert!(events.iter().all(|ev| ev.request_id == free));

    // Stop at the 3-letter string starting at the 4th letter: the text is the first 3
    // letters, and the stop string is not emitted.
    let stop = full[3..6].to_owned();
    let _ = e
        .add_request(GenerationRequest {
            stop_strings: vec![stop.clone(), "zzzzzz".into()],
            ..request(prompt(4, 1), 8, SamplingParams::greedy())
        })
        .unwrap();
    let mut events = vec![];
    while e.has_work() {
        events.extend(e.step());
    }
    assert_eq!(text_of(&events), full[..full.find(&stop).unwrap()]);
    assert!(matches!(
        events.last().unwrap().kind,
        EventKind::Finished {
            reason: FinishReason::Stop,
            ..
        }
    ));

    // With min_tokens the first letters are not searched: a stop string they hold (here
    // the first two letters) ends the text only where it occurs after them.
    let opening = full[..2].to_owned();
    let _ = e
        .add_request(GenerationRequest {
            stop_strings: vec![opening.clone()],
            ..request(
                prompt(4, 1),
                8,
                SamplingParams {
                    min_tokens: 2,
                    ..SamplingParams::greedy()
                },
            )
        })
        .unwrap();
    let mut events = vec![];
    while e.has_work() {
        events.extend(e.step());
    }
    let after = full[2..].find(&opening).map_or(full.len(), |at| at + 2);
    assert_eq!(text_of(&events), full[..after]);

    // A stop string that never completes: its held-back prefix comes out at the end.
    let last = &full[7..8];
    let _ = e
        .add_request(GenerationRequest {
            stop_strings: vec![format!("{last}#")],
            ..request(prompt(4, 1), 8, SamplingParams::greedy())
        })
        .unwrap();
    let mut events = vec![];
    while e.has_work() {
        events.extend(e.step());
    }
    assert_eq!(text_of(&events), full);
    assert_eq!(e.free_blocks(), 16);
}

#[test]
fn handle_streams_events_and_dropping_a_stream_cancels_it() {
    // A cache large enough that the open-ended requests below cannot reach its end (and
    // finish with `Length`) before the cancellation arrives, however slow the test thread.
    const BLOCKS: usize = 1 << 14;
    let e = engine(8, BLOCKS);
    let (handle, thread) = EngineHandle::spawn(e, "engine-test").unwrap();
    let stream = handle.submit(request(prompt(6, 1), 5, sampled(7))).unwrap();
    let events: Vec<_> = stream.collect();
    assert_eq!(events.len(), 6);
    assert!(matches!(
        events.last().unwrap().kind,
        EventKind::Finished {
            reason: FinishReason::Length,
            usage: Usage {
                prompt_tokens: 6,
                completion_tokens: 5,
                ..
            },
            ..
        }
    ));

    let refused = handle
        .submit(request(vec![], 5, SamplingParams::greedy()))
        .unwrap();
    let events: Vec<_> = refused.collect();
    assert!(
        matches!(&events[..], [EngineEvent { kind: EventKind::Finished { reason: FinishReason::Error(m), .. }, .. }] if m.contains("empty"))
    );

    let long = handle
        .submit(request(prompt(6, 2), 10_000, SamplingParams::greedy()))
        .unwrap();
    assert!(long.recv().is_some());
    drop(long);
    let explicit = handle
        .submit(request(prompt(6, 3), 10_000, SamplingParams::greedy()))
        .unwrap();
    assert!(explicit.recv().is_some());
    handle.cancel(explicit.id()).unwrap();
    let rest: Vec<_> = explicit.collect();
    assert!(matches!(
        rest.last().unwrap().kind,
        EventKind::Finished {
            reason: FinishReason::Cancelled,
            ..
        }
    ));
    // The dropped stream is cancelled at the next step; wait until the engine is idle.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while handle.active_requests() > 0 || handle.free_blocks() != BLOCKS {
        assert!(
            std::time::Instant::now() < deadline,
            "dropped stream was not cancelled"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(handle);
    thread.join().unwrap();
}

/// The fake model, sampling "on the device": summaries made on the host by the reference
/// summariser, with the rows kept for the requests the summaries do not decide.
struct SummarizingModel {
    inner: FakeModel,
    last_rows: Vec<Vec<f32>>,
    /// The tokens the last submitted pass picked (each summary's `drawn`).
    last_picks: Vec<u32>,
    /// Passes submitted and not collected: their rows and summaries.
    submitted: VecDeque<(Vec<Vec<f32>>, Vec<crate::sampler::device::RowSummary>)>,
    /// The next collect finds the device lost (a sticky error surfacing when the host waits).
    lose_device_at_collect: bool,
    rows_fetched: usize,
    /// Rows summarized after a grammar's mask.
    rows_masked: usize,
}

impl StepModel for SummarizingModel {
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn max_model_len(&self) -> usize {
        self.inner.max_model_len()
    }
    fn eos_token_ids(&self) -> Vec<u32> {
        self.inner.eos_token_ids()
    }
    fn forward(&mut self, _batch: &ForwardBatch) -> Result<Vec<Vec<f32>>, ModelError> {
        panic!("a model that samples on the device is never asked for host rows")
    }
    fn device_sampling(&mut self) -> Option<&mut dyn DeviceSampling> {
        Some(self)
    }
    fn kv_layout(&self) -> crate::kv_cache::KvLayout {
        self.inner.kv_layout()
    }
    fn read_kv_blocks(
        &self,
        blocks: &[crate::kv_cache::block_pool::BlockId],
        dst: KvBytesMut<'_>,
    ) -> Result<(), ModelError> {
        self.inner.read_kv_blocks(blocks, dst)
    }
    fn write_kv_blocks(
        &mut self,
        blocks: &[crate::kv_cache::block_pool::BlockId],
        src: crate::backend::KvBytes<'_>,
    ) -> Result<(), ModelError> {
        self.inner.write_kv_blocks(blocks, src)
    }
}

impl DeviceSampling for SummarizingModel {
    fn submit_summarized(
        &mut self,
        batch: &ForwardBatch,
        requests: &[RowRequest],
    ) -> Result<(), ModelError> {
        // The chained tokens are the previous pass's picks, as the device fills them in.
        let mut batch = batch.clone();
        for chained in std::mem::take(&mut batch.chained) {
            batch.tokens[chained.token] = self.last_picks[chained.row];
        }
        let rows = self.inner.forward(&batch)?;
        let summaries: Vec<_> = rows
            .iter()
            .zip(requests)
            .map(|(row, request)| crate::sampler::device::summarize_row(row, request))
            .collect();
        self.last_picks = summaries.iter().map(|s| s.drawn).collect();
        self.submitted.push_back((rows, summaries));
        Ok(())
    }
    fn collect_summarized(
        &mut self,
    ) -> Result<Vec<crate::sampler::device::RowSummary>, ModelError> {
        let (rows, summaries) = self
            .submitted
            .pop_front()
            .expect("the engine collects only what it submitted");
        if std::mem::take(&mut self.lose_device_at_collect) {
            return Err(ModelError::Backend(
                crate::backend::BackendError::DeviceLost {
                    op: "wait for summaries",
                    detail: "injected loss".into(),
                },
            ));
        }
        self.last_rows = rows;
        Ok(summaries)
    }
    fn last_logits_rows(&mut self, rows: &[usize]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.rows_fetched += rows.len();
        Ok(rows.iter().map(|&r| self.last_rows[r].clone()).collect())
    }
    fn summarize_last_masked(
        &mut self,
        rows: &[usize],
        masks: &[&[u32]],
        requests: &[RowRequest],
    ) -> Result<Vec<crate::sampler::device::RowSummary>, ModelError> {
        self.rows_masked += rows.len();
        Ok(rows
            .iter()
            .zip(masks)
            .zip(requests)
            .map(|((&r, mask), request)| {
                let mut row = self.last_rows[r].clone();
                for (token, logit) in row.iter_mut().enumerate() {
                    let allowed = mask
                        .get(token / 32)
                        .is_some_and(|word| word >> (token % 32) & 1 == 1);
                    if !allowed {
                        *logit = f32::NEG_INFINITY;
                    }
                }
                crate::sampler::device::summarize_row(&row, request)
            })
            .collect())
    }
}

/// Sampling from device summaries gives every request the tokens host sampling gives, in a
/// batch mixing greedy, seeded, truncated and penalised requests (the last on host rows).
#[test]
fn sampling_on_the_device_matches_sampling_on_the_host() {
    let params = [
        SamplingParams::greedy(),
        sampled(7),
        SamplingParams {
            temperature: 1.0,
            seed: Some(3),
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 0.7,
            top_k: Some(5),
            seed: Some(9),
            logprobs: Some(2),
            ..SamplingParams::default()
        },
        SamplingParams {
            repetition_penalty: 1.3,
            seed: Some(11),
            ..SamplingParams::default()
        },
    ];
    let config = EngineConfig {
        block_size: 4,
        num_blocks: 64,
        max_num_batched_tokens: 16,
        max_num_seqs: 8,
        max_model_len: None,
        growth_reserve_tokens: Some(DEFAULT_GROWTH_RESERVE_TOKENS),
        prefix_caching: true,
        ..EngineConfig::default()
    };
    let mut host = Engine::new(FakeModel::new(4, 64), config.clone(), None).unwrap();
    let mut device = summarizing_engine(config.clone(), true);
    let mut host_ids = Vec::new();
    let mut device_ids = Vec::new();
    for (k, p) in params.iter().enumerate() {
        let req = || request(prompt(3 + 4 * k, k as u32), 12, p.clone());
        host_ids.push(host.add_request(req()).unwrap());
        device_ids.push(device.add_request(req()).unwrap());
    }
    let host_out = run(&mut host);
    let mut device_out = Outcomes::new();
    let mut steps = 0;
    while device.has_work() {
        absorb(&mut device_out, device.step());
        steps += 1;
        assert!(steps < 10_000, "engine made no progress");
    }
    for (h, d) in host_ids.iter().zip(&device_ids) {
        assert_eq!(host_out[h], device_out[d]);
    }
    // Only the penalised request sampled from host rows: one row per token.
    assert_eq!(device.model.rows_fetched, 12);
    assert_eq!(device.model.rows_masked, 0, "no request has a grammar");
}

/// `min_tokens` keeps a request's stop tokens from being drawn until it has that many tokens,
/// on host rows and with sampling on the device alike (its held rows come to the host).
#[test]
fn min_tokens_holds_stop_tokens_back_on_the_host_and_the_device() {
    let config = EngineConfig {
        block_size: 4,
        num_blocks: 64,
        ..EngineConfig::default()
    };
    let mut host = Engine::new(FakeModel::new(4, 64), config.clone(), None).unwrap();
    let probe = host
        .add_request(request(prompt(5, 3), 1, SamplingParams::greedy()))
        .unwrap();
    let first = run(&mut host)[&probe].0[0];
    let held = |min_tokens| GenerationRequest {
        stop_token_ids: vec![first],
        ..request(
            prompt(5, 3),
            10,
            SamplingParams {
                min_tokens,
                ..SamplingParams::greedy()
            },
        )
    };
    let id = host.add_request(held(0)).unwrap();
    assert_eq!(run(&mut host)[&id], (vec![first], FinishReason::Stop));

    let id = host.add_request(held(3)).unwrap();
    let (tokens, reason) = run(&mut host)[&id].clone();
    assert!(tokens.len() >= 3, "{tokens:?}");
    assert!(!tokens[..3].contains(&first), "{tokens:?}");
    match reason {
        FinishReason::Stop => assert_eq!(tokens.last(), Some(&first)),
        FinishReason::Length => assert_eq!(tokens.len(), 10),
        other => panic!("{other:?}"),
    }

    let mut device = summarizing_engine(config, true);
    let id = device.add_request(held(3)).unwrap();
    let mut device_out = Outcomes::new();
    while device.has_work() {
        absorb(&mut device_out, device.step());
    }
    assert_eq!(device_out[&id], (tokens, reason));
    assert_eq!(
        device.model.rows_fetched, 3,
        "the held rows, and only those"
    );
    assert_eq!(host.free_blocks(), 64);
}

#[test]
fn a_request_whose_deadline_passes_in_the_queue_is_dropped_when_its_turn_comes() {
    // One sequence at a time: the second request waits for the first.
    let config = EngineConfig {
        block_size: 4,
        num_blocks: 64,
        max_num_batched_tokens: 64,
        max_num_seqs: 1,
        max_model_len: None,
        growth_reserve_tokens: Some(DEFAULT_GROWTH_RESERVE_TOKENS),
        prefix_caching: true,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(FakeModel::new(4, 64), config, None).unwrap();
    let first = e
        .add_request(request(prompt(5, 0), 6, SamplingParams::greedy()))
        .unwrap();
    let soon = std::time::Instant::now() + std::time::Duration::from_millis(20);
    let waiting = e
        .add_request(GenerationRequest {
            deadline: Some(soon),
            ..request(prompt(5, 1), 6, SamplingParams::greedy())
        })
        .unwrap();
    let relaxed = e
        .add_request(GenerationRequest {
            deadline: Some(soon + std::time::Duration::from_secs(3600)),
            ..request(prompt(5, 2), 6, SamplingParams::greedy())
        })
        .unwrap();
    let mut out = Outcomes::new();
    absorb(&mut out, e.step());
    std::thread::sleep(std::time::Duration::from_millis(30));
    run_into(&mut e, &mut out);
    assert_eq!(out[&first].0.len(), 6);
    assert_eq!(out[&first].1, FinishReason::Length);
    assert!(
        out[&waiting].0.is_empty(),
        "never started: {:?}",
        out[&waiting]
    );
    assert!(
        matches!(&out[&waiting].1, FinishReason::Error(m) if m.contains("deadline passed before the engine started it")),
        "{:?}",
        out[&waiting].1
    );
    assert_eq!(
        out[&relaxed].0.len(),
        6,
        "a deadline not reached changes nothing"
    );
    assert_eq!(e.free_blocks(), 64, "the dropped request's blocks are free");

    // Once started, a request is not dropped for its deadline (a preemption does not make it
    // droppable either): it runs to its end.
    let started = e
        .add_request(GenerationRequest {
            deadline: Some(std::time::Instant::now() + std::time::Duration::from_millis(5)),
            ..request(prompt(5, 3), 4, SamplingParams::greedy())
        })
        .unwrap();
    let mut out = Outcomes::new();
    absorb(&mut out, e.step());
    std::thread::sleep(std::time::Duration::from_millis(10));
    run_into(&mut e, &mut out);
    assert_eq!(out[&started].0.len(), 4);
}

/// Every event until the engine is idle.
fn run_events(e: &mut Engine<FakeModel>) -> Vec<EngineEvent> {
    let mut events = vec![];
    while e.has_work() {
        events.extend(e.step());
    }
    events
}

#[test]
fn a_resumed_request_continues_exactly_where_the_first_run_was_cut() {
    // Letters make the text depend on every token; a stop string that never completes keeps
    // text held back across the cut, so the replay must restore it.
    let letters = || {
        let config = EngineConfig {
            block_size: 4,
            num_blocks: 32,
            ..EngineConfig::default()
        };
        Engine::new(FakeModel::new(4, 32), config, Some(Arc::new(Letters))).unwrap()
    };
    for params in [
        SamplingParams::greedy(),
        SamplingParams {
            repetition_penalty: 1.3,
            frequency_penalty: 0.5,
            ..sampled(77)
        },
    ] {
        let mut e = letters();
        let whole_request = |stops: Vec<String>| GenerationRequest {
            stop_strings: stops,
            ..request(prompt(6, 2), 12, params.clone())
        };
        e.add_request(whole_request(vec![])).unwrap();
        let whole = run_events(&mut e);
        let ids: Vec<u32> = whole
            .iter()
            .filter_map(|ev| match ev.kind {
                EventKind::Token { id, .. } => Some(id),
                _ => None,
            })
            .collect();
        assert_eq!(ids.len(), 12);
        let full = text_of(&whole);
        // A stop string of the last letter and one more that never comes: everything from
        // the last letter is held back until the end.
        let held = vec![format!("{}#", &full[4..5])];
        let mut e = letters();
        let cut_run = e.add_request(whole_request(held.clone())).unwrap();
        let first: Vec<EngineEvent> = run_events(&mut e)
            .into_iter()
            .filter(|ev| ev.request_id == cut_run)
            .collect();
        assert_eq!(text_of(&first), full);

        for cut in [1usize, 5, 11] {
            let mut e = letters();
            let resumed = e
                .add_request(GenerationRequest {
                    resume_ids: ids[..cut].to_vec(),
                    ..whole_request(held.clone())
                })
                .unwrap();
            let events = run_events(&mut e);
            let rest: Vec<u32> = events
                .iter()
                .filter_map(|ev| match ev.kind {
                    EventKind::Token { id, .. } => Some(id),
                    _ => None,
                })
                .collect();
            assert_eq!(rest, ids[cut..], "cut at {cut}, {params:?}");
            // The text before the cut is the client's already; what comes now is the rest,
            // including text the first run still held back at the cut (the letter at 4).
            let before: String = first
                .iter()
                .filter_map(|ev| match &ev.kind {
                    EventKind::Token { text_delta, .. } => Some(text_delta.as_str()),
                    _ => None,
                })
                .take(cut)
                .collect();
            assert_eq!(
                format!("{before}{}", text_of(&events)),
                full,
                "cut at {cut}"
            );
            let Some(EventKind::Finished { reason, usage, .. }) =
                events.last().map(|ev| ev.kind.clone())
            else {
                panic!("no end: {events:?}")
            };
            assert_eq!(reason, FinishReason::Length);
            assert_eq!(
                (usage.prompt_tokens, usage.completion_tokens),
                (6, 12),
                "usage counts the resumed tokens once"
            );
            assert!(events.iter().all(|ev| ev.request_id == resumed));
            assert_eq!(e.free_blocks(), 32);
        }
    }
}

#[test]
fn resumed_tokens_that_would_have_ended_the_request_are_refused() {
    let mut e = engine(64, 64);
    for (resume, max_tokens) in [(vec![3, 4, 5], 3), (vec![3, EOS, 5], 10), (vec![99], 10)] {
        assert!(
            e.add_request(GenerationRequest {
                resume_ids: resume.clone(),
                ..request(prompt(4, 1), max_tokens, SamplingParams::greedy())
            })
            .is_err(),
            "{resume:?} with max_tokens {max_tokens}"
        );
    }
    assert!(!e.has_work());
    assert_eq!(e.free_blocks(), 64);
}

#[test]
fn forward_passes_failing_in_a_row_stop_the_engine_and_a_pass_that_runs_resets_the_count() {
    let mut e = engine(64, 16);
    // Two failures, then a pass that runs: the engine goes on.
    for _ in 0..MAX_FAILED_FORWARDS_IN_A_ROW - 1 {
        e.add_request(request(prompt(5, 1), 2, SamplingParams::greedy()))
            .unwrap();
        e.model.fail_next = true;
        e.step();
    }
    assert!(e.device_lost().is_none());
    let ok = e
        .add_request(request(prompt(5, 1), 2, SamplingParams::greedy()))
        .unwrap();
    assert_eq!(run(&mut e)[&ok].1, FinishReason::Length);
    let progress = e.progress();
    assert_eq!(
        progress.failed_steps,
        u64::from(MAX_FAILED_FORWARDS_IN_A_ROW - 1)
    );
    assert!(progress.steps >= 2);
    // Then as many failures in a row as allowed: the engine is lost and refuses work.
    for _ in 0..MAX_FAILED_FORWARDS_IN_A_ROW {
        e.add_request(request(prompt(5, 1), 2, SamplingParams::greedy()))
            .unwrap();
        e.model.fail_next = true;
        e.step();
    }
    assert!(
        e.device_lost()
            .is_some_and(|reason| reason.contains("in a row failed")),
        "{:?}",
        e.device_lost()
    );
    assert!(
        e.add_request(request(prompt(5, 1), 2, SamplingParams::greedy()))
            .is_err()
    );
    assert_eq!(e.free_blocks(), 16);
}

/// Blocks of 4 tokens, room for every request of the overlap tests at once.
fn roomy_config() -> EngineConfig {
    EngineConfig {
        block_size: 4,
        num_blocks: 64,
        max_num_batched_tokens: 32,
        max_num_seqs: 8,
        max_model_len: None,
        growth_reserve_tokens: Some(DEFAULT_GROWTH_RESERVE_TOKENS),
        prefix_caching: true,
        ..EngineConfig::default()
    }
}

fn summarizing_engine(config: EngineConfig, overlap: bool) -> Engine<SummarizingModel> {
    let model = SummarizingModel {
        inner: FakeModel::new(config.block_size, config.num_blocks),
        last_rows: Vec::new(),
        last_picks: Vec::new(),
        submitted: VecDeque::new(),
        lose_device_at_collect: false,
        rows_fetched: 0,
        rows_masked: 0,
    };
    let mut e = Engine::new(model, config, None).unwrap();
    e.set_overlap(overlap);
    e
}

/// Steps until idle; the number of steps that ended with a step still in flight.
fn run_overlapped(e: &mut Engine<SummarizingModel>, out: &mut Outcomes) -> usize {
    let (mut steps, mut overlapped) = (0, 0);
    while e.has_work() {
        absorb(out, e.step());
        overlapped += usize::from(e.overlap.in_flight.is_some());
        steps += 1;
        assert!(steps < 100_000, "engine made no progress");
    }
    overlapped
}

/// Steps queued before the previous one is collected give every request the tokens it gets
/// without overlap and with host sampling: across EOS found a step late, preemptions of a
/// small cache, batches with truncated draws (top-p, top-k, min-p: decided on the device too,
/// so they overlap) and with the drawn tokens' log-probabilities asked for, and every block is
/// free at the end.
#[test]
fn overlapped_steps_give_every_request_the_tokens_of_steps_run_one_at_a_time() {
    let config = EngineConfig {
        block_size: 4,
        num_blocks: 24,
        max_num_batched_tokens: 16,
        max_num_seqs: 8,
        max_model_len: None,
        growth_reserve_tokens: None, // the small cache is there to preempt
        prefix_caching: true,
        ..EngineConfig::default()
    };
    let hot = |seed| SamplingParams {
        // Hot enough that EOS (biased down) is drawn now and then.
        temperature: 6.0,
        seed: Some(seed),
        ..SamplingParams::default()
    };
    for with_truncated in [false, true] {
        let mut params: Vec<SamplingParams> = (0..10)
            .map(|k| {
                if k % 3 == 0 {
                    SamplingParams::greedy()
                } else {
                    hot(k)
                }
            })
            .collect();
        if with_truncated {
            params[4] = sampled(4);
            params[5] = SamplingParams {
                top_k: Some(3),
                ..hot(5)
            };
            params[7] = SamplingParams {
                min_p: 0.2,
                ..hot(7)
            };
            // `logprobs: true` without top alternatives: decided on the device as well.
            params[3].logprobs = Some(0);
            params[8] = SamplingParams {
                logprobs: Some(0),
                ..hot(8)
            };
        }
        let requests: Vec<GenerationRequest> = params
            .iter()
            .enumerate()
            .map(|(k, p)| request(prompt(3 + 2 * k, k as u32), 16 + 2 * k, p.clone()))
            .collect();
        let mut host = Engine::new(FakeModel::new(4, 24), config.clone(), None).unwrap();
        let mut one_at_a_time = summarizing_engine(config.clone(), false);
        let mut overlapped = summarizing_engine(config.clone(), true);
        let mut ids = Vec::new();
        for r in &requests {
            ids.push((
                host.add_request(r.clone()).unwrap(),
                one_at_a_time.add_request(r.clone()).unwrap(),
                overlapped.add_request(r.clone()).unwrap(),
            ));
        }
        let host_out = run(&mut host);
        let mut single_out = Outcomes::new();
        assert_eq!(run_overlapped(&mut one_at_a_time, &mut single_out), 0);
        let mut overlapped_out = Outcomes::new();
        let steps_in_flight = run_overlapped(&mut overlapped, &mut overlapped_out);
        assert!(
            steps_in_flight > 10,
            "only {steps_in_flight} steps overlapped"
        );
        for (h, s, o) in &ids {
            assert_eq!(host_out[h], single_out[s]);
            assert_eq!(host_out[h], overlapped_out[o]);
        }
        assert!(
            host_out.values().any(|(_, r)| *r == FinishReason::Stop),
            "some request meets EOS"
        );
        assert!(overlapped.num_preemptions() > 0, "the small cache preempts");
        assert_eq!(overlapped.free_blocks(), 24);
        assert_eq!(one_at_a_time.free_blocks(), 24);
        assert!(overlapped.seqs.is_empty() && overlapped.overlap.in_flight.is_none());
    }
}

/// Truncated draws (top-p, top-k, min-p) are decided on the device, so a batch of nothing but
/// them keeps a step in flight as greedy ones do, with the tokens of host sampling.
#[test]
fn steps_of_truncated_draws_stay_in_flight() {
    let config = roomy_config();
    let params = [
        sampled(1),
        SamplingParams {
            temperature: 1.2,
            top_k: Some(3),
            seed: Some(2),
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 0.9,
            min_p: 0.3,
            seed: Some(3),
            ..SamplingParams::default()
        },
    ];
    let mut host = Engine::new(
        FakeModel::new(config.block_size, config.num_blocks),
        config.clone(),
        None,
    )
    .unwrap();
    let mut overlapped = summarizing_engine(config.clone(), true);
    let mut ids = Vec::new();
    for (k, p) in params.iter().enumerate() {
        let r = request(prompt(4 + k, k as u32), 20, p.clone());
        ids.push((
            host.add_request(r.clone()).unwrap(),
            overlapped.add_request(r).unwrap(),
        ));
    }
    let host_out = run(&mut host);
    let mut out = Outcomes::new();
    let in_flight = run_overlapped(&mut overlapped, &mut out);
    // 20 tokens each: after the prefill, every decode step but the last stays in flight.
    assert!(in_flight >= 15, "only {in_flight} steps stayed in flight");
    for (h, o) in &ids {
        assert_eq!(host_out[h], out[o]);
    }
    assert_eq!(overlapped.model.rows_fetched, 0, "no row came to the host");
}

/// A request ended by a stop token, or cancelled, while its next decode is queued: its blocks
/// stay allocated (pinned, out of scheduling) until that step is collected, its usage counts
/// only the tokens it was given, and the other requests get the tokens of a run without it.
#[test]
fn a_request_ended_while_its_next_decode_is_queued_keeps_its_blocks_until_that_step_is_done() {
    let config = roomy_config();
    let requests: Vec<GenerationRequest> = (0..4)
        .map(|k| request(prompt(5, k), 12, SamplingParams::greedy()))
        .collect();
    let mut baseline = summarizing_engine(config.clone(), true);
    let base_ids: Vec<_> = requests
        .iter()
        .map(|r| baseline.add_request(r.clone()).unwrap())
        .collect();
    let mut base_out = Outcomes::new();
    run_overlapped(&mut baseline, &mut base_out);
    // Request 0 stops at its first token, from the 4th on, not seen before it.
    let first_tokens = &base_out[&base_ids[0]].0;
    let stop_at = (3..first_tokens.len())
        .find(|&i| !first_tokens[..i].contains(&first_tokens[i]))
        .expect("a new token among 12");
    let mut stopping = requests[0].clone();
    stopping.stop_token_ids = vec![first_tokens[stop_at]];

    let mut e = summarizing_engine(config.clone(), true);
    let stopped = e.add_request(stopping).unwrap();
    let cancelled = e.add_request(requests[1].clone()).unwrap();
    let others: Vec<_> = requests[2..]
        .iter()
        .map(|r| e.add_request(r.clone()).unwrap())
        .collect();
    let mut out = Outcomes::new();
    let mut cancelled_usage = None;
    let mut steps = 0;
    while !matches!(out.get(&stopped), Some((_, FinishReason::Stop))) {
        absorb(&mut out, e.step());
        steps += 1;
        assert!(steps < 100, "the stop token never came");
    }
    assert_eq!(out[&stopped].0, first_tokens[..=stop_at]);
    // Found in the step collected after the next was queued with its decode.
    assert!(e.overlap.in_flight.is_some());
    assert_eq!(e.scheduler.status(stopped), Some(SeqStatus::Pinned));
    assert!(e.cancel(cancelled));
    let events = e.step();
    assert_eq!(e.scheduler.status(stopped), None, "released once collected");
    for ev in &events {
        if let (true, EventKind::Finished { usage, .. }) = (ev.request_id == cancelled, &ev.kind) {
            cancelled_usage = Some(*usage);
        }
    }
    absorb(&mut out, events);
    run_overlapped(&mut e, &mut out);
    assert_eq!(out[&cancelled].1, FinishReason::Cancelled);
    let usage = cancelled_usage.expect("the cancelled request finished");
    assert_eq!(usage.completion_tokens, out[&cancelled].0.len());
    assert_eq!(
        out[&cancelled].0,
        base_out[&base_ids[1]].0[..usage.completion_tokens]
    );
    for (id, base) in others.iter().zip(&base_ids[2..]) {
        assert_eq!(out[id], base_out[base]);
    }
    assert_eq!(e.free_blocks(), e.total_blocks());
}

/// The device found lost while a step is in flight (when the host waits for its summaries,
/// the next step already queued): every request ends with the error, every block is free,
/// and the engine has no work left (no step keeps it spinning).
#[test]
fn a_device_lost_while_a_step_is_in_flight_ends_every_request() {
    let config = roomy_config();
    let mut e = summarizing_engine(config, true);
    let ids: Vec<_> = (0..3)
        .map(|k| {
            e.add_request(request(prompt(5, k), 20, SamplingParams::greedy()))
                .unwrap()
        })
        .collect();
    let mut out = Outcomes::new();
    for _ in 0..3 {
        absorb(&mut out, e.step());
    }
    assert!(e.overlap.in_flight.is_some());
    let ran = e.progress().steps;
    e.model.lose_device_at_collect = true;
    absorb(&mut out, e.step());
    // Neither the step whose wait found the loss nor the one queued after it counts as run.
    assert_eq!(e.progress().steps, ran);
    for id in &ids {
        assert!(
            matches!(&out[id].1, FinishReason::Error(m) if m.contains("injected loss")),
            "{:?}",
            out[id]
        );
    }
    assert!(e.device_lost().is_some());
    assert!(!e.has_work(), "nothing left to step");
    assert!(e.overlap.in_flight.is_none());
    assert_eq!(e.free_blocks(), e.total_blocks());
}

/// Usage per request id, from `Finished` events.
fn usages(events: &[EngineEvent]) -> HashMap<RequestId, Usage> {
    events
        .iter()
        .filter_map(|ev| match &ev.kind {
            EventKind::Finished { usage, .. } => Some((ev.request_id, *usage)),
            _ => None,
        })
        .collect()
}

/// Each request's tokens and end, each one's usage, and the tokens the model computed.
type RunReport = (Vec<(Vec<u32>, FinishReason)>, Vec<Usage>, usize);

/// Runs `requests` on `e`, the first alone and the rest together after it.
fn run_after_first(e: &mut Engine<FakeModel>, requests: Vec<GenerationRequest>) -> RunReport {
    let mut out = Outcomes::new();
    let mut usage = HashMap::new();
    let mut ids = Vec::new();
    for (i, request) in requests.into_iter().enumerate() {
        ids.push(e.add_request(request).unwrap());
        if i == 0 {
            while e.has_work() {
                let events = e.step();
                usage.extend(usages(&events));
                absorb(&mut out, events);
            }
        }
    }
    while e.has_work() {
        let events = e.step();
        usage.extend(usages(&events));
        absorb(&mut out, events);
    }
    (
        ids.iter().map(|id| out[id].clone()).collect(),
        ids.iter().map(|id| usage[id]).collect(),
        e.model().tokens_computed,
    )
}

/// Prefix caching changes what is computed, never what is generated: requests sharing a long
/// prefix with a finished one (greedy and seeded; the fake model reads every position's token
/// from the cache through the block table, so a wrong cached block changes the logits) give
/// the tokens they give without the cache, compute only the blocks they do not share, and
/// report the shared tokens as cached.
#[test]
fn a_prompt_sharing_a_cached_prefix_computes_only_its_new_blocks_and_generates_the_same() {
    let system = prompt(22, 3);
    let with_question = |q: u32, len: usize| [&system[..], &prompt(len, q)[..]].concat();
    let requests = || {
        vec![
            request(with_question(1, 5), 8, SamplingParams::greedy()),
            request(with_question(2, 3), 8, SamplingParams::greedy()),
            request(with_question(3, 9), 6, sampled(7)),
            request(system.clone(), 5, sampled(8)),
        ]
    };
    let (plain, plain_usage, plain_computed) =
        run_after_first(&mut engine_without_prefix_cache(64, 64), requests());
    let mut cached_engine = engine(64, 64);
    let (cached, cached_usage, cached_computed) = run_after_first(&mut cached_engine, requests());
    assert_eq!(cached, plain);
    // 22 shared tokens: 5 full blocks of 4. The last request's prompt is the shared part
    // itself: it computes its last block's worth (20 cached, 2 computed).
    let cached_tokens: Vec<usize> = cached_usage.iter().map(|u| u.cached_tokens).collect();
    assert_eq!(cached_tokens, vec![0, 20, 20, 20]);
    assert!(plain_usage.iter().all(|u| u.cached_tokens == 0));
    assert_eq!(cached_computed + 3 * 20, plain_computed);
    assert_eq!(cached_engine.free_blocks(), 64);
    let stats = cached_engine.prefix_cache_stats();
    assert_eq!(stats.hit_tokens, 60);
}

/// Under a cache too small for everything: shared blocks survive their first holder's end,
/// eviction makes room, preempted requests recompute or find their blocks, and every request
/// still generates what it does without the cache.
#[test]
fn shared_prefixes_under_memory_pressure_generate_what_they_do_without_the_cache() {
    let system = prompt(13, 5);
    let requests = || -> Vec<GenerationRequest> {
        (0..8u32)
            .map(|k| {
                let tail = prompt(2 + (k as usize * 3) % 7, k + 10);
                let params = if k % 2 == 0 {
                    SamplingParams::greedy()
                } else {
                    sampled(u64::from(k))
                };
                request([&system[..], &tail[..]].concat(), 10, params)
            })
            .collect()
    };
    let (plain, _, _) = run_after_first(&mut engine_without_prefix_cache(6, 16), requests());
    let mut e = engine(6, 16);
    let (cached, usage, _) = run_after_first(&mut e, requests());
    assert_eq!(cached, plain);
    assert!(usage.iter().skip(1).any(|u| u.cached_tokens > 0));
    assert!(
        e.prefix_cache_stats().evicted_blocks > 0,
        "the cache must evict"
    );
    assert!(e.num_preemptions() > 0, "the cache must preempt");
    assert_eq!(e.free_blocks(), 16);
}

/// Requests with different `cache_salt`s never share a block: the second computes its whole
/// prompt; the same salt shares.
#[test]
fn requests_with_different_salts_never_share_cached_blocks() {
    let salted = |salt: &str| GenerationRequest {
        cache_salt: Some(salt.into()),
        ..request(prompt(17, 2), 3, SamplingParams::greedy())
    };
    let mut e = engine(64, 64);
    let (_, usage, _) = run_after_first(
        &mut e,
        vec![
            salted("a"),
            salted("b"),
            request(prompt(17, 2), 3, SamplingParams::greedy()),
        ],
    );
    assert_eq!(
        usage.iter().map(|u| u.cached_tokens).collect::<Vec<_>>(),
        vec![0, 0, 0]
    );
    let (_, usage, _) = run_after_first(&mut e, vec![salted("a")]);
    assert_eq!(usage[0].cached_tokens, 16);
}

/// A request of a higher priority (a lower number) is served before the requests it finds
/// running or queued: with one sequence slot, it preempts the running request of a lower
/// priority and finishes first; the preempted request later recomputes and generates what
/// it would have alone. An import of a higher priority makes room the same way on a decode
/// engine.
#[test]
fn a_request_of_a_higher_priority_is_served_first_and_the_preempted_lose_nothing() {
    let low = |salt| GenerationRequest {
        priority: 1,
        ..request(prompt(9, salt), 12, sampled(salt as u64))
    };
    let mut alone = engine(64, 64);
    let id = alone.add_request(low(1)).unwrap();
    let reference = run(&mut alone).remove(&id).unwrap();

    let config = EngineConfig {
        max_num_seqs: 1,
        ..first_chunk_admission(64, 64)
    };
    let mut e = Engine::new(FakeModel::new(4, 64), config.clone(), None).unwrap();
    let first = e.add_request(low(1)).unwrap();
    let queued = e.add_request(low(2)).unwrap();
    let mut finished = Vec::new();
    let mut out = Outcomes::new();
    let mut step = |e: &mut Engine<FakeModel>, out: &mut Outcomes| {
        let events = e.step();
        for ev in &events {
            if matches!(ev.kind, EventKind::Finished { .. }) {
                finished.push(ev.request_id);
            }
        }
        absorb(out, events);
    };
    for _ in 0..3 {
        step(&mut e, &mut out);
    }
    let urgent = e
        .add_request(GenerationRequest {
            priority: -1,
            ..request(prompt(5, 3), 4, SamplingParams::greedy())
        })
        .unwrap();
    while e.has_work() {
        step(&mut e, &mut out);
    }
    assert_eq!(finished, [urgent, first, queued]);
    assert_eq!(out[&first], reference, "the preempted request lost nothing");
    assert!(e.num_preemptions() >= 1);
    assert_eq!(e.free_blocks(), 64);

    // On a decode engine: an import of a higher priority preempts the running request.
    let mut context = engine(64, 64);
    let (token, kv) = prefill_and_take(
        &mut context,
        request(prompt(7, 4), 4, SamplingParams::greedy()),
    );
    let mut decode = Engine::new(FakeModel::new(4, 64), config, None).unwrap();
    let busy = decode.add_request(low(1)).unwrap();
    let mut out = Outcomes::new();
    absorb(&mut out, decode.step());
    let import = decode
        .import_request(
            GenerationRequest {
                priority: -1,
                ..request(prompt(7, 4), 4, SamplingParams::greedy())
            },
            ImportedPrefill {
                kv: ImportedKv::Bytes(Box::new(kv)),
                num_tokens: 7,
                first_token: token,
            },
        )
        .unwrap();
    absorb(&mut out, decode.step());
    assert!(
        out.get(&import)
            .is_some_and(|(tokens, _)| !tokens.is_empty()),
        "imported at once: {out:?}"
    );
    run_into(&mut decode, &mut out);
    assert_eq!(out[&import].0.len(), 4);
    assert_eq!(out[&busy], reference);
    assert!(decode.num_preemptions() >= 1);
}

/// Runs `request` alone to its end: its tokens, its finish reason, its usage and the steps
/// it took.
fn run_alone(
    e: &mut Engine<FakeModel>,
    request: GenerationRequest,
) -> (Vec<u32>, FinishReason, Usage, usize) {
    let id = e.add_request(request).unwrap();
    let (mut tokens, mut reason, mut usage, mut steps) =
        (Vec::new(), FinishReason::Cancelled, None, 0);
    while e.has_work() {
        steps += 1;
        for ev in e.step() {
            assert_eq!(ev.request_id, id);
            match ev.kind {
                EventKind::Token { id, .. } => tokens.push(id),
                EventKind::Finished {
                    reason: r,
                    usage: u,
                    ..
                } => (reason, usage) = (r, Some(u)),
                _ => {}
            }
        }
        assert!(steps < 10_000);
    }
    (tokens, reason, usage.expect("finished"), steps)
}

/// A decode verifying a prediction gives the tokens the request gets without one, whatever
/// the prediction: right (fewer steps, every draft token kept), wrong (every one thrown
/// away), or right for a while; greedy and sampled; and gives every block back.
#[test]
fn a_prediction_changes_the_steps_never_the_tokens() {
    for params in [SamplingParams::greedy(), sampled(77)] {
        let plain = request(prompt(9, 3), 40, params.clone());
        let mut e = engine(64, 64);
        let (reference, reason, usage, steps) = run_alone(&mut e, plain.clone());
        assert_eq!(usage.prediction, None, "no prediction, no counts");
        assert!(reference.len() > 20, "{reference:?}");
        let mut wrong = reference.iter().map(|t| (t % 31) + 1).collect::<Vec<_>>();
        wrong.rotate_left(3);
        let mut half = reference[..reference.len() / 2].to_vec();
        half.extend(&wrong[..10]);
        for (name, prediction) in [
            ("right", reference.clone()),
            ("wrong", wrong),
            ("half", half),
        ] {
            let mut e = engine(64, 64);
            let with = GenerationRequest {
                prediction: prediction.clone(),
                ..plain.clone()
            };
            let (tokens, r, u, s) = run_alone(&mut e, with);
            assert_eq!(tokens, reference, "{name}, {params:?}");
            assert_eq!(r, reason, "{name}");
            assert_eq!(u.completion_tokens, usage.completion_tokens);
            let counts = u.prediction.expect("a prediction is counted");
            match name {
                "right" => {
                    // Every token after the first (the prefill's) comes from a draft but the
                    // rows' own picks: at most 8 drafted and one picked a step.
                    assert!(s * 3 < steps, "{s} steps against {steps}");
                    assert_eq!(counts.rejected, 0, "{counts:?}");
                    assert!(counts.accepted + s >= reference.len(), "{counts:?}");
                }
                "half" => {
                    assert!(s < steps, "{s} steps against {steps}");
                    // The right half, less the first token and the steps' own picks.
                    assert!(counts.accepted >= reference.len() / 2 - 4, "{counts:?}");
                }
                // A 32-token vocabulary: a wrong draft token is sometimes drawn anyway.
                _ => assert!(counts.accepted * 10 < counts.rejected, "{counts:?}"),
            }
            assert_eq!(e.free_blocks(), 64, "{name}: blocks leaked");
            let progress = e.progress();
            assert_eq!(
                progress.draft_tokens as usize,
                counts.accepted + counts.rejected
            );
            assert_eq!(progress.accepted_draft_tokens as usize, counts.accepted);
        }
    }
}

/// Drafts in a busy engine: batched with plain requests and prompt chunks under a small
/// token budget (drafts cut short or left out), preempted and recomputed in a small cache,
/// with stop tokens and `max_tokens` ending requests in the middle of a draft; every request
/// gets its tokens alone, and a later request finds the kept drafts' blocks cached.
#[test]
fn drafts_in_a_busy_engine_keep_every_requests_tokens() {
    let lens = [5usize, 30, 1, 17, 9, 2, 22, 13];
    let requests: Vec<GenerationRequest> = lens
        .iter()
        .enumerate()
        .map(|(k, &len)| request(prompt(len, k as u32), 12 + 3 * k, sampled(k as u64)))
        .collect();
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| run_alone(&mut engine(64, 64), r.clone()).0)
        .collect();
    for (budget, num_blocks) in [(64, 64), (12, 64), (6, 20)] {
        let mut e = engine(budget, num_blocks);
        let ids: Vec<RequestId> = requests
            .iter()
            .zip(&alone)
            .enumerate()
            .map(|(k, (r, tokens))| {
                // Odd requests predict their output, with a wrong token in the middle.
                let mut prediction = tokens.clone();
                if k % 2 == 1 {
                    let middle = prediction.len() / 2;
                    prediction[middle] = (prediction[middle] % 31) + 1;
                    e.add_request(GenerationRequest {
                        prediction,
                        ..r.clone()
                    })
                    .unwrap()
                } else {
                    e.add_request(r.clone()).unwrap()
                }
            })
            .collect();
        let out = run(&mut e);
        for (k, id) in ids.iter().enumerate() {
            assert_eq!(
                out[id].0, alone[k],
                "request {k}, budget {budget}, {num_blocks} blocks"
            );
        }
        assert!(e.progress().accepted_draft_tokens > 0);
        assert_eq!(e.free_blocks(), num_blocks, "blocks leaked");
    }
    // The blocks a decode filled by kept drafts are named by their tokens: the same prompt
    // and output as a new prompt finds them cached.
    let mut e = engine(64, 64);
    let (tokens, ..) = run_alone(
        &mut e,
        GenerationRequest {
            prediction: alone[1].clone(),
            ..requests[1].clone()
        },
    );
    let mut again = requests[1].prompt_ids.clone();
    again.extend(&tokens);
    let (_, _, usage, _) = run_alone(&mut e, request(again.clone(), 2, SamplingParams::greedy()));
    assert_eq!(usage.cached_tokens, (again.len() - 1) / 4 * 4);
}

/// The engine's own n-gram speculation drafts from each sequence's prompt and output: the
/// same tokens as without it, and drafts kept where the output repeats earlier tokens.
#[test]
fn ngram_speculation_keeps_every_requests_tokens() {
    let speculating = |budget, num_blocks| {
        let config = EngineConfig {
            speculation: Some(drafter::DraftConfig {
                max_draft_tokens: 4,
                max_match: 3,
                min_match: 1,
            }),
            ..first_chunk_admission(budget, num_blocks)
        };
        Engine::new(FakeModel::new(4, num_blocks), config, None).unwrap()
    };
    for params in [SamplingParams::greedy(), sampled(5)] {
        let requests: Vec<GenerationRequest> = (0..6)
            .map(|k| request(prompt(3 + 5 * k, k as u32), 40, params.clone()))
            .collect();
        let alone: Vec<Vec<u32>> = requests
            .iter()
            .map(|r| run_alone(&mut engine(64, 64), r.clone()).0)
            .collect();
        for (budget, num_blocks) in [(64, 64), (8, 40)] {
            let mut e = speculating(budget, num_blocks);
            let ids: Vec<RequestId> = requests
                .iter()
                .map(|r| e.add_request(r.clone()).unwrap())
                .collect();
            let out = run(&mut e);
            for (k, id) in ids.iter().enumerate() {
                assert_eq!(out[id].0, alone[k], "request {k}, {params:?}");
            }
            // A 32-token vocabulary repeats itself: some drafts are right.
            let progress = e.progress();
            assert!(progress.draft_tokens > 0, "{progress:?}");
            assert!(progress.accepted_draft_tokens > 0, "{progress:?}");
            assert_eq!(e.free_blocks(), num_blocks, "blocks leaked");
        }
    }
    // Usage reports only a client's prediction.
    let (_, _, usage, _) = run_alone(
        &mut speculating(64, 64),
        request(prompt(9, 1), 20, SamplingParams::greedy()),
    );
    assert_eq!(usage.prediction, None);
}

/// Drafts verified from device summaries: each row's summary asked for as its position's
/// decode would be, and only undecided rows (a penalised request's) copied to the host. Every
/// request gets the tokens host sampling gives it without a prediction, with overlap on (steps
/// of drafting sequences are never left in flight) and off.
#[test]
fn drafts_verified_from_device_summaries_keep_every_requests_tokens() {
    let params = [
        SamplingParams::greedy(),
        sampled(7),
        SamplingParams {
            temperature: 0.7,
            top_k: Some(5),
            seed: Some(9),
            logprobs: Some(2),
            ..SamplingParams::default()
        },
        SamplingParams {
            repetition_penalty: 1.3,
            seed: Some(11),
            ..SamplingParams::default()
        },
        SamplingParams {
            min_tokens: 6,
            ..SamplingParams::greedy()
        },
    ];
    let config = EngineConfig {
        block_size: 4,
        num_blocks: 96,
        max_num_batched_tokens: 24,
        max_num_seqs: 8,
        ..EngineConfig::default()
    };
    let requests: Vec<GenerationRequest> = params
        .iter()
        .enumerate()
        .map(|(k, p)| request(prompt(3 + 4 * k, k as u32), 20, p.clone()))
        .collect();
    let mut host = Engine::new(FakeModel::new(4, 96), config.clone(), None).unwrap();
    let host_ids: Vec<RequestId> = requests
        .iter()
        .map(|r| host.add_request(r.clone()).unwrap())
        .collect();
    let host_out = run(&mut host);
    for overlap in [true, false] {
        let mut device = summarizing_engine(config.clone(), overlap);
        let ids: Vec<RequestId> = requests
            .iter()
            .zip(&host_ids)
            .map(|(r, h)| {
                let with = GenerationRequest {
                    prediction: host_out[h].0.clone(),
                    ..r.clone()
                };
                device.add_request(with).unwrap()
            })
            .collect();
        let mut out = Outcomes::new();
        run_overlapped(&mut device, &mut out);
        for (k, (h, d)) in host_ids.iter().zip(&ids).enumerate() {
            assert_eq!(out[d], host_out[h], "request {k}, overlap {overlap}");
        }
        let progress = device.progress();
        assert!(
            progress.accepted_draft_tokens * 2 > progress.draft_tokens,
            "{progress:?}"
        );
        // Only the penalised request's rows came to the host: fewer than its 20 tokens'
        // worth of rows and drafts.
        assert!(device.model.rows_fetched > 0, "the penalised rows");
        assert!(
            device.model.rows_fetched < 40,
            "{}",
            device.model.rows_fetched
        );
        assert_eq!(device.free_blocks(), 96, "blocks leaked");
    }
}
