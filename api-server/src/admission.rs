//! A bound on the generation requests this api-server holds at once (accepted, not finished):
//! past it, a request is answered 429 with `Retry-After` at once, instead of joining a queue
//! that grows as long as clients keep sending. A streamed request holds its place
//! until its stream ends, since the client still waits for it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::ApiError;
use crate::refusals::RefusalRun;

/// The count of requests in flight and its bound (0: none).
#[derive(Debug, Clone)]
pub struct Admission {
    in_flight: Arc<AtomicUsize>,
    max: usize,
    /// The run of refusals under way, for the log (a 429 is the client's to retry, but the
    /// operator should know the bound is being met).
    refusals: Arc<Mutex<RefusalRun>>,
}

/// A request's place; given back when dropped (the response is complete, or the client left).
#[derive(Debug)]
pub struct Admitted {
    in_flight: Arc<AtomicUsize>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(max: usize) -> Self {
        Self {
            in_flight: Arc::new(AtomicUsize::new(0)),
            max,
            refusals: Arc::new(Mutex::new(RefusalRun::new("--max-pending-requests"))),
        }
    }

    /// A place for one more request, or [`ApiError::Overloaded`] when all are taken.
    pub fn try_admit(&self) -> Result<Admitted, ApiError> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let admitted = Admitted {
            in_flight: Arc::clone(&self.in_flight),
        };
        if self.max != 0 && before >= self.max {
            if self.refusals().refused(Instant::now()) {
                tracing::warn!(
                    max_pending_requests = self.max,
                    "this api-server holds as many requests as --max-pending-requests allows: \
                     answering 429 (with Retry-After) until one ends"
                );
            }
            // Dropping `admitted` gives the place back.
            return Err(ApiError::Overloaded { max: self.max });
        }
        if self.max != 0 {
            self.refusals().taken(Instant::now());
        }
        Ok(admitted)
    }

    fn refusals(&self) -> std::sync::MutexGuard<'_, RefusalRun> {
        // Counters only: a panic under the lock leaves nothing inconsistent.
        self.refusals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Requests holding a place now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_and_come_back_when_dropped() {
        let admission = Admission::new(2);
        let a = admission.try_admit().unwrap();
        let b = admission.try_admit().unwrap();
        let refused = admission.try_admit().unwrap_err();
        assert!(
            matches!(refused, ApiError::Overloaded { max: 2 }),
            "{refused}"
        );
        assert_eq!(admission.in_flight(), 2, "a refusal holds no place");
        drop(a);
        let _c = admission.try_admit().unwrap();
        drop(b);
        assert_eq!(admission.in_flight(), 1);
        let unbounded = Admission::new(0);
        let held: Vec<_> = (0..10_000)
            .map(|_| unbounded.try_admit().unwrap())
            .collect();
        assert_eq!(unbounded.in_flight(), held.len());
    }
}
