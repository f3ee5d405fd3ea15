//! Latency and throughput statistics of one benchmark level.

use serde::Serialize;

use crate::openai_client::Reply;

/// Mean and percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Distribution {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Distribution {
    /// Percentiles by linear interpolation between closest ranks (numpy's default); all zero
    /// for no samples.
    pub fn of(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let pos = q * (sorted.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
        };
        Distribution {
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
        }
    }
}

/// Service-level limits for goodput: a request counts when its time to first token and its
/// mean inter-token latency are both within them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub itl_ms: Option<f64>,
}

impl std::str::FromStr for Slo {
    type Err = String;

    /// `ttft:500,itl:50` (either part optional).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut slo = Slo::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once(':')
                .ok_or_else(|| format!("`{part}`: expected KEY:MILLISECONDS"))?;
            let ms: f64 = value
                .parse()
                .ok()
                .filter(|v: &f64| *v > 0.0)
                .ok_or_else(|| format!("`{part}`: {value} is not a positive number of ms"))?;
            match key {
                "ttft" => slo.ttft_ms = Some(ms),
                "itl" => slo.itl_ms = Some(ms),
                _ => return Err(format!("`{key}`: known limits are ttft and itl")),
            }
        }
        Ok(slo)
    }
}

/// One level's results.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Requests in flight at most (multi-turn: conversations).
    pub concurrency: usize,
    /// Arrivals per second of the Poisson process, if any: requests, or conversations for
    /// the multi-turn workload.
    pub request_rate: Option<f64>,
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    /// First few error messages.
    pub errors: Vec<String>,
    pub duration_s: f64,
    pub request_throughput: f64,
    pub output_token_throughput: f64,
    pub total_token_throughput: f64,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub ttft_ms: Distribution,
    /// Gaps between consecutive streamed pieces of text, over all requests.
    pub itl_ms: Distribution,
    /// Time per output token after the first, per request: (e2e - ttft) / (tokens - 1).
    pub tpot_ms: Distribution,
    pub e2e_ms: Distribution,
    pub slo: Slo,
    /// Completed requests per second that met `slo` (all completed ones without limits).
    pub goodput: f64,
    /// Prompt tokens the server served from its prefix cache; `None` when no reply said.
    pub prompt_cache: Option<PromptCache>,
    /// Multi-turn only: time to first token of first turns apart from later ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms_by_turn: Option<TtftByTurn>,
    /// What the server counted during the level (tandem's `/metrics`); `None` for a server
    /// without them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<super::server::Delta>,
}

/// What the server's prefix cache served, from the replies whose usage gave
/// `prompt_tokens_details.cached_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PromptCache {
    /// Replies that gave the count.
    pub replies: usize,
    pub cached_tokens: u64,
    /// Prompt tokens of those replies.
    pub prompt_tokens: u64,
    /// `cached_tokens / prompt_tokens`.
    pub hit_rate: f64,
}

impl PromptCache {
    /// Over the replies that gave a cached count; `None` when none did (the server does not
    /// report it, which says nothing about its cache).
    pub fn of(replies: &[&Reply]) -> Option<Self> {
        let reporting: Vec<&&Reply> = replies
            .iter()
            .filter(|r| r.cached_tokens.is_some())
            .collect();
        if reporting.is_empty() {
            return None;
        }
        let cached_tokens = reporting.iter().filter_map(|r| r.cached_tokens).sum();
        let prompt_tokens = reporting.iter().filter_map(|r| r.prompt_tokens).sum();
        Some(PromptCache {
            replies: reporting.len(),
            cached_tokens,
            prompt_tokens,
            hit_rate: if prompt_tokens > 0 {
                cached_tokens as f64 / prompt_tokens as f64
            } else {
                0.0
            },
        })
    }
}

/// Time to first token by turn of a multi-turn level: a first turn has no history to find in
/// a cache (only what other conversations left), a later turn's prompt extends the last.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TtftByTurn {
    pub first_turn: Distribution,
    pub later_turns: Distribution,
    /// Each turn's, first to last.
    pub turns: Vec<Distribution>,
}

