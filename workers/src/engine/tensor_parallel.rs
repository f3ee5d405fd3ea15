//! A tensor-parallel group driven as one model: every rank (a [`ModelRunner`] over its share of
//! the weights, [`crate::model::shard`]) runs in a thread of its own, and each call of the
//! engine goes to all of them at once.
//!
//! The ranks sum their partial outputs among themselves (the backend's all-reduce), so every
//! rank ends a forward with the same logits, bit for bit. The group therefore runs every rank
//! alike and answers with rank 0's results: a forward's logits rows, row log-probabilities and
//! timing; with device sampling ([`DeviceSampling`], the CUDA backend), the summaries of its
//! rows. Each rank samples its own copy of the same logits with the same uniforms, so each
//! holds the same picks for the next pass's chained tokens ([`ForwardBatch::chained`]) and
//! overlapped steps work as on one device. Only reading rows back to the host goes to rank 0
//! alone.
//!
//! The ranks' KV caches hold each rank's KV heads; to the outside (a KV transfer, the handle's
//! layout) the group shows the whole model's layout, each block's token rows put together from
//! the ranks' head slices, so a context worker of two ranks hands its prompt to a decode worker
//! of one, or the other way.
//!
//! A rank that fails while computing, or does not answer within [`REPLY_TIMEOUT`], breaks the
//! group: its collectives are aborted (waking ranks waiting in them where the backend can) and
//! the group reports a lost device, which takes the worker out of service to be restarted, as
//! a GPU fault does. The group does not wait for the other ranks then: on a GPU a rank whose
//! peer never joins an all-reduce waits inside it for good, and only the process's exit ends
//! that.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use super::profile::ForwardTiming;
use super::runner::{DeviceSampling, ModelRunner, StepModel};
use crate::backend::{BackendError, KvBlockIo, KvBytes, KvBytesMut};
use crate::kv_cache::KvLayout;
use crate::kv_cache::block_pool::BlockId;
use crate::model::{ForwardBatch, ModelError, RowOutputs};
use crate::sampler::device::{RowRequest, RowSummary};

/// How long the group waits for a rank's answer before it declares the group broken: far
/// longer than any step (a whole-budget prefill of a 70B model takes seconds), short enough
/// that a hung rank does not hold requests for long.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// What a rank is asked to do.
enum Command {
    Forward(Arc<ForwardBatch>),
    Submit(Arc<ForwardBatch>, Arc<Vec<RowRequest>>),
    Collect,
    SummarizeMasked {
        rows: Arc<Vec<usize>>,
        masks: Arc<Vec<Vec<u32>>>,
        requests: Arc<Vec<RowRequest>>,
    },
    LogitsRows(Vec<usize>),
    Read(Arc<Vec<BlockId>>),
    Write(Arc<Vec<BlockId>>, Vec<u8>),
}

/// A rank's answer to a pass: its value, and the row log-probabilities and timing the pass
/// left (only rank 0's are kept).
struct Pass<T> {
    value: T,
    row_outputs: RowOutputs,
    timing: Option<ForwardTiming>,
}

/// What a rank answers.
enum Reply {
    Logits(Result<Pass<Vec<Vec<f32>>>, ModelError>),
    Submitted(Result<Pass<()>, ModelError>),
    Summaries(Result<Pass<Vec<RowSummary>>, ModelError>),
    Rows(Result<Vec<Vec<f32>>, ModelError>),
    Read(Result<Vec<u8>, ModelError>),
    Written(Result<(), ModelError>),
}

struct Rank {
    commands: Option<Sender<Command>>,
    thread: Option<JoinHandle<()>>,
}

