//! Waiting times of an M/D/1 queue: Poisson arrivals at rate λ, one server, a fixed service
//! time D. A context worker is modelled as one (prefills of one prompt length take about the
//! same time), and so is the prefill side of an aggregated worker.
//!
//! The mean wait (Pollaczek–Khinchine, ρ D / (2 (1 - ρ))) hides the tail a TTFT target is about,
//! so the planner asks for a quantile of the wait. It uses the Cramér–Lundberg approximation
//! of the M/G/1 waiting-time tail (Tijms, *A First Course in Stochastic Models*, §2.5):
//!
//! - P(W > t) ≈ c e^(-γ t), where γ > 0 solves λ (E[e^(γS)] - 1) = γ, which for a fixed
//!   service time is ρ (e^x - 1) = x with x = γ D, and c = (1 - ρ) / (λ E[S e^(γS)] - 1)
//!   = (1 - ρ) / (ρ e^x - 1);
//! - P(W > 0) = ρ exactly (an arrival waits only when the server is busy), so when ρ ≤ 1 - q
//!   the q-quantile is 0.
//!
//! Against a simulation of the queue (the tests below), the 0.9-quantile is within a few per
//! cent from ρ = 0.2 to 0.95.

/// The `quantile` (in (0, 1)) of the waiting time, in seconds, of an M/D/1 queue with
/// arrivals at `rate` per second and a service time of `service_s`; `None` when the queue is
/// unstable (ρ = rate × service_s ≥ 1) and waits grow without bound.
pub fn md1_wait_quantile(rate: f64, service_s: f64, quantile: f64) -> Option<f64> {
    let rho = rate * service_s;
    if rho.is_nan() || rho >= 1.0 {
        return None;
    }
    if rho <= 1.0 - quantile || rho <= 0.0 {
        return Some(0.0);
    }
    let x = decay_root(rho);
    let gamma = x / service_s;
    let c = (1.0 - rho) / (rho * x.exp() - 1.0);
    Some(((c / (1.0 - quantile)).ln() / gamma).max(0.0))
}

