//! Prompts prefilled elsewhere: an import with its K/V at hand, or a reservation whose K/V
//! the caller pulls once room is reserved. Both wait in order of priority, then arrival, for
//! a sequence slot and the prompt's blocks, preempting running requests of a strictly lower
//! priority for them (as the scheduler's waiting queue does); a reservation's blocks are lent
//! to the caller until it hands the request back, so no transfer writes blocks that another
//! request was given.

use std::sync::atomic::Ordering;

use super::{
    Engine, EngineError, EngineEvent, EventKind, FinishReason, GenerationRequest, RequestId,
    Sequence, StepModel, finished_without_tokens,
};
use crate::backend::KvBuffer;
use crate::sampler::SampledToken;
use crate::scheduler::SeqStatus;

/// A prompt prefilled elsewhere (a context worker): its K/V and the token sampled after it.
#[derive(Debug)]
pub struct ImportedPrefill {
    pub kv: ImportedKv,
    pub num_tokens: usize,
    pub first_token: SampledToken,
}

/// Where an imported prefill's K/V is.
#[derive(Debug)]
pub enum ImportedKv {
    /// `blocks_for(num_tokens)` blocks of the layout's block bytes, back to back, for the
    /// engine to write into the cache: a `Vec`, or memory a transport lent (a slice of its
    /// pool: host memory, pinned on a GPU worker, or device memory), given back when the
    /// engine drops it after writing it.
    Bytes(Box<dyn KvBuffer>),
    /// Already in the blocks reserved for the request ([`Engine::reserve_import`]): the
    /// transfer wrote them there itself (a CUDA IPC pull), so the request joins the next step
    /// with no copy on the engine's side.
    InReservedBlocks,
}

impl ImportedKv {
    /// Bytes to write into the cache: `Some` for [`Self::Bytes`].
    fn bytes(&self) -> Option<crate::backend::KvBytes<'_>> {
        match self {
            ImportedKv::Bytes(kv) => Some(kv.bytes()),
            ImportedKv::InReservedBlocks => None,
        }
    }
}

/// A prompt prefilled elsewhere waiting for room (a free sequence slot and its blocks): with
/// its K/V ([`Engine::import_request`]), or before it is pulled ([`Engine::reserve_import`]).
pub(super) struct PendingImport {
    pub(super) id: RequestId,
    pub(super) seq: Sequence,
    /// The K/V and the first token; `None` for a reservation (its caller pulls them once the
    /// room is reserved).
    arrived: Option<ArrivedKv>,
    /// Found no room when it was first considered.
    waited: bool,
}

/// Whether a lent reservation's request has ended while its blocks were lent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LentReservation {
    Live,
    /// Ended: its blocks are pinned until it is handed back, then freed.
    Ended,
}

/// An imported prefill's K/V and the token sampled after it.
struct ArrivedKv {
    kv: ImportedKv,
    first_token: SampledToken,
}

