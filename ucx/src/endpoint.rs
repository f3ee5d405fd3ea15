//! Endpoints to peers, created from a peer's packed worker address, and a per-peer cache.
//!
//! Endpoints use `UCP_ERR_HANDLING_MODE_PEER` where the transports allow it: when the peer dies,
//! UCX completes the endpoint's outstanding requests with an error (and records the failure here)
//! instead of leaving them pending forever. UCX 1.13's shared-memory transports (sysv, posix)
//! have no peer failure detection, so with `UCX_TLS=shm` an endpoint in that mode cannot be
//! created; [`Endpoint::connect`] then falls back to `UCP_ERR_HANDLING_MODE_NONE`, and a dead peer
//! is noticed only by the deadline of [`Endpoint::get_all`]. (With every transport enabled, UCX
//! picks tcp for a peer-mode endpoint even on one host; `UCX_TLS=shm` trades the early failure
//! report for shared-memory bandwidth: see docs/benchmarks.md.) A failed or aborted endpoint is
//! closed and never reused; the cache replaces it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::c_int;
use std::ptr::NonNull;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::error::{Result, UcxError, check, status_error};
use crate::ffi;
use crate::worker::Worker;

/// How long, after an abort, dropping the endpoint's unfinished gets may progress the worker
/// waiting for UCX to cancel them, all of them together.
const ABORT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long closing an endpoint may progress the worker before giving up on the close request.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// An endpoint to one peer worker. Cheap to clone; the last clone closes it. Remote keys and
/// in-flight gets hold a clone, so the endpoint outlives them; it holds its [`Worker`].
#[derive(Clone)]
pub struct Endpoint {
    pub(crate) inner: Rc<EndpointInner>,
}

pub(crate) struct EndpointInner {
    /// Null once closed.
    handle: Cell<ffi::EpHandle>,
    /// Written by the shim's error callback (inside progress) with the failure status; UCS_OK
    /// while healthy. Heap-allocated because UCX keeps its address; freed only once UCX provably
    /// stopped using it (the close completed).
    error_slot: NonNull<c_int>,
    error_slot_in_use: Cell<bool>,
    /// Why the endpoint was closed by us, for the errors of later calls.
    closed_reason: RefCell<Option<String>>,
    /// Set by the first [`Endpoint::abort`]: until when dropped gets wait for their cancellation.
    abort_deadline: Cell<Option<Instant>>,
    peer_address: Vec<u8>,
    peer_error_handling: bool,
    pub(crate) worker: Worker,
}

impl Endpoint {
    /// Connects to the worker whose packed address ([`Worker::address`]) is `peer_address`.
    /// Wire-up completes lazily during the first operations.
    pub fn connect(worker: &Worker, peer_address: &[u8]) -> Result<Self> {
        if peer_address.is_empty() {
            return Err(UcxError::Invalid {
                what: "worker address",
                reason: "empty".into(),
            });
        }
        let error_slot = NonNull::from(Box::leak(Box::new(ffi::ok())));
        let create = |peer_error_handling: bool| {
            let mut handle = std::ptr::null_mut();
            // SAFETY: worker alive; the address bytes outlive the call (UCX copies what it
            // needs); error_slot stays valid until the endpoint is closed (see Drop).
            let status = unsafe {
                ffi::tandem_ep_create(
                    worker.inner.handle,
                    peer_address.as_ptr().cast(),
                    c_int::from(peer_error_handling),
                    error_slot.as_ptr(),
                    &mut handle,
                )
            };
            (status, handle)
        };
        let mut peer_error_handling = worker.inner.peer_error_handling.get() != Some(false);
        let (mut status, mut handle) = create(peer_error_handling);
        if peer_error_handling && status == ffi::err_unreachable() {
            // No transport to this peer can report peer failures (shared memory in UCX 1.13).
            let (fallback_status, fallback_handle) = create(false);
            if fallback_status == ffi::ok() {
                tracing::warn!(
                    "UCX transports to this peer cannot detect peer failure (UCX_TLS=shm?); \
                     a dead peer is noticed only by transfer deadlines"
                );
                worker.inner.peer_error_handling.set(Some(false));
                peer_error_handling = false;
            }
            (status, handle) = (fallback_status, fallback_handle);
        }
        if let Err(err) = check("ucp_ep_create", status) {
            // SAFETY: no endpoint was created, so UCX holds no pointer to the slot.
            drop(unsafe { Box::from_raw(error_slot.as_ptr()) });
            return Err(err);
        }
        if peer_error_handling {
            worker.inner.peer_error_handling.set(Some(true));
        }
        Ok(Self {
            inner: Rc::new(EndpointInner {
                handle: Cell::new(handle),
                error_slot,
                error_slot_in_use: Cell::new(true),
                closed_reason: RefCell::new(None),
                abort_deadline: Cell::new(None),
                peer_address: peer_address.to_vec(),
                peer_error_handling,
                worker: worker.clone(),
            }),
        })
    }

