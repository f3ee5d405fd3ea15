//! Tensor parallelism on the CPU backend: two ranks in two threads, each holding half the
//! heads and half the MLP channels ([`tandem_workers::model::shard`]), summed by the group's
//! all-reduce. Their logits match Hugging Face transformers' reference as the whole model's do,
//! are the same bits on both ranks, and give the whole model's greedy tokens.

mod parity_support;

use std::path::Path;
use std::sync::Arc;

use parity_support::*;
use tandem_workers::backend::cpu::group::{CpuGroup, DEFAULT_TIMEOUT, GroupOptions};
use tandem_workers::backend::cpu::{CpuBackend, CpuOptions};
use tandem_workers::backend::{KvBytes, KvBytesMut};
use tandem_workers::engine::{ModelRunner, StepModel, TensorParallelRunner};
use tandem_workers::model::{
    ForwardBatch, Model, ModelError, ModelOptions, RowLogprobs, TensorParallel, TokenLogprob,
};

const MAX_REL_L2: f64 = 1e-4;

fn load_rank(
    dir: &Path,
    group: &Arc<CpuGroup>,
    rank: usize,
) -> Result<Model<CpuBackend>, ModelError> {
    let options = CpuOptions {
        threads: 1,
        ..Default::default()
    };
    let backend = CpuBackend::in_group(&options, group.clone(), rank).expect("cpu backend");
    let tensor_parallel = TensorParallel::new(rank, group.size()).expect("rank in the group");
    Model::load(
        dir,
        backend,
        &ModelOptions {
            tensor_parallel,
            ..ModelOptions::default()
        },
    )
}