/// A tensor-parallel group as a [`StepModel`].
pub struct TensorParallelRunner {
    ranks: Vec<Rank>,
    replies: Receiver<(usize, Reply)>,
    /// The whole model's layout: what the group reads and writes in a transfer.
    layout: KvLayout,
    /// One rank's share of it.
    rank_layout: KvLayout,
    /// Each rank's cache, in rank order (as each rank's backend describes it), where the ranks
    /// can hand theirs out: transfers read a prompt's blocks straight out of them, or write
    /// them straight in, the heads laid out per rank.
    cache_parts: Vec<crate::backend::KvCacheMemory>,
    vocab_size: usize,
    max_model_len: usize,
    eos_token_ids: Vec<u32>,
    /// Whether the ranks sample on their device.
    device_sampling: bool,
    /// Rank 0's row log-probabilities of the last forward or collected pass, until taken.
    row_outputs: RowOutputs,
    /// Rank 0's forward timing since it was last taken.
    timing: Option<ForwardTiming>,
    /// Fails the group's pending collectives where the backend can.
    abort: Box<dyn Fn(&str) + Send>,
    /// Why the group no longer computes, once it does not.
    broken: std::cell::RefCell<Option<String>>,
    timeout: Duration,
}

impl TensorParallelRunner {
    /// Starts a thread per rank; `ranks[r]` is rank r's runner, `abort` fails the group's
    /// pending collectives.
    pub fn spawn<B: KvBlockIo + 'static>(
        mut ranks: Vec<ModelRunner<B>>,
        abort: Box<dyn Fn(&str) + Send>,
    ) -> std::io::Result<Self> {
        assert!(!ranks.is_empty(), "a group of no ranks");
        let device_sampling = ranks.iter_mut().all(|r| r.device_sampling().is_some());
        let first = &ranks[0];
        let rank_layout = first.kv_layout();
        let layout = KvLayout {
            num_kv_heads: rank_layout.num_kv_heads * ranks.len(),
            ..rank_layout
        };
        let (vocab_size, max_model_len) = (first.vocab_size(), first.max_model_len());
        let eos_token_ids = first.eos_token_ids();
        let parts: Vec<_> = ranks.iter().map(|r| r.kv_cache_parts()).collect();
        let cache_parts = if parts.iter().all(|p| p.len() == 1) {
            parts.into_iter().flatten().collect()
        } else {
            Vec::new()
        };
        let (reply_to, replies) = channel();
        let mut handles = Vec::with_capacity(ranks.len());
        for (r, runner) in ranks.into_iter().enumerate() {
            let (commands, inbox) = channel();
            let reply_to = reply_to.clone();
            let thread = std::thread::Builder::new()
                .name(format!("tp-rank-{r}"))
                .spawn(move || serve_rank(r, runner, inbox, reply_to))?;
            handles.push(Rank {
                commands: Some(commands),
                thread: Some(thread),
            });
        }
        Ok(TensorParallelRunner {
            ranks: handles,
            replies,
            layout,
            rank_layout,
            cache_parts,
            vocab_size,
            max_model_len,
            eos_token_ids,
            device_sampling,
            row_outputs: RowOutputs::default(),
            timing: None,
            abort,
            broken: std::cell::RefCell::new(None),
            timeout: REPLY_TIMEOUT,
        })
    }

    /// How long to wait for a rank's answer ([`REPLY_TIMEOUT`] by default): tests shorten it.
    pub fn set_reply_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn size(&self) -> usize {
        self.ranks.len()
    }

    /// Sends `command(r)` to every rank r in `ranks` and gathers their answers in rank order.
    ///
    /// A rank that fails computing breaks the group at once: its peers may be waiting for it
    /// in a collective, so their answers are not awaited. A request that every rank refused
    /// before computing (an invalid batch) is only refused.
    fn ask<T>(
        &self,
        ranks: std::ops::Range<usize>,
        command: impl Fn(usize) -> Command,
        take: impl Fn(Reply) -> Result<T, ModelError>,
    ) -> Result<Vec<T>, ModelError> {
        if let Some(why) = &*self.broken.borrow() {
            return Err(lost(why));
        }
        for r in ranks.clone() {
            let sent = self.ranks[r]
                .commands
                .as_ref()
                .is_some_and(|c| c.send(command(r)).is_ok());
            if !sent {
                return Err(self.break_group(format!("rank {r} is gone")));
            }
        }
        let mut results: Vec<Option<Result<T, ModelError>>> = ranks.clone().map(|_| None).collect();
        for _ in ranks.clone() {
            let (r, reply) = match self.replies.recv_timeout(self.timeout) {
                Ok(answer) => answer,
                Err(RecvTimeoutError::Timeout) => {
                    let missing: Vec<usize> = ranks
                        .clone()
                        .filter(|r| results[r - ranks.start].is_none())
                        .collect();
                    return Err(self.break_group(format!(
                        "rank(s) {missing:?} did not answer within {:?}",
                        self.timeout
                    )));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.break_group("every rank is gone".into()));
                }
            };
            let result = take(reply);
            if let Err(e @ ModelError::Backend(_)) = &result {
                return Err(self.break_group(format!("rank {r} failed: {e}")));
            }
            results[r - ranks.start] = Some(result);
        }
        let mut values = Vec::with_capacity(results.len());
        let mut refused = None;
        for (i, result) in results.into_iter().enumerate() {
            match result.expect("every rank answered once") {
                Ok(value) => values.push(value),
                Err(e) => {
                    refused.get_or_insert((ranks.start + i, e));
                }
            }
        }
        match refused {
            None => Ok(values),
            // Refused alike by every rank before it computed: the group is fine.
            Some((_, e)) if values.is_empty() => Err(e),
            // Some ranks ran what others refused: they no longer agree.
            Some((r, e)) => Err(self.break_group(format!("rank {r} alone refused: {e}"))),
        }
    }

    /// [`Self::ask`] of every rank.
    fn all<T>(
        &self,
        command: impl Fn(usize) -> Command,
        take: impl Fn(Reply) -> Result<T, ModelError>,
    ) -> Result<Vec<T>, ModelError> {
        self.ask(0..self.ranks.len(), command, take)
    }

    /// Keeps rank 0's row outputs and timing of a pass every rank ran (a forward or
    /// a collected pass: what [`StepModel::take_row_outputs`] returns next); its value.
    fn keep_first<T>(&mut self, passes: Vec<Pass<T>>) -> T {
        let first = passes.into_iter().next().expect("a group has a rank");
        self.row_outputs = first.row_outputs;
        self.add_timing(first.timing);
        first.value
    }

    /// Adds rank 0's timing of a pass to what [`StepModel::take_forward_timing`] returns.
    fn add_timing(&mut self, timing: Option<ForwardTiming>) {
        if let Some(t) = timing {
            let kept = self.timing.get_or_insert_default();
            kept.enqueue += t.enqueue;
            kept.device += t.device;
        }
    }

    fn break_group(&self, why: String) -> ModelError {
        (self.abort)(&why);
        tracing::error!(reason = %why, "tensor-parallel group broken: the worker must restart");
        let e = lost(&why);
        *self.broken.borrow_mut() = Some(why);
        e
    }
}

