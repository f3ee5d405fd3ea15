//! How many requests per second one worker serves within the targets, by its role: a context
//! worker (prefill only), a decode worker (decode only), an aggregated worker (both, its
//! prefill chunks sharing steps with its decodes). Pure functions of a [`WorkerProfile`] and
//! the [`Targets`]; docs/planner.md states the model with its assumptions.

use super::profile::WorkerProfile;
use super::queueing::{md1_max_rate, md1_wait_quantile};

/// The workload and the service-level targets a plan is for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Targets {
    /// Prompt tokens per request (ISL).
    pub isl: usize,
    /// Output tokens per request (OSL).
    pub osl: usize,
    /// Time to first token, at `ttft_quantile`, in ms.
    pub ttft_ms: f64,
    /// Mean inter-token latency per request, in ms (as `tandem bench --goodput` counts it).
    pub itl_ms: f64,
    /// Which quantile of the TTFT must meet `ttft_ms` (0.9: the p90).
    pub ttft_quantile: f64,
    /// Added to every disaggregated TTFT: the KV hand-over from the context worker to the
    /// decode worker and the extra bus messages.
    pub handover_ms: f64,
}

/// The settings every profiled worker ran with that the model needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// The prompt length the profile measured (prefill times are scaled from it).
    pub profiled_isl: usize,
    /// Tokens per step at most (`max_num_tokens`): decodes plus the prefill chunk.
    pub max_num_tokens: usize,
    pub block_size: usize,
}

/// A context worker at its highest rate within the TTFT target.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextCapacity {
    /// Requests per second (0: the target cannot be met).
    pub rate: f64,
    /// One prefill alone, in ms.
    pub alone_ms: f64,
    /// The service time of the queue model (the inverse of the best prefill rate), in ms.
    pub service_ms: f64,
    /// Why the rate is 0, if it is.
    pub infeasible: Option<String>,
}

/// A decode worker at its best batch within the ITL target and its KV cache.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeCapacity {
    pub rate: f64,
    pub batch: usize,
    pub itl_ms: f64,
    /// Requests of ISL + OSL tokens its KV cache holds.
    pub kv_batch_limit: usize,
    pub infeasible: Option<String>,
}

/// An aggregated worker at its highest rate within both targets.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregatedCapacity {
    pub rate: f64,
    /// Sequences decoding on average at that rate.
    pub batch: f64,
    /// Mean ITL at that rate (decode steps and the chunks among them), in ms.
    pub itl_ms: f64,
    /// TTFT at the quantile, at that rate, in ms.
    pub ttft_ms: f64,
    /// The largest batch within the ITL target (its `max_batch_size`).
    pub batch_limit: usize,
    /// What stops the rate from growing further.
    pub bound: &'static str,
    pub infeasible: Option<String>,
}

/// Prefill of `targets.isl` tokens alone, in ms, scaled linearly from the profiled length.
fn prefill_alone_ms(worker: &WorkerProfile, settings: &Settings, targets: &Targets) -> f64 {
    worker.prefill.latency_ms * targets.isl as f64 / settings.profiled_isl.max(1) as f64
}

/// Requests of ISL + OSL tokens the worker's KV cache holds (whole blocks each).
pub fn kv_batch_limit(worker: &WorkerProfile, settings: &Settings, targets: &Targets) -> usize {
    let blocks_per_request = (targets.isl + targets.osl).div_ceil(settings.block_size.max(1));
    (worker.kv_cache_blocks / blocks_per_request.max(1) as u64) as usize
}