/// The ranks of a group of `size` over `dir`, each running `work` in a thread of its own;
/// every rank's result, in rank order.
fn on_every_rank<T: Send>(
    dir: &Path,
    size: usize,
    work: impl Fn(&Model<CpuBackend>) -> T + Sync,
) -> Vec<T> {
    let group = Arc::new(CpuGroup::new(GroupOptions {
        size,
        timeout: DEFAULT_TIMEOUT,
    }));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let (group, work) = (&group, &work);
                s.spawn(move || {
                    let model = load_rank(dir, group, rank)
                        .unwrap_or_else(|e| panic!("rank {rank} of {}: {e}", dir.display()));
                    work(&model)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn check(name: &str, dir: &Path, reference: &Path) {
    let reference = read_reference(reference);
    let whole = load_cpu(dir);
    for (prompt, expected) in reference.prompts.iter().zip(&reference.logits) {
        let ranks = on_every_rank(dir, 2, |model| {
            let mut session = Session::new(model, prompt.ids.len());
            let logits = session.feed(&prompt.ids);
            let tokens = greedy(model, &prompt.ids, 12, &[]);
            (logits, tokens)
        });
        let (logits, tokens) = &ranks[0];
        assert_eq!(
            ranks[1].0, *logits,
            "{name}/{}: the ranks' logits differ",
            prompt.name
        );
        let err = rel_l2(logits, expected);
        assert!(
            err < MAX_REL_L2,
            "{name}/{}: relative L2 {err:e} against the reference",
            prompt.name
        );
        assert_eq!(
            *tokens,
            greedy(&whole, &prompt.ids, 12, &[]),
            "{name}/{}: greedy tokens differ from the whole model's",
            prompt.name
        );
        assert_eq!(ranks[1].1, *tokens, "{name}/{}", prompt.name);
    }
}

#[test]
fn two_ranks_match_the_reference_and_the_whole_model() {
    for name in ["tiny-llama", "tiny-llama3-rope", "tiny-qwen2", "tiny-qwen3"] {
        check(name, &fixture_dir(name), &fixture_dir(name));
    }
    // model-prep's own tiny model (bf16 checkpoints are covered by the same split).
    check(
        "model-prep-tiny",
        &test_model_dir("tiny"),
        &fixture_dir("model-prep-tiny"),
    );
}

#[test]
fn a_model_whose_heads_do_not_divide_is_refused_by_name() {
    // tiny-llama has 4 query and 2 KV heads: three ranks cannot split them.
    let dir = fixture_dir("tiny-llama");
    let group = Arc::new(CpuGroup::new(GroupOptions {
        size: 3,
        timeout: DEFAULT_TIMEOUT,
    }));
    let err = load_rank(&dir, &group, 0).unwrap_err().to_string();
    assert_eq!(
        err,
        "tensor parallelism: attention heads (4) do not divide over 3 tensor-parallel ranks"
    );
}

/// The fixture `name` as a group of `size` ranks driven as one model, on 8 blocks of 16 tokens
/// each; and the whole model on the same cache.
fn runners(name: &str, size: usize) -> (TensorParallelRunner, ModelRunner<CpuBackend>) {
    let dir = fixture_dir(name);
    let group = Arc::new(CpuGroup::new(GroupOptions {
        size,
        timeout: DEFAULT_TIMEOUT,
    }));
    let ranks = (0..size)
        .map(|rank| ModelRunner::new(load_rank(&dir, &group, rank).unwrap(), 16, 8).unwrap())
        .collect();
    let abort = Box::new(move |why: &str| group.abort(why));
    let tp = TensorParallelRunner::spawn(ranks, abort).unwrap();
    (tp, ModelRunner::new(load_cpu(&dir), 16, 8).unwrap())
}

#[test]
fn the_group_shows_the_whole_layout_and_hands_over_what_the_whole_model_computes() {
    let (mut tp, mut whole) = runners("tiny-llama", 2);
    assert_eq!(tp.kv_layout(), whole.kv_layout());
    // A prompt prefilled by the whole model, its blocks written into the group: the group's
    // next token is the whole model's, and reading them back gives the same bytes.
    let prompt: Vec<u32> = (0..37).map(|i| (i * 13 + 5) % 256).collect();
    let mut batch = ForwardBatch::default();
    batch.push(&prompt, 0, vec![0, 1, 2], true);
    let expected = whole.forward(&batch).unwrap();
    let block_bytes = whole.kv_layout().block_bytes();
    let mut bytes = vec![0u8; 3 * block_bytes];
    whole
        .read_kv_blocks(&[0, 1, 2], KvBytesMut::Host(&mut bytes))
        .unwrap();
    tp.write_kv_blocks(&[5, 3, 7], KvBytes::Host(&bytes))
        .unwrap();
    let mut back = vec![0u8; 3 * block_bytes];
    tp.read_kv_blocks(&[5, 3, 7], KvBytesMut::Host(&mut back))
        .unwrap();
    assert_eq!(back, bytes, "a round trip through the ranks' caches");
    let next = argmax(&expected[0]);
    let decode = |model: &mut dyn StepModel, table: Vec<u32>| {
        let mut batch = ForwardBatch::default();
        batch.push(&[next], prompt.len(), table, true);
        model.forward(&batch).unwrap().remove(0)
    };
    let from_group = decode(&mut tp, vec![5, 3, 7]);
    let from_whole = decode(&mut whole, vec![0, 1, 2]);
    assert!(rel_l2(&from_group, &from_whole) < MAX_REL_L2);
    assert_eq!(argmax(&from_group), argmax(&from_whole));
}

#[test]
fn a_batch_every_rank_refuses_leaves_the_group_serving() {
    let (mut tp, _) = runners("tiny-llama", 2);
    let mut bad = ForwardBatch::default();
    bad.push(&[1, 2, 3], 0, vec![99], true); // block 99 of 8
    let err = tp.forward(&bad).unwrap_err();
    assert!(!err.is_device_lost(), "{err}");
    let mut good = ForwardBatch::default();
    good.push(&[1, 2, 3], 0, vec![0], true);
    assert_eq!(tp.forward(&good).unwrap().len(), 1);
    // Bytes that are not whole blocks are refused too, without breaking anything.
    assert!(tp.write_kv_blocks(&[0], KvBytes::Host(&[0u8; 3])).is_err());
    assert_eq!(tp.forward(&good).unwrap().len(), 1);
}

/// Prompt logprobs (`echo` with `logprobs`) come from rank 0 of the group: the same targets'
/// log-probabilities and alternatives as the whole model's, taken once.
#[test]
fn the_group_reports_the_row_outputs_of_its_forward() {
    let (mut tp, mut whole) = runners("tiny-llama", 2);
    let prompt: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 256).collect();
    let outputs = |model: &mut dyn StepModel| {
        let mut batch = ForwardBatch::default();
        batch.push(&prompt, 0, vec![0, 1], true);
        batch.want_row_logprobs(RowLogprobs {
            first: 0,
            targets: prompt[1..].to_vec(),
            top_k: 3,
        });
        batch.want_hidden();
        model.forward(&batch).unwrap();
        let outputs = model.take_row_outputs();
        assert!(model.take_row_outputs().is_empty(), "taken once");
        outputs
    };
    let (group, whole) = (outputs(&mut tp), outputs(&mut whole));
    // The last token's hidden state: the whole model's, from the group's rank 0.
    assert_eq!((group.hidden.len(), whole.hidden.len()), (1, 1));
    let (g, w) = (&group.hidden[0], &whole.hidden[0]);
    assert_eq!(g.len(), w.len());
    let diff: f32 = g
        .iter()
        .zip(w)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f32>()
        .sqrt();
    let norm: f32 = w.iter().map(|b| b * b).sum::<f32>().sqrt();
    assert!(
        norm > 0.0 && diff / norm < 1e-4,
        "relative L2 {}",
        diff / norm
    );
    let (from_group, from_whole) = (group.logprobs, whole.logprobs);
    assert_eq!(from_group.len(), 1);
    assert_eq!(from_group[0].len(), prompt.len() - 1);
    for (g, w) in from_group[0].iter().zip(&from_whole[0]) {
        assert!((g.logprob - w.logprob).abs() < 1e-4, "{g:?} {w:?}");
        let ids = |t: &TokenLogprob| t.top_logprobs.iter().map(|&(id, _)| id).collect::<Vec<_>>();
        assert_eq!(ids(g), ids(w));
    }
}

/// A rank that never answers (here: a rank whose backend waits in the all-reduce for a peer
/// that is not coming) breaks the group after the reply timeout, as a lost device, instead of
/// holding the engine forever; the group then refuses everything at once.
#[test]
fn a_rank_that_does_not_answer_breaks_the_group_instead_of_hanging() {
    let dir = fixture_dir("tiny-llama");
    // Two ranks that each wait for a third that does not exist, longer than the runner waits.
    let group = Arc::new(CpuGroup::new(GroupOptions {
        size: 3,
        timeout: std::time::Duration::from_secs(30),
    }));
    let ranks = (0..2)
        .map(|rank| {
            let options = CpuOptions {
                threads: 1,
                ..Default::default()
            };
            let backend = CpuBackend::in_group(&options, group.clone(), rank).unwrap();
            let model = Model::load(
                &dir,
                backend,
                &ModelOptions {
                    tensor_parallel: TensorParallel::new(rank, 2).unwrap(),
                    ..ModelOptions::default()
                },
            )
            .unwrap();
            ModelRunner::new(model, 16, 8).unwrap()
        })
        .collect();
    let abort = {
        let group = group.clone();
        Box::new(move |why: &str| group.abort(why))
    };
    let mut tp = TensorParallelRunner::spawn(ranks, abort).unwrap();
    tp.set_reply_timeout(std::time::Duration::from_millis(500));
    let mut batch = ForwardBatch::default();
    batch.push(&[1, 2, 3], 0, vec![0], true);
    let started = std::time::Instant::now();
    let err = tp.forward(&batch).unwrap_err();
    assert!(err.is_device_lost(), "{err}");
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let again = tp.forward(&batch).unwrap_err();
    assert!(again.is_device_lost(), "{again}");
}

/// `gpu_bench tp-check`'s comparison, run on CPU ranks (where a split computes the whole
/// model's values to rounding): it must find the split's logits at the whole model's, the
/// same top-1 token at every teacher-forced step and the same free-running greedy tokens. The
/// distances are not zero: the two ranks' partial sums round differently from the whole
/// model's, which shows the comparison is of two models, not of one with itself.
#[test]
fn the_tp_check_finds_a_cpu_split_at_the_whole_models_logits() {
    let dir = test_model_dir("tiny");
    let rows = tandem_workers::tp_bench::check(
        &dir,
        tandem_workers::device::Device::Cpu,
        &[1, 2],
        &[5, 40],
        6,
        false,
    )
    .unwrap();
    // Group sizes of 1 are the reference itself and are not compared.
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert_eq!(r.ranks, 2);
        assert!(r.prefill_rel_l2 < MAX_REL_L2, "{r:?}");
        assert!(r.max_rel_l2 < MAX_REL_L2 && r.max_rel_l2 > 0.0, "{r:?}");
        assert_eq!(r.top1_agree, r.steps, "{r:?}");
        assert_eq!(r.greedy_same, r.steps + 1, "{r:?}");
    }
    assert_eq!(
        rows.iter().map(|r| r.prompt_tokens).collect::<Vec<_>>(),
        [5, 40]
    );
}