fn lost(why: &str) -> ModelError {
    ModelError::Backend(BackendError::DeviceLost {
        op: "tensor-parallel group",
        detail: why.to_owned(),
    })
}

/// Rank `rank`'s loop: runs each command on its runner and answers it.
fn serve_rank<B: KvBlockIo>(
    rank: usize,
    mut runner: ModelRunner<B>,
    inbox: Receiver<Command>,
    reply_to: Sender<(usize, Reply)>,
) {
    let block_bytes = runner.kv_layout().block_bytes();
    // The row outputs and timing a pass left, taken with its value.
    fn pass<T, B: KvBlockIo>(
        runner: &mut ModelRunner<B>,
        value: Result<T, ModelError>,
    ) -> Result<Pass<T>, ModelError> {
        let value = value?;
        Ok(Pass {
            value,
            row_outputs: runner.take_row_outputs(),
            timing: runner.take_forward_timing(),
        })
    }
    fn sampler<B: KvBlockIo>(
        runner: &mut ModelRunner<B>,
    ) -> Result<&mut dyn DeviceSampling, ModelError> {
        runner.device_sampling().ok_or_else(|| {
            ModelError::InvalidBatch("this rank's backend samples from host rows".into())
        })
    }
    for command in inbox {
        let reply = match command {
            Command::Forward(batch) => {
                let logits = runner.forward(&batch);
                Reply::Logits(pass(&mut runner, logits))
            }
            Command::Submit(batch, requests) => {
                let done =
                    sampler(&mut runner).and_then(|s| s.submit_summarized(&batch, &requests));
                Reply::Submitted(pass(&mut runner, done))
            }
            Command::Collect => {
                let summaries = sampler(&mut runner).and_then(|s| s.collect_summarized());
                Reply::Summaries(pass(&mut runner, summaries))
            }
            Command::SummarizeMasked {
                rows,
                masks,
                requests,
            } => {
                let masks: Vec<&[u32]> = masks.iter().map(Vec::as_slice).collect();
                let summaries = sampler(&mut runner)
                    .and_then(|s| s.summarize_last_masked(&rows, &masks, &requests));
                Reply::Summaries(summaries.map(|value| Pass {
                    value,
                    row_outputs: RowOutputs::default(),
                    timing: None,
                }))
            }
            Command::LogitsRows(rows) => {
                Reply::Rows(sampler(&mut runner).and_then(|s| s.last_logits_rows(&rows)))
            }
            Command::Read(blocks) => {
                let mut bytes = vec![0u8; blocks.len() * block_bytes];
                Reply::Read(
                    runner
                        .read_kv_blocks(&blocks, KvBytesMut::Host(&mut bytes))
                        .map(|()| bytes),
                )
            }
            Command::Write(blocks, bytes) => {
                Reply::Written(runner.write_kv_blocks(&blocks, KvBytes::Host(&bytes)))
            }
        };
        if reply_to.send((rank, reply)).is_err() {
            return;
        }
    }
}

