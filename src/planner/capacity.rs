//! How many requests per second one worker serves within the targets, by its role: a context
//! worker (prefill only), a decode worker (decode only), an aggregated worker (both, its
//! prefill chunks sharing steps with its decodes). Pure functions of a [`WorkerProfile`] and
//! the [`Targets`]; docs/planner.md states the model with its assumptions.

use super::profile::WorkerProfile;
use super::queueing::{bounded_queue, md1_max_rate, md1_wait_quantile, poisson_quantile};

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
/// with a mean ITL of ITL(b) + b × ISL / (C - b) × X(b) / OSL. Goodput counts each request
/// against the ITL target, so the mean is not enough: a request's own mean ITL is ITL(b) plus
/// X(b) / OSL for each chunk step that lands in its life, a Poisson count (λ × ISL / (C - b)
/// chunk steps a second, over OSL × the mean ITL), and the count at the quantile must fit.
/// Prefills queue as an M/D/1 queue with a service time of ISL / (C - b) mixed steps; TTFT =
/// the wait at the quantile plus the prompt's own chunks (at least the measured prefill
/// alone). The rate is the highest λ(b), over b in quarter steps up to the largest batch
/// measured, that meets both targets and the KV cache.
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
        let chunks_in_life =
            poisson_quantile(rate * chunks * osl * itl_ms / 1e3, targets.ttft_quantile);
        let own_itl_ms = decode_ms + chunks_in_life as f64 * chunk_ms / osl;
        // Share of steps that carry a chunk; past 1 the chunks cannot keep up.
        let chunked_share = b * isl / (osl * chunk_tokens);
        let mixed_ms = decode_ms + chunk_ms;
        let service_s = chunks * mixed_ms / 1e3;
        let own_ms = alone_ms.max(chunks * mixed_ms);
        let ttft_ms = md1_wait_quantile(rate, service_s, targets.ttft_quantile)
            .map_or(f64::INFINITY, |w| w * 1e3 + own_ms);
        if own_itl_ms <= targets.itl_ms {
            best.batch_limit = b.floor() as usize;
        }
        let miss = if itl_ms > targets.itl_ms {
            Some((
                "ITL",
                format!("mean ITL {itl_ms:.1} ms > {:.1} ms", targets.itl_ms),
            ))
        } else if own_itl_ms > targets.itl_ms {
            Some((
                "ITL",
                format!(
                    "a request's mean ITL {own_itl_ms:.1} ms (p{:.0}) > {:.1} ms",
                    100.0 * targets.ttft_quantile,
                    targets.itl_ms
                ),
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

/// Tokens a decode worker's step carries at most when it prefills prompts a context worker
/// turned away (its `max_num_tokens`): small chunks keep each step close to a decode step, so
/// the decodes' ITL tail stays low; the mean ITL pays for the prefill whatever the chunk.
pub const LOCAL_STEP_TOKENS: usize = 512;

/// Bounds on the prompts a context worker holds that the planner tries (in the worker and
/// its queue together).
pub const OVERFLOW_BOUNDS: std::ops::RangeInclusive<usize> = 2..=8;

/// Conditional disaggregation at its highest rate within both targets: context workers that
/// take a prompt only while they hold fewer than their bound, and decode workers that prefill
/// the prompts turned away, in chunks of [`LOCAL_STEP_TOKENS`] beside their decodes.
#[derive(Debug, Clone, PartialEq)]
pub struct OverflowCapacity {
    /// Requests per second of the whole deployment (0: the targets cannot be met).
    pub rate: f64,
    /// Each context worker's bound: prompts prefilled at once (`max_batch_size`) and queued
    /// (`max_queued_requests`).
    pub context_running: usize,
    pub context_queued: usize,
    /// The share of prompts the decode workers prefill at that rate.
    pub local_share: f64,
    /// Sequences a decode worker decodes on average at that rate, and their mean ITL.
    pub batch: f64,
    pub itl_ms: f64,
    /// The decode workers' `max_batch_size`.
    pub batch_limit: usize,
    /// The decode workers' `max_num_tokens`.
    pub local_step_tokens: usize,
    /// What stops the rate from growing (`ITL`, `context TTFT`, `local TTFT`, `local prefill`,
    /// `decode batch`, `measured batches`), or why it is 0.
    pub bound: String,
}

/// [`OverflowCapacity`] of `contexts` context workers profiled as `context` and `decodes`
/// decode workers profiled as `decode`.
///
/// Each context worker is an M/D/1/K queue ([`bounded_queue`]: K the bound, the service time
/// the inverse of its best prefill rate), fed a `1 / contexts` share of the arrivals; its
/// prompts' TTFT is the wait at the quantile plus the prefill alone plus the hand-over. The
/// prompts it turns away are spread over the decode workers. A decode worker at average batch
/// b spends a share u = λ_local × ISL × x(b) of its time on local prefill chunks (x(b): what a
/// prefill token adds to a step, from the profiled mixed steps), so its steps average
/// ITL(b) / (1 - u), which is the mean ITL; b = λ_decode × OSL × that ITL (Little), solved
/// by iteration. Local prompts queue as an M/D/1 queue (the turned-away arrivals are burstier
/// than Poisson: an optimistic wait) whose service is the prompt's chunked steps. The rate is
/// the highest that meets every target, over the bounds in [`OVERFLOW_BOUNDS`].
pub fn overflow(
    context: &WorkerProfile,
    decode: &WorkerProfile,
    settings: &Settings,
    targets: &Targets,
    contexts: usize,
    decodes: usize,
) -> OverflowCapacity {
    let (isl, osl) = (targets.isl as f64, targets.osl as f64);
    let alone_ms = prefill_alone_ms(context, settings, targets);
    let scale = isl / settings.profiled_isl.max(1) as f64;
    let service_s = scale / context.prefill_requests_per_s();
    let max_batch = kv_batch_limit(decode, settings, targets).min(decode.max_measured_batch());
    let mut best = OverflowCapacity {
        rate: 0.0,
        context_running: 0,
        context_queued: 0,
        local_share: 0.0,
        batch: 0.0,
        itl_ms: f64::NAN,
        batch_limit: 0,
        local_step_tokens: LOCAL_STEP_TOKENS,
        bound: String::new(),
    };
    if alone_ms + targets.handover_ms > targets.ttft_ms {
        best.bound = format!(
            "context: prefill alone {alone_ms:.0} ms + hand-over {:.0} ms > TTFT {:.0} ms",
            targets.handover_ms, targets.ttft_ms
        );
        return best;
    }
    if max_batch == 0 || decode.itl_ms(1.0).is_none() {
        best.bound = "decode: no measured batch the KV cache holds".to_owned();
        return best;
    }
    // What one prefill token adds to a step of b decodes, in ms.
    let per_token_ms = |b: f64| {
        let chunk = (settings.max_num_tokens as f64 - b).max(1.0);
        decode.chunk_ms(b, targets.isl, chunk as usize) / chunk
    };
    // Decode workers' steps carry their decodes and a chunk; the scheduler wants room for
    // every sequence's token besides.
    let local_step_tokens = LOCAL_STEP_TOKENS.max(max_batch + LOCAL_STEP_TOKENS / 2);
    struct Point {
        local_share: f64,
        batch: f64,
        itl_ms: f64,
    }
    // What a rate missed: a short name for the table, and the numbers.
    struct Miss(&'static str, String);
    let evaluate = |rate: f64, bound: usize| -> Result<Point, Miss> {
        let queue = bounded_queue(
            rate / contexts as f64,
            service_s,
            bound,
            targets.ttft_quantile,
        );
        let context_ttft = queue.wait_s * 1e3 + alone_ms + targets.handover_ms;
        if context_ttft > targets.ttft_ms {
            return Err(Miss(
                "context TTFT",
                format!(
                    "context TTFT {context_ttft:.0} ms > {:.0} ms",
                    targets.ttft_ms
                ),
            ));
        }
        let local_rate = rate * queue.overflow / decodes as f64;
        let decode_rate = rate / decodes as f64;
        let (mut batch, mut itl_ms, mut step_ms) = (1.0_f64, f64::NAN, f64::NAN);
        for _ in 0..100 {
            step_ms = decode.itl_ms(batch.max(1.0)).ok_or_else(|| {
                Miss(
                    "measured batches",
                    "decode batch past the measured ones".into(),
                )
            })?;
            let busy = local_rate * isl * per_token_ms(batch) / 1e3;
            if busy >= 1.0 {
                return Err(Miss(
                    "local prefill",
                    "local prefills cannot keep up".into(),
                ));
            }
            itl_ms = step_ms / (1.0 - busy);
            let next = decode_rate * osl * itl_ms / 1e3;
            if next > max_batch as f64 {
                return Err(Miss(
                    "decode batch",
                    format!("decode batch {next:.0} > {max_batch}"),
                ));
            }
            let settled = (next - batch).abs() < 1e-4;
            batch = next;
            if settled {
                break;
            }
        }
        if itl_ms > targets.itl_ms {
            return Err(Miss(
                "ITL",
                format!("mean ITL {itl_ms:.1} ms > {:.1} ms", targets.itl_ms),
            ));
        }
        // Goodput counts each request against the target: its own mean ITL is the decode
        // step plus the local prefills that land in its life (a Poisson count), and the
        // count at the quantile must fit, not only the average one.
        let local_prefills =
            poisson_quantile(local_rate * osl * itl_ms / 1e3, targets.ttft_quantile);
        let own_itl_ms = step_ms + local_prefills as f64 * isl * per_token_ms(batch) / osl;
        if own_itl_ms > targets.itl_ms {
            return Err(Miss(
                "ITL",
                format!(
                    "a request's mean ITL {own_itl_ms:.1} ms (p{:.0}) > {:.1} ms",
                    100.0 * targets.ttft_quantile,
                    targets.itl_ms
                ),
            ));
        }
        if local_rate > 0.0 {
            let chunk = (local_step_tokens as f64 - batch).max(1.0);
            let own_ms = (isl / chunk).ceil() * (step_ms + chunk * per_token_ms(batch));
            let wait_s = md1_wait_quantile(local_rate, own_ms / 1e3, targets.ttft_quantile)
                .ok_or_else(|| Miss("local prefill", "local prefills cannot keep up".into()))?;
            let local_ttft = wait_s * 1e3 + own_ms;
            if local_ttft > targets.ttft_ms {
                return Err(Miss(
                    "local TTFT",
                    format!("local TTFT {local_ttft:.0} ms > {:.0} ms", targets.ttft_ms),
                ));
            }
        }
        Ok(Point {
            local_share: queue.overflow,
            batch,
            itl_ms,
        })
    };
    // No more than the decode workers can decode at their largest batch.
    let ceiling = decodes as f64 * max_batch as f64
        / (osl * decode.itl_ms(max_batch as f64).unwrap_or(f64::INFINITY) / 1e3);
    const STEPS: usize = 80;
    for bound in OVERFLOW_BOUNDS {
        let mut found: Option<(f64, Point)> = None;
        let mut miss: Option<Miss> = None;
        for step in 1..=STEPS {
            let rate = ceiling * step as f64 / STEPS as f64;
            match evaluate(rate, bound) {
                Ok(point) => found = Some((rate, point)),
                Err(why) => {
                    miss = Some(why);
                    if found.is_some() {
                        break;
                    }
                }
            }
        }
        let Some((mut rate, mut point)) = found else {
            if best.rate == 0.0 && best.bound.is_empty() {
                best.bound = miss.map_or_else(|| "no rate tried".to_owned(), |m| m.1);
            }
            continue;
        };
        // Between the last rate that met the targets and the first that did not.
        let mut hi = (rate + ceiling / STEPS as f64).min(ceiling);
        for _ in 0..12 {
            let mid = 0.5 * (rate + hi);
            match evaluate(mid, bound) {
                Ok(p) => (rate, point) = (mid, p),
                Err(why) => {
                    hi = mid;
                    miss = Some(why);
                }
            }
        }
        if rate > best.rate {
            let running = 2.min(bound - 1);
            let step_limit = (1..=max_batch)
                .rev()
                .find(|&b| {
                    decode
                        .itl_ms(b as f64)
                        .is_some_and(|itl| itl <= targets.itl_ms)
                })
                .unwrap_or(1);
            best = OverflowCapacity {
                rate,
                context_running: running,
                context_queued: bound - running,
                local_share: point.local_share,
                batch: point.batch,
                itl_ms: point.itl_ms,
                batch_limit: step_limit.max(point.batch.ceil() as usize),
                local_step_tokens,
                bound: miss.map_or("measured batches", |m| m.0).to_owned(),
            };
        }
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
    fn conditional_disaggregation_prefills_a_context_workers_overflow_on_the_decode_workers() {
        // 2.5 prompts a second on the context side; decode steps of about 30 ms, which a
        // 50 ms mean ITL leaves room beside.
        let w = synthetic_worker(2, 400.0, 29.0, 0.05, 250.0, 64, 100_000);
        let t = targets(2000.0, 50.0);
        let plain = context(&w, &SETTINGS, &t)
            .rate
            .min(decode(&w, &SETTINGS, &t).rate);
        let o = overflow(&w, &w, &SETTINGS, &t, 1, 1);
        assert!(o.rate > 1.2 * plain, "{o:?} against {plain}");
        assert!(o.local_share > 0.0 && o.local_share < 0.5, "{o:?}");
        assert!(
            o.itl_ms <= 50.0 && o.itl_ms > w.itl_ms(o.batch).unwrap(),
            "{o:?}"
        );
        assert!(o.context_running >= 1 && o.context_queued >= 1, "{o:?}");
        assert!(o.batch_limit as f64 >= o.batch && o.local_step_tokens >= o.batch_limit);
        // Decode steps already at the ITL target leave the overflow nowhere to go.
        let tight = overflow(&w, &w, &SETTINGS, &targets(2000.0, 30.5), 1, 1);
        assert!(tight.rate < 0.8 * o.rate, "{tight:?} against {o:?}");
        // A prompt whose prefill alone misses the TTFT: no rate at all, and why.
        let none = overflow(&w, &w, &SETTINGS, &targets(300.0, 50.0), 1, 1);
        assert_eq!(none.rate, 0.0);
        assert!(none.bound.contains("prefill alone 400 ms"), "{none:?}");
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

    /// Goodput counts requests one by one: at the chosen rate, the request that meets more
    /// chunk steps than the average one (at the quantile) still meets the ITL target, so the
    /// mean ITL stays clearly under it.
    #[test]
    fn an_aggregated_worker_keeps_the_unlucky_requests_itl_within_the_target() {
        let w = synthetic_worker(1, 200.0, 10.0, 0.5, 100.0, 64, 10_000);
        let t = targets(5000.0, 20.0);
        let c = aggregated(&w, &SETTINGS, &t);
        assert!(c.rate > 0.0, "{c:?}");
        let chunk_tokens = SETTINGS.max_num_tokens as f64 - c.batch;
        let chunks = t.isl as f64 / chunk_tokens;
        let chunk_ms = w.chunk_ms(c.batch, t.isl, chunk_tokens as usize);
        let in_life = poisson_quantile(
            c.rate * chunks * t.osl as f64 * c.itl_ms / 1e3,
            t.ttft_quantile,
        );
        let own_itl_ms = w.itl_ms(c.batch).unwrap() + in_life as f64 * chunk_ms / t.osl as f64;
        assert!(own_itl_ms <= t.itl_ms, "{own_itl_ms} ms at {c:?}");
        // The average request's mean ITL alone would have allowed about 6.75 sequences (10 +
        // 1.48 b ms); the unlucky request's allows fewer.
        assert!(c.batch < 6.0 && c.itl_ms < 18.5, "{c:?}");
    }
}
