//! The metrics of one request: [`RequestRecord`] follows a request from its arrival to its
//! end and reports what happened to it as [`metrics::Event`](crate::metrics::Event)s (its
//! tokens with their timing, its usage, and its outcome, exactly once).

use std::time::Instant;

use tandem_protocol::messages::Usage;

use crate::error::ApiError;
use crate::metrics::{Endpoint, Event, Metrics, TokenTiming};

/// Counts one request in the metrics exactly once: with the outcome it ended with, or as
/// `client_disconnected` when dropped before an outcome was set.
pub struct RequestRecord {
    metrics: Metrics,
    endpoint: Endpoint,
    arrival: Instant,
    last_token: Option<Instant>,
    outcome: Option<&'static str>,
    /// The record of a choice after the first of a request with `n` > 1: its tokens and
    /// completion tokens count, its prompt and the request itself are counted by the first
    /// choice's record.
    extra_choice: bool,
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
        }
    }

    /// The record of another choice of the request `self` records (`n` > 1): it counts the
    /// choice's tokens and completion tokens, not the prompt or the request again.
    pub fn extra_choice(&self) -> Self {
        RequestRecord {
            metrics: self.metrics.clone(),
            endpoint: self.endpoint,
            arrival: self.arrival,
            last_token: None,
            outcome: None,
            extra_choice: true,
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
        if self.extra_choice {
            return;
        }
        self.metrics.record(Event::RequestEnded {
            endpoint: self.endpoint,
            outcome: self.outcome.unwrap_or("client_disconnected"),
        });
    }
}