/// The bytes of one token row of one layer's K or V: a rank's, and the whole model's.
fn row_bytes(layout: &KvLayout) -> usize {
    layout.token_stride() * layout.dtype.size_bytes()
}

fn host_only(op: &str) -> ModelError {
    ModelError::InvalidBatch(format!(
        "a tensor-parallel group {op} KV blocks through host memory only"
    ))
}

/// Refuses `len` bytes that are not `blocks` whole blocks of `layout`.
fn check_len(layout: &KvLayout, blocks: usize, len: usize) -> Result<(), ModelError> {
    if len != blocks * layout.block_bytes() {
        return Err(ModelError::InvalidBatch(format!(
            "{len} bytes for {blocks} KV blocks of {} bytes",
            layout.block_bytes()
        )));
    }
    Ok(())
}

impl Drop for TensorParallelRunner {
    fn drop(&mut self) {
        (self.abort)("the group is shutting down");
        let broken = self.broken.borrow().is_some();
        for rank in &mut self.ranks {
            // Closing its inbox ends the rank's loop.
            rank.commands = None;
            // A broken group's ranks may wait on their device for good: left to the
            // process's exit.
            if let Some(thread) = rank.thread.take()
                && !broken
            {
                let _ = thread.join();
            }
        }
    }
}

macro_rules! expect_reply {
    ($variant:ident) => {
        |reply| match reply {
            Reply::$variant(result) => result,
            _ => unreachable!(concat!("a rank answered other than ", stringify!($variant))),
        }
    };
}

impl StepModel for TensorParallelRunner {
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_ids.clone()
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Vec<Vec<f32>>, ModelError> {
        self.row_outputs.clear();
        let batch = Arc::new(batch.clone());
        let passes = self.all(|_| Command::Forward(batch.clone()), expect_reply!(Logits))?;
        Ok(self.keep_first(passes))
    }

    fn take_row_outputs(&mut self) -> RowOutputs {
        std::mem::take(&mut self.row_outputs)
    }

    fn take_forward_timing(&mut self) -> Option<ForwardTiming> {
        self.timing.take()
    }

    fn device_sampling(&mut self) -> Option<&mut dyn DeviceSampling> {
        if self.device_sampling {
            Some(self)
        } else {
            None
        }
    }

    fn kv_layout(&self) -> KvLayout {
        self.layout
    }

    fn kv_cache_parts(&self) -> Vec<crate::backend::KvCacheMemory> {
        self.cache_parts.clone()
    }