/// A context worker: prefills queue as an M/D/1 queue whose service time is the inverse of
/// the worker's best prefill rate; a request's TTFT is its wait at the quantile plus its own
/// prefill alone plus the hand-over. The rate is the highest whose TTFT meets the target.
pub fn context(worker: &WorkerProfile, settings: &Settings, targets: &Targets) -> ContextCapacity {
    let alone_ms = prefill_alone_ms(worker, settings, targets);
    let scale = targets.isl as f64 / settings.profiled_isl.max(1) as f64;
    let service_ms = 1e3 / worker.prefill_requests_per_s() * scale;
    let budget_ms = targets.ttft_ms - alone_ms - targets.handover_ms;
    if budget_ms < 0.0 {
        return ContextCapacity {
            rate: 0.0,
            alone_ms,
            service_ms,
            infeasible: Some(format!(
                "prefill alone {alone_ms:.0} ms + hand-over {:.0} ms > TTFT {:.0} ms",
                targets.handover_ms, targets.ttft_ms
            )),
        };
    }
    let rate = md1_max_rate(service_ms / 1e3, targets.ttft_quantile, budget_ms / 1e3);
    ContextCapacity {
        rate,
        alone_ms,
        service_ms,
        infeasible: None,
    }
}

/// A decode worker: `batch` sequences decode at ITL(batch) each, and each request holds its
/// slot for OSL steps, so it serves batch / (OSL × ITL(batch)) requests per second. The batch
/// is the one of most throughput among those within the ITL target, the KV cache (ISL + OSL
/// tokens a request) and the measured ladder.
pub fn decode(worker: &WorkerProfile, settings: &Settings, targets: &Targets) -> DecodeCapacity {
    let kv_limit = kv_batch_limit(worker, settings, targets);
    let max_batch = kv_limit.min(worker.max_measured_batch());
    let mut best: Option<(f64, usize, f64)> = None;
    for batch in 1..=max_batch {
        let Some(itl_ms) = worker.itl_ms(batch as f64) else {
            break;
        };
        if itl_ms > targets.itl_ms {
            continue;
        }
        let rate = batch as f64 / (targets.osl as f64 * itl_ms / 1e3);
        if best.is_none_or(|(r, _, _)| rate > r) {
            best = Some((rate, batch, itl_ms));
        }
    }
    match best {
        Some((rate, batch, itl_ms)) => DecodeCapacity {
            rate,
            batch,
            itl_ms,
            kv_batch_limit: kv_limit,
            infeasible: None,
        },
        None => DecodeCapacity {
            rate: 0.0,
            batch: 0,
            itl_ms: worker.itl_ms(1.0).unwrap_or(f64::NAN),
            kv_batch_limit: kv_limit,
            infeasible: Some(if kv_limit == 0 {
                format!(
                    "the KV cache ({} blocks) holds no request of {} tokens",
                    worker.kv_cache_blocks,
                    targets.isl + targets.osl
                )
            } else {
                format!(
                    "ITL at batch 1 is {:.1} ms > {:.1} ms",
                    worker.itl_ms(1.0).unwrap_or(f64::NAN),
                    targets.itl_ms
                )
            }),
        },
    }
}

