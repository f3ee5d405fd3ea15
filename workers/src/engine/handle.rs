//! The engine on a dedicated thread, reached through a channel.
//!
//! The CPU forward pass is long, blocking work: it must not run on an async executor. The
//! engine thread owns the [`Engine`] and everything in it; callers hold a cloneable
//! [`EngineHandle`] that sends commands (add, cancel, release KV) and get each request's
//! events through that request's own [`EventSink`]. No lock on the hot path: the step loop
//! drains the command channel between steps.
//!
//! A request's stream carries its cancellation: when a sink reports that its receiver is gone,
//! the engine cancels the request at the next step. When every handle is dropped, the thread
//! cancels what is left, delivers the `Finished` events and exits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::backend::{HostRange, KvBuffer};
use crate::kv_cache::manager::{KvEvent, PrefixCacheStats};

use super::{
    Engine, EngineError, EngineEvent, EngineProgress, FinishReason, GenerationRequest,
    ImportedPrefill, RequestId, StepModel, finished_without_tokens,
};

/// Where a request's events go. Implemented for std channel senders; an async caller can
/// implement it over a tokio unbounded sender (whose `send` does not block).
pub trait EventSink: Send + 'static {
    /// Delivers an event; false when nobody listens any more (the request is then cancelled).
    fn send(&mut self, event: EngineEvent) -> bool;
}

impl EventSink for Sender<EngineEvent> {
    fn send(&mut self, event: EngineEvent) -> bool {
        Sender::send(self, event).is_ok()
    }
}

enum Command {
    Add {
        id: RequestId,
        request: GenerationRequest,
        sink: Box<dyn EventSink>,
        /// When it was sent: a request's wait counts from there ([`super::RetainedKv::queued`]),
        /// a step that holds up the channel included.
        sent: Instant,
    },
    ReserveImport {
        id: RequestId,
        request: GenerationRequest,
        sink: Box<dyn EventSink>,
    },
    ImportReserved {
        id: RequestId,
        prefill: ImportedPrefill,
    },
    PrefillReserved(RequestId),
    ReturnReservation(RequestId),
    Cancel(RequestId),
    ReleaseKv(RequestId),
    PinHostMemory {
        range: HostRange,
        reply: tokio::sync::oneshot::Sender<Result<bool, EngineError>>,
    },
    TakeKv {
        id: RequestId,
        dst: Box<dyn KvBuffer>,
        reply: tokio::sync::oneshot::Sender<(Box<dyn KvBuffer>, Result<(), EngineError>)>,
    },
}

/// A cloneable handle to an engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: Sender<Command>,
    next_id: Arc<AtomicU64>,
    free_blocks: Arc<AtomicUsize>,
    active: Arc<AtomicUsize>,
    waiting: Arc<AtomicUsize>,
    /// Requests sent to the engine thread and not yet queued there (not in `waiting` yet).
    unapplied: Arc<AtomicUsize>,
    imports_waiting: Arc<AtomicUsize>,
    imports_waited: Arc<AtomicU64>,
    device_lost: Arc<OnceLock<String>>,
    steps: Arc<AtomicU64>,
    failed_steps: Arc<AtomicU64>,
    preemptions: Arc<AtomicU64>,
    draft_tokens: Arc<AtomicU64>,
    accepted_draft_tokens: Arc<AtomicU64>,
    prefix_stats: Arc<Mutex<PrefixCacheStats>>,
    /// The receiving end of the engine's KV events until a caller takes it
    /// ([`Self::take_kv_events`]); until then the engine thread drops them.
    kv_events: Arc<Mutex<Option<KvEventReceiver>>>,
    kv_events_wanted: Arc<AtomicBool>,
}

/// Batches of the engine's [`KvEvent`]s (cached blocks stored and evicted), each batch one
/// step's, in order.
pub type KvEventReceiver = tokio::sync::mpsc::UnboundedReceiver<Vec<KvEvent>>;

/// The events of one request, in order; the last is `Finished`.
pub struct RequestStream {
    id: RequestId,
    events: Receiver<EngineEvent>,
}

impl RequestStream {
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The next event; `None` after `Finished` (or if the engine thread died).
    pub fn recv(&self) -> Option<EngineEvent> {
        self.events.recv().ok()
    }
}

