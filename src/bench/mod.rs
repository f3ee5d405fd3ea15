//! `tandem bench`: a load generator for any OpenAI-compatible endpoint (ours or another
//! server). It sends streaming requests at a fixed concurrency or at Poisson arrival rates,
//! measures time to first token, inter-token latency and end-to-end latency per request, and
//! reports percentiles, request and token throughput and goodput as a table, a JSON file and a
//! PNG chart.
//!
//! - [`workload`]: synthetic prompts, prompt files, Poisson arrival gaps.
//! - [`metrics`]: percentiles, goodput limits, one level's summary.
//! - [`chart`]: the PNG.
//! - [`server`]: what the server counted per level (its `/metrics`, where it has one).
//! - the HTTP side is [`crate::openai_client`].

pub mod chart;
pub mod metrics;
pub mod server;
pub mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::openai_client::{Client, Endpoint, Prompt, Reply, Request};
use metrics::{Slo, Summary};

/// What `tandem bench --help` explains (the subcommand's variant names it too: its doc comment
/// would otherwise stand in for it).
pub const BENCH_LONG_ABOUT: &str = "\
Measure an OpenAI-compatible server under load: tandem's (`tandem serve`) or any other.

Each level sends --num-prompts streaming requests, either at a fixed number in flight
(--concurrency 1,4,16 runs three levels in turn) or arriving as a Poisson process
(--request-rate 2,8: requests per second, each level capped at --concurrency in flight if
given), or all at once (--offline: maximum throughput). Prompts are synthetic (--input-len words drawn from common English words, about one
token each; the server's usage counts are reported), exactly --input-tokens random token ids
(the completions endpoint: the fixed shapes of published throughput tables), or come from
--prompts FILE (a JSON list of strings, of {\"prompt\": ...} objects, or ShareGPT records). Every request asks for
--output-len tokens with `ignore_eos` (servers that do not know the field stop at their end of
sequence token; the token counts reported are the server's).

Measured per request: time to first token (TTFT), inter-token latency (ITL: gaps between
streamed pieces), time per output token after the first (TPOT) and end-to-end latency (E2E);
per level: mean/p50/p90/p99 of each, requests/s, output and total tokens/s, and goodput
(requests/s whose TTFT and mean ITL meet --goodput ttft:MS,itl:MS). Results: a table on stdout,
--output-json, --output-png (latency and throughput against the level). Failed requests are
counted and their first errors reported; each request is bounded by --timeout-s.

Against tandem, each level also reports what the server counted, read from its /metrics
before and after: KV hand-overs by transport, hand-overs that fell back and why, requests a
context worker prefilled, sequences the workers preempted (a KV cache too small for the
load; as of their last heartbeats), and for requests handed over, the mean of each part of
their TTFT (context worker queue, prefill, wait for room on the decode worker, KV transfer,
and the rest; JSON: server.ttft_parts_ms). Other servers give no such line.";

const BENCH_EXAMPLES: &str = "\
Examples:
  # tandem serve on this host, three concurrency levels, chart and JSON
  tandem bench --concurrency 1,4,16 --num-prompts 32 --input-len 128 --output-len 64 \\
      --output-json bench.json --output-png bench.png

  # another server, Poisson arrivals, prompts from a file, an SLO for goodput
  tandem bench --url http://gpu-host:8000/v1 --api-key $KEY --request-rate 1,4 \\
      --prompts prompts.json --goodput ttft:500,itl:50

  # maximum throughput: 1024 requests of ~128/128 tokens, all at once
  tandem bench --offline --num-prompts 1024 --input-len 77 --output-len 128

  # a published table's shape exactly: 2048 prompt tokens (random ids), 128 output tokens
  tandem bench --offline --endpoint completions --num-prompts 512 --input-tokens 2048 \\
      --output-len 128";

/// `tandem bench` flags.
#[derive(Debug, clap::Args)]
#[command(long_about = BENCH_LONG_ABOUT, after_help = BENCH_EXAMPLES)]
pub struct BenchArgs {
    /// API root of the server.
    #[arg(
        long,
        env = "TANDEM_BENCH_URL",
        default_value = "http://127.0.0.1:8000/v1"
    )]
    pub url: String,
    /// Model name to request (default: the first of /v1/models).
    #[arg(long)]
    pub model: Option<String>,
    /// Endpoint to load.
    #[arg(long, value_enum, default_value = "chat")]
    pub endpoint: Endpoint,
    /// Requests per level.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub num_prompts: usize,
    /// Requests in flight; a list runs one level per value.
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub concurrency: Vec<usize>,
    /// Poisson arrivals, requests per second; a list runs one level per value.
    #[arg(long, value_delimiter = ',', value_name = "R,...")]
    pub request_rate: Vec<f64>,
    /// All --num-prompts requests at once, one level: the server's maximum throughput, as
    /// offline benchmarks (TensorRT-LLM's, vLLM's) measure it.
    #[arg(long, conflicts_with_all = ["concurrency", "request_rate"])]
    pub offline: bool,
    /// Words per synthetic prompt.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub input_len: usize,
    /// Tokens per synthetic prompt, exactly: each prompt is that many random token ids from
    /// --token-ids, sent as a token array (needs --endpoint completions). The fixed input
    /// lengths of TensorRT-LLM's and vLLM's throughput tables; instead of --input-len.
    #[arg(long, value_name = "N", conflicts_with_all = ["input_len", "prompts"])]
    pub input_tokens: Option<usize>,
    /// The ids --input-tokens draws from, `LO-HI` (HI excluded): all below the model's
    /// vocabulary size. The default suits every vocabulary of 30k tokens or more.
    #[arg(long, value_name = "LO-HI", default_value = "1000-30000", value_parser = id_range)]
    pub token_ids: std::ops::Range<u32>,
    /// Tokens to generate per request (`max_tokens`).
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub output_len: usize,
    /// Prompts from a JSON file instead of synthetic ones (reused in turn if fewer than
    /// --num-prompts).
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// Seed of the synthetic prompts and of the arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sampling temperature of every request.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling (`top_p`, in (0, 1]) of every request; left out when not given.
    #[arg(long, value_name = "P", value_parser = parse_top_p)]
    pub top_p: Option<f32>,
    /// Send `ignore_eos` so every request generates --output-len tokens.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub ignore_eos: bool,
    /// Limits for goodput, e.g. `ttft:500,itl:50` (milliseconds).
    #[arg(long, value_name = "LIMITS")]
    pub goodput: Option<Slo>,
    /// Bearer token for servers that want one.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Each request's time limit.
    #[arg(long, default_value_t = 300, value_name = "S")]
    pub timeout_s: u64,
    /// Write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub output_json: Option<PathBuf>,
    /// Draw the chart (PNG) here.
    #[arg(long, value_name = "FILE")]
    pub output_png: Option<PathBuf>,
}

/// One level: how many in flight, and the arrival rate if Poisson.
#[derive(Debug, Clone, Copy)]
struct Level {
    concurrency: usize,
    rate: Option<f64>,
}

fn levels(args: &BenchArgs) -> anyhow::Result<Vec<Level>> {
    if args.offline {
        return Ok(vec![Level {
            concurrency: args.num_prompts.max(1),
            rate: None,
        }]);
    }
    if args.concurrency.contains(&0) {
        bail!("--concurrency must be at least 1");
    }
    if args
        .request_rate
        .iter()
        .any(|r| !(r.is_finite() && *r > 0.0))
    {
        bail!("--request-rate must be positive");
    }
    if args.request_rate.is_empty() {
        let list = if args.concurrency.is_empty() {
            vec![1]
        } else {
            args.concurrency.clone()
        };
        return Ok(list
            .into_iter()
            .map(|c| Level {
                concurrency: c,
                rate: None,
            })
            .collect());
    }
    let cap = match args.concurrency.as_slice() {
        [] => args.num_prompts,
        [c] => *c,
        _ => bail!("with --request-rate, give at most one --concurrency (the cap in flight)"),
    };
    Ok(args
        .request_rate
        .iter()
        .map(|&r| Level {
            concurrency: cap,
            rate: Some(r),
        })
        .collect())
}

/// Runs the benchmark described by `args`.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.num_prompts == 0 || args.output_len == 0 {
        bail!("--num-prompts and --output-len must be at least 1");
    }
    let levels = levels(args)?;
    let client = Client::new(
        &args.url,
        args.api_key.clone(),
        Duration::from_secs(args.timeout_s.max(1)),
    );
    let model = match &args.model {
        Some(m) => m.clone(),
        None => client
            .models()
            .with_context(|| format!("asking {}/models which model to load", client.base()))?
            .into_iter()
            .next()
            .with_context(|| format!("{}/models lists no model", client.base()))?,
    };
    if args.input_tokens.is_some() && args.endpoint != Endpoint::Completions {
        bail!("--input-tokens sends token ids, which only --endpoint completions takes");
    }
    let prompts: Vec<Prompt> = match (&args.prompts, args.input_tokens) {
        (Some(file), _) => workload::from_file(file)
            .map_err(anyhow::Error::msg)?
            .into_iter()
            .map(Prompt::Text)
            .collect(),
        (None, Some(tokens)) => {
            workload::synthetic_tokens(args.num_prompts, tokens, args.token_ids.clone(), args.seed)
                .into_iter()
                .map(Prompt::Tokens)
                .collect()
        }
        (None, None) => workload::synthetic(args.num_prompts, args.input_len, args.seed)
            .into_iter()
            .map(Prompt::Text)
            .collect(),
    };
    let requests: Vec<Request> = (0..args.num_prompts)
        .map(|i| Request {
            model: model.clone(),
            prompt: prompts[i % prompts.len()].clone(),
            max_tokens: args.output_len,
            stream: true,
            temperature: args.temperature,
            top_p: args.top_p,
            ignore_eos: args.ignore_eos,
        })
        .collect();
    let slo = args.goodput.unwrap_or_default();

    let progress = ProgressBar::new((levels.len() * requests.len()) as u64);
    progress.set_style(
        ProgressStyle::with_template(
            "{prefix:>14} [{elapsed_precise}] {wide_bar} {pos}/{len} requests ({eta} left)",
        )
        .expect("a valid template"),
    );
    let mut summaries = Vec::new();
    for level in &levels {
        progress.set_prefix(match level.rate {
            Some(r) => format!("{r} req/s"),
            None => format!("{} in flight", level.concurrency),
        });
        let counters_before = server_counters(&client);
        let started = Instant::now();
        let replies = run_level(
            &client,
            args.endpoint,
            &requests,
            *level,
            args.seed,
            &progress,
        );
        let mut summary = metrics::summarize(
            level.concurrency,
            level.rate,
            &replies,
            started.elapsed().as_secs_f64(),
            slo,
        );
        if let Some(before) = counters_before {
            // Workers report their counters in heartbeats (tandem's default interval: 1 s).
            std::thread::sleep(HEARTBEAT_LAG);
            summary.server = server_counters(&client).map(|after| after.since(&before));
        }
        summaries.push(summary);
    }
    progress.finish_and_clear();

    print_table(&model, &args.url, args.endpoint, &summaries);
    if let Some(path) = &args.output_json {
        let doc = json!({
            "url": args.url,
            "model": model,
            "endpoint": args.endpoint,
            "num_prompts": args.num_prompts,
            "input_len": (args.prompts.is_none() && args.input_tokens.is_none())
                .then_some(args.input_len),
            "input_tokens": args.input_tokens,
            "prompts_file": args.prompts,
            "output_len": args.output_len,
            "ignore_eos": args.ignore_eos,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
            "levels": summaries,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("results: {}", path.display());
    }
    if let Some(path) = &args.output_png {
        let title = format!(
            "tandem bench: {model} at {}, {} endpoint, {} requests per level, {} output tokens",
            args.url,
            args.endpoint.path(),
            args.num_prompts,
            args.output_len
        );
        chart::draw(path, &title, &summaries).map_err(anyhow::Error::msg)?;
        println!("chart: {}", path.display());
    }
    let failed: usize = summaries.iter().map(|s| s.failed).sum();
    if summaries.iter().all(|s| s.completed == 0) {
        bail!(
            "every request failed; first error: {}",
            summaries
                .iter()
                .flat_map(|s| s.errors.first())
                .next()
                .map(String::as_str)
                .unwrap_or("none recorded")
        );
    }
    if failed > 0 {
        eprintln!("tandem bench: {failed} request(s) failed (see `errors` per level)");
    }
    Ok(())
}

/// How long to wait after a level before reading the server's counters again: a bit more
/// than tandem workers' default heartbeat interval, which carries their preemption counts.
const HEARTBEAT_LAG: Duration = Duration::from_millis(1200);

/// The server's counters ([`server`]), if it exposes them at `/metrics` beside the API root.
fn server_counters(client: &Client) -> Option<server::Counters> {
    client
        .metrics()
        .ok()
        .and_then(|text| server::Counters::parse(&text))
}

/// Sends every request of one level; results in request order.
fn run_level(
    client: &Client,
    endpoint: Endpoint,
    requests: &[Request],
    level: Level,
    seed: u64,
    progress: &ProgressBar,
) -> Vec<Result<Reply, String>> {
    let results: Vec<Mutex<Option<Result<Reply, String>>>> =
        requests.iter().map(|_| Mutex::new(None)).collect();
    let send = |i: usize| {
        let reply = client
            .send(endpoint, &requests[i], |_| {})
            .map_err(|e| e.to_string());
        *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(reply);
        progress.inc(1);
    };
    match level.rate {
        None => {
            let next = AtomicUsize::new(0);
            std::thread::scope(|scope| {
                for _ in 0..level.concurrency.min(requests.len()) {
                    scope.spawn(|| {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= requests.len() {
                                break;
                            }
                            send(i);
                        }
                    });
                }
            });
        }
        Some(rate) => {
            let gaps = workload::poisson_gaps(requests.len(), rate, seed);
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
                    // Cap requests in flight: wait for one to finish.
                    let (count, freed) = &in_flight;
                    let mut n = count.lock().unwrap_or_else(|p| p.into_inner());
                    while *n >= level.concurrency {
                        n = freed.wait(n).unwrap_or_else(|p| p.into_inner());
                    }
                    *n += 1;
                    drop(n);
                    let in_flight = &in_flight;
                    let send = &send;
                    scope.spawn(move || {
                        send(i);
                        let (count, freed) = in_flight;
                        *count.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
                        freed.notify_one();
                    });
                }
            });
        }
    }
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or_else(|| Err("not sent".to_owned()))
        })
        .collect()
}

