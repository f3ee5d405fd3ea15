//! Cancellation of a request on the bus: a [`CancelGuard`] is armed while a worker may be
//! working on the request, and publishes a `CancelRequest` when it is dropped (or fired)
//! armed. The [`Generation`](super::Generation) owns its guard, so a client that goes away
//! (actix drops the response body stream or the handler future) stops the work on the worker.
//! The cancel goes to every worker, so it stops the request in either phase of a hand-over.

use tandem_protocol::messages::{CancelRequest, encode};

use super::bus::Bus;

/// Publishes a `CancelRequest` for its request when dropped while armed.
pub struct CancelGuard {
    bus: Bus,
    request_id: String,
    armed: bool,
}

impl CancelGuard {
    /// Armed: the job for `request_id` is about to be published.
    pub(super) fn new(bus: Bus, request_id: String) -> Self {
        CancelGuard {
            bus,
            request_id,
            armed: true,
        }
    }

    /// The worker has finished with the request: nothing to cancel.
    pub(super) fn disarm(&mut self) {
        self.armed = false;
    }

    /// Publishes the cancel now (once).
    pub(super) fn fire(&mut self) {
        if !std::mem::take(&mut self.armed) {
            return;
        }
        let subject = self.bus.subjects.cancel();
        let payload = encode(&CancelRequest {
            request_id: self.request_id.clone(),
        });
        let client = self.bus.client.clone();
        let request_id = self.request_id.clone();
        // Drop cannot await; the publish is a channel send to the connection task.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    match client.publish(subject, payload.into()).await {
                        Ok(()) => tracing::debug!(%request_id, "cancel published"),
                        Err(err) => tracing::warn!(%request_id, %err, "could not publish cancel"),
                    }
                });
            }
            Err(_) => tracing::warn!(%request_id, "no runtime to publish cancel on"),
        }
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.fire();
    }
}
