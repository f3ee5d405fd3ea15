//! Which inter-token gaps of a set of concurrent streams measure what: the steady state of a
//! decode batch (every sequence past its prefill, none finished), or the steps taken while
//! something else (a burst of prefills) ran. Pure functions of the streams' token arrival
//! times, in seconds since one common instant.

/// Arrival times of one stream's tokens, ascending, in seconds since a common epoch.
pub type Timeline = Vec<f64>;

/// The interval in which every stream had its first token and none had its last: while all
/// of them decoded together. `None` if there is no such interval (or no streams).
pub fn steady_interval(streams: &[Timeline]) -> Option<(f64, f64)> {
    let start = streams
        .iter()
        .map(|s| s.first().copied())
        .try_fold(f64::NEG_INFINITY, |acc, t| t.map(|t| acc.max(t)))?;
    let end = streams
        .iter()
        .map(|s| s.last().copied())
        .try_fold(f64::INFINITY, |acc, t| t.map(|t| acc.min(t)))?;
    (!streams.is_empty() && start < end).then_some((start, end))
}

/// Gaps (in ms) between consecutive tokens of each stream that both arrived within
/// `[from, to]`.
pub fn gaps_within(streams: &[Timeline], from: f64, to: f64) -> Vec<f64> {
    streams
        .iter()
        .flat_map(|s| s.windows(2))
        .filter(|w| w[0] >= from && w[1] <= to)
        .map(|w| (w[1] - w[0]) * 1e3)
        .collect()
}

/// The steady-state gaps of a decode batch (see [`steady_interval`]), in ms.
pub fn steady_gaps(streams: &[Timeline]) -> Vec<f64> {
    steady_interval(streams).map_or_else(Vec::new, |(from, to)| gaps_within(streams, from, to))
}

/// The median and the 0.9-quantile (nearest rank) of `values`; `None` when empty.
pub fn median_and_p90(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at =
        |q: f64| sorted[((q * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1)];
    Some((at(0.5), at(0.9)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steady_state_starts_at_the_last_first_token_and_ends_at_the_first_last_one() {
        // Stream a starts early (its first gaps overlap b's prefill) and ends first.
        let a = vec![0.0, 0.5, 0.6, 0.7, 0.8];
        let b = vec![0.45, 0.55, 0.65, 0.75, 0.85, 0.95];
        let streams = [a, b];
        assert_eq!(steady_interval(&streams), Some((0.45, 0.8)));
        let gaps = steady_gaps(&streams);
        // a: 0.5-0.6, 0.6-0.7, 0.7-0.8; b: 0.45-0.55, 0.55-0.65, 0.65-0.75 (0.75-0.85 ends late).
        assert_eq!(gaps.len(), 6);
        assert!(gaps.iter().all(|g| (g - 100.0).abs() < 1e-9), "{gaps:?}");
    }

    #[test]
    fn streams_that_never_overlap_have_no_steady_state() {
        let streams = [vec![0.0, 0.1], vec![0.2, 0.3]];
        assert_eq!(steady_interval(&streams), None);
        assert!(steady_gaps(&streams).is_empty());
        assert_eq!(steady_interval(&[]), None);
        assert_eq!(steady_interval(&[vec![]]), None);
    }

    #[test]
    fn gaps_within_an_interval_keep_both_ends_inside() {
        let streams = [vec![0.0, 1.0, 2.0, 3.0]];
        assert_eq!(gaps_within(&streams, 0.5, 3.0), [1000.0, 1000.0]);
        assert!(gaps_within(&streams, 0.5, 1.5).is_empty());
    }

    #[test]
    fn median_and_p90_by_nearest_rank() {
        let values: Vec<f64> = (1..=11).map(f64::from).collect();
        assert_eq!(median_and_p90(&values), Some((6.0, 10.0)));
        assert_eq!(median_and_p90(&[]), None);
        assert_eq!(median_and_p90(&[4.0]), Some((4.0, 4.0)));
    }
}