    fn read_kv_blocks(&self, blocks: &[BlockId], dst: KvBytesMut<'_>) -> Result<(), ModelError> {
        let KvBytesMut::Host(dst) = dst else {
            return Err(host_only("reads"));
        };
        check_len(&self.layout, blocks.len(), dst.len())?;
        let blocks = Arc::new(blocks.to_vec());
        let parts = self.all(|_| Command::Read(blocks.clone()), expect_reply!(Read))?;
        let (rank_row, whole_row) = (row_bytes(&self.rank_layout), row_bytes(&self.layout));
        for (row, out) in dst.chunks_exact_mut(whole_row).enumerate() {
            for (r, part) in parts.iter().enumerate() {
                out[r * rank_row..(r + 1) * rank_row]
                    .copy_from_slice(&part[row * rank_row..(row + 1) * rank_row]);
            }
        }
        Ok(())
    }

    fn write_kv_blocks(&mut self, blocks: &[BlockId], src: KvBytes<'_>) -> Result<(), ModelError> {
        let KvBytes::Host(src) = src else {
            return Err(host_only("writes"));
        };
        check_len(&self.layout, blocks.len(), src.len())?;
        let (rank_row, whole_row) = (row_bytes(&self.rank_layout), row_bytes(&self.layout));
        let size = self.ranks.len();
        let mut parts: Vec<Vec<u8>> = (0..size)
            .map(|_| Vec::with_capacity(src.len() / size))
            .collect();
        for row in src.chunks_exact(whole_row) {
            for (r, part) in parts.iter_mut().enumerate() {
                part.extend_from_slice(&row[r * rank_row..(r + 1) * rank_row]);
            }
        }
        let blocks = Arc::new(blocks.to_vec());
        let parts = std::sync::Mutex::new(parts.into_iter().map(Some).collect::<Vec<_>>());
        self.all(
            |r| {
                let bytes = parts.lock().expect("not poisoned")[r]
                    .take()
                    .expect("each rank's part is sent once");
                Command::Write(blocks.clone(), bytes)
            },
            expect_reply!(Written),
        )?;
        Ok(())
    }
}

impl DeviceSampling for TensorParallelRunner {
    fn submit_summarized(
        &mut self,
        batch: &ForwardBatch,
        requests: &[RowRequest],
    ) -> Result<(), ModelError> {
        let (batch, requests) = (Arc::new(batch.clone()), Arc::new(requests.to_vec()));
        let passes = self.all(
            |_| Command::Submit(batch.clone(), requests.clone()),
            expect_reply!(Submitted),
        )?;
        // A submitted pass's row log-probabilities come with its collection; those of the
        // pass collected before it may not have been taken yet.
        let first = passes.into_iter().next().expect("a group has a rank");
        self.add_timing(first.timing);
        Ok(())
    }

    fn collect_summarized(&mut self) -> Result<Vec<RowSummary>, ModelError> {
        self.row_outputs.clear();
        let passes = self.all(|_| Command::Collect, expect_reply!(Summaries))?;
        Ok(self.keep_first(passes))
    }

    fn last_logits_rows(&mut self, rows: &[usize]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut rows = self.ask(
            0..1,
            |_| Command::LogitsRows(rows.to_vec()),
            expect_reply!(Rows),
        )?;
        Ok(rows.swap_remove(0))
    }

    fn summarize_last_masked(
        &mut self,
        rows: &[usize],
        masks: &[&[u32]],
        requests: &[RowRequest],
    ) -> Result<Vec<RowSummary>, ModelError> {
        // Every rank: the summaries also leave the picks a later pass's chained tokens read.
        let (rows, requests) = (Arc::new(rows.to_vec()), Arc::new(requests.to_vec()));
        let masks = Arc::new(masks.iter().map(|m| m.to_vec()).collect::<Vec<_>>());
        let mut passes = self.all(
            |_| Command::SummarizeMasked {
                rows: rows.clone(),
                masks: masks.clone(),
                requests: requests.clone(),
            },
            expect_reply!(Summaries),
        )?;
        Ok(passes.swap_remove(0).value)
    }
}
