//! A second stream for the prefill attention of a batch that mixes decodes with prompt chunks,
//! so it runs beside the decode attention instead of after it.
//!
//! In a loaded server's step (at 2048/128 on an H100: 214 decodes and ~2.6k prompt tokens)
//! the decode attention reads every decoding sequence's K/V (memory-bound, ~0.64 ms a layer)
//! and the prefill attention of the chunks is a few hundred tensor-core blocks with a causal
//! tail (~0.16 ms a layer) that leaves multiprocessors idle as it drains. Queued on a stream of
//! higher priority, the prefill blocks are placed first and the decode attention's fill the
//! rest of the device. The main stream waits for the side stream before anything reads the
//! attention's output, and every buffer involved was allocated on the main stream before the
//! fork and is freed on it after the join, so the stream-ordered allocator never hands one out
//! while the side stream still uses it.
//!
//! Only eager forwards fork: mixed batches are never captured in a CUDA graph
//! ([`super::graph`] captures decode-only batches).

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError};

/// The side stream and the two events that order it against the main stream.
pub(super) struct SideStream {
    stream: Arc<CudaStream>,
    /// Recorded on the main stream where the side stream's work may start.
    fork: CudaEvent,
    /// Recorded on the side stream where its work ends.
    join: CudaEvent,
}

impl SideStream {
    /// A stream of the device's highest priority and its events (without timing, the cheapest
    /// to record).
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self, DriverError> {
        ctx.bind_to_thread()?;
        let (_, greatest) = cudarc::driver::result::stream::get_priority_range()?;
        let stream = ctx.new_stream_with_priority(greatest)?;
        let flags = Some(CUevent_flags::CU_EVENT_DISABLE_TIMING);
        Ok(SideStream {
            stream,
            fork: ctx.new_event(flags)?,
            join: ctx.new_event(flags)?,
        })
    }

    /// Makes the side stream wait for everything queued on `main` so far; returns it.
    pub fn fork(&self, main: &CudaStream) -> Result<&Arc<CudaStream>, DriverError> {
        self.fork.record(main)?;
        self.stream.wait(&self.fork)?;
        Ok(&self.stream)
    }

    /// Makes `main` wait for everything queued on the side stream so far.
    pub fn join(&self, main: &CudaStream) -> Result<(), DriverError> {
        self.join.record(&self.stream)?;
        main.wait(&self.join)
    }
}
