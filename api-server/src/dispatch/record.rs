//! The metrics of one request: [`RequestRecord`] follows a request from its arrival to its
//! end and reports what happened to it as [`metrics::Event`](crate::metrics::Event)s (its
//! tokens with their timing, its usage, and its outcome, exactly once).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tandem_protocol::messages::Usage;

use crate::error::ApiError;
use crate::metrics::{Endpoint, Event, Metrics, TokenTiming};

/// Counts one request in the metrics exactly once: with the outcome it ended with, or as
/// `client_disconnected` when dropped before an outcome was set. A request with `n` > 1 has
/// one record per choice ([`Self::extra_choice`]); the request is counted when the last of
/// them drops: with the first failure of any choice, else `success` if every choice
/// succeeded, else `client_disconnected`.
pub struct RequestRecord {
    metrics: Metrics,
    endpoint: Endpoint,
    arrival: Instant,
    last_token: Option<Instant>,
    outcome: Option<&'static str>,
    /// A choice after the first: its prompt tokens are the first choice's to count.
    extra_choice: bool,
    /// What the records of the request's choices know together.
    request: Arc<Mutex<RequestOutcome>>,
}

/// The outcome of a request, gathered from its choices' records.
#[derive(Default)]
struct RequestOutcome {
    /// Records of the request not dropped yet.
    live: usize,
    /// Records of the request in all.
    choices: usize,
    succeeded: usize,
    /// The first failure of any choice.
    failure: Option<&'static str>,
}

impl RequestRecord {
    /// A request that arrives now.
    pub fn new(metrics: Metrics, endpoint: Endpoint) -> Self {
        RequestRecord {
            metrics,
            endpoint,
            arrival: Instant::now(),
            last_token: None,
            outcome: None,
            extra_choice: false,
            request: Arc::new(Mutex::new(RequestOutcome {
                live: 1,
                choices: 1,
                ..RequestOutcome::default()
            })),
        }
    }

    /// The record of another choice of the request `self` records (`n` > 1): it counts the
    /// choice's tokens and completion tokens, and its outcome makes the request's.
    pub fn extra_choice(&self) -> Self {
        let mut request = lock(&self.request);
        request.live += 1;
        request.choices += 1;
        drop(request);
        RequestRecord {
            metrics: self.metrics.clone(),
            endpoint: self.endpoint,
            arrival: self.arrival,
            last_token: None,
            outcome: None,
            extra_choice: true,
            request: Arc::clone(&self.request),
        }
    }

    pub fn arrival(&self) -> Instant {
        self.arrival
    }

    /// Records the arrival of `count` tokens at once, at `now`.
    pub(super) fn tokens(&mut self, count: usize, now: Instant) {
        if count == 0 {
            return;
        }
        let timing = match self.last_token {
            None => TokenTiming::First {
                since_arrival: now.duration_since(self.arrival),
            },
            Some(last) => TokenTiming::Next {
                since_previous: now.duration_since(last),
            },
        };
        self.metrics.record(Event::Tokens {
            endpoint: self.endpoint,
            count,
            timing,
        });
        self.last_token = Some(now);
    }

    /// The request ends with `error` (the first outcome set is the one counted).
    pub fn fail(&mut self, error: &ApiError) {
        if self.outcome.is_none() {
            lock(&self.request).failure.get_or_insert(error.outcome());
        }
        self.outcome.get_or_insert(error.outcome());
    }

    /// The request finished with `usage`.
    pub(super) fn succeed(&mut self, mut usage: Usage) {
        if self.extra_choice {
            usage.prompt_tokens = 0;
        }
        self.metrics.record(Event::Finished { usage });
        self.outcome.get_or_insert("success");
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let mut request = lock(&self.request);
        if self.outcome == Some("success") {
            request.succeeded += 1;
        }
        request.live -= 1;
        if request.live > 0 {
            return;
        }
        let outcome = match request.failure {
            Some(failure) => failure,
            None if request.succeeded == request.choices => "success",
            None => "client_disconnected",
        };
        drop(request);
        self.metrics.record(Event::RequestEnded {
            endpoint: self.endpoint,
            outcome,
        });
    }
}

/// The request's shared outcome; a panic while it was held leaves plain counters, usable.
fn lock(request: &Mutex<RequestOutcome>) -> MutexGuard<'_, RequestOutcome> {
    request
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests(metrics: &Metrics, outcome: &str) -> String {
        let series = format!("tandem_requests_total{{endpoint=\"chat\",outcome=\"{outcome}\"}} 1");
        let text = metrics.render();
        assert!(text.contains(&series), "{series} missing:\n{text}");
        text
    }

    #[test]
    fn the_choices_of_a_request_count_it_once_with_the_first_failure_of_any() {
        let usage = Usage {
            prompt_tokens: 10,
            completion_tokens: 4,
        };
        // Every choice succeeds: one success, the prompt counted once.
        let metrics = Metrics::new();
        let mut first = RequestRecord::new(metrics.clone(), Endpoint::Chat);
        let mut second = first.extra_choice();
        first.succeed(usage);
        drop(first);
        assert!(!metrics.render().contains("outcome=\"success\""));
        second.succeed(usage);
        drop(second);
        let text = requests(&metrics, "success");
        assert!(text.contains("tandem_prompt_tokens_total 10"), "{text}");
        assert!(text.contains("tandem_completion_tokens_total 8"), "{text}");

        // The first choice succeeds and is gone before another fails: the request failed.
        let metrics = Metrics::new();
        let mut first = RequestRecord::new(metrics.clone(), Endpoint::Chat);
        let mut second = first.extra_choice();
        let third = first.extra_choice();
        first.succeed(usage);
        drop(first);
        second.fail(&ApiError::Stalled { timeout_ms: 5 });
        drop(second);
        drop(third);
        let text = requests(&metrics, ApiError::Stalled { timeout_ms: 5 }.outcome());
        assert!(!text.contains("outcome=\"success\""), "{text}");

        // A choice cut short without an outcome (the client left): not a success.
        let metrics = Metrics::new();
        let mut first = RequestRecord::new(metrics.clone(), Endpoint::Chat);
        let second = first.extra_choice();
        first.succeed(usage);
        drop(first);
        drop(second);
        requests(&metrics, "client_disconnected");
    }
}
