//! When a level's arrivals start: a fixed number in flight, or a Poisson process capped in
//! flight. An arrival is whatever the workload starts as one unit (a request, or a whole
//! conversation); each runs on a thread of its own and records its replies in [`Results`].
//! Poisson arrival times are reproducible from a seed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use crate::openai_client::Reply;

/// One level: how many arrivals in flight, and the arrival rate if Poisson.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Level {
    pub concurrency: usize,
    /// Arrivals per second.
    pub rate: Option<f64>,
}

/// Runs `arrive(i)` for every `i` in `0..count`, at most `level.concurrency` at a time, at
/// Poisson arrival times (reproducible from `seed`) if the level has a rate, else each as soon
/// as an earlier one ends; returns when all have ended.
pub fn run(count: usize, level: Level, seed: u64, arrive: impl Fn(usize) + Sync) {
    let arrive = &arrive;
    match level.rate {
        None => {
            let next = AtomicUsize::new(0);
            std::thread::scope(|scope| {
                for _ in 0..level.concurrency.min(count) {
                    scope.spawn(|| {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= count {
                                break;
                            }
                            arrive(i);
                        }
                    });
                }
            });
        }
        Some(rate) => {
            let gaps = poisson_gaps(count, rate, seed);
            let in_flight = (Mutex::new(0usize), Condvar::new());
            let start = Instant::now();
            std::thread::scope(|scope| {
                let mut at = 0.0;
                for (i, gap) in gaps.iter().enumerate() {
                    at += gap;
                    let due = start + Duration::from_secs_f64(at);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    // Cap arrivals in flight: wait for one to end.
                    let (count, freed) = &in_flight;
                    let mut n = count.lock().unwrap_or_else(|p| p.into_inner());
                    while *n >= level.concurrency {
                        n = freed.wait(n).unwrap_or_else(|p| p.into_inner());
                    }
                    *n += 1;
                    drop(n);
                    let in_flight = &in_flight;
                    scope.spawn(move || {
                        arrive(i);
                        let (count, freed) = in_flight;
                        *count.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
                        freed.notify_one();
                    });
                }
            });
        }
    }
}

/// Exponential gaps between arrivals of a Poisson process of `rate` requests per second.
pub fn poisson_gaps(count: usize, rate: f64, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            // Uniform in (0, 1]: never ln(0).
            let u = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            -u.ln() / rate
        })
        .collect()
}

/// A level's replies (errors as strings), one slot per request, filled in by the threads that
/// send them.
pub struct Results(Vec<Mutex<Option<Result<Reply, String>>>>);

impl Results {
    pub fn new(requests: usize) -> Self {
        Results((0..requests).map(|_| Mutex::new(None)).collect())
    }

    pub fn set(&self, request: usize, result: Result<Reply, String>) {
        *self.0[request].lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
    }

    /// The replies in request order; a slot never filled in is an error.
    pub fn into_vec(self) -> Vec<Result<Reply, String>> {
        self.0
            .into_iter()
            .map(|r| {
                r.into_inner()
                    .unwrap_or_else(|p| p.into_inner())
                    .unwrap_or_else(|| Err("not sent".to_owned()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_gaps_average_one_over_the_rate() {
        let gaps = poisson_gaps(20_000, 4.0, 7);
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        assert!((mean - 0.25).abs() < 0.01, "mean gap {mean}");
        assert!(gaps.iter().all(|&g| g > 0.0));
        assert_eq!(gaps[..5], poisson_gaps(5, 4.0, 7)[..]);
    }

    #[test]
    fn every_arrival_runs_once_within_the_cap() {
        for level in [
            Level {
                concurrency: 3,
                rate: None,
            },
            Level {
                concurrency: 2,
                rate: Some(500.0),
            },
        ] {
            let runs: Vec<AtomicUsize> = (0..10).map(|_| AtomicUsize::new(0)).collect();
            let (now, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
            run(10, level, 1, |i| {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(n, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
                runs[i].fetch_add(1, Ordering::SeqCst);
                now.fetch_sub(1, Ordering::SeqCst);
            });
            assert!(
                runs.iter().all(|r| r.load(Ordering::SeqCst) == 1),
                "{level:?}"
            );
            assert!(
                most.load(Ordering::SeqCst) <= level.concurrency,
                "{level:?}"
            );
        }
    }

    #[test]
    fn results_keep_request_order_and_name_what_was_never_sent() {
        let results = Results::new(3);
        results.set(2, Err("HTTP 500: boom".to_owned()));
        results.set(0, Ok(Reply::default()));
        let all = results.into_vec();
        assert!(all[0].is_ok());
        assert_eq!(all[1].as_ref().unwrap_err(), "not sent");
        assert_eq!(all[2].as_ref().unwrap_err(), "HTTP 500: boom");
    }
}