    /// The packed worker address this endpoint was created from.
    pub fn peer_address(&self) -> &[u8] {
        &self.inner.peer_address
    }

    /// Whether UCX reports this peer's death (`UCP_ERR_HANDLING_MODE_PEER`); when false, only
    /// deadlines notice it (see the module doc).
    pub fn detects_peer_failure(&self) -> bool {
        self.inner.peer_error_handling
    }

    /// The worker this endpoint belongs to.
    pub fn worker(&self) -> &Worker {
        &self.inner.worker
    }

    /// False once UCX reported a peer failure or the endpoint was closed.
    pub fn is_usable(&self) -> bool {
        self.inner.live_handle().is_ok()
    }

    /// Force-closes the endpoint now: outstanding requests complete with `UCS_ERR_CANCELED` and
    /// UCX stops touching their buffers. UCX cannot cancel a single RMA request, so this is how an
    /// abandoned transfer is stopped. Later calls fail with [`UcxError::EndpointClosed`].
    pub fn abort(&self, reason: &str) {
        if self.inner.abort_deadline.get().is_none() {
            self.inner
                .abort_deadline
                .set(Some(Instant::now() + ABORT_TIMEOUT));
        }
        self.inner.close(true, reason);
    }

    /// How long a get dropped after [`Endpoint::abort`] may still wait for UCX to cancel it. One
    /// deadline for all of them, so abandoning many gets waits at most [`ABORT_TIMEOUT`] in all.
    pub(crate) fn abort_wait_left(&self) -> Duration {
        self.inner
            .abort_deadline
            .get()
            .map_or(ABORT_TIMEOUT, |deadline| {
                deadline.saturating_duration_since(Instant::now())
            })
    }

    /// `ucp_ep_flush_nbx`: resolves once every operation issued on this endpoint so far has
    /// completed at the peer. Gets need no flush (their futures resolve when the data has
    /// landed); this is for callers that want a round trip to a live peer, e.g. before telling it
    /// to release memory. Somebody must progress the worker meanwhile. Dropping the future early
    /// leaves the flush to finish inside UCX (it touches no caller memory).
    pub async fn flush(&self) -> Result<()> {
        let ep = self.live_handle()?;
        let mut request = std::ptr::null_mut();
        // SAFETY: live endpoint of this worker; out pointer valid.
        let status = unsafe { ffi::tandem_ep_flush(ep, &mut request) };
        if status == ffi::ok() {
            return Ok(());
        }
        if status != ffi::in_progress() {
            return Err(status_error("ucp_ep_flush_nbx", status));
        }
        let pending = PendingRequest::new(self.worker(), request);
        let status = std::future::poll_fn(|cx| pending.poll_status(cx)).await;
        if status == ffi::ok() {
            Ok(())
        } else {
            Err(status_error("ucp_ep_flush_nbx", status))
        }
    }

    pub(crate) fn live_handle(&self) -> Result<ffi::EpHandle> {
        self.inner.live_handle()
    }

    pub(crate) fn same_as(&self, other: &Endpoint) -> bool {
        Rc::ptr_eq(&self.inner, &other.inner)
    }
}

impl EndpointInner {
    fn live_handle(&self) -> Result<ffi::EpHandle> {
        if let Some(reason) = self.closed_reason.borrow().as_ref() {
            return Err(UcxError::EndpointClosed {
                reason: reason.clone(),
            });
        }
        let failure = self.failure_status();
        if failure != ffi::ok() {
            return Err(UcxError::EndpointClosed {
                reason: format!("peer failure: {}", ffi::status_string(failure)),
            });
        }
        Ok(self.handle.get())
    }

    /// The status the error callback recorded (UCS_OK while healthy).
    pub(crate) fn failure_status(&self) -> c_int {
        // SAFETY: the slot is a live heap int; the callback only writes it during progress on
        // this thread, never concurrently with this read.
        unsafe { self.error_slot.as_ptr().read() }
    }

