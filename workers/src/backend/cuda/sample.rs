//! Sampling summaries on the device (`kernels/sample.cu`): per logits row, what the host
//! sampler needs instead of the row itself ([`crate::sampler::device`]).
//!
//! Summaries are read back either at once ([`summarize_rows`]) or queued
//! ([`SummaryQueue`]): the copy to pinned host memory is queued on the stream right behind the
//! kernel, so the host can queue the next forward pass before it waits for these summaries,
//! and that pass can read the tokens the device picked ([`chain_tokens`]).

use std::collections::VecDeque;
use std::sync::Mutex;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice, PushKernelArg};

use super::{CudaBackend, CudaTensor, rows_config, shape_err};
use crate::backend::BackendError;
use crate::model::ChainedToken;
use crate::sampler::device::{DEVICE_CANDIDATES, RowRequest, RowSummary};

/// `SAMPLE_THREADS` in sample.cu.
const THREADS: u32 = 1024;

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
    let want: Vec<u32> = requests.iter().map(|r| u32::from(r.candidates)).collect();
    let temperature = dev!("summarize_rows upload", stream.clone_htod(&temperature))?;
    let uniform = dev!("summarize_rows upload", stream.clone_htod(&uniform))?;
    let want = dev!("summarize_rows upload", stream.clone_htod(&want))?;
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
    let mut b = stream.launch_builder(&backend.kernels.sample_rows);
    b.arg(x)
        .arg(&cols)
        .arg(&temperature)
        .arg(&uniform)
        .arg(&want)
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
        // SAFETY: every element is written by a copy from the device before it is read.
        unsafe {
            Ok(Self {
                capacity,
                f32s: dev!(
                    "pinned summaries",
                    ctx.alloc_pinned_with_flags(capacity * 2, 0)
                )?,
                u32s: dev!(
                    "pinned summaries",
                    ctx.alloc_pinned_with_flags(capacity * 4, 0)
                )?,
                f64s: dev!(
                    "pinned summaries",
                    ctx.alloc_pinned_with_flags(capacity * 2, 0)
                )?,
                cand_logit: dev!(
                    "pinned summaries",
                    ctx.alloc_pinned_with_flags(capacity * DEVICE_CANDIDATES, 0)
                )?,
                cand_id: dev!(
                    "pinned summaries",
                    ctx.alloc_pinned_with_flags(capacity * DEVICE_CANDIDATES, 0)
                )?,
            })
        }
    }
}

/// Summaries queued behind their forward pass, oldest first.
struct Queued {
    rows: usize,
    want_candidates: Vec<bool>,
    pinned: PinnedOutputs,
    /// Recorded after the copies into `pinned`.
    copied: Option<CudaEvent>,
}

/// Queues the copy of `src` into the first `src.len()` elements of `dst`. (cudarc's
/// `memcpy_dtoh` copies the whole destination, which is larger: it is reused across steps.)
fn copy_to_pinned<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &std::sync::Arc<CudaStream>,
    src: &CudaSlice<T>,
    dst: &mut PinnedHostSlice<T>,
) -> Result<(), BackendError> {
    let n = src.len();
    // Waits for nothing: a buffer is reused only after its summaries were read.
    let host = dev!("queue summaries", dst.as_mut_slice())?;
    let (src_ptr, _sync) = src.device_ptr(stream);
    // SAFETY: `host[..n]` is pinned memory that stays allocated (in the queue) until the copy
    // is waited for; `src` holds `n` elements, alive until the copy ran (stream-ordered free).
    dev!("queue summaries", unsafe {
        cudarc::driver::result::memcpy_dtoh_async(&mut host[..n], src_ptr, stream.cu_stream())
    })
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Queues the summaries of `logits`' rows and their copy to the host; they become the picks
/// the next forward's chained tokens read.
pub(super) fn queue_summaries(
    backend: &CudaBackend,
    logits: &CudaTensor,
    requests: &[RowRequest],
) -> Result<(), BackendError> {
    let rows = logits.rows;
    let queue = &backend.summaries;
    let out = if rows == 0 {
        None
    } else {
        Some(launch(backend, logits, requests)?)
    };
    let reused = {
        let mut spare = lock(&queue.spare);
        let at = spare.iter().position(|p| p.capacity >= rows.max(1));
        at.map(|at| spare.swap_remove(at))
    };
    let mut pinned = match reused {
        Some(pinned) => pinned,
        None => PinnedOutputs::new(backend, rows.max(1))?,
    };
    let mut copied = None;
    if let Some(out) = out {
        let stream = &backend.stream;
        copy_to_pinned(stream, &out.f32s, &mut pinned.f32s)?;
        copy_to_pinned(stream, &out.u32s, &mut pinned.u32s)?;
        copy_to_pinned(stream, &out.f64s, &mut pinned.f64s)?;
        if requests.iter().any(|r| r.candidates) {
            copy_to_pinned(stream, &out.cand_logit, &mut pinned.cand_logit)?;
            copy_to_pinned(stream, &out.cand_id, &mut pinned.cand_id)?;
        }
        copied = Some(dev!("queue summaries", stream.record_event(None))?);
        *lock(&queue.last_picks) = Some((rows, out.u32s));
    } else {
        *lock(&queue.last_picks) = None;
    }
    lock(&queue.queued).push_back(Queued {
        rows,
        want_candidates: requests.iter().map(|r| r.candidates).collect(),
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
    if let Some(copied) = &queued.copied {
        dev!("wait for summaries", copied.synchronize())?;
    }
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
    let mut b = stream.launch_builder(&backend.kernels.chain_tokens);
    b.arg(&tokens).arg(&pairs).arg(&n).arg(picks);
    backend.launch(
        b,
        rows_config(chained.len().div_ceil(256), 256),
        "chain_tokens",
    )
}
