//! RMA gets (`ucp_get_nbx`): one region per future, many in flight at once, and a batch helper
//! with a deadline for pulling a request's KV regions.
//!
//! Completion is detected by polling the request (`ucp_request_check_status`) when the worker's
//! progress wakes the future, so no Rust code runs inside UCX callbacks. That is the callback
//! turned into a future without the callback's hazards: a `ucp_request_param_t` callback would
//! need a pointer to the future's waker slot that stays valid until UCX calls it, even after the
//! future was dropped; progress wakes pending futures after every round anyway, so polling adds
//! no latency. A get completes once the
//! data has landed in the local buffer. UCX cannot cancel an RMA request, so dropping an
//! unfinished get force-closes its endpoint (which completes every request on it with
//! `UCS_ERR_CANCELED`) and waits for the request, so the buffer is never written after the drop.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use crate::endpoint::Endpoint;
use crate::error::{Result, UcxError, status_error};
use crate::ffi;
use crate::memory::RemoteKey;

/// One get of a batch: fill `local` from `remote_address` in the region of `rkey`.
pub struct GetOp<'buf> {
    pub local: &'buf mut [u8],
    pub remote_address: u64,
    pub rkey: RemoteKey,
}

impl Endpoint {
    /// Starts reading `local.len()` bytes at `remote_address` (inside the region of `rkey`, which
    /// must have been unpacked on this endpoint) into `local`. The returned future resolves once
    /// the data has landed; somebody must progress the worker meanwhile
    /// ([`crate::Worker::progress_loop`] or [`crate::Worker::progress_until`]).
    ///
    /// # Safety
    /// The future must be run to completion or dropped, never leaked (`mem::forget`): UCX writes
    /// into `local` until the future's completion or drop, and only those end the borrow safely.
    /// Nothing else may read or write `local` meanwhile (the `&mut` borrow ensures that in safe
    /// code).
    pub unsafe fn get<'buf>(
        &self,
        local: &'buf mut [u8],
        remote_address: u64,
        rkey: &RemoteKey,
    ) -> Result<GetFuture<'buf>> {
        if !rkey.endpoint().same_as(self) {
            return Err(UcxError::Invalid {
                what: "remote key",
                reason: "unpacked on a different endpoint".into(),
            });
        }
        rkey.check_range(remote_address, local.len())?;
        let ep = self.live_handle()?;
        let mut request = std::ptr::null_mut();
        // SAFETY: endpoint and rkey alive (the future holds clones); the buffer stays valid and
        // exclusively ours until completion or drop (caller's contract).
        let status = unsafe {
            ffi::tandem_get(
                ep,
                local.as_mut_ptr().cast(),
                local.len(),
                remote_address,
                rkey.inner.handle,
                &mut request,
            )
        };
        let state = if status == ffi::in_progress() {
            self.worker().request_started();
            State::InFlight(request)
        } else if status == ffi::ok() {
            State::Finished
        } else {
            return Err(status_error("ucp_get_nbx", status));
        };
        Ok(GetFuture {
            state,
            endpoint: self.clone(),
            _rkey: rkey.clone(),
            _buffer: PhantomData,
        })
    }

    /// Issues every get of `ops` at once and waits for all of them, at most `timeout`. On the
    /// first error or at the deadline the remaining gets are aborted (the endpoint is
    /// force-closed, see [`Endpoint::abort`]) and the error is returned; on success every buffer
    /// holds the remote bytes. Every `rkey` must belong to this endpoint.
    ///
    /// # Safety
    /// As for [`Endpoint::get`]: the returned future must be run to completion or dropped, never
    /// leaked.
    pub async unsafe fn get_all(&self, ops: Vec<GetOp<'_>>, timeout: Duration) -> Result<()> {
        let mut pending = Vec::with_capacity(ops.len());
        for op in ops {
            // SAFETY: the futures live in `pending`, which is awaited or dropped in this function.
            pending.push(unsafe { self.get(op.local, op.remote_address, &op.rkey)? });
        }
        let all = async {
            for get in pending {
                get.await?;
            }
            Ok(())
        };
        match tokio::time::timeout(timeout, all).await {
            Ok(result) => result,
            Err(_elapsed) => Err(UcxError::Timeout {
                op: "ucp_get_nbx",
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }
}

/// An RMA get in flight. Resolves to `Ok(())` once the bytes have landed. See the module doc for
/// what dropping it early does.
#[must_use = "a get must be awaited (or dropped to abort it)"]
pub struct GetFuture<'buf> {
    state: State,
    endpoint: Endpoint,
    _rkey: RemoteKey,
    _buffer: PhantomData<&'buf mut [u8]>,
}

enum State {
    InFlight(ffi::RequestHandle),
    /// Completed at issue time: nothing to wait for.
    Finished,
    /// The output was returned.
    Done,
}

impl Future for GetFuture<'_> {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match self.state {
            State::Finished => {
                self.state = State::Done;
                Poll::Ready(Ok(()))
            }
            State::Done => Poll::Ready(Err(UcxError::Invalid {
                what: "get future",
                reason: "polled after completion".into(),
            })),
            State::InFlight(request) => {
                // SAFETY: the request is alive until freed below, once.
                let status = unsafe { ffi::tandem_request_check_status(request) };
                if status == ffi::in_progress() {
                    self.endpoint.worker().register_waiter(cx.waker());
                    return Poll::Pending;
                }
                // SAFETY: completed request from ucp_get_nbx, freed once.
                unsafe { ffi::tandem_request_free(request) };
                self.endpoint.worker().request_finished();
                self.state = State::Done;
                if status == ffi::ok() {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Ready(Err(self.failure(status)))
                }
            }
        }
    }
}

impl GetFuture<'_> {
    /// The error for a failed request, naming the peer failure when UCX reported one.
    fn failure(&self, status: std::ffi::c_int) -> UcxError {
        let peer_status = self.endpoint.inner.failure_status();
        if peer_status != ffi::ok() && status == ffi::err_canceled() {
            return status_error("ucp_get_nbx (peer failed)", peer_status);
        }
        status_error("ucp_get_nbx", status)
    }
}

impl Drop for GetFuture<'_> {
    fn drop(&mut self) {
        let State::InFlight(request) = self.state else {
            return;
        };
        self.endpoint.abort("a get was dropped before it completed");
        let wait = self.endpoint.abort_wait_left();
        // SAFETY (closure): the request is alive until freed below.
        let done = self.endpoint.worker().progress_blocking(wait, || unsafe {
            ffi::tandem_request_check_status(request) != ffi::in_progress()
        });
        if !done {
            // Seen with UCX_TLS=shm and a dead peer: no peer error handling, so the force-close
            // leaves requests queued for a peer that never answers. They are never sent (the
            // endpoint is gone), so nothing writes into the buffer later.
            tracing::warn!("UCX get not cancelled by force-closing its endpoint; abandoned");
        }
        // SAFETY: request from ucp_get_nbx, freed once (UCX defers the release if still pending).
        unsafe { ffi::tandem_request_free(request) };
        self.endpoint.worker().request_finished();
    }
}
