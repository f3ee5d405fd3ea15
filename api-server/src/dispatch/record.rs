//! The metrics of one request: [`RequestRecord`] follows a request from its arrival to its
//! end and reports what happened to it as [`metrics::Event`](crate::metrics::Event)s (its
//! tokens with their timing, its usage, and its outcome, exactly once; for a request whose
//! K/V a decode worker pulled, its time to first token split into parts).
//!
//! The split: the context worker's `kv_ready` says how long the prefill job queued there and
//! how long its prefill took, the decode worker's `kv_pulled` how long the decode job waited
//! for room and how long the pull took; each is an interval of one worker's own clock, and
//! they are disjoint stretches of the request's life. `other` is the time to first token as
//! the api-server measured it less those four. Measured on different clocks, the four could
//! exceed it by a hair: `other` is then 0 (logged), never negative. A request counts only when
//! both workers reported their parts (workers older than the fields do not) and the hand-over
//! it reported is the one its first token came from: a fallback or a migration before the
//! first token forgets it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tandem_protocol::messages::{PrefillTiming, Usage};

use crate::error::ApiError;
use crate::metrics::{Endpoint, Event, Metrics, TokenTiming, TtftParts};

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
    /// What the workers of the hand-over in progress said of their parts of the time to
    /// first token, until the first token.
    handover: HandoverTiming,
    /// Prompt tokens the context worker of the hand-over in progress took from its prefix
    /// cache (`kv_ready.cached_tokens`): the request's, once the decode worker pulled the K/V.
    context_cached_tokens: u32,
    /// A choice after the first: its prompt tokens are the first choice's to count.
    extra_choice: bool,
    /// What the records of the request's choices know together.
    request: Arc<Mutex<RequestOutcome>>,
    /// The LoRA adapter the request named (`None`: the served model), the `adapter` label of
    /// the per-adapter families.
    adapter: Option<Arc<str>>,
}

/// The workers' parts of a hand-over's time to first token, as their messages arrive.
#[derive(Debug, Clone, Copy, Default)]
struct HandoverTiming {
    /// `kv_ready.prefill_timing`.
    prefill: Option<PrefillTiming>,
    /// From a `kv_pulled` after a pull: the wait for room, and the pull.
    pull: Option<(Duration, Duration)>,
}

