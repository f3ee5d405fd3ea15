//! The measurements of one running worker, through its OpenAI endpoint with the load
//! generator's client: prompts of exactly ISL random token ids (`/v1/completions`, as
//! `tandem bench --input-tokens` sends them), greedy, `ignore_eos` so every request generates
//! what it asks for.
//!
//! 1. Prefill: one prompt alone, with `max_tokens` 1, a few times (the median), after one
//!    warm-up; then a burst of prompts at once, for the rate of back-to-back prefills.
//! 2. Decode: at each batch b of a ladder, b requests at once; their ITL is the median gap
//!    while all b decode together ([`window::steady_gaps`]). Each request asks for enough
//!    tokens to outlast the others' prefills (estimated from step 1 and the previous rung)
//!    plus `steady_tokens` (fewer if the KV cache cannot hold them). The ladder ends at the
//!    first batch the KV cache cannot hold, or after the first whose ITL is above the target.
//! 3. Interference: b requests decode; once each has its first token, a burst of prompts
//!    arrives, and the decodes' gaps while the burst is prefilled are the steps that carry a
//!    prefill chunk.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::ProgressBar;

use super::profile::{DecodePoint, MixedPoint, PrefillProfile};
use super::window::{self, Timeline};
use crate::bench::workload;
use crate::openai_client::{Client, ClientError, Endpoint, Prompt, Reply, Request};

/// What to measure, and how much of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Steps {
    pub prefill_repeats: usize,
    /// Prompts sent at once for the back-to-back prefill rate (0: not measured).
    pub prefill_burst: usize,
    /// Decode batches, ascending.
    pub batches: Vec<usize>,
    /// Tokens each decode request should generate while the whole batch decodes.
    pub steady_tokens: usize,
    /// The ladder stops after the first batch whose ITL is above this (ms): larger batches
    /// can only be slower, and no plan for the target uses them.
    pub stop_above_itl_ms: Option<f64>,
    /// Decode batches at which prefill interference is measured (none: not measured).
    pub interference_batches: Vec<usize>,
    /// Prompts prefilled during each interference measurement.
    pub interference_prompts: usize,
}

impl Steps {
    /// Progress steps: the prefills, the burst, each rung, each interference batch.
    pub fn count(&self) -> u64 {
        (self.prefill_repeats
            + 1
            + usize::from(self.prefill_burst > 0)
            + self.batches.len()
            + self.interference_batches.len()) as u64
    }
}

/// The worker under measurement and the shape of its requests.
pub struct Probe<'a> {
    pub client: &'a Client,
    /// Served model name.
    pub model: String,
    pub isl: usize,
    /// Token ids prompts are drawn from (all below the vocabulary size).
    pub token_ids: Range<u32>,
    /// Tokens a sequence may hold (the model's context length).
    pub max_context: usize,
    /// Tokens per step at most: the prefill chunk.
    pub max_num_tokens: usize,
    pub block_size: usize,
    pub kv_cache_blocks: u64,
    pub progress: &'a ProgressBar,
    /// Seed of the next prompts (every request gets a fresh prompt).
    pub seed: AtomicU64,
}

/// One request as it went: when it was sent (seconds since the measurement's epoch) and
/// what came back.
struct Sent {
    at_s: f64,
    reply: Reply,
}

impl Sent {
    /// Arrival of each token, in seconds since the epoch.
    fn timeline(&self) -> Timeline {
        self.reply
            .token_times
            .iter()
            .map(|t| self.at_s + t.as_secs_f64())
            .collect()
    }

    /// Time to first token in ms (the whole reply when its only token carried no text).
    fn ttft_ms(&self) -> f64 {
        self.reply.ttft().unwrap_or(self.reply.total).as_secs_f64() * 1e3
    }

    fn end_s(&self) -> f64 {
        self.at_s + self.reply.total.as_secs_f64()
    }
}