impl Iterator for RequestStream {
    type Item = EngineEvent;

    fn next(&mut self) -> Option<EngineEvent> {
        self.recv()
    }
}

impl EngineHandle {
    /// Moves `engine` onto a new thread named `name` and returns a handle to it with the
    /// thread's join handle (the thread ends when every handle is dropped).
    pub fn spawn<M: StepModel + 'static>(
        engine: Engine<M>,
        name: &str,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (commands, rx) = mpsc::channel();
        let (kv_events_tx, kv_events_rx) = tokio::sync::mpsc::unbounded_channel();
        let handle = Self {
            commands,
            next_id: engine.id_source(),
            free_blocks: Arc::new(AtomicUsize::new(engine.free_blocks())),
            active: Arc::new(AtomicUsize::new(0)),
            waiting: Arc::new(AtomicUsize::new(0)),
            unapplied: Arc::new(AtomicUsize::new(0)),
            imports_waiting: Arc::new(AtomicUsize::new(0)),
            imports_waited: Arc::new(AtomicU64::new(0)),
            device_lost: Arc::new(OnceLock::new()),
            steps: Arc::new(AtomicU64::new(0)),
            failed_steps: Arc::new(AtomicU64::new(0)),
            preemptions: Arc::new(AtomicU64::new(0)),
            draft_tokens: Arc::new(AtomicU64::new(0)),
            accepted_draft_tokens: Arc::new(AtomicU64::new(0)),
            prefix_stats: Arc::new(Mutex::new(engine.prefix_cache_stats())),
            kv_events: Arc::new(Mutex::new(Some(kv_events_rx))),
            kv_events_wanted: Arc::new(AtomicBool::new(false)),
        };
        let counters = Counters {
            free_blocks: Arc::clone(&handle.free_blocks),
            active: Arc::clone(&handle.active),
            waiting: Arc::clone(&handle.waiting),
            unapplied: Arc::clone(&handle.unapplied),
            imports_waiting: Arc::clone(&handle.imports_waiting),
            imports_waited: Arc::clone(&handle.imports_waited),
            device_lost: Arc::clone(&handle.device_lost),
            steps: Arc::clone(&handle.steps),
            failed_steps: Arc::clone(&handle.failed_steps),
            preemptions: Arc::clone(&handle.preemptions),
            draft_tokens: Arc::clone(&handle.draft_tokens),
            accepted_draft_tokens: Arc::clone(&handle.accepted_draft_tokens),
            prefix_stats: Arc::clone(&handle.prefix_stats),
            kv_events: kv_events_tx,
            kv_events_wanted: Arc::clone(&handle.kv_events_wanted),
        };
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(engine, rx, &counters))?;
        Ok((handle, thread))
    }

    /// Queues a request; its events arrive on the returned stream. A request the engine
    /// refuses gets a single `Finished` event with the reason.
    pub fn submit(&self, request: GenerationRequest) -> Result<RequestStream, EngineError> {
        let (tx, events) = mpsc::channel();
        let id = self.submit_with_sink(request, tx)?;
        Ok(RequestStream { id, events })
    }

    /// Queues a request whose events go to `sink`.
    pub fn submit_with_sink(
        &self,
        request: GenerationRequest,
        sink: impl EventSink,
    ) -> Result<RequestId, EngineError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.send_request(Command::Add {
            id,
            request,
            sink: Box::new(sink),
            sent: Instant::now(),
        })?;
        Ok(id)
    }

    /// Sends a command that queues a request, counted in [`Self::queued_requests`] until the
    /// engine has it.
    fn send_request(&self, command: Command) -> Result<(), EngineError> {
        self.unapplied.fetch_add(1, Ordering::AcqRel);
        self.commands.send(command).map_err(|_| {
            self.unapplied.fetch_sub(1, Ordering::AcqRel);
            EngineError::Stopped
        })
    }

    /// Queues a request whose prompt's K/V is pulled from elsewhere once the engine has room
    /// for it ([`Engine::reserve_import`]): its first event is
    /// [`RoomReserved`](super::EventKind::RoomReserved) (or its `Finished`, if cancelled or
    /// refused before), after which the caller hands over the K/V ([`Self::import_reserved`])
    /// or has the prompt prefilled here ([`Self::prefill_reserved`]).
    pub fn reserve_import_with_sink(
        &self,
        request: GenerationRequest,
        sink: impl EventSink,
    ) -> Result<RequestId, EngineError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.send_request(Command::ReserveImport {
            id,
            request,
            sink: Box::new(sink),
        })?;
        Ok(id)
    }

    /// Hands over the K/V pulled for a request whose room is reserved
    /// ([`Engine::import_reserved`]).
    pub fn import_reserved(
        &self,
        id: RequestId,
        prefill: ImportedPrefill,
    ) -> Result<(), EngineError> {
        self.commands
            .send(Command::ImportReserved { id, prefill })
            .map_err(|_| EngineError::Stopped)
    }

    /// Gives back the room reserved for a request without K/V (its pull was cancelled before
    /// it began; [`Engine::return_reservation`]).
    pub fn return_reservation(&self, id: RequestId) -> Result<(), EngineError> {
        self.commands
            .send(Command::ReturnReservation(id))
            .map_err(|_| EngineError::Stopped)
    }

    /// Has the prompt of a request queued for an import prefilled here instead
    /// ([`Engine::prefill_reserved`]).
    pub fn prefill_reserved(&self, id: RequestId) -> Result<(), EngineError> {
        self.commands
            .send(Command::PrefillReserved(id))
            .map_err(|_| EngineError::Stopped)
    }

    /// Copies the K/V a prefill-only request retained into `dst` (exactly its blocks' bytes)
    /// and frees its blocks ([`Engine::take_retained_kv_into`]); answered between two steps.
    /// The command owns `dst` while the copy runs, so a caller that stops waiting cannot free
    /// it under the copy. Returns `dst` filled.
    pub async fn take_retained_kv_into<D: KvBuffer>(
        &self,
        id: RequestId,
        dst: D,
    ) -> Result<D, EngineError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::TakeKv {
                id,
                dst: Box::new(dst),
                reply,
            })
            .map_err(|_| EngineError::Stopped)?;
        let (dst, result) = answer.await.map_err(|_| EngineError::Stopped)?;
        result?;
        let dst: Box<dyn std::any::Any> = dst;
        Ok(*dst
            .downcast::<D>()
            .expect("the engine hands back the destination it was given"))
    }

    /// Pins `range` for the device ([`Engine::pin_host_memory`]); answered between two
    /// steps. False where there is nothing to pin.
    ///
    /// # Safety
    /// `range` must stay mapped for as long as the engine thread runs.
    pub async unsafe fn pin_host_memory(&self, range: HostRange) -> Result<bool, EngineError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::PinHostMemory { range, reply })
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Cancels a request at the engine's next step (a no-op for one that already ended).
    pub fn cancel(&self, id: RequestId) -> Result<(), EngineError> {
        self.commands
            .send(Command::Cancel(id))
            .map_err(|_| EngineError::Stopped)
    }

    /// Frees the KV blocks a prefill-only request retained.
    pub fn release_kv(&self, id: RequestId) -> Result<(), EngineError> {
        self.commands
            .send(Command::ReleaseKv(id))
            .map_err(|_| EngineError::Stopped)
    }

    /// Free KV blocks after the engine's last step (for heartbeats and metrics).
    pub fn free_blocks(&self) -> usize {
        self.free_blocks.load(Ordering::Relaxed)
    }

    /// Requests queued or running after the engine's last step.
    pub fn active_requests(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Requests queued and not yet scheduled after the engine's last step.
    pub fn waiting_requests(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Requests not started: those the engine holds waiting ([`Engine::num_waiting`], as of
    /// the last command or step it handled) and those sent to it since. A worker bounds its
    /// queue with this, so a burst of jobs between two steps is counted whole. (A request
    /// being queued may be counted twice for an instant, never missed.)
    pub fn queued_requests(&self) -> usize {
        self.waiting.load(Ordering::Acquire) + self.unapplied.load(Ordering::Acquire)
    }

    /// Imports waiting for room in the cache ([`Engine::imports_waiting`]).
    pub fn imports_waiting(&self) -> usize {
        self.imports_waiting.load(Ordering::Relaxed)
    }

    /// Imports that found no room at once, since start ([`Engine::imports_waited`]).
    pub fn imports_waited(&self) -> u64 {
        self.imports_waited.load(Ordering::Relaxed)
    }

    /// The engine's KV events from now on, batched by step; `None` once taken.
    pub fn take_kv_events(&self) -> Option<KvEventReceiver> {
        let taken = self
            .kv_events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if taken.is_some() {
            self.kv_events_wanted.store(true, Ordering::Relaxed);
        }
        taken
    }

    /// The prefix cache's counters as of the engine's last step.
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        *self.prefix_stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the engine's device failed for good, once it has ([`Engine::device_lost`]): every
    /// request has ended and new ones are refused, so the worker should leave and restart.
    pub fn device_lost(&self) -> Option<&str> {
        self.device_lost.get().map(String::as_str)
    }

    /// Forward passes the engine ran and failed since it started (as of its last step).
    pub fn progress(&self) -> EngineProgress {
        EngineProgress {
            steps: self.steps.load(Ordering::Relaxed),
            failed_steps: self.failed_steps.load(Ordering::Relaxed),
            preemptions: self.preemptions.load(Ordering::Relaxed),
            draft_tokens: self.draft_tokens.load(Ordering::Relaxed),
            accepted_draft_tokens: self.accepted_draft_tokens.load(Ordering::Relaxed),
        }
    }
}

/// What the engine thread publishes after each step for callers to read without waiting.
struct Counters {
    prefix_stats: Arc<Mutex<PrefixCacheStats>>,
    kv_events: tokio::sync::mpsc::UnboundedSender<Vec<KvEvent>>,
    kv_events_wanted: Arc<AtomicBool>,
    free_blocks: Arc<AtomicUsize>,
    active: Arc<AtomicUsize>,
    waiting: Arc<AtomicUsize>,
    unapplied: Arc<AtomicUsize>,
    imports_waiting: Arc<AtomicUsize>,
    imports_waited: Arc<AtomicU64>,
    device_lost: Arc<OnceLock<String>>,
    steps: Arc<AtomicU64>,
    failed_steps: Arc<AtomicU64>,
    preemptions: Arc<AtomicU64>,
    draft_tokens: Arc<AtomicU64>,
    accepted_draft_tokens: Arc<AtomicU64>,
}

impl Counters {
    /// The prefix cache's counters, and its KV events to whoever takes them (dropped until
    /// someone does, so that they never pile up).
    fn publish_prefix_cache<M: StepModel>(&self, engine: &mut Engine<M>) {
        let events = engine.take_kv_events();
        if !events.is_empty() && self.kv_events_wanted.load(Ordering::Relaxed) {
            let _ = self.kv_events.send(events);
        }
        *self.prefix_stats.lock().unwrap_or_else(|e| e.into_inner()) = engine.prefix_cache_stats();
    }

    /// The engine's load as callers read it: free blocks, requests active and waiting.
    fn publish_load<M: StepModel>(&self, engine: &Engine<M>) {
        self.free_blocks
            .store(engine.free_blocks(), Ordering::Relaxed);
        self.active.store(engine.num_active(), Ordering::Relaxed);
        self.waiting.store(engine.num_waiting(), Ordering::Release);
        self.imports_waiting
            .store(engine.imports_waiting(), Ordering::Relaxed);
        self.imports_waited
            .store(engine.imports_waited(), Ordering::Relaxed);
    }
}

/// Marks the engine lost when its thread unwinds (a panic): the worker then leaves the
/// deployment and exits for a restart, as on a lost device, instead of heartbeating on with
/// an engine that answers nothing.
struct PanicWatch<'a>(&'a Counters);

impl Drop for PanicWatch<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self
                .0
                .device_lost
                .set("the engine thread panicked".to_owned());
        }
    }
}

