//! K/V handed out of the engine: a prefill-only request's retained blocks, read out for a
//! transfer and released; the cache's memory, for transfers that read or write it in place;
//! host memory pinned for the device's copies.

use super::{Engine, EngineError, RequestId, StepModel};
use crate::backend::{HostRange, KvBytesMut};
use crate::scheduler::SeqStatus;

impl<M: StepModel> Engine<M> {
    /// Copies the K/V of a request retained after a prefill-only run (block after block) into
    /// a new `Vec` and frees its blocks (the tests' form of [`Self::take_retained_kv_into`]).
    #[cfg(test)]
    pub(crate) fn take_retained_kv(&mut self, id: RequestId) -> Result<Vec<u8>, EngineError> {
        let blocks = self.scheduler.blocks(id).map_or(0, |b| b.len());
        let mut kv = vec![0u8; blocks * self.model.kv_layout().block_bytes()];
        self.take_retained_kv_into(id, KvBytesMut::Host(&mut kv))?;
        Ok(kv)
    }

    /// Copies the K/V of a request retained after a prefill-only run (block after block) into
    /// `dst` (the transfer's own memory, host or device, so the K/V is copied once), which
    /// must hold exactly the request's blocks, and frees its blocks, either way: the context
    /// worker's hand-over to a transfer.
    pub fn take_retained_kv_into(
        &mut self,
        id: RequestId,
        dst: KvBytesMut<'_>,
    ) -> Result<(), EngineError> {
        if self.scheduler.status(id) != Some(SeqStatus::Pinned) {
            return Err(EngineError::UnknownRequest(id));
        }
        let blocks = self.scheduler.blocks(id).unwrap_or_default();
        let read = self.model.read_kv_blocks(&blocks, dst);
        self.scheduler.release_pinned(id)?;
        Ok(read?)
    }

    /// Where the KV cache lies ([`StepModel::kv_cache_parts`]): a context worker hands a
    /// prompt's blocks to decode workers straight out of it, pinned until released
    /// ([`Self::release_kv`]); a decode worker's CUDA IPC pulls write into blocks reserved for
    /// them ([`Self::reserve_import`]).
    pub fn kv_cache_parts(&self) -> Vec<crate::backend::KvCacheMemory> {
        self.model.kv_cache_parts()
    }

    /// Pins `range` for the device ([`StepModel::pin_host_memory`]): K/V copied into or out
    /// of it then skips the backend's staging buffer. False where there is nothing to pin.
    ///
    /// # Safety
    /// `range` must stay mapped for as long as the engine lives.
    pub unsafe fn pin_host_memory(&mut self, range: HostRange) -> Result<bool, EngineError> {
        // SAFETY: the caller's promise, passed on.
        Ok(unsafe { self.model.pin_host_memory(range) }?)
    }

    /// Frees the blocks a prefill-only request retained.
    pub fn release_kv(&mut self, id: RequestId) -> Result<(), EngineError> {
        if self.scheduler.status(id) != Some(SeqStatus::Pinned) {
            return Err(EngineError::UnknownRequest(id));
        }
        self.scheduler.release_pinned(id)?;
        Ok(())
    }
}