/// An aggregated worker at average decode batch b (the sequences past their prefill): a step
/// takes ITL(b), and a step that also carries a prefill chunk of C - b tokens (C =
/// `max_num_tokens`) takes X(b) more. A request needs OSL decode steps (shared by b) and
/// ISL / (C - b) chunks (its own), so at batch b the worker serves
///
///   λ(b) = b / (OSL × ITL(b) + b × ISL / (C - b) × X(b))
///
/// with a mean ITL of ITL(b) + b × ISL / (C - b) × X(b) / OSL. Prefills queue as an M/D/1
/// queue with a service time of ISL / (C - b) mixed steps; TTFT = the wait at the quantile
/// plus the prompt's own chunks (at least the measured prefill alone). The rate is the highest
/// λ(b), over b in quarter steps up to the largest batch measured, that meets both targets
/// and the KV cache.
pub fn aggregated(
    worker: &WorkerProfile,
    settings: &Settings,
    targets: &Targets,
) -> AggregatedCapacity {
    let (isl, osl) = (targets.isl as f64, targets.osl as f64);
    let kv_limit = kv_batch_limit(worker, settings, targets);
    let max_batch = kv_limit
        .min(worker.max_measured_batch())
        .min(settings.max_num_tokens.saturating_sub(1));
    let alone_ms = prefill_alone_ms(worker, settings, targets);
    let mut best = AggregatedCapacity {
        rate: 0.0,
        batch: 0.0,
        itl_ms: f64::NAN,
        ttft_ms: f64::NAN,
        batch_limit: 0,
        bound: "",
        infeasible: None,
    };
    let mut first_miss: Option<String> = None;
    // What stopped the rate from growing: the first miss past the best batch, else the end
    // of the scan.
    let mut bound_past_best: Option<&'static str> = None;
    for quarter in 1..=4 * max_batch {
        let b = quarter as f64 / 4.0;
        let Some(decode_ms) = worker.itl_ms(b) else {
            break;
        };
        let chunk_tokens = settings.max_num_tokens as f64 - b;
        let chunk_ms = worker.chunk_ms(b, targets.isl, chunk_tokens as usize);
        let chunks = isl / chunk_tokens;
        let per_request_ms = osl * decode_ms + b * chunks * chunk_ms;
        let rate = b / (per_request_ms / 1e3);
        let itl_ms = decode_ms + b * chunks * chunk_ms / osl;
        // Share of steps that carry a chunk; past 1 the chunks cannot keep up.
        let chunked_share = b * isl / (osl * chunk_tokens);
        let mixed_ms = decode_ms + chunk_ms;
        let service_s = chunks * mixed_ms / 1e3;
        let own_ms = alone_ms.max(chunks * mixed_ms);
        let ttft_ms = md1_wait_quantile(rate, service_s, targets.ttft_quantile)
            .map_or(f64::INFINITY, |w| w * 1e3 + own_ms);
        if itl_ms <= targets.itl_ms {
            best.batch_limit = b.floor() as usize;
        }
        let miss = if itl_ms > targets.itl_ms {
            Some((
                "ITL",
                format!("mean ITL {itl_ms:.1} ms > {:.1} ms", targets.itl_ms),
            ))
        } else if chunked_share > 1.0 {
            Some(("prefill", "prefill chunks cannot keep up".to_owned()))
        } else if ttft_ms > targets.ttft_ms {
            Some((
                "TTFT",
                format!("TTFT {ttft_ms:.0} ms > {:.0} ms", targets.ttft_ms),
            ))
        } else {
            None
        };
        match miss {
            Some((bound, why)) => {
                first_miss.get_or_insert(why);
                if best.rate > 0.0 {
                    bound_past_best.get_or_insert(bound);
                }
            }
            None if rate > best.rate => {
                best = AggregatedCapacity {
                    rate,
                    batch: b,
                    itl_ms,
                    ttft_ms,
                    batch_limit: best.batch_limit,
                    bound: "",
                    infeasible: None,
                };
                bound_past_best = None;
            }
            None => {}
        }
    }
    if best.rate > 0.0 {
        best.batch_limit = best.batch_limit.max(best.batch.ceil() as usize);
        best.bound = bound_past_best.unwrap_or(if max_batch == kv_limit {
            "KV cache"
        } else {
            "measured batches"
        });
    } else {
        best.infeasible = Some(first_miss.unwrap_or_else(|| {
            if kv_limit == 0 {
                format!(
                    "the KV cache ({} blocks) holds no request of {} tokens",
                    worker.kv_cache_blocks,
                    targets.isl + targets.osl
                )
            } else {
                "no measured batch".to_owned()
            }
        }));
    }
    best
}

#[cfg(test)]
mod tests {
    use super::super::profile::tests::synthetic_worker;
    use super::*;

    const SETTINGS: Settings = Settings {
        profiled_isl: 3000,
        max_num_tokens: 2048,
        block_size: 64,
    };