/// The engine thread's loop.
fn run<M: StepModel>(mut engine: Engine<M>, commands: Receiver<Command>, counters: &Counters) {
    let _watch = PanicWatch(counters);
    let mut sinks: HashMap<RequestId, Box<dyn EventSink>> = HashMap::new();
    let mut connected = true;
    loop {
        if !engine.has_work() {
            if !connected {
                break;
            }
            // Idle: block until a caller has something.
            match commands.recv() {
                Ok(command) => apply(&mut engine, &mut sinks, command, counters),
                Err(_) => break,
            }
        }
        loop {
            match commands.try_recv() {
                Ok(command) => apply(&mut engine, &mut sinks, command, counters),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if connected {
                        connected = false;
                        for &id in sinks.keys() {
                            engine.cancel(id);
                        }
                    }
                    break;
                }
            }
        }
        let events = engine.step();
        let delivering = std::time::Instant::now();
        for event in events {
            let id = event.request_id;
            let finished = event.is_finished();
            let Some(sink) = sinks.get_mut(&id) else {
                continue;
            };
            let delivered = sink.send(event);
            if finished {
                sinks.remove(&id);
            } else if !delivered {
                engine.cancel(id);
            }
        }
        engine.record_delivery(delivering.elapsed());
        if let Some(line) = engine.profile_summary() {
            tracing::info!("{line}");
        }
        counters.publish_load(&engine);
        counters.publish_prefix_cache(&mut engine);
        let progress = engine.progress();
        counters.steps.store(progress.steps, Ordering::Relaxed);
        counters
            .failed_steps
            .store(progress.failed_steps, Ordering::Relaxed);
        counters
            .preemptions
            .store(progress.preemptions, Ordering::Relaxed);
        counters
            .draft_tokens
            .store(progress.draft_tokens, Ordering::Relaxed);
        counters
            .accepted_draft_tokens
            .store(progress.accepted_draft_tokens, Ordering::Relaxed);
        if let Some(reason) = engine.device_lost()
            && counters.device_lost.get().is_none()
        {
            let _ = counters.device_lost.set(reason.to_owned());
        }
    }
}

