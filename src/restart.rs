//! When the launcher starts an exited worker again: at once-ish after a worker that ran for a
//! while (a lost GPU, an OOM kill, a crash under load), with a doubling delay after one that
//! keeps dying soon after it starts, and never again after a run of those (a crash loop: a
//! bad flag, a model that does not load), which is reported instead.

use std::time::Duration;

/// The restart rules.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Delay before the first restart, and after an exit of a worker that ran long enough.
    pub first_delay: Duration,
    /// Longest delay between restarts.
    pub max_delay: Duration,
    /// A worker that ran this long was healthy: its exit starts the count afresh.
    pub healthy_after: Duration,
    /// Quick exits in a row (each before `healthy_after`) after which it is given up; 0: no
    /// restarts at all.
    pub max_quick_exits: u32,
}

impl RestartPolicy {
    /// The launcher's: 1 s, doubling to 30 s; healthy after a minute; five quick exits.
    pub const STANDARD: RestartPolicy = RestartPolicy {
        first_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(30),
        healthy_after: Duration::from_secs(60),
        max_quick_exits: 5,
    };
}

/// What to do after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Start it again after this delay.
    RestartIn(Duration),
    /// It keeps failing right after starting: leave it stopped.
    GiveUp { quick_exits: u32 },
    /// Restarts are off (`max_quick_exits` 0).
    RestartsOff,
}

/// One worker's restart history.
#[derive(Debug, Clone, Default)]
pub struct Restarts {
    /// Restarts so far (for the logs).
    pub total: u32,
    quick_exits: u32,
    next_delay: Option<Duration>,
}

impl Restarts {
    /// The worker exited after running for `ran`.
    pub fn on_exit(&mut self, ran: Duration, policy: &RestartPolicy) -> AfterExit {
        if policy.max_quick_exits == 0 {
            return AfterExit::RestartsOff;
        }
        if ran >= policy.healthy_after {
            self.quick_exits = 0;
            self.next_delay = None;
        }
        self.quick_exits += u32::from(ran < policy.healthy_after);
        if self.quick_exits > policy.max_quick_exits {
            return AfterExit::GiveUp {
                quick_exits: self.quick_exits,
            };
        }
        let delay = self.next_delay.unwrap_or(policy.first_delay);
        self.next_delay = Some((delay * 2).min(policy.max_delay));
        self.total += 1;
        AfterExit::RestartIn(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_secs(2);
    const LONG: Duration = Duration::from_secs(600);

    #[test]
    fn quick_exits_back_off_and_a_crash_loop_is_given_up() {
        let policy = RestartPolicy::STANDARD;
        let mut r = Restarts::default();
        let delays: Vec<AfterExit> = (0..6).map(|_| r.on_exit(SHORT, &policy)).collect();
        let secs = |s| AfterExit::RestartIn(Duration::from_secs(s));
        assert_eq!(
            delays,
            [
                secs(1),
                secs(2),
                secs(4),
                secs(8),
                secs(16),
                AfterExit::GiveUp { quick_exits: 6 }
            ]
        );
        assert_eq!(r.total, 5);
    }

    #[test]
    fn a_worker_that_ran_long_enough_starts_the_count_afresh() {
        let policy = RestartPolicy::STANDARD;
        let mut r = Restarts::default();
        for _ in 0..4 {
            r.on_exit(SHORT, &policy);
        }
        assert_eq!(
            r.on_exit(LONG, &policy),
            AfterExit::RestartIn(Duration::from_secs(1))
        );
        // Five more quick exits are tolerated again, and the delay is capped.
        for _ in 0..5 {
            assert!(
                matches!(r.on_exit(SHORT, &policy), AfterExit::RestartIn(d) if d <= policy.max_delay)
            );
        }
        assert!(matches!(
            r.on_exit(SHORT, &policy),
            AfterExit::GiveUp { .. }
        ));
        assert_eq!(r.total, 10);
    }

    #[test]
    fn zero_quick_exits_turns_restarts_off() {
        let policy = RestartPolicy {
            max_quick_exits: 0,
            ..RestartPolicy::STANDARD
        };
        let mut r = Restarts::default();
        assert_eq!(r.on_exit(LONG, &policy), AfterExit::RestartsOff);
        assert_eq!(r.on_exit(SHORT, &policy), AfterExit::RestartsOff);
        assert_eq!(r.total, 0);
    }
}