fn print_table(model: &str, url: &str, endpoint: Endpoint, levels: &[Summary]) {
    println!(
        "tandem bench: {model} at {url}, endpoint {}",
        endpoint.path()
    );
    println!(
        "{:>12} {:>6} {:>6} {:>8} {:>10} {:>10} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>9}",
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
        "E2E p99"
    );
    for s in levels {
        let level = match s.request_rate {
            Some(r) => format!("{r} req/s"),
            None => format!("c={}", s.concurrency),
        };
        println!(
            "{:>12} {:>6} {:>6} {:>8.2} {:>10.1} {:>10.2} {:>9.1} {:>9.1} {:>8.1} {:>8.1} {:>9.1} {:>9.1} {:>9.1}",
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
            s.e2e_ms.p99
        );
        for e in &s.errors {
            println!("{:>12} error: {e}", "");
        }
        if let Some(server) = &s.server {
            println!("{:>12} server: {}", "", server.line());
        }
    }
    println!("(latencies in ms; goodput in requests/s)");
}

/// `LO-HI` as a range of token ids (HI excluded, above LO).
fn id_range(text: &str) -> Result<std::ops::Range<u32>, String> {
    let (lo, hi) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not LO-HI"))?;
    let parse = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|e| format!("{v:?} in {text:?}: {e}"))
    };
    let (lo, hi) = (parse(lo)?, parse(hi)?);
    if hi <= lo {
        return Err(format!("{text:?}: HI must be above LO"));
    }
    Ok(lo..hi)
}

