//! Where the engine thread's time goes, summed over a window and logged once per window.
//!
//! One line per interval ([`super::EngineSettings::log_interval`]) while there is work, in
//! the spirit of vLLM's periodic throughput line, so an operator (and a benchmark) can read
//! from the log how busy the worker is and whether a step is bound by the device or by the
//! host work around it:
//!
//! ```text
//! engine: 312 steps in 10.0 s; 7.9k decode + 2.1k prompt tokens/s; 245 sequences per step;
//! step 32.1 ms = schedule 0.8 + enqueue 1.9 + device 26.2 + sample 2.6 + deliver 0.6; 0 preempted;
//! 298 overlapped
//! ```
//!
//! - `schedule`: cancellations, admissions, the scheduler's decision, the batch.
//! - `enqueue`: the forward pass until its kernels are queued (host work of the backend: batch
//!   upload, graph launch; on the CPU backend this is the whole forward pass).
//! - `device`: from then until the sampling summaries are on the host (the device finishing
//!   the step). Both come from [`ForwardTiming`]; a model without one counts all as `enqueue`.
//!   In an overlapped step ([`super::overlap`]) it is the wait for the previous step's
//!   summaries, while this step's pass is queued behind it.
//! - `sample`: turning summaries or logits rows into tokens, detokenizing, stop checks, events.
//! - `deliver`: handing the events to the requests' sinks (the engine thread's side of the bus).
//! - `overlapped`: steps left in flight, the next one queued before they were read.

use std::time::{Duration, Instant};

/// How long one forward pass spent queueing its work and then waiting for the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardTiming {
    pub enqueue: Duration,
    pub device: Duration,
}

/// The engine's phases, summed over the current window.
#[derive(Debug)]
pub struct StepProfile {
    interval: Duration,
    window_start: Instant,
    steps: u64,
    decode_tokens: u64,
    prompt_tokens: u64,
    sequences: u64,
    preempted: u64,
    overlapped: u64,
    schedule: Duration,
    enqueue: Duration,
    device: Duration,
    sample: Duration,
    deliver: Duration,
}

/// What one step did, for [`StepProfile::record_step`].
#[derive(Debug, Clone, Copy, Default)]
pub struct StepRecord {
    pub decode_tokens: usize,
    pub prompt_tokens: usize,
    pub sequences: usize,
    pub preempted: usize,
    /// The step was left in flight ([`super::overlap`]).
    pub overlapped: bool,
    pub schedule: Duration,
    pub forward: ForwardTiming,
    pub sample: Duration,
}

impl StepProfile {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            window_start: Instant::now(),
            steps: 0,
            decode_tokens: 0,
            prompt_tokens: 0,
            sequences: 0,
            preempted: 0,
            overlapped: 0,
            schedule: Duration::ZERO,
            enqueue: Duration::ZERO,
            device: Duration::ZERO,
            sample: Duration::ZERO,
            deliver: Duration::ZERO,
        }
    }

    pub fn record_step(&mut self, step: &StepRecord) {
        self.steps += 1;
        self.decode_tokens += step.decode_tokens as u64;
        self.prompt_tokens += step.prompt_tokens as u64;
        self.sequences += step.sequences as u64;
        self.preempted += step.preempted as u64;
        self.overlapped += u64::from(step.overlapped);
        self.schedule += step.schedule;
        self.enqueue += step.forward.enqueue;
        self.device += step.forward.device;
        self.sample += step.sample;
    }

    pub fn record_delivery(&mut self, took: Duration) {
        self.deliver += took;
    }

    /// The window's summary line once the interval has passed (and the window restarts);
    /// `None` before, or when the window saw no step (an idle engine logs nothing).
    pub fn take_summary(&mut self, now: Instant) -> Option<String> {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed < self.interval {
            return None;
        }
        let line = (self.steps > 0).then(|| self.summary(elapsed));
        *self = Self::new(self.interval);
        self.window_start = now;
        line
    }

    fn summary(&self, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let steps = self.steps as f64;
        let per_step = |d: Duration| d.as_secs_f64() * 1e3 / steps;
        let total = self.schedule + self.enqueue + self.device + self.sample + self.deliver;
        format!(
            "engine: {} steps in {:.1} s; {} decode + {} prompt tokens/s; {:.0} sequences per \
             step; step {:.1} ms = schedule {:.1} + enqueue {:.1} + device {:.1} + sample {:.1} \
             + deliver {:.1}; {} preempted; {} overlapped",
            self.steps,
            secs,
            per_second(self.decode_tokens, secs),
            per_second(self.prompt_tokens, secs),
            self.sequences as f64 / steps,
            per_step(total),
            per_step(self.schedule),
            per_step(self.enqueue),
            per_step(self.device),
            per_step(self.sample),
            per_step(self.deliver),
            self.preempted,
            self.overlapped,
        )
    }
}

/// `1234.5` → `"1.2k"`, below 1000 as a whole number.
fn per_second(count: u64, secs: f64) -> String {
    let rate = count as f64 / secs;
    if rate >= 1000.0 {
        format!("{:.1}k", rate / 1000.0)
    } else {
        format!("{rate:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_window_sums_its_steps_and_restarts_after_the_line() {
        let mut profile = StepProfile::new(Duration::from_secs(10));
        let start = profile.window_start;
        let step = StepRecord {
            decode_tokens: 200,
            prompt_tokens: 100,
            sequences: 201,
            preempted: 1,
            overlapped: true,
            schedule: ms(1),
            forward: ForwardTiming {
                enqueue: ms(2),
                device: ms(20),
            },
            sample: ms(3),
        };
        profile.record_step(&step);
        profile.record_step(&step);
        profile.record_delivery(ms(8));
        assert_eq!(profile.take_summary(start + Duration::from_secs(5)), None);
        let line = profile
            .take_summary(start + Duration::from_secs(10))
            .expect("a line once the interval has passed");
        assert_eq!(
            line,
            "engine: 2 steps in 10.0 s; 40 decode + 20 prompt tokens/s; 201 sequences per \
             step; step 30.0 ms = schedule 1.0 + enqueue 2.0 + device 20.0 + sample 3.0 + \
             deliver 4.0; 2 preempted; 2 overlapped"
        );
        assert_eq!(profile.steps, 0);
        assert_eq!(profile.take_summary(start + Duration::from_secs(25)), None);
    }

    #[test]
    fn an_idle_window_logs_nothing() {
        let mut profile = StepProfile::new(Duration::from_secs(1));
        let later = profile.window_start + Duration::from_secs(2);
        assert_eq!(profile.take_summary(later), None);
    }

    #[test]
    fn rates_in_thousands_read_as_k() {
        assert_eq!(per_second(12_345, 1.0), "12.3k");
        assert_eq!(per_second(999, 1.0), "999");
    }
}
