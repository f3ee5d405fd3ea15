//! The results table on stdout: one row per level, then its errors, its prefix-cache hits by
//! turn (multi-turn) and what the server counted.

use super::metrics::{PromptCache, Summary, TtftByTurn};
use crate::openai_client::Endpoint;

/// Prints the table. `workload` describes it in a few words; `rate_unit` is what a level's
/// rate counts per second (`req/s`, or `conv/s` where arrivals are conversations).
pub fn print_table(
    model: &str,
    url: &str,
    endpoint: Endpoint,
    workload: &str,
    rate_unit: &str,
    levels: &[Summary],
) {
    println!(
        "tandem bench: {model} at {url}, endpoint {}, {workload}",
        endpoint.path()
    );
    println!(
        "{:>12} {:>6} {:>6} {:>8} {:>10} {:>10} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>9} {:>7}",
        "level",
        "ok",
        "failed",
        "req/s",
        "out tok/s",
        "goodput",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "TPOT p50",
        "E2E p50",
        "E2E p99",
        "cached"
    );
    for s in levels {
        let level = match s.request_rate {
            Some(r) => format!("{r} {rate_unit}"),
            None => format!("c={}", s.concurrency),
        };
        println!(
            "{:>12} {:>6} {:>6} {:>8.2} {:>10.1} {:>10.2} {:>9.1} {:>9.1} {:>8.1} {:>8.1} {:>9.1} {:>9.1} {:>9.1} {:>7}",
            level,
            s.completed,
            s.failed,
            s.request_throughput,
            s.output_token_throughput,
            s.goodput,
            s.ttft_ms.p50,
            s.ttft_ms.p99,
            s.itl_ms.p50,
            s.itl_ms.p99,
            s.tpot_ms.p50,
            s.e2e_ms.p50,
            s.e2e_ms.p99,
            cached_share(s.prompt_cache.as_ref())
        );
        for e in &s.errors {
            println!("{:>12} error: {e}", "");
        }
        if let Some(turns) = &s.ttft_ms_by_turn {
            println!("{:>12} turns: {}", "", turns_line(turns));
        }
        if let Some(server) = &s.server {
            println!("{:>12} server: {}", "", server.line());
        }
    }
    println!(
        "(latencies in ms; goodput in requests/s; cached: prompt tokens the server reported \
         served from its prefix cache, - where it does not say)"
    );
}

/// The cached share of the prompt tokens, or `-` where the server did not say (never 0%:
/// that would claim a cache that missed).
fn cached_share(cache: Option<&PromptCache>) -> String {
    match cache {
        Some(cache) => format!("{:.1}%", cache.hit_rate * 100.0),
        None => "-".to_owned(),
    }
}

/// TTFT of first turns against later ones, then each turn's p50.
fn turns_line(turns: &TtftByTurn) -> String {
    let each: Vec<String> = turns
        .turns
        .iter()
        .enumerate()
        .map(|(i, d)| format!("{} {:.1}", i + 1, d.p50))
        .collect();
    format!(
        "TTFT p50 / p99 first turn {:.1} / {:.1}, later turns {:.1} / {:.1}; p50 by turn: {}",
        turns.first_turn.p50,
        turns.first_turn.p99,
        turns.later_turns.p50,
        turns.later_turns.p99,
        each.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::metrics::Distribution;

    #[test]
    fn an_unreported_cache_is_a_dash_not_zero() {
        assert_eq!(cached_share(None), "-");
        let cache = PromptCache {
            replies: 2,
            cached_tokens: 0,
            prompt_tokens: 400,
            hit_rate: 0.0,
        };
        assert_eq!(cached_share(Some(&cache)), "0.0%");
        let cache = PromptCache {
            cached_tokens: 256,
            hit_rate: 0.64,
            ..cache
        };
        assert_eq!(cached_share(Some(&cache)), "64.0%");
    }

    #[test]
    fn the_turns_line_puts_first_turns_before_later_ones() {
        let at = |p50| Distribution {
            mean: p50,
            p50,
            p90: p50,
            p99: p50 * 2.0,
        };
        let turns = TtftByTurn {
            first_turn: at(400.0),
            later_turns: at(90.0),
            turns: vec![at(400.0), at(100.0), at(80.0)],
        };
        assert_eq!(
            turns_line(&turns),
            "TTFT p50 / p99 first turn 400.0 / 800.0, later turns 90.0 / 180.0; p50 by turn: \
             1 400.0, 2 100.0, 3 80.0"
        );
    }
}