    fn targets(ttft_ms: f64, itl_ms: f64) -> Targets {
        Targets {
            isl: 3000,
            osl: 150,
            ttft_ms,
            itl_ms,
            ttft_quantile: 0.9,
            handover_ms: 20.0,
        }
    }

    #[test]
    fn a_context_worker_serves_up_to_its_prefill_rate_within_the_ttft() {
        let w = synthetic_worker(1, 200.0, 10.0, 0.5, 50.0, 64, 10_000);
        let loose = context(&w, &SETTINGS, &targets(10_000.0, 50.0));
        let tight = context(&w, &SETTINGS, &targets(400.0, 50.0));
        assert!(loose.rate < 5.0 && loose.rate > 4.5, "{loose:?}");
        assert!(tight.rate > 0.0 && tight.rate < loose.rate, "{tight:?}");
        let impossible = context(&w, &SETTINGS, &targets(210.0, 50.0));
        assert_eq!(impossible.rate, 0.0);
        assert!(
            impossible
                .infeasible
                .unwrap()
                .contains("prefill alone 200 ms")
        );
        // A longer prompt than profiled takes proportionally longer.
        let long = context(
            &w,
            &SETTINGS,
            &Targets {
                isl: 6000,
                ..targets(10_000.0, 50.0)
            },
        );
        assert!((long.alone_ms - 400.0).abs() < 1e-9);
    }

    #[test]
    fn a_decode_worker_runs_the_largest_batch_within_the_itl_and_its_cache() {
        // ITL = 10 + 0.5 b: 50 ms allows b = 80, the ladder stops at 64.
        let w = synthetic_worker(1, 200.0, 10.0, 0.5, 50.0, 64, 10_000);
        let d = decode(&w, &SETTINGS, &targets(2000.0, 50.0));
        assert_eq!(d.batch, 64);
        assert!((d.rate - 64.0 / (150.0 * 0.042)).abs() < 1e-9);
        // 20 ms: b = 20.
        assert_eq!(decode(&w, &SETTINGS, &targets(2000.0, 20.0)).batch, 20);
        // A cache of 10 requests of 3150 tokens (50 blocks each).
        let small = synthetic_worker(1, 200.0, 10.0, 0.5, 50.0, 64, 500);
        let d = decode(&small, &SETTINGS, &targets(2000.0, 50.0));
        assert_eq!((d.batch, d.kv_batch_limit), (10, 10));
        let d = decode(&w, &SETTINGS, &targets(2000.0, 5.0));
        assert_eq!(d.rate, 0.0);
        assert!(d.infeasible.unwrap().contains("ITL at batch 1"));
    }

    #[test]
    fn an_aggregated_worker_pays_for_its_chunks_in_itl() {
        let w = synthetic_worker(1, 200.0, 10.0, 0.5, 100.0, 64, 10_000);
        let loose = aggregated(&w, &SETTINGS, &targets(5000.0, 100.0));
        assert!(loose.rate > 0.0, "{loose:?}");
        assert!(loose.itl_ms <= 100.0 && loose.ttft_ms <= 5000.0);
        // Its ITL is the decode step plus its share of chunks: above the decode worker's.
        let d = decode(&w, &SETTINGS, &targets(5000.0, 100.0));
        assert!(loose.itl_ms > w.itl_ms(loose.batch).unwrap());
        assert!(loose.rate < d.rate);
        // Close to the bare decode step, the chunks leave it almost nothing.
        let tight = aggregated(&w, &SETTINGS, &targets(5000.0, 12.0));
        assert!(
            tight.rate > 0.0 && tight.rate < 0.25 * loose.rate,
            "{tight:?} vs {loose:?}"
        );
        let none = aggregated(&w, &SETTINGS, &targets(5000.0, 10.0));
        assert_eq!(none.rate, 0.0);
        assert!(none.infeasible.unwrap().contains("ITL"));
    }
}