/// `--top-p`: a probability in (0, 1], as the OpenAI API takes it.
fn parse_top_p(text: &str) -> Result<f32, String> {
    let p: f32 = text
        .trim()
        .parse()
        .map_err(|e| format!("{text:?} is not a number: {e}"))?;
    if p > 0.0 && p <= 1.0 {
        Ok(p)
    } else {
        Err(format!("{text}: top-p must be in (0, 1]"))
    }
}

#[cfg(test)]
mod tests {
    use super::{id_range, parse_top_p};

    #[test]
    fn top_p_is_a_probability_above_zero() {
        assert_eq!(parse_top_p("0.9"), Ok(0.9));
        assert_eq!(parse_top_p("1"), Ok(1.0));
        assert!(parse_top_p("0").is_err());
        assert!(parse_top_p("1.5").is_err());
        assert!(parse_top_p("x").is_err());
    }

    #[test]
    fn token_id_ranges_are_lo_dash_hi_with_hi_above_lo() {
        assert_eq!(id_range("1000-30000"), Ok(1000..30_000));
        assert_eq!(id_range(" 3 - 500"), Ok(3..500));
        assert!(id_range("500-3").is_err());
        assert!(id_range("7-7").is_err());
        assert!(id_range("1000").is_err());
        assert!(id_range("a-9").is_err());
    }

    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(argv: &[&str]) -> BenchArgs {
        Wrap::try_parse_from(std::iter::once("bench").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn levels_from_concurrency_or_rates() {
        let l = levels(&parse(&["--concurrency", "1,4,16"])).unwrap();
        assert_eq!(
            l.iter().map(|l| l.concurrency).collect::<Vec<_>>(),
            [1, 4, 16]
        );
        assert!(l.iter().all(|l| l.rate.is_none()));
        let l = levels(&parse(&["--request-rate", "2,8", "--concurrency", "4"])).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!((l[1].concurrency, l[1].rate), (4, Some(8.0)));
        let l = levels(&parse(&["--request-rate", "2", "--num-prompts", "10"])).unwrap();
        assert_eq!(l[0].concurrency, 10);
        assert_eq!(levels(&parse(&[])).unwrap()[0].concurrency, 1);
        let err = levels(&parse(&["--concurrency", "0"])).unwrap_err();
        assert!(err.to_string().contains("at least 1"));
        let err = levels(&parse(&["--request-rate", "1", "--concurrency", "2,3"])).unwrap_err();
        assert!(err.to_string().contains("at most one"));
    }

    #[test]
    fn offline_is_every_request_at_once() {
        let l = levels(&parse(&["--offline", "--num-prompts", "1024"])).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!((l[0].concurrency, l[0].rate), (1024, None));
        for other in [["--concurrency", "4"], ["--request-rate", "2"]] {
            let argv = ["bench", "--offline", other[0], other[1]];
            assert!(Wrap::try_parse_from(argv).is_err(), "{argv:?}");
        }
    }
}