    fn close(&self, force: bool, reason: &str) {
        let handle = self.handle.replace(std::ptr::null_mut());
        if handle.is_null() {
            return;
        }
        self.closed_reason.replace(Some(reason.to_string()));
        // A failed endpoint must be force-closed: a flush would wait on a dead peer.
        let force = force || self.failure_status() != ffi::ok();
        let mut request = std::ptr::null_mut();
        // SAFETY: handle is a live endpoint of this worker; it is closed exactly once (swapped out).
        let status = unsafe { ffi::tandem_ep_close(handle, c_int::from(force), &mut request) };
        if status == ffi::in_progress() {
            // SAFETY (closure): the request is alive until freed below.
            let done = self.worker.progress_blocking(CLOSE_TIMEOUT, || unsafe {
                ffi::tandem_request_check_status(request) != ffi::in_progress()
            });
            // SAFETY: a request returned by ucp_ep_close_nbx, freed once (UCX releases it on
            // completion if it is still running).
            unsafe { ffi::tandem_request_free(request) };
            if !done {
                // UCX may still call the error callback: keep the slot alive for good.
                tracing::warn!(
                    force,
                    "UCX endpoint close did not complete within {CLOSE_TIMEOUT:?}"
                );
                self.error_slot_in_use.set(true);
                return;
            }
        } else if status != ffi::ok() {
            tracing::debug!(error = %status_error("ucp_ep_close_nbx", status), "closing endpoint");
        }
        self.error_slot_in_use.set(false);
    }
}

impl Drop for EndpointInner {
    fn drop(&mut self) {
        self.close(false, "endpoint dropped");
        if !self.error_slot_in_use.get() {
            // SAFETY: allocated with Box in `connect`; the close completed, so UCX no longer
            // holds the pointer.
            drop(unsafe { Box::from_raw(self.error_slot.as_ptr()) });
        }
    }
}

/// A UCX request that writes no caller memory (flush), freed when dropped: UCX releases a
/// request freed before completion once it completes.
struct PendingRequest {
    worker: Worker,
    request: Cell<ffi::RequestHandle>,
}

impl PendingRequest {
    fn new(worker: &Worker, request: ffi::RequestHandle) -> Self {
        worker.request_started();
        Self {
            worker: worker.clone(),
            request: Cell::new(request),
        }
    }

    /// The request's status once it is no longer in progress.
    fn poll_status(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<c_int> {
        let request = self.request.get();
        if request.is_null() {
            return std::task::Poll::Ready(ffi::err_canceled());
        }
        // SAFETY: the request is alive until freed in `release`.
        let status = unsafe { ffi::tandem_request_check_status(request) };
        if status == ffi::in_progress() {
            self.worker.register_waiter(cx.waker());
            return std::task::Poll::Pending;
        }
        self.release();
        std::task::Poll::Ready(status)
    }

    fn release(&self) {
        let request = self.request.replace(std::ptr::null_mut());
        if !request.is_null() {
            // SAFETY: a request returned by UCX, freed once (swapped out).
            unsafe { ffi::tandem_request_free(request) };
            self.worker.request_finished();
        }
    }
}

impl Drop for PendingRequest {
    fn drop(&mut self) {
        self.release();
    }
}

/// Endpoints of one worker, one per peer worker address, created on first use and replaced when
/// they failed or were aborted.
pub struct EndpointCache {
    worker: Worker,
    endpoints: RefCell<HashMap<Vec<u8>, Endpoint>>,
}

impl EndpointCache {
    pub fn new(worker: &Worker) -> Self {
        Self {
            worker: worker.clone(),
            endpoints: RefCell::new(HashMap::new()),
        }
    }

    /// The usable endpoint to `peer_address`, connecting (again) if there is none.
    pub fn get(&self, peer_address: &[u8]) -> Result<Endpoint> {
        if let Some(endpoint) = self.endpoints.borrow().get(peer_address)
            && endpoint.is_usable()
        {
            return Ok(endpoint.clone());
        }
        let endpoint = Endpoint::connect(&self.worker, peer_address)?;
        self.endpoints
            .borrow_mut()
            .insert(peer_address.to_vec(), endpoint.clone());
        Ok(endpoint)
    }

    /// Forgets the endpoint to `peer_address` (closed once its last user drops it).
    pub fn remove(&self, peer_address: &[u8]) -> Option<Endpoint> {
        self.endpoints.borrow_mut().remove(peer_address)
    }

    /// Number of cached endpoints, usable or not.
    pub fn len(&self) -> usize {
        self.endpoints.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