impl Probe<'_> {
    /// Step 1: prefill alone and back to back.
    pub fn prefill(&self, steps: &Steps) -> anyhow::Result<PrefillProfile> {
        self.progress.set_message("prefill warm-up");
        self.send_at_once(self.requests(1, 1), Instant::now())
            .context("the warm-up request")?;
        self.progress.inc(1);
        let mut samples_ms = Vec::new();
        for i in 0..steps.prefill_repeats {
            self.progress
                .set_message(format!("prefill {}/{}", i + 1, steps.prefill_repeats));
            let sent = self
                .send_at_once(self.requests(1, 1), Instant::now())
                .context("a prefill request")?;
            samples_ms.push(sent[0].ttft_ms());
            self.progress.inc(1);
        }
        let (latency_ms, _) =
            window::median_and_p90(&samples_ms).context("--prefill-repeats must be at least 1")?;
        self.say(format!(
            "prefill of {} tokens alone: {latency_ms:.1} ms median of {} ({:.0} tok/s)",
            self.isl,
            samples_ms.len(),
            self.isl as f64 / (latency_ms / 1e3)
        ));
        let mut prefill = PrefillProfile {
            latency_ms,
            samples_ms,
            burst: 0,
            burst_requests_per_s: 0.0,
        };
        if steps.prefill_burst > 0 {
            self.progress
                .set_message(format!("{} prefills at once", steps.prefill_burst));
            let epoch = Instant::now();
            let sent = self
                .send_at_once(self.requests(steps.prefill_burst, 1), epoch)
                .context("the prefill burst")?;
            let duration_s = sent.iter().map(Sent::end_s).fold(0.0, f64::max);
            prefill.burst = steps.prefill_burst;
            prefill.burst_requests_per_s = steps.prefill_burst as f64 / duration_s;
            self.say(format!(
                "{} prefills at once: {:.2} prompts/s ({:.0} tok/s)",
                steps.prefill_burst,
                prefill.burst_requests_per_s,
                prefill.burst_requests_per_s * self.isl as f64
            ));
            self.progress.inc(1);
        }
        Ok(prefill)
    }

    /// The inter-token gaps of `batch` requests of `output_tokens` each sent at once: those
    /// of the steady state, or (when the prefills outlast the first requests) those of each
    /// request's second half, which decodes with fewer prefills beside it.
    fn decode_gaps(&self, batch: usize, output_tokens: usize) -> anyhow::Result<Vec<f64>> {
        let sent = self
            .send_at_once(self.requests(batch, output_tokens), Instant::now())
            .with_context(|| format!("decoding at batch {batch}"))?;
        let timelines: Vec<Timeline> = sent.iter().map(Sent::timeline).collect();
        let gaps = window::steady_gaps(&timelines);
        if gaps.len() >= batch {
            return Ok(gaps);
        }
        self.say(format!(
            "decode batch {batch}: no steady state in {output_tokens} tokens; using each \
             request's second half"
        ));
        Ok(timelines
            .iter()
            .filter(|t| t.len() >= 2)
            .flat_map(|t| {
                window::gaps_within(std::slice::from_ref(t), t[t.len() / 2], f64::INFINITY)
            })
            .collect())
    }

    /// Step 2: the steady-state ITL at each batch of the ladder.
    pub fn decode(
        &self,
        steps: &Steps,
        prefill: &PrefillProfile,
    ) -> anyhow::Result<Vec<DecodePoint>> {
        let mut points: Vec<DecodePoint> = Vec::new();
        for &batch in &steps.batches {
            self.progress.set_message(format!("decode batch {batch}"));
            let step_s = self.step_estimate_s(points.last().map(|p| p.itl_ms), prefill);
            let spread_s = (batch - 1) as f64 * service_s(prefill);
            let mut wanted = steps.steady_tokens + (2.0 * spread_s / step_s).ceil() as usize;
            // A fast model's tokens may reach the client a few to a message (a worker sends
            // what it made since its last send): too few messages to time are measured again
            // with more tokens, a few times.
            let mut attempts = 0;
            let (gaps, output_tokens) = loop {
                let Some(output_tokens) = self.fit_output(batch, 0, wanted, steps.steady_tokens)
                else {
                    break (Vec::new(), 0);
                };
                let gaps = self.decode_gaps(batch, output_tokens)?;
                attempts += 1;
                if !gaps.is_empty() || attempts == 3 || output_tokens < wanted {
                    break (gaps, output_tokens);
                }
                wanted = output_tokens * 4;
                self.say(format!(
                    "decode batch {batch}: {output_tokens} tokens a request streamed in too few \
                     messages to time; again with up to {wanted}"
                ));
            };
            if output_tokens == 0 {
                self.say(format!(
                    "decode batch {batch} and up: not measured, the KV cache or the context \
                     length holds no {batch} requests of {} + {} tokens",
                    self.isl, steps.steady_tokens
                ));
                break;
            }
            let Some((itl_ms, itl_p90_ms)) = window::median_and_p90(&gaps) else {
                bail!("decode batch {batch}: the replies streamed fewer than two tokens each");
            };
            self.say(format!(
                "decode batch {batch}: ITL {itl_ms:.2} ms median, {itl_p90_ms:.2} ms p90 ({} gaps, {output_tokens} \
                 tokens a request)",
                gaps.len()
            ));
            points.push(DecodePoint {
                batch,
                itl_ms,
                itl_p90_ms,
                gaps: gaps.len(),
                output_tokens,
            });
            self.progress.inc(1);
            if let Some(limit) = steps.stop_above_itl_ms
                && itl_ms > limit
            {
                self.say(format!(
                    "decode batch {batch}: ITL above the target {limit} ms; larger batches not \
                     measured"
                ));
                break;
            }
        }
        if points.is_empty() {
            bail!(
                "no decode batch fits the KV cache ({} blocks)",
                self.kv_cache_blocks
            );
        }
        Ok(points)
    }

    /// Step 3: the step time of decodes while prompts are prefilled beside them.
    pub fn interference(
        &self,
        steps: &Steps,
        prefill: &PrefillProfile,
        decode: &[DecodePoint],
    ) -> anyhow::Result<Vec<MixedPoint>> {
        let mut points = Vec::new();
        let prompts = steps.interference_prompts.max(1);
        let largest = decode.last().map_or(0, |p| p.batch);
        for &batch in &steps.interference_batches {
            if batch > largest {
                self.say(format!(
                    "prefill beside decode batch {batch}: not measured (past the ladder's end)"
                ));
                self.progress.inc(1);
                continue;
            }
            self.progress
                .set_message(format!("prefill beside decode batch {batch}"));
            let itl_ms = decode
                .iter()
                .rev()
                .find(|p| p.batch <= batch)
                .or(decode.first())
                .map(|p| p.itl_ms);
            let step_s = self.step_estimate_s(itl_ms, prefill);
            let spread_s = (batch - 1 + 2 * prompts) as f64 * service_s(prefill) + 1.0;
            let wanted = steps.steady_tokens + (2.0 * spread_s / step_s).ceil() as usize;
            let Some(output_tokens) = self.fit_output(batch, prompts, wanted, steps.steady_tokens)
            else {
                self.say(format!(
                    "prefill beside decode batch {batch}: skipped, the KV cache holds too little"
                ));
                self.progress.inc(1);
                continue;
            };
            match self.mixed_point(batch, prompts, output_tokens, spread_s)? {
                Some(point) => {
                    self.say(format!(
                        "decode batch {batch} beside {prompts} prefills: steps of {:.2} ms median ({} gaps); \
                         the prompts' TTFT {:.1} ms median",
                        point.step_ms, point.gaps, point.prompt_ttft_ms
                    ));
                    points.push(point);
                }
                None => self.say(format!(
                    "decode batch {batch} beside {prompts} prefills: no decode step fell within the \
                     prefills; not used"
                )),
            }
            self.progress.inc(1);
        }
        Ok(points)
    }

    fn mixed_point(
        &self,
        batch: usize,
        prompts: usize,
        output_tokens: usize,
        spread_s: f64,
    ) -> anyhow::Result<Option<MixedPoint>> {
        let epoch = Instant::now();
        let started = AtomicUsize::new(0);
        let finished = AtomicUsize::new(0);
        let background = self.requests(batch, output_tokens);
        let burst = self.requests(prompts, 1);
        let (decodes, burst) = std::thread::scope(|scope| {
            let handles: Vec<_> = background
                .iter()
                .map(|request| {
                    let (started, finished) = (&started, &finished);
                    scope.spawn(move || {
                        let mut seen = false;
                        let at_s = epoch.elapsed().as_secs_f64();
                        let reply = self.client.send(Endpoint::Completions, request, |_| {
                            if !seen {
                                seen = true;
                                started.fetch_add(1, Ordering::SeqCst);
                            }
                        });
                        finished.fetch_add(1, Ordering::SeqCst);
                        reply.map(|reply| Sent { at_s, reply })
                    })
                })
                .collect();
            // The burst goes once every background request decodes (or one already ended).
            let deadline = Instant::now() + Duration::from_secs_f64(4.0 * spread_s + 60.0);
            while started.load(Ordering::SeqCst) < batch
                && finished.load(Ordering::SeqCst) == 0
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            let burst = self.send_at_once(burst, epoch);
            let decodes: Vec<_> = handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(thread_panicked())))
                .collect();
            (decodes, burst)
        });
        let burst = burst.context("the prompts sent during decodes")?;
        let decodes: Vec<Sent> = decodes
            .into_iter()
            .collect::<Result<_, _>>()
            .context("the decodes beside prefills")?;
        let from = burst.iter().map(|s| s.at_s).fold(f64::INFINITY, f64::min);
        let to = burst.iter().map(Sent::end_s).fold(0.0, f64::max);
        let timelines: Vec<Timeline> = decodes.iter().map(Sent::timeline).collect();
        let gaps = window::gaps_within(&timelines, from, to);
        let ttfts: Vec<f64> = burst.iter().map(Sent::ttft_ms).collect();
        let (Some((step_ms, _)), Some((prompt_ttft_ms, _))) = (
            window::median_and_p90(&gaps),
            window::median_and_p90(&ttfts),
        ) else {
            return Ok(None);
        };
        Ok(Some(MixedPoint {
            batch,
            step_ms,
            gaps: gaps.len(),
            prompts,
            prompt_ttft_ms,
        }))
    }

    /// A step's duration while prompts are prefilled beside decodes, for sizing requests:
    /// the last decode step measured (else 0) plus half a chunk's share of the prefill alone.
    /// Erring short makes requests longer, which only costs time.
    fn step_estimate_s(&self, itl_ms: Option<f64>, prefill: &PrefillProfile) -> f64 {
        let chunk_s =
            prefill.latency_ms / 1e3 * self.max_num_tokens.min(self.isl) as f64 / self.isl as f64;
        (itl_ms.unwrap_or(0.0) / 1e3 + 0.5 * chunk_s).max(1e-4)
    }

    /// Output tokens for `batch` requests (and `prompts` prompts of one token) at once:
    /// `wanted`, or fewer to fit the KV cache and the context length; `None` when fewer than
    /// `at_least` fit.
    fn fit_output(
        &self,
        batch: usize,
        prompts: usize,
        wanted: usize,
        at_least: usize,
    ) -> Option<usize> {
        let bs = self.block_size as u64;
        let prompt_blocks = (self.isl as u64 + 1).div_ceil(bs) * prompts as u64;
        let per_request = self.kv_cache_blocks.checked_sub(prompt_blocks)? / batch as u64;
        let by_cache = (per_request * bs).saturating_sub(self.isl as u64) as usize;
        let by_context = self.max_context.saturating_sub(self.isl + 1);
        let tokens = wanted.min(by_cache).min(by_context);
        (tokens >= at_least).then_some(tokens)
    }

    /// `count` requests of fresh prompts, `max_tokens` each.
    fn requests(&self, count: usize, max_tokens: usize) -> Vec<Request> {
        let seed = self.seed.fetch_add(1, Ordering::Relaxed);
        workload::synthetic_tokens(count, self.isl, self.token_ids.clone(), seed)
            .into_iter()
            .map(|ids| Request {
                model: self.model.clone(),
                prompt: Prompt::Tokens(ids),
                max_tokens,
                stream: true,
                temperature: 0.0,
                top_p: None,
                ignore_eos: true,
            })
            .collect()
    }

    /// Sends every request at once (a thread each); all must succeed.
    fn send_at_once(&self, requests: Vec<Request>, epoch: Instant) -> anyhow::Result<Vec<Sent>> {
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = requests
                .iter()
                .map(|request| {
                    scope.spawn(move || {
                        let at_s = epoch.elapsed().as_secs_f64();
                        self.client
                            .send(Endpoint::Completions, request, |_| {})
                            .map(|reply| Sent { at_s, reply })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(thread_panicked())))
                .collect()
        });
        let mut sent = Vec::with_capacity(results.len());
        for (i, result) in results.into_iter().enumerate() {
            sent.push(result.with_context(|| format!("request {i} of {}", requests.len()))?);
        }
        Ok(sent)
    }

    /// A line above the progress bar (printed even when the bar is hidden).
    fn say(&self, line: String) {
        self.progress.suspend(|| eprintln!("  {line}"));
    }
}