impl<M: StepModel> Engine<M> {
    /// Queues a request whose prompt was prefilled elsewhere: once a sequence slot and the
    /// prompt's blocks are free, its K/V are written into the cache and it continues from
    /// `prefill.first_token` (which is emitted as its first token, through the same stop and
    /// text handling as a sampled one). `request.sampling.seed` must be the seed the prefill
    /// sampled with, so later draws continue the same stream.
    pub fn import_request(
        &mut self,
        request: GenerationRequest,
        prefill: ImportedPrefill,
    ) -> Result<RequestId, EngineError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.import_with_id(id, request, prefill)?;
        Ok(id)
    }

    pub(crate) fn import_with_id(
        &mut self,
        id: RequestId,
        request: GenerationRequest,
        prefill: ImportedPrefill,
    ) -> Result<(), EngineError> {
        self.check_device()?;
        self.check_imported(request.prompt_ids.len(), 0, &prefill)?;
        if matches!(prefill.kv, ImportedKv::InReservedBlocks) {
            return Err(EngineError::ImportMismatch(
                "K/V in reserved blocks for a request that reserved none".into(),
            ));
        }
        let seq = self.import_sequence(request)?;
        self.queue_import(PendingImport {
            id,
            seq,
            arrived: Some(ArrivedKv {
                kv: prefill.kv,
                first_token: prefill.first_token,
            }),
            waited: false,
        });
        Ok(())
    }

    /// Queues an import behind every one of its priority or a higher one.
    fn queue_import(&mut self, import: PendingImport) {
        let priority = import.seq.priority;
        let at = self
            .pending_imports
            .partition_point(|queued| queued.seq.priority <= priority);
        self.pending_imports.insert(at, import);
    }

    /// Queues a request whose prompt is prefilled elsewhere and whose K/V the caller pulls
    /// once there is room for it: in arrival order with other imports, when a sequence slot
    /// and the prompt's blocks are free, they are reserved for it and it gets an
    /// [`EventKind::RoomReserved`] event. The caller then hands over the K/V
    /// ([`Self::import_reserved`]), or has the prompt prefilled here
    /// ([`Self::prefill_reserved`], e.g. when the pull fails), or cancels it. A request waiting
    /// for room counts as waiting ([`Self::num_waiting`]).
    pub fn reserve_import(&mut self, request: GenerationRequest) -> Result<RequestId, EngineError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.reserve_import_with_id(id, request)?;
        Ok(id)
    }

    pub(crate) fn reserve_import_with_id(
        &mut self,
        id: RequestId,
        request: GenerationRequest,
    ) -> Result<(), EngineError> {
        self.check_device()?;
        let seq = self.import_sequence(request)?;
        self.queue_import(PendingImport {
            id,
            seq,
            arrived: None,
            waited: false,
        });
        Ok(())
    }

    /// Hands over the K/V of a request whose room was reserved ([`Self::reserve_import`]):
    /// written into its reserved blocks at the start of the next step (or already there,
    /// [`ImportedKv::InReservedBlocks`]), where it continues from `prefill.first_token`. A
    /// request that has ended meanwhile (cancelled) drops the K/V; one whose K/V does not fit
    /// its prompt ends with an error.
    pub fn import_reserved(&mut self, id: RequestId, prefill: ImportedPrefill) {
        if self.reservation_back(id) {
            self.arrived_imports.push_back((id, prefill));
        }
    }

    /// The caller is done with a reservation's blocks without handing over K/V (it was
    /// cancelled before its pull): a request that ended meanwhile frees them now.
    pub fn return_reservation(&mut self, id: RequestId) {
        self.reservation_back(id);
    }

    /// A lent reservation is handed back: false when its request ended while it was lent
    /// (its blocks, pinned since, are freed now).
    fn reservation_back(&mut self, id: RequestId) -> bool {
        match self.lent_reservations.remove(&id) {
            Some(LentReservation::Ended) => {
                if let Err(e) = self.scheduler.release_pinned(id) {
                    tracing::error!("freeing the reserved blocks of request {id}: {e}");
                }
                false
            }
            Some(LentReservation::Live) | None => true,
        }
    }

    /// Has the prompt of a request reserved for an import ([`Self::reserve_import`]) prefilled
    /// here instead (its pull failed, or took too long): in its reserved blocks if it has
    /// them, else it joins the queue of requests to prefill, holding no memory until admitted.
    pub fn prefill_reserved(&mut self, id: RequestId) -> Result<(), EngineError> {
        if !self.reservation_back(id) {
            return Err(EngineError::UnknownRequest(id));
        }
        if let Some(at) = self
            .pending_imports
            .iter()
            .position(|p| p.id == id && p.arrived.is_none())
        {
            let import = self
                .pending_imports
                .remove(at)
                .expect("position is in range");
            let prompt_len = import.seq.prompt_len;
            let added = self.scheduler.add(id, prompt_len);
            match added
                .and_then(|()| self.scheduler.set_max_len(id, import.seq.max_len()))
                .and_then(|()| self.scheduler.set_priority(id, import.seq.priority))
            {
                Ok(()) => {
                    self.seqs.insert(id, import.seq);
                }
                Err(e) => self.deferred_events.push(finished_without_tokens(
                    id,
                    prompt_len,
                    FinishReason::Error(e.to_string()),
                )),
            }
            return Ok(());
        }
        if self.scheduler.status(id) == Some(SeqStatus::Reserved) {
            self.arrived_imports.retain(|(arrived, _)| *arrived != id);
            self.scheduler.start_reserved(id, false)?;
            return Ok(());
        }
        Err(EngineError::UnknownRequest(id))
    }

    /// Checks an imported prefill against its prompt and this engine: its token count, the
    /// bytes of its blocks after the first `cached_blocks` (which the cache gave it), its
    /// first token.
    fn check_imported(
        &self,
        prompt_tokens: usize,
        cached_blocks: usize,
        prefill: &ImportedPrefill,
    ) -> Result<(), EngineError> {
        let layout = self.model.kv_layout();
        if prefill.num_tokens != prompt_tokens {
            return Err(EngineError::ImportMismatch(format!(
                "K/V of {} tokens for a prompt of {prompt_tokens}",
                prefill.num_tokens,
            )));
        }
        let expected = layout
            .blocks_for(prefill.num_tokens)
            .saturating_sub(cached_blocks)
            * layout.block_bytes();
        if let Some(bytes) = prefill.kv.bytes().filter(|b| b.len() != expected) {
            return Err(EngineError::ImportMismatch(format!(
                "{} bytes of K/V for {} tokens, expected {expected}",
                bytes.len(),
                prefill.num_tokens
            )));
        }
        if prefill.first_token.id as usize >= self.vocab_size {
            return Err(EngineError::TokenOutOfRange {
                token: prefill.first_token.id,
                vocab_size: self.vocab_size,
            });
        }
        Ok(())
    }

    /// The state of a request whose prompt was prefilled elsewhere.
    fn import_sequence(&self, request: GenerationRequest) -> Result<Sequence, EngineError> {
        if request.prompt_logprobs.is_some() {
            return Err(EngineError::PromptLogprobsNeedLocalPrefill);
        }
        if !request.resume_ids.is_empty() {
            return Err(EngineError::ImportMismatch(
                "a prefill imported from a context worker cannot resume generated tokens".into(),
            ));
        }
        let seq = self.new_sequence(request)?;
        self.scheduler.check_prompt(seq.prompt_len)?;
        Ok(seq)
    }

    /// Admits queued imports while there is room, in arrival order: allocates their blocks,
    /// and writes their K/V and takes their first token, or (a reservation) tells the caller
    /// to pull.
    pub(super) fn admit_imports(&mut self, events: &mut Vec<EngineEvent>) {
        while let Some(front) = self.pending_imports.front_mut() {
            // A request queued here (a local prefill, or one preempted) of a higher priority,
            // or of the same one and older, goes first: imports do not overtake it.
            let queued_ahead = self
                .scheduler
                .first_waiting()
                .and_then(|head| self.seqs.get(&head))
                .is_some_and(|head| {
                    (head.priority, head.arrived) <= (front.seq.priority, front.seq.arrived)
                });
            if queued_ahead {
                front.waited = true;
                break;
            }
            if !self
                .scheduler
                .can_add_computed(front.seq.prompt_len, front.seq.max_len())
            {
                if let Some(victim) = self.scheduler.preempt_below(front.seq.priority) {
                    self.progress.preemptions += 1;
                    tracing::debug!(
                        preempted = victim,
                        "preempted for an import of a higher priority"
                    );
                    continue;
                }
                front.waited = true;
                break;
            }
            let Some(import) = self.pending_imports.pop_front() else {
                break;
            };
            if import.waited {
                self.imports_waited += 1;
            }
            let id = import.id;
            let Some(arrived) = import.arrived else {
                self.reserve(id, import.seq, events);
                continue;
            };
            let max_len = import.seq.max_len();
            let blocks = match self
                .scheduler
                .add_computed(id, import.seq.prompt_len, max_len)
                .and_then(|blocks| {
                    self.scheduler.set_priority(id, import.seq.priority)?;
                    Ok(blocks)
                }) {
                Ok(blocks) => blocks,
                Err(e) => {
                    events.push(finished_without_tokens(
                        id,
                        import.seq.prompt_len,
                        FinishReason::Error(format!("importing the KV cache: {e}")),
                    ));
                    continue;
                }
            };
            self.seqs.insert(id, import.seq);
            let Some(bytes) = arrived.kv.bytes() else {
                unreachable!("an import with its K/V at hand reserved no blocks to hold it")
            };
            if let Err(e) = self.model.write_kv_blocks(&blocks, bytes) {
                self.end(
                    id,
                    FinishReason::Error(format!("writing the imported KV cache: {e}")),
                    events,
                );
                continue;
            }
            self.cache_imported(id);
            self.accept_token(id, arrived.first_token, events);
        }
    }

    /// Reserves the blocks and slot of a request whose K/V is to be pulled (there is room).
    fn reserve(&mut self, id: RequestId, mut seq: Sequence, events: &mut Vec<EngineEvent>) {
        let naming = seq
            .cache_root
            .map(|root| (root, &seq.tokens[..seq.prompt_len]));
        let reserved = self
            .scheduler
            .reserve(id, seq.prompt_len, seq.max_len(), naming)
            .and_then(|cached_blocks| {
                self.scheduler.set_priority(id, seq.priority)?;
                Ok(cached_blocks)
            });
        let cached_blocks = match reserved {
            Ok(cached_blocks) => cached_blocks,
            Err(e) => {
                events.push(finished_without_tokens(
                    id,
                    seq.prompt_len,
                    FinishReason::Error(format!("reserving room for the KV cache: {e}")),
                ));
                return;
            }
        };
        // It has started: what it waits for now is its own pull, not the engine.
        seq.deadline = None;
        self.seqs.insert(id, seq);
        self.lent_reservations.insert(id, LentReservation::Live);
        let blocks = self.scheduler.blocks(id).unwrap_or_default();
        events.push(EngineEvent {
            request_id: id,
            kind: EventKind::RoomReserved {
                blocks,
                cached_blocks,
            },
        });
    }

    /// Writes the K/V that arrived for reserved requests into their blocks; each continues
    /// from its first token.
    pub(super) fn write_arrived_imports(&mut self, events: &mut Vec<EngineEvent>) {
        while let Some((id, prefill)) = self.arrived_imports.pop_front() {
            if self.scheduler.status(id) != Some(SeqStatus::Reserved) {
                // Ended meanwhile (cancelled): the K/V goes back to its owner.
                continue;
            }
            let Some(prompt_len) = self.seqs.get(&id).map(|seq| seq.prompt_len) else {
                continue;
            };
            let cached_blocks =
                self.scheduler.cached_tokens(id).unwrap_or(0) / self.model.kv_layout().block_size;
            if let Err(e) = self.check_imported(prompt_len, cached_blocks, &prefill) {
                self.end(id, FinishReason::Error(e.to_string()), events);
                continue;
            }
            let blocks = match self.scheduler.start_reserved(id, true) {
                Ok(blocks) => blocks,
                Err(e) => {
                    self.end(id, FinishReason::Error(e.to_string()), events);
                    continue;
                }
            };
            // The first `cached_blocks` came from the cache, with their K/V (and may be
            // shared); what arrived is the rest.
            let written = match prefill.kv.bytes() {
                Some(bytes) => self.model.write_kv_blocks(&blocks[cached_blocks..], bytes),
                None => Ok(()),
            };
            if let Err(e) = written {
                self.end(
                    id,
                    FinishReason::Error(format!("writing the imported KV cache: {e}")),
                    events,
                );
                continue;
            }
            // Named at its reservation: its full blocks enter the prefix cache.
            self.scheduler.commit_sequence(id);
            self.accept_token(id, prefill.first_token, events);
        }
    }

    /// An imported prompt's K/V are written: its full blocks enter the prefix cache like
    /// those of a prompt prefilled here.
    fn cache_imported(&mut self, id: RequestId) {
        let Some(seq) = self.seqs.get(&id) else {
            return;
        };
        if let Some(root) = seq.cache_root {
            self.scheduler
                .track(id, root, &seq.tokens[..seq.prompt_len]);
            self.scheduler.commit_sequence(id);
        }
    }
}
