//! Runs of refused requests (429s), for the log: a run is logged as it begins (by its owner,
//! with why), every [`REPORT_EVERY`] while it lasts, and as it ends, when requests are taken
//! again after [`QUIET`] without a refusal. Never once per request: under a sustained overload
//! every freed place takes one request and the next is refused, and a line per request, or a
//! begin and an end per freed place, would flood the log.
//!
//! Imports nothing of the crate.

use std::time::{Duration, Instant};

/// How long without a refusal ends a run.
pub const QUIET: Duration = Duration::from_secs(5);
/// How often a run that lasts says so.
pub const REPORT_EVERY: Duration = Duration::from_secs(30);

/// One kind of refusal (`what`: whose bound refuses, as the log says it) and its run, if one
/// is under way.
#[derive(Debug)]
pub struct RefusalRun {
    what: &'static str,
    run: Option<Run>,
}

#[derive(Debug)]
struct Run {
    began: Instant,
    last_refusal: Instant,
    last_report: Instant,
    refused: u64,
    refused_since_report: u64,
}

impl RefusalRun {
    pub fn new(what: &'static str) -> Self {
        RefusalRun { what, run: None }
    }

    /// A request was refused at `now`; true when that begins a run (the caller logs why).
    pub fn refused(&mut self, now: Instant) -> bool {
        let Some(run) = &mut self.run else {
            self.run = Some(Run {
                began: now,
                last_refusal: now,
                last_report: now,
                refused: 1,
                refused_since_report: 1,
            });
            return true;
        };
        run.refused += 1;
        run.refused_since_report += 1;
        run.last_refusal = now;
        let since_report = now.saturating_duration_since(run.last_report);
        if since_report >= REPORT_EVERY {
            tracing::warn!(
                refused = run.refused_since_report,
                seconds = since_report.as_secs(),
                "{}: still refusing requests (429)",
                self.what
            );
            run.last_report = now;
            run.refused_since_report = 0;
        }
        false
    }

    /// A request was taken at `now`: the run ends when none was refused for [`QUIET`].
    pub fn taken(&mut self, now: Instant) {
        let Some(run) = &self.run else {
            return;
        };
        if now.saturating_duration_since(run.last_refusal) < QUIET {
            return;
        }
        tracing::info!(
            refused = run.refused,
            seconds = run
                .last_refusal
                .saturating_duration_since(run.began)
                .as_secs(),
            "{}: taking requests again",
            self.what
        );
        self.run = None;
    }

    /// Requests refused in the run under way (0: none).
    pub fn refused_in_run(&self) -> u64 {
        self.run.as_ref().map_or(0, |run| run.refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_begins_once_lasts_through_alternating_takes_and_ends_after_a_quiet_spell() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut run = RefusalRun::new("the test's bound");
        assert!(run.refused(at(0)), "the first refusal begins a run");
        // Saturated: each freed place takes one request, the next is refused.
        for i in 1..100 {
            run.taken(at(i * 20));
            assert!(
                !run.refused(at(i * 20 + 10)),
                "refusal {i} is part of the run"
            );
        }
        assert_eq!(run.refused_in_run(), 100);
        // Taken within the quiet spell: still the same run.
        run.taken(at(1990 + QUIET.as_millis() as u64 - 1));
        assert_eq!(run.refused_in_run(), 100);
        // Taken after it: the run ended, and the next refusal begins another.
        run.taken(at(1990 + QUIET.as_millis() as u64));
        assert_eq!(run.refused_in_run(), 0);
        assert!(run.refused(at(10_000)));
        assert_eq!(run.refused_in_run(), 1);
    }
}