impl HandoverTiming {
    /// `ttft` split, once both workers have reported; the second value says whether `other`
    /// was clamped at 0.
    fn split(&self, ttft: Duration) -> Option<(TtftParts, bool)> {
        let prefill = self.prefill?;
        let (decode_room_wait, kv_transfer) = self.pull?;
        let context_queue = Duration::from_micros(prefill.queued_us);
        let prefill = Duration::from_micros(prefill.prefill_us);
        let measured = context_queue + prefill + decode_room_wait + kv_transfer;
        let other = ttft.checked_sub(measured);
        let parts = TtftParts {
            context_queue,
            prefill,
            decode_room_wait,
            kv_transfer,
            other: other.unwrap_or(Duration::ZERO),
        };
        Some((parts, other.is_none()))
    }
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
            handover: HandoverTiming::default(),
            context_cached_tokens: 0,
            extra_choice: false,
            request: Arc::new(Mutex::new(RequestOutcome {
                live: 1,
                choices: 1,
                ..RequestOutcome::default()
            })),
            adapter: None,
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
            handover: HandoverTiming::default(),
            context_cached_tokens: 0,
            extra_choice: true,
            request: Arc::clone(&self.request),
            adapter: self.adapter.clone(),
        }
    }

    /// The request named LoRA adapter `adapter` (validated: one a live worker serves); set
    /// before the records of its other choices are made.
    pub fn set_adapter(&mut self, adapter: Option<&str>) {
        self.adapter = adapter.map(Arc::from);
    }

    pub fn arrival(&self) -> Instant {
        self.arrival
    }

    /// A context worker's `kv_ready`: a hand-over begins, with the context worker's parts of
    /// the time to first token (`None`: a worker that does not report them) and the prompt
    /// tokens it took from its prefix cache.
    pub(super) fn kv_ready(&mut self, prefill: Option<PrefillTiming>, cached_tokens: u32) {
        self.handover = HandoverTiming {
            prefill,
            pull: None,
        };
        self.context_cached_tokens = cached_tokens;
    }

    /// The decode worker did not pull the K/V (the pull failed, or it refused the handle) and
    /// prefills the prompt itself: its own usage says what it found cached.
    pub(super) fn pull_not_done(&mut self) {
        self.context_cached_tokens = 0;
    }

    /// The request's cached prompt tokens, given the generation worker's count
    /// (`usage.cached_tokens`): those the context worker took from its cache when its K/V was
    /// handed over, else the generation worker's.
    pub(super) fn cached_tokens(&self, generation_worker: u32) -> u32 {
        generation_worker.max(self.context_cached_tokens)
    }

    /// A decode worker's `kv_pulled` after a pull: the wait for room before it (`None`: a
    /// worker that does not report it) and the pull itself.
    pub(super) fn kv_pulled(&mut self, room_wait: Option<Duration>, transfer: Duration) {
        self.handover.pull = room_wait.map(|room_wait| (room_wait, transfer));
    }

    /// The request left the hand-over before its first token (a fallback to a local prefill,
    /// a migration): its first token owes nothing to the parts reported so far.
    pub(super) fn no_handover(&mut self) {
        self.handover = HandoverTiming::default();
        self.context_cached_tokens = 0;
    }

    /// Records the arrival of `count` tokens at once, at `now`.
    pub(super) fn tokens(&mut self, count: usize, now: Instant) {
        if count == 0 {
            return;
        }
        let timing = match self.last_token {
            None => {
                let since_arrival = now.duration_since(self.arrival);
                self.ttft_parts(since_arrival);
                TokenTiming::First { since_arrival }
            }
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

    /// Splits the time to first token `ttft` of a request handed over ([`HandoverTiming`]).
    fn ttft_parts(&mut self, ttft: Duration) {
        let Some((parts, clamped)) = std::mem::take(&mut self.handover).split(ttft) else {
            return;
        };
        if clamped {
            tracing::debug!(
                ?ttft,
                ?parts,
                "the workers' parts of the time to first token \
                exceed it (measured on other clocks): `other` counted as 0"
            );
        }
        self.metrics.record(Event::TtftParts(parts));
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
        self.metrics.record(Event::Finished {
            usage,
            adapter: self.adapter.as_deref(),
        });
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
            adapter: self.adapter.as_deref(),
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

    fn part(text: &str, part: &str, what: &str) -> f64 {
        let series = format!("tandem_ttft_part_seconds_{what}{{part=\"{part}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(series.as_str()))
            .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
            .parse()
            .unwrap()
    }

    const PREFILL: PrefillTiming = PrefillTiming {
        queued_us: 2_000,
        prefill_us: 50_000,
    };

    #[test]
    fn a_handed_over_request_splits_its_time_to_first_token() {
        let metrics = Metrics::new();
        let mut record = RequestRecord::new(metrics.clone(), Endpoint::Chat);
        let arrival = record.arrival();
        record.kv_ready(Some(PREFILL), 0);
        record.kv_pulled(Some(Duration::from_millis(10)), Duration::from_millis(3));
        record.tokens(2, arrival + Duration::from_millis(100));
        // Later tokens change nothing.
        record.tokens(1, arrival + Duration::from_millis(120));
        let text = metrics.render();
        for (name, seconds) in [
            ("context_queue", 0.002),
            ("prefill", 0.05),
            ("decode_room_wait", 0.01),
            ("kv_transfer", 0.003),
            ("other", 0.035),
        ] {
            assert_eq!(part(&text, name, "count"), 1.0, "{name}");
            assert!((part(&text, name, "sum") - seconds).abs() < 1e-9, "{name}");
        }

        // Parts past the time to first token (other clocks): `other` is 0, never negative.
        let metrics = Metrics::new();
        let mut record = RequestRecord::new(metrics.clone(), Endpoint::Chat);
        let arrival = record.arrival();
        record.kv_ready(Some(PREFILL), 0);
        record.kv_pulled(Some(Duration::ZERO), Duration::from_millis(1));
        record.tokens(1, arrival + Duration::from_millis(52));
        let text = metrics.render();
        assert_eq!(part(&text, "other", "count"), 1.0);
        assert_eq!(part(&text, "other", "sum"), 0.0);
        assert!((part(&text, "prefill", "sum") - 0.05).abs() < 1e-9);
    }

    #[test]
    fn requests_without_a_whole_report_of_their_hand_over_are_not_split() {
        let split = |steps: &dyn Fn(&mut RequestRecord)| {
            let metrics = Metrics::new();
            let mut record = RequestRecord::new(metrics.clone(), Endpoint::Chat);
            let arrival = record.arrival();
            steps(&mut record);
            record.tokens(1, arrival + Duration::from_millis(100));
            let text = metrics.render();
            assert_eq!(
                part(&text, "context_queue", "count"),
                part(&text, "other", "count")
            );
            part(&text, "other", "count")
        };
        let ms = Duration::from_millis;
        assert_eq!(split(&|_| {}), 0.0, "a local prefill");
        assert_eq!(
            split(&|r| r.kv_ready(Some(PREFILL), 0)),
            0.0,
            "a failed pull (no kv_pulled with a transport)"
        );
        assert_eq!(
            split(&|r| {
                r.kv_ready(Some(PREFILL), 0);
                r.kv_pulled(Some(ms(1)), ms(1));
                r.no_handover();
            }),
            0.0,
            "a migration after the pull: the first token came from a local prefill"
        );
        assert_eq!(
            split(&|r| {
                r.kv_ready(None, 0);
                r.kv_pulled(Some(ms(1)), ms(1));
            }),
            0.0,
            "a context worker older than prefill_timing"
        );
        assert_eq!(
            split(&|r| {
                r.kv_ready(Some(PREFILL), 0);
                r.kv_pulled(None, ms(1));
            }),
            0.0,
            "a decode worker older than room_wait_us"
        );
        assert_eq!(
            split(&|r| {
                r.kv_ready(Some(PREFILL), 0);
                r.kv_pulled(Some(ms(1)), ms(1));
            }),
            1.0
        );
    }

    #[test]
    fn the_choices_of_a_request_count_it_once_with_the_first_failure_of_any() {
        let usage = Usage {
            prompt_tokens: 10,
            completion_tokens: 4,
            cached_tokens: 0,
            ..Default::default()
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
