//! The UCP worker and how it is progressed from tokio.
//!
//! Threading model: a UCP worker is created in `UCS_THREAD_MODE_SINGLE` and is not thread-safe,
//! so every call on it (and on its endpoints, rkeys and requests) must happen on one thread. The
//! Rust types enforce this: they are reference counted with `Rc` and therefore neither `Send` nor
//! `Sync`. Run them on a current-thread runtime, inside a `tokio::task::LocalSet`, or on a
//! dedicated thread that owns the worker and is reached through channels.
//!
//! Progress: UCX only moves data (and, over tcp, serves a peer's gets: tcp has no RMA, so UCX
//! emulates it with active messages that the *target* worker must progress) when
//! `ucp_worker_progress` is called. [`Worker::progress_loop`] drives it without spinning a core:
//! it progresses until idle, arms the worker (`ucp_worker_arm`) and sleeps on the worker's event
//! file descriptor (`ucp_worker_get_efd`) through `tokio::io::unix::AsyncFd`. A short tick
//! (5 ms) bounds the sleep even when the worker has no requests of its own, as a guarantee that
//! work UCX queued without signalling the descriptor still moves: a worker serving gets of
//! registered user memory over shm answers them with active messages, and when the puller's
//! shared-memory FIFO is full the replies wait in UCX's pending queue (in one instrumented
//! benchmark run the serving side was woken 167 times by the tick and 12 times by the
//! descriptor). Transfers in the tests also completed without the tick, so it is a safety net,
//! not a required pacing. An idle worker thus wakes 200 times a second, which costs no
//! measurable CPU. A newly issued request wakes the loop at once. After every progress round the
//! wakers of pending transfers are woken so they can check their requests.

use std::cell::{Cell, OnceCell, RefCell};
use std::convert::Infallible;
use std::future::Future;
use std::os::fd::RawFd;
use std::pin::pin;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::context::Context;
use crate::error::{Result, UcxError, check, status_error};
use crate::ffi;

/// Longest sleep on the event descriptor before progressing anyway.
const EVENT_WAIT_TICK: Duration = Duration::from_millis(5);

/// Progress calls in a row, while they keep finding work, before yielding to other tasks.
const PROGRESS_BURST: usize = 64;

/// A UCP worker. Cheap to clone (reference counted); endpoints hold a clone, so the worker is
/// destroyed only after all of them, and it holds its [`Context`], which goes last.
#[derive(Clone)]
pub struct Worker {
    pub(crate) inner: Rc<WorkerInner>,
}

pub(crate) struct WorkerInner {
    pub(crate) handle: ffi::WorkerHandle,
    /// Registered with tokio on first use (needs a runtime), deregistered before destruction.
    event_fd: OnceCell<AsyncFd<RawFd>>,
    /// Tasks waiting for a request of this worker to complete; woken after each progress round.
    waiters: RefCell<Vec<Waker>>,
    /// Requests issued on this worker and not yet completed or abandoned.
    outstanding: Cell<usize>,
    /// Wakes a sleeping progress loop when a request is issued, so it is driven at once.
    request_issued: Notify,
    /// Whether endpoints of this worker can use UCX's peer error handling: unknown until the
    /// first connect, false once a peer was reachable only without it (see
    /// [`crate::Endpoint::connect`]), which spares later connects the failing attempt.
    pub(crate) peer_error_handling: Cell<Option<bool>>,
    /// Keeps the context alive until after `ucp_worker_destroy` (fields drop after `drop`).
    _context: Context,
}

impl Worker {
    /// Creates a single-threaded worker on `context`.
    pub fn new(context: &Context) -> Result<Self> {
        let mut handle = std::ptr::null_mut();
        // SAFETY: the context handle is alive (we hold a clone); the out pointer is valid.
        check("ucp_worker_create", unsafe {
            ffi::tandem_worker_create(context.inner.handle, &mut handle)
        })?;
        Ok(Self {
            inner: Rc::new(WorkerInner {
                handle,
                event_fd: OnceCell::new(),
                waiters: RefCell::new(Vec::new()),
                outstanding: Cell::new(0),
                request_issued: Notify::new(),
                peer_error_handling: Cell::new(None),
                _context: context.clone(),
            }),
        })
    }

    /// The worker's packed address: the bytes a peer passes to [`crate::Endpoint::connect`].
    pub fn address(&self) -> Result<Vec<u8>> {
        let mut address = std::ptr::null_mut();
        let mut length = 0usize;
        // SAFETY: the worker is alive; out pointers are valid.
        check("ucp_worker_get_address", unsafe {
            ffi::tandem_worker_get_address(self.inner.handle, &mut address, &mut length)
        })?;
        // SAFETY: UCX returned `length` readable bytes at `address`, released right after the copy.
        let bytes = unsafe { std::slice::from_raw_parts(address.cast::<u8>(), length) }.to_vec();
        // SAFETY: the address came from ucp_worker_get_address on this worker.
        unsafe { ffi::tandem_worker_release_address(self.inner.handle, address) };
        Ok(bytes)
    }