/// The positive root x of ρ (e^x - 1) = x, for 0 < ρ < 1. The left side minus the right is 0
/// at 0, falls first (slope ρ - 1) and is convex, so it has exactly one positive root;
/// bisection between 0 and a doubling bound finds it to machine precision.
fn decay_root(rho: f64) -> f64 {
    let f = |x: f64| rho * x.exp_m1() - x;
    let mut hi = 1.0;
    while f(hi) <= 0.0 {
        hi *= 2.0;
    }
    let mut lo = 0.0;
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if f(mid) > 0.0 {
            hi = mid;
        } else {
            lo = mid;
        }
        if hi - lo <= f64::EPSILON * hi {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// The highest arrival rate (per second) at which the `quantile` of the wait stays within
/// `budget_s`, for a fixed service time `service_s`; 0 when the budget is negative. The
/// quantile grows with the rate, so bisection over (0, 1 / service_s) finds it.
pub fn md1_max_rate(service_s: f64, quantile: f64, budget_s: f64) -> f64 {
    if budget_s < 0.0 || service_s <= 0.0 {
        return 0.0;
    }
    let meets =
        |rate: f64| md1_wait_quantile(rate, service_s, quantile).is_some_and(|w| w <= budget_s);
    let (mut lo, mut hi) = (0.0, 1.0 / service_s);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if meets(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// An M/D/1/K queue: Poisson arrivals at `rate`, one server with a fixed service time, at
/// most `capacity` requests in it (the one served included); an arrival that finds it full
/// goes elsewhere. A context worker whose queue is bounded is one: the prompts it turns away
/// are prefilled by decode workers (conditional disaggregation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoundedQueue {
    /// The share of arrivals turned away.
    pub overflow: f64,
    /// The quantile of the wait of those taken, in seconds.
    pub wait_s: f64,
}

/// Arrivals the bounded queue is simulated over: enough for a 0.9-quantile within a few per
/// cent, few enough for a planner that simulates it for every rate it tries.
const BOUNDED_ARRIVALS: usize = 20_000;

/// [`BoundedQueue`] for `rate` per second, `service_s` and `capacity`, by simulation (no
/// closed form is as simple; the seed is fixed, so the same inputs give the same answer).
pub fn bounded_queue(rate: f64, service_s: f64, capacity: usize, quantile: f64) -> BoundedQueue {
    if rate <= 0.0 || capacity == 0 {
        return BoundedQueue {
            overflow: if capacity == 0 { 1.0 } else { 0.0 },
            wait_s: 0.0,
        };
    }
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    // splitmix64: a fixed, dependency-free stream of uniform draws.
    let mut uniform = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    // Departure times of the requests in the queue, oldest first.
    let mut departures = std::collections::VecDeque::with_capacity(capacity);
    let mut waits = Vec::with_capacity(BOUNDED_ARRIVALS);
    let (mut now, mut turned_away) = (0.0_f64, 0usize);
    for _ in 0..BOUNDED_ARRIVALS {
        now += -uniform().ln() / rate;
        while departures.front().is_some_and(|&d| d <= now) {
            departures.pop_front();
        }
        if departures.len() >= capacity {
            turned_away += 1;
            continue;
        }
        let start = departures.back().map_or(now, |&d: &f64| d.max(now));
        waits.push(start - now);
        departures.push_back(start + service_s);
    }
    waits.sort_by(f64::total_cmp);
    let wait_s = waits
        .get(((quantile * waits.len() as f64) as usize).min(waits.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0);
    BoundedQueue {
        overflow: turned_away as f64 / BOUNDED_ARRIVALS as f64,
        wait_s,
    }
}

/// The smallest k with P(N ≤ k) ≥ `quantile` for N Poisson with `mean`.
pub fn poisson_quantile(mean: f64, quantile: f64) -> usize {
    if mean <= 0.0 {
        return 0;
    }
    let (mut k, mut term) = (0usize, (-mean).exp());
    let mut cdf = term;
    while cdf < quantile && k < 10_000 {
        k += 1;
        term *= mean / k as f64;
        cdf += term;
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::{Rng, SeedableRng};

    /// The `quantile` of the wait in a simulated M/D/1 queue (Lindley's recursion).
    fn simulated_quantile(rho: f64, service_s: f64, quantile: f64) -> f64 {
        let rate = rho / service_s;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut wait = 0.0_f64;
        let mut waits = Vec::with_capacity(200_000);
        for _ in 0..200_000 {
            waits.push(wait);
            let u = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            let gap = -u.ln() / rate;
            wait = (wait + service_s - gap).max(0.0);
        }
        waits.sort_by(f64::total_cmp);
        waits[(quantile * waits.len() as f64) as usize]
    }

    #[test]
    fn the_tail_approximation_matches_a_simulated_queue() {
        for rho in [0.2, 0.5, 0.8, 0.9, 0.95] {
            for quantile in [0.5, 0.9] {
                let approx = md1_wait_quantile(rho / 0.25, 0.25, quantile).unwrap();
                let simulated = simulated_quantile(rho, 0.25, quantile);
                let tolerance = 0.02 + 0.06 * simulated;
                assert!(
                    (approx - simulated).abs() <= tolerance,
                    "rho {rho} q {quantile}: approx {approx:.4} s, simulated {simulated:.4} s"
                );
            }
        }
    }

    #[test]
    fn light_load_waits_nothing_at_the_quantile_and_overload_has_no_quantile() {
        // 30% busy: 70% of arrivals find the server idle, so the median wait is 0.
        assert_eq!(md1_wait_quantile(0.3, 1.0, 0.5), Some(0.0));
        assert_eq!(md1_wait_quantile(0.0, 1.0, 0.9), Some(0.0));
        assert_eq!(md1_wait_quantile(1.0, 1.0, 0.9), None);
        assert_eq!(md1_wait_quantile(2.0, 1.0, 0.9), None);
    }

    #[test]
    fn poisson_quantiles() {
        assert_eq!(poisson_quantile(0.0, 0.9), 0);
        // Mean 1: P(N <= 1) = 0.736, P(N <= 2) = 0.920.
        assert_eq!(poisson_quantile(1.0, 0.9), 2);
        assert_eq!(poisson_quantile(1.0, 0.7), 1);
        // Mean 4: P(N <= 6) = 0.889, P(N <= 7) = 0.949.
        assert_eq!(poisson_quantile(4.0, 0.9), 7);
    }

    #[test]
    fn a_bounded_queue_turns_away_what_it_cannot_hold_and_bounds_the_wait() {
        // M/D/1/1 is Erlang's loss system: the share turned away is rho / (1 + rho).
        let q = bounded_queue(1.0, 1.0, 1, 0.9);
        assert!((q.overflow - 0.5).abs() < 0.02, "{q:?}");
        assert_eq!(q.wait_s, 0.0);
        // Room for 3: nobody waits more than two service times.
        let q = bounded_queue(2.0, 0.4, 3, 0.99);
        assert!(q.wait_s <= 0.8 + 1e-9 && q.wait_s > 0.4, "{q:?}");
        // More room turns fewer away; a light load turns almost none away.
        assert!(
            bounded_queue(2.0, 0.4, 5, 0.9).overflow < bounded_queue(2.0, 0.4, 3, 0.9).overflow
        );
        assert!(bounded_queue(0.2, 0.4, 3, 0.9).overflow < 0.001);
        // Overloaded, it serves at its capacity and turns the rest away.
        let q = bounded_queue(10.0, 0.5, 4, 0.9);
        assert!((q.overflow - 0.8).abs() < 0.02, "{q:?}");
        // Unbounded queues are the M/D/1 above: a large bound matches its quantile.
        let big = bounded_queue(1.6, 0.5, 1000, 0.9);
        let md1 = md1_wait_quantile(1.6, 0.5, 0.9).unwrap();
        assert!(
            big.overflow == 0.0 && (big.wait_s - md1).abs() < 0.1 * md1,
            "{big:?} vs {md1}"
        );
    }

    #[test]
    fn the_max_rate_is_where_the_quantile_meets_the_budget() {
        let rate = md1_max_rate(0.2, 0.9, 1.0);
        assert!(rate > 0.0 && rate < 5.0);
        let wait = md1_wait_quantile(rate, 0.2, 0.9).unwrap();
        assert!((wait - 1.0).abs() < 1e-6, "{wait}");
        // A bigger budget admits more, never reaching the server's capacity.
        assert!(md1_max_rate(0.2, 0.9, 10.0) > rate);
        assert!(md1_max_rate(0.2, 0.9, 10.0) < 5.0);
        // No budget: only rates whose quantile is 0 (rho <= 0.1 for the 0.9-quantile).
        assert!((md1_max_rate(0.2, 0.9, 0.0) - 0.5).abs() < 1e-6);
        assert_eq!(md1_max_rate(0.2, 0.9, -0.1), 0.0);
    }
}