fn thread_panicked() -> ClientError {
    ClientError::Transport("a measuring thread panicked".into())
}

/// The service time of back-to-back prefills, in seconds.
fn service_s(prefill: &PrefillProfile) -> f64 {
    let alone = 1e3 / prefill.latency_ms;
    1.0 / alone.max(prefill.burst_requests_per_s)
}

/// KV blocks of the one worker behind `client`, from the api-server's
/// `tandem_worker_total_kv_blocks` (its workers' heartbeats), waiting up to `timeout` for the
/// first heartbeat to be counted.
pub fn kv_cache_blocks(client: &Client, timeout: Duration) -> anyhow::Result<u64> {
    let started = Instant::now();
    loop {
        let text = client
            .metrics()
            .context("reading the api-server's /metrics")?;
        if let Some(blocks) = total_kv_blocks(&text).filter(|&b| b > 0) {
            return Ok(blocks);
        }
        if started.elapsed() > timeout {
            bail!(
                "the api-server's /metrics has no tandem_worker_total_kv_blocks after {timeout:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The sum of `tandem_worker_total_kv_blocks` over its series.
fn total_kv_blocks(metrics: &str) -> Option<u64> {
    let values: Vec<u64> = metrics
        .lines()
        .filter(|l| l.starts_with("tandem_worker_total_kv_blocks"))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_blocks_are_read_from_the_worker_gauge() {
        let text = "# HELP tandem_worker_total_kv_blocks KV blocks of a worker (last heartbeat)\n\
                    # TYPE tandem_worker_total_kv_blocks gauge\n\
                    tandem_worker_total_kv_blocks{role=\"both\",worker_id=\"w\"} 6590\n\
                    tandem_worker_free_kv_blocks{role=\"both\",worker_id=\"w\"} 6500\n";
        assert_eq!(total_kv_blocks(text), Some(6590));
        assert_eq!(total_kv_blocks("tandem_worker_free_kv_blocks 3\n"), None);
    }
}