    /// One `ucp_worker_progress` call; wakes the tasks waiting on requests. Returns UCX's count of
    /// events processed (0 when idle).
    pub fn progress(&self) -> u32 {
        // SAFETY: the worker is alive and used from this thread only (the type is !Send).
        let events = unsafe { ffi::tandem_worker_progress(self.inner.handle) };
        self.inner.wake_waiters();
        events
    }

    /// Drives the worker forever (returns only on an error of the event descriptor). Spawn it with
    /// `tokio::task::spawn_local` next to the tasks that use the worker, or use
    /// [`Worker::progress_until`]. A process that only *serves* memory to peers must run it too
    /// (tcp emulates RMA with messages the target handles).
    pub async fn progress_loop(&self) -> Result<Infallible> {
        let event_fd = self.inner.event_fd()?;
        loop {
            let mut burst = 0;
            while self.progress() > 0 {
                burst += 1;
                if burst == PROGRESS_BURST {
                    break;
                }
            }
            if burst == PROGRESS_BURST {
                tokio::task::yield_now().await;
                continue;
            }
            // SAFETY: the worker is alive; arm is called after progress reported no more events.
            let armed = unsafe { ffi::tandem_worker_arm(self.inner.handle) };
            if armed == ffi::err_busy() {
                // Events arrived between the last progress and arm: progress again.
                tokio::task::yield_now().await;
                continue;
            }
            check("ucp_worker_arm", armed)?;
            tokio::select! {
                readable = event_fd.readable() => match readable {
                    Ok(mut guard) => guard.clear_ready(),
                    Err(err) => return Err(UcxError::EventFd(err)),
                },
                () = tokio::time::sleep(EVENT_WAIT_TICK) => {}
                () = self.inner.request_issued.notified() => {}
            }
        }
    }

    /// Runs `future` while driving this worker's progress in the same task, and returns the
    /// future's output. For callers that do not keep a [`Worker::progress_loop`] task running.
    pub async fn progress_until<F: Future>(&self, future: F) -> Result<F::Output> {
        let mut future = pin!(future);
        let mut driver = pin!(self.progress_loop());
        std::future::poll_fn(|cx| {
            if let Poll::Ready(output) = future.as_mut().poll(cx) {
                return Poll::Ready(Ok(output));
            }
            match driver.as_mut().poll(cx) {
                Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
                Poll::Ready(Ok(never)) => match never {},
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Registers `waker` to be woken after the next progress round.
    pub(crate) fn register_waiter(&self, waker: &Waker) {
        let mut waiters = self.inner.waiters.borrow_mut();
        if !waiters.iter().any(|w| w.will_wake(waker)) {
            waiters.push(waker.clone());
        }
    }

    /// Gets issued on this worker that have neither completed nor been abandoned (0 once every
    /// transfer future has finished or been dropped).
    pub fn outstanding_requests(&self) -> usize {
        self.inner.outstanding.get()
    }

    /// Counts a request issued on this worker until [`Worker::request_finished`]; wakes an idle
    /// progress loop so it drives the request.
    pub(crate) fn request_started(&self) {
        self.inner.outstanding.set(self.inner.outstanding.get() + 1);
        self.inner.request_issued.notify_one();
    }

    /// The request counted by [`Worker::request_started`] completed or was abandoned.
    pub(crate) fn request_finished(&self) {
        self.inner
            .outstanding
            .set(self.inner.outstanding.get().saturating_sub(1));
    }

    /// Progresses synchronously until `done` holds or `timeout` passes; for `Drop` paths, which
    /// cannot await. Returns whether `done` held.
    pub(crate) fn progress_blocking(
        &self,
        timeout: Duration,
        mut done: impl FnMut() -> bool,
    ) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if done() {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            if self.progress() == 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

impl WorkerInner {
    fn event_fd(&self) -> Result<&AsyncFd<RawFd>> {
        if let Some(fd) = self.event_fd.get() {
            return Ok(fd);
        }
        let mut fd: RawFd = -1;
        // SAFETY: the worker is alive and was created with UCP_FEATURE_WAKEUP.
        let status = unsafe { ffi::tandem_worker_get_efd(self.handle, &mut fd) };
        if status != ffi::ok() {
            return Err(status_error("ucp_worker_get_efd", status));
        }
        // SAFETY: the descriptor is valid and stays open until the worker is destroyed, and the
        // AsyncFd is dropped before that (Drop below). AsyncFd<RawFd> deregisters it but never
        // closes it: UCX owns it.
        let async_fd =
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
                .map_err(|e| UcxError::EventFd(e.into_parts().1))?;
        Ok(self.event_fd.get_or_init(|| async_fd))
    }

    fn wake_waiters(&self) {
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for waker in waiters {
            waker.wake();
        }
    }
}

impl Drop for WorkerInner {
    fn drop(&mut self) {
        // Deregister from tokio while the descriptor still exists.
        drop(self.event_fd.take());
        // SAFETY: endpoints hold an Rc of this, so none is left; the context outlives us (field).
        unsafe { ffi::tandem_worker_destroy(self.handle) };
    }
}
