//! Sampling summaries on the device (`kernels/sample.cu`): per logits row, what the host
//! sampler needs instead of the row itself ([`crate::sampler::device`]).
//!
//! Summaries are read back either at once ([`summarize_rows`]) or queued
//! ([`SummaryQueue`]): the copy to pinned host memory is queued on the stream right behind the
//! kernel, so the host can queue the next forward pass before it waits for these summaries,
//! and that pass can read the tokens the device picked ([`chain_tokens`]).

use std::collections::VecDeque;
use std::sync::Mutex;

use super::launch::{KernelArgs, PushArg};
use cudarc::driver::{CudaEvent, CudaSlice, PinnedHostSlice};

use super::pinned::{self, lock};
use super::{CudaBackend, CudaTensor, rows_config, shape_err};
use crate::backend::{BackendError, DeviceSampler};
use crate::model::ChainedToken;
use crate::sampler::device::{DEVICE_CANDIDATES, RowRequest, RowSummary};

/// `SAMPLE_THREADS` in sample.cu.
const THREADS: u32 = 1024;
/// A row's flags in sample.cu: its candidates come back; its draw is truncated.
const SAMPLE_WANT_CANDIDATES: u32 = 1;
const SAMPLE_TRUNCATED: u32 = 2;

/// What `sample_rows` writes, per row: see sample.cu.
struct DeviceOutputs {
    rows: usize,
    f32s: CudaSlice<f32>,
    /// Row `r`'s picked token (the draw, or the argmax of a greedy row) is at `r * 4 + 1`.
    u32s: CudaSlice<u32>,
    f64s: CudaSlice<f64>,
    cand_logit: CudaSlice<f32>,
    cand_id: CudaSlice<u32>,
}

/// The outputs' host side, as plain slices (wherever they were copied to).
struct HostOutputs<'a> {
    f32s: &'a [f32],
    u32s: &'a [u32],
    f64s: &'a [f64],
    cand_logit: &'a [f32],
    cand_id: &'a [u32],
}

/// Runs `sample_rows` over `logits` as `requests` ask.
fn launch(
    backend: &CudaBackend,
    logits: &CudaTensor,
    requests: &[RowRequest],
) -> Result<DeviceOutputs, BackendError> {
    let x = logits.as_f32("summarize_rows")?;
    let rows = logits.rows;
    if requests.len() != rows {
        return Err(shape_err(
            "summarize_rows",
            format!("{} requests for {rows} logits rows", requests.len()),
        ));
    }
    let stream = &backend.stream;
    let temperature: Vec<f32> = requests.iter().map(|r| r.temperature).collect();
    let uniform: Vec<f64> = requests.iter().map(|r| r.uniform).collect();
    // Per row: SAMPLE_WANT_CANDIDATES | SAMPLE_TRUNCATED and top-k; top-p and T ln(min-p).
    let flags: Vec<u32> = requests
        .iter()
        .flat_map(|r| {
            let want = u32::from(r.candidates) * SAMPLE_WANT_CANDIDATES;
            match &r.truncation {
                Some(t) => [want | SAMPLE_TRUNCATED, t.top_k],
                None => [want, 0],
            }
        })
        .collect();
    let truncation: Vec<f32> = requests
        .iter()
        .flat_map(|r| match &r.truncation {
            Some(t) => [t.top_p, t.min_logit_offset(r.temperature)],
            None => [1.0, f32::NEG_INFINITY],
        })
        .collect();
    let temperature = dev!("summarize_rows upload", stream.clone_htod(&temperature))?;
    let uniform = dev!("summarize_rows upload", stream.clone_htod(&uniform))?;
    let flags = dev!("summarize_rows upload", stream.clone_htod(&flags))?;
    let truncation = dev!("summarize_rows upload", stream.clone_htod(&truncation))?;
    let mut out = DeviceOutputs {
        rows,
        f32s: backend.alloc_f32(rows * 2)?,
        u32s: backend.alloc_u32(rows * 4)?,
        // SAFETY: the kernel writes both values of every row before they are read.
        f64s: dev!("alloc", unsafe { stream.alloc::<f64>(rows * 2) })?,
        cand_logit: backend.alloc_f32(rows * DEVICE_CANDIDATES)?,
        cand_id: backend.alloc_u32(rows * DEVICE_CANDIDATES)?,
    };
    let cols = logits.cols as i32;
    let mut b = KernelArgs::new(stream, &backend.kernels.sample_rows);
    b.arg(x)
        .arg(&cols)
        .arg(&temperature)
        .arg(&uniform)
        .arg(&flags)
        .arg(&truncation)
        .arg(&mut out.f32s)
        .arg(&mut out.u32s)
        .arg(&mut out.f64s)
        .arg(&mut out.cand_logit)
        .arg(&mut out.cand_id);
    backend.launch(b, rows_config(rows, THREADS), "sample_rows")?;
    Ok(out)
}