impl TtftByTurn {
    /// From a level's replies in conversation order, `turns` per conversation (request `i` is
    /// turn `i % turns`); failed requests have no TTFT.
    pub fn of(replies: &[Result<Reply, String>], turns: usize) -> Self {
        let turns = turns.max(1);
        let mut by_turn: Vec<Vec<f64>> = vec![Vec::new(); turns];
        for (i, reply) in replies.iter().enumerate() {
            if let Some(ttft) = reply.as_ref().ok().and_then(Reply::ttft) {
                by_turn[i % turns].push(ttft.as_secs_f64() * 1e3);
            }
        }
        let later: Vec<f64> = by_turn[1..].concat();
        TtftByTurn {
            first_turn: Distribution::of(&by_turn[0]),
            later_turns: Distribution::of(&later),
            turns: by_turn.iter().map(|t| Distribution::of(t)).collect(),
        }
    }
}

/// Summarizes `replies` (errors as strings) of a level that took `duration_s`.
pub fn summarize(
    concurrency: usize,
    request_rate: Option<f64>,
    replies: &[Result<Reply, String>],
    duration_s: f64,
    slo: Slo,
) -> Summary {
    let ok: Vec<&Reply> = replies.iter().filter_map(|r| r.as_ref().ok()).collect();
    let errors: Vec<String> = replies
        .iter()
        .filter_map(|r| r.as_ref().err().cloned())
        .collect();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft()).map(ms).collect();
    let e2e: Vec<f64> = ok.iter().map(|r| ms(r.total)).collect();
    let mut itl = Vec::new();
    let mut tpot = Vec::new();
    let mut good = 0usize;
    for r in &ok {
        let gaps: Vec<f64> = r.token_times.windows(2).map(|w| ms(w[1] - w[0])).collect();
        let mean_gap = (!gaps.is_empty()).then(|| gaps.iter().sum::<f64>() / gaps.len() as f64);
        itl.extend_from_slice(&gaps);
        let tokens = r.output_tokens();
        if tokens > 1
            && let Some(first) = r.ttft()
        {
            tpot.push((ms(r.total) - ms(first)) / (tokens - 1) as f64);
        }
        let ttft_ok = match (slo.ttft_ms, r.ttft()) {
            (Some(limit), Some(t)) => ms(t) <= limit,
            (Some(_), None) => false,
            (None, _) => true,
        };
        let itl_ok = match (slo.itl_ms, mean_gap) {
            (Some(limit), Some(g)) => g <= limit,
            _ => true,
        };
        good += usize::from(ttft_ok && itl_ok);
    }
    let prompt_tokens: u64 = ok.iter().filter_map(|r| r.prompt_tokens).sum();
    let output_tokens: u64 = ok.iter().map(|r| r.output_tokens()).sum();
    let per_s = |n: f64| {
        if duration_s > 0.0 {
            n / duration_s
        } else {
            0.0
        }
    };
    Summary {
        concurrency,
        request_rate,
        requests: replies.len(),
        completed: ok.len(),
        failed: errors.len(),
        errors: errors.into_iter().take(5).collect(),
        duration_s,
        request_throughput: per_s(ok.len() as f64),
        output_token_throughput: per_s(output_tokens as f64),
        total_token_throughput: per_s((prompt_tokens + output_tokens) as f64),
        prompt_tokens,
        output_tokens,
        ttft_ms: Distribution::of(&ttft),
        itl_ms: Distribution::of(&itl),
        tpot_ms: Distribution::of(&tpot),
        e2e_ms: Distribution::of(&e2e),
        slo,
        goodput: per_s(good as f64),
        prompt_cache: PromptCache::of(&ok),
        ttft_ms_by_turn: None,
        server: None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let d = Distribution::of(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]);
        assert_eq!(d.mean, 5.5);
        assert!((d.p50 - 5.5).abs() < 1e-12);
        assert!((d.p90 - 9.1).abs() < 1e-12);
        assert!((d.p99 - 9.91).abs() < 1e-12);
        assert_eq!(Distribution::of(&[]), Distribution::default());
        assert_eq!(Distribution::of(&[3.0]).p99, 3.0);
    }

    fn reply(times_ms: &[u64], total_ms: u64) -> Reply {
        Reply {
            token_times: times_ms.iter().map(|&t| Duration::from_millis(t)).collect(),
            total: Duration::from_millis(total_ms),
            completion_tokens: Some(times_ms.len() as u64),
            prompt_tokens: Some(10),
            ..Reply::default()
        }
    }

    #[test]
    fn summary_counts_goodput_against_the_limits() {
        let replies = vec![
            Ok(reply(&[100, 110, 120], 120)), // ttft 100, gaps 10
            Ok(reply(&[400, 410, 420], 420)), // ttft 400: misses ttft:300
            Ok(reply(&[50, 150, 250], 250)),  // gaps 100: misses itl:50
            Err("HTTP 500: boom".to_owned()),
        ];
        let slo: Slo = "ttft:300,itl:50".parse().unwrap();
        let s = summarize(4, None, &replies, 2.0, slo);
        assert_eq!((s.completed, s.failed), (3, 1));
        assert_eq!(s.errors, ["HTTP 500: boom"]);
        assert_eq!(s.goodput, 0.5);
        assert_eq!(s.request_throughput, 1.5);
        assert_eq!(s.output_tokens, 9);
        assert_eq!(s.output_token_throughput, 4.5);
        assert_eq!(s.total_token_throughput, 19.5);
        assert_eq!(s.ttft_ms.p50, 100.0);
        assert!((s.tpot_ms.mean - (10.0 + 10.0 + 100.0) / 3.0).abs() < 1e-9);
        // No limits: every completed request counts.
        assert_eq!(
            summarize(4, None, &replies, 2.0, Slo::default()).goodput,
            1.5
        );
    }

    #[test]
    fn the_cache_hit_rate_counts_only_replies_that_report_it() {
        let cached = |prompt, cached| Reply {
            prompt_tokens: Some(prompt),
            cached_tokens: cached,
            ..reply(&[10], 10)
        };
        let replies = [
            cached(100, Some(0)),
            cached(300, Some(256)),
            cached(50, None),
        ];
        let refs: Vec<&Reply> = replies.iter().collect();
        let cache = PromptCache::of(&refs).unwrap();
        assert_eq!((cache.replies, cache.cached_tokens), (2, 256));
        assert_eq!(cache.prompt_tokens, 400);
        assert_eq!(cache.hit_rate, 0.64);
        // A server that never says: no rate at all, not a rate of zero.
        assert_eq!(PromptCache::of(&refs[2..]), None);
        let s = summarize(1, None, &[Ok(replies[2].clone())], 1.0, Slo::default());
        assert_eq!(s.prompt_cache, None);
        assert_eq!(
            serde_json::to_value(&s).unwrap()["prompt_cache"],
            serde_json::Value::Null
        );
        // Zero cached is a rate of zero.
        let s = summarize(1, None, &[Ok(replies[0].clone())], 1.0, Slo::default());
        assert_eq!(s.prompt_cache.unwrap().hit_rate, 0.0);
    }

    #[test]
    fn ttft_by_turn_splits_first_turns_from_later_ones() {
        // Two conversations of three turns, in conversation order; one turn failed.
        let replies = vec![
            Ok(reply(&[400], 400)),
            Ok(reply(&[100], 100)),
            Ok(reply(&[120], 120)),
            Ok(reply(&[600], 600)),
            Err("HTTP 500: boom".to_owned()),
            Ok(reply(&[80], 80)),
        ];
        let by_turn = TtftByTurn::of(&replies, 3);
        assert_eq!(by_turn.first_turn.mean, 500.0);
        assert_eq!(by_turn.later_turns.mean, 100.0);
        assert_eq!(by_turn.turns.len(), 3);
        assert_eq!(by_turn.turns[1].mean, 100.0);
        assert_eq!(by_turn.turns[2].mean, 100.0);
    }

    #[test]
    fn slo_parsing_names_the_problem() {
        assert_eq!(
            "itl:20".parse::<Slo>().unwrap(),
            Slo {
                ttft_ms: None,
                itl_ms: Some(20.0)
            }
        );
        assert!(
            "ttft"
                .parse::<Slo>()
                .unwrap_err()
                .contains("KEY:MILLISECONDS")
        );
        assert!("ttft:-1".parse::<Slo>().unwrap_err().contains("positive"));
        assert!("e2e:5".parse::<Slo>().unwrap_err().contains("ttft and itl"));
    }
}