fn apply<M: StepModel>(
    engine: &mut Engine<M>,
    sinks: &mut HashMap<RequestId, Box<dyn EventSink>>,
    command: Command,
    counters: &Counters,
) {
    // A request now in the engine's count: counted there before it leaves `unapplied`.
    let queued = |engine: &Engine<M>| {
        counters.publish_load(engine);
        counters.unapplied.fetch_sub(1, Ordering::AcqRel);
    };
    match command {
        Command::Add {
            id,
            request,
            sink,
            sent,
        } => {
            let prompt_tokens = request.prompt_ids.len();
            let added = engine.add_request_with_id(id, request, sent);
            register(sinks, id, sink, prompt_tokens, added);
            queued(engine);
        }
        Command::ReserveImport { id, request, sink } => {
            let prompt_tokens = request.prompt_ids.len();
            let reserved = engine.reserve_import_with_id(id, request);
            register(sinks, id, sink, prompt_tokens, reserved);
            queued(engine);
        }
        Command::ImportReserved { id, prefill } => engine.import_reserved(id, prefill),
        Command::ReturnReservation(id) => engine.return_reservation(id),
        Command::PrefillReserved(id) => {
            // A request that ended meanwhile (cancelled) has nothing to prefill.
            if let Err(e) = engine.prefill_reserved(id) {
                tracing::debug!("local prefill of request {id}: {e}");
            }
        }
        Command::PinHostMemory { range, reply } => {
            // SAFETY: the promise of `EngineHandle::pin_host_memory`'s caller.
            let _ = reply.send(unsafe { engine.pin_host_memory(range) });
        }
        Command::TakeKv { id, mut dst, reply } => {
            // The caller may have given up waiting; the blocks are freed either way.
            let result = engine.take_retained_kv_into(id, dst.bytes_mut());
            let _ = reply.send((dst, result));
        }
        Command::Cancel(id) => {
            engine.cancel(id);
        }
        Command::ReleaseKv(id) => {
            if let Err(e) = engine.release_kv(id) {
                tracing::warn!("release of KV for request {id}: {e}");
            }
        }
    }
}

/// Keeps the sink of a request the engine took; a refused one gets its single `Finished`
/// event with the reason.
fn register(
    sinks: &mut HashMap<RequestId, Box<dyn EventSink>>,
    id: RequestId,
    mut sink: Box<dyn EventSink>,
    prompt_tokens: usize,
    taken: Result<(), EngineError>,
) {
    match taken {
        Ok(()) => {
            sinks.insert(id, sink);
        }
        Err(e) => {
            sink.send(finished_without_tokens(
                id,
                prompt_tokens,
                FinishReason::Error(e.to_string()),
            ));
        }
    }
}