/// The summaries of `rows` rows from their host copies.
fn decode(rows: usize, want_candidates: &[bool], host: &HostOutputs<'_>) -> Vec<RowSummary> {
    (0..rows)
        .map(|r| {
            let count = host.u32s[r * 4 + 3] as usize;
            let candidates = (want_candidates[r] && count <= DEVICE_CANDIDATES).then(|| {
                let base = r * DEVICE_CANDIDATES;
                (base..base + count)
                    .map(|i| (host.cand_logit[i], host.cand_id[i]))
                    .collect()
            });
            RowSummary {
                max_logit: host.f32s[r * 2],
                argmax: host.u32s[r * 4],
                non_finite: host.u32s[r * 4 + 2],
                sum_exp: host.f64s[r * 2],
                sum_exp_temperature: host.f64s[r * 2 + 1],
                drawn: host.u32s[r * 4 + 1],
                drawn_logit: host.f32s[r * 2 + 1],
                candidates,
            }
        })
        .collect()
}

/// One summary per row of `logits`, waiting for them.
pub(super) fn summarize_rows(
    backend: &CudaBackend,
    logits: &CudaTensor,
    requests: &[RowRequest],
) -> Result<Vec<RowSummary>, BackendError> {
    if logits.rows == 0 {
        return Ok(Vec::new());
    }
    let out = launch(backend, logits, requests)?;
    let stream = &backend.stream;
    let f32s = dev!("summarize_rows", stream.clone_dtoh(&out.f32s))?;
    let u32s = dev!("summarize_rows", stream.clone_dtoh(&out.u32s))?;
    let f64s = dev!("summarize_rows", stream.clone_dtoh(&out.f64s))?;
    // Candidates only cross when some row asked for them.
    let (cand_logit, cand_id) = if requests.iter().any(|r| r.candidates) {
        (
            dev!("summarize_rows", stream.clone_dtoh(&out.cand_logit))?,
            dev!("summarize_rows", stream.clone_dtoh(&out.cand_id))?,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let want: Vec<bool> = requests.iter().map(|r| r.candidates).collect();
    let host = HostOutputs {
        f32s: &f32s,
        u32s: &u32s,
        f64s: &f64s,
        cand_logit: &cand_logit,
        cand_id: &cand_id,
    };
    Ok(decode(out.rows, &want, &host))
}

/// Pinned host buffers for one step's summaries, reused from step to step (allocating pinned
/// memory costs milliseconds).
struct PinnedOutputs {
    /// Rows the buffers hold.
    capacity: usize,
    f32s: PinnedHostSlice<f32>,
    u32s: PinnedHostSlice<u32>,
    f64s: PinnedHostSlice<f64>,
    cand_logit: PinnedHostSlice<f32>,
    cand_id: PinnedHostSlice<u32>,
}

impl PinnedOutputs {
    fn new(backend: &CudaBackend, rows: usize) -> Result<Self, BackendError> {
        // Some headroom, so a batch growing by a few sequences does not allocate again.
        let capacity = rows.next_power_of_two().max(64);
        let ctx = &backend.ctx;
        Ok(Self {
            capacity,
            f32s: pinned::alloc(ctx, capacity * 2)?,
            u32s: pinned::alloc(ctx, capacity * 4)?,
            f64s: pinned::alloc(ctx, capacity * 2)?,
            cand_logit: pinned::alloc(ctx, capacity * DEVICE_CANDIDATES)?,
            cand_id: pinned::alloc(ctx, capacity * DEVICE_CANDIDATES)?,
        })
    }
}

/// Summaries queued behind their forward pass, oldest first.
struct Queued {
    rows: usize,
    want_candidates: Vec<bool>,
    pinned: PinnedOutputs,
    /// Recorded after the copies into `pinned`.
    copied: CudaEvent,
}

/// Summaries on their way to the host, and the device copy of the newest ones' picked tokens
/// for the next forward's [`ChainedToken`]s.
#[derive(Default)]
pub(super) struct SummaryQueue {
    queued: Mutex<VecDeque<Queued>>,
    spare: Mutex<Vec<PinnedOutputs>>,
    /// `u32s` of the newest queued summaries: row `r`'s token at `r * 4 + 1`.
    last_picks: Mutex<Option<(usize, CudaSlice<u32>)>>,
}

// SAFETY: the pinned buffers and device slices are only touched under the mutexes; CUDA
// memory may be used from any thread with the context bound.
unsafe impl Send for SummaryQueue {}
unsafe impl Sync for SummaryQueue {}

/// Queues the summaries of `logits`' rows and their copy to the host; they become the picks
/// the next forward's chained tokens read.
pub(super) fn queue_summaries(
    backend: &CudaBackend,
    logits: &CudaTensor,
    requests: &[RowRequest],
) -> Result<(), BackendError> {
    let rows = logits.rows;
    if rows == 0 {
        // A forward without logits rows has nothing to summarize (the runner queues none).
        return Err(shape_err("queue_summaries", "no logits rows".into()));
    }
    let queue = &backend.summaries;
    let out = launch(backend, logits, requests)?;
    let reused = {
        let mut spare = lock(&queue.spare);
        let at = spare.iter().position(|p| p.capacity >= rows);
        at.map(|at| spare.swap_remove(at))
    };
    let mut pinned = match reused {
        Some(pinned) => pinned,
        None => PinnedOutputs::new(backend, rows)?,
    };
    let stream = &backend.stream;
    pinned::from_device(stream, &out.f32s, &mut pinned.f32s)?;
    pinned::from_device(stream, &out.u32s, &mut pinned.u32s)?;
    pinned::from_device(stream, &out.f64s, &mut pinned.f64s)?;
    let want_candidates: Vec<bool> = requests.iter().map(|r| r.candidates).collect();
    if want_candidates.contains(&true) {
        pinned::from_device(stream, &out.cand_logit, &mut pinned.cand_logit)?;
        pinned::from_device(stream, &out.cand_id, &mut pinned.cand_id)?;
    }
    let copied = dev!("queue summaries", stream.record_event(None))?;
    *lock(&queue.last_picks) = Some((rows, out.u32s));
    lock(&queue.queued).push_back(Queued {
        rows,
        want_candidates,
        pinned,
        copied,
    });
    Ok(())
}

/// The oldest queued summaries, once their copy is done.
pub(super) fn take_summaries(backend: &CudaBackend) -> Result<Vec<RowSummary>, BackendError> {
    let queue = &backend.summaries;
    let queued = lock(&queue.queued)
        .pop_front()
        .ok_or_else(|| shape_err("take_summaries", "no summaries are queued".into()))?;
    dev!("wait for summaries", queued.copied.synchronize())?;
    let summaries = {
        let p = &queued.pinned;
        let host = HostOutputs {
            f32s: dev!("wait for summaries", p.f32s.as_slice())?,
            u32s: dev!("wait for summaries", p.u32s.as_slice())?,
            f64s: dev!("wait for summaries", p.f64s.as_slice())?,
            cand_logit: dev!("wait for summaries", p.cand_logit.as_slice())?,
            cand_id: dev!("wait for summaries", p.cand_id.as_slice())?,
        };
        decode(queued.rows, &queued.want_candidates, &host)
    };
    lock(&queue.spare).push(queued.pinned);
    Ok(summaries)
}

/// Writes `chained` tokens into the batch whose device token array is at `tokens`, from the
/// newest queued summaries' picks.
pub(super) fn chain_tokens(
    backend: &CudaBackend,
    tokens: u64,
    chained: &[ChainedToken],
) -> Result<(), BackendError> {
    if chained.is_empty() {
        return Ok(());
    }
    let picks = lock(&backend.summaries.last_picks);
    let Some((rows, picks)) = picks.as_ref() else {
        return Err(shape_err(
            "chain_tokens",
            "chained tokens without summaries queued before them".into(),
        ));
    };
    if let Some(c) = chained.iter().find(|c| c.row >= *rows) {
        return Err(shape_err(
            "chain_tokens",
            format!(
                "chained token from row {} of a forward with {rows} logits rows",
                c.row
            ),
        ));
    }
    let pairs: Vec<u32> = chained
        .iter()
        .flat_map(|c| [c.token as u32, c.row as u32])
        .collect();
    let stream = &backend.stream;
    let pairs = dev!("chain_tokens upload", stream.clone_htod(&pairs))?;
    let n = chained.len() as i32;
    let mut b = KernelArgs::new(stream, &backend.kernels.chain_tokens);
    b.arg(&tokens).arg(&pairs).arg(&n).arg(picks);
    backend.launch(
        b,
        rows_config(chained.len().div_ceil(256), 256),
        "chain_tokens",
    )
}

impl DeviceSampler<CudaTensor> for CudaBackend {
    fn summarize_rows(
        &self,
        logits: &CudaTensor,
        requests: &[RowRequest],
    ) -> Result<Vec<RowSummary>, BackendError> {
        summarize_rows(self, logits, requests)
    }

    fn queue_summaries(
        &self,
        logits: &CudaTensor,
        requests: &[RowRequest],
    ) -> Result<(), BackendError> {
        queue_summaries(self, logits, requests)
    }

    fn take_summaries(&self) -> Result<Vec<RowSummary>, BackendError> {
        take_summaries(self)
    }

    fn summarize_masked_rows(
        &self,
        logits: &CudaTensor,
        rows: &[usize],
        masks: &[&[u32]],
        requests: &[RowRequest],
    ) -> Result<Vec<RowSummary>, BackendError> {
        if rows.len() != masks.len() || rows.len() != requests.len() {
            return Err(shape_err(
                "summarize_masked_rows",
                format!(
                    "{} rows, {} masks and {} requests",
                    rows.len(),
                    masks.len(),
                    requests.len()
                ),
            ));
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= logits.rows) {
            return Err(shape_err(
                "summarize_masked_rows",
                format!("row {r} of {}", logits.rows),
            ));
        }
        // Every mask padded to the longest (missing words: tokens not allowed).
        let words = masks.iter().map(|m| m.len()).max().unwrap_or(0);
        let mut packed = vec![0u32; rows.len() * words.max(1)];
        for (i, mask) in masks.iter().enumerate() {
            packed[i * words..i * words + mask.len()].copy_from_slice(mask);
        }
        let row_ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let x = logits.as_f32("summarize_masked_rows")?;
        let row_ids = dev!(
            "summarize_masked_rows upload",
            self.stream.clone_htod(&row_ids)
        )?;
        let packed = dev!(
            "summarize_masked_rows upload",
            self.stream.clone_htod(&packed)
        )?;
        let mut out = self.alloc_f32(rows.len() * logits.cols)?;
        let cols = logits.cols as i32;
        let words = words as i32;
        let mut b = self.kernel_args(&self.kernels.gather_masked_rows);
        b.arg(x)
            .arg(&row_ids)
            .arg(&packed)
            .arg(&words)
            .arg(&mut out)
            .arg(&cols);
        self.launch(b, rows_config(rows.len(), 256), "gather_masked_rows")?;
        let masked = CudaTensor::from_f32(rows.len(), logits.cols, out);
        summarize_rows(self, &masked, requests)
    }
}
