//! `tandem bench`: a load generator for any OpenAI-compatible endpoint (ours or another
//! server). It sends streaming requests at a fixed concurrency or at Poisson arrival rates,
//! measures time to first token, inter-token latency and end-to-end latency per request, and
//! reports percentiles, request and token throughput, goodput and the server's prefix-cache
//! hits as a table, a JSON file and a PNG chart.
//!
//! - [`args`]: the flags, their help, and their validation into a workload and levels.
//! - [`spec`]: which workload a run sends, with its parameters.
//! - [`workload`]: synthetic prompts (words or token ids) and prompt files.
//! - [`shared_prefix`]: groups of prompts that share a system prompt.
//! - [`multi_turn`]: conversations that resend their history every turn.
//! - [`schedule`]: when a level's requests (or conversations) start; Poisson arrival gaps.
//! - [`metrics`]: percentiles, goodput limits, cache hits, one level's summary.
//! - [`report`]: the table on stdout.
//! - [`chart`]: the PNG.
//! - [`server`]: what the server counted per level (its `/metrics`, where it has one).
//! - the HTTP side is [`crate::openai_client`].

pub mod args;
pub mod chart;
pub mod metrics;
pub mod multi_turn;
pub mod report;
pub mod schedule;
pub mod server;
pub mod shared_prefix;
pub mod spec;
pub mod workload;

pub use args::{BENCH_LONG_ABOUT, BenchArgs};

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::openai_client::{Client, Endpoint, Prompt, Request};
use metrics::TtftByTurn;
use multi_turn::Conversations;
use schedule::{Level, Results};
use spec::{RandomPrompts, Workload};

/// Runs the benchmark described by `args`.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let workload = args.workload()?;
    let levels = args.levels(workload.arrivals())?;
    let output_len = args.output_len();
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
    let template = Request {
        model: model.clone(),
        prompt: Prompt::Text(String::new()),
        max_tokens: output_len,
        stream: true,
        temperature: args.temperature,
        top_p: args.top_p,
        ignore_eos: args.ignore_eos,
    };
    let slo = args.goodput.unwrap_or_default();

    let progress = ProgressBar::new((levels.len() * workload.requests()) as u64);
    progress.set_style(
        ProgressStyle::with_template(
            "{prefix:>14} [{elapsed_precise}] {wide_bar} {pos}/{len} requests ({eta} left)",
        )
        .expect("a valid template"),
    );
    let mut summaries = Vec::new();
    let mut rate_unit = "req/s";
    for (index, level) in levels.iter().enumerate() {
        let sends = Sends::of(&workload, args.endpoint, template.clone(), args.seed, index)?;
        rate_unit = sends.rate_unit();
        progress.set_prefix(match level.rate {
            Some(r) => format!("{r} {}", sends.rate_unit()),
            None => format!("{} in flight", level.concurrency),
        });
        let counters_before = server_counters(&client);
        let started = Instant::now();
        let replies = sends
            .run_level(&client, args.endpoint, *level, args.seed, &progress)
            .into_vec();
        let mut summary = metrics::summarize(
            level.concurrency,
            level.rate,
            &replies,
            started.elapsed().as_secs_f64(),
            slo,
        );
        if let Sends::Conversations(conversations) = &sends {
            summary.ttft_ms_by_turn = Some(TtftByTurn::of(&replies, conversations.shape.turns));
        }
        if let Some(before) = counters_before {
            // Workers report their counters in heartbeats (tandem's default interval: 1 s).
            std::thread::sleep(HEARTBEAT_LAG);
            summary.server = server_counters(&client).map(|after| after.since(&before));
        }
        summaries.push(summary);
    }
    progress.finish_and_clear();

    let described = describe(&workload);
    report::print_table(
        &model,
        &args.url,
        args.endpoint,
        &described,
        rate_unit,
        &summaries,
    );
    if let Some(path) = &args.output_json {
        let random = match &workload {
            Workload::Random(random) => Some(&random.prompts),
            _ => None,
        };
        let doc = json!({
            "url": args.url,
            "model": model,
            "endpoint": args.endpoint,
            "workload": workload,
            "num_prompts": workload.requests(),
            "input_len": match random {
                Some(RandomPrompts::Words { input_len }) => Some(*input_len),
                _ => None,
            },
            "input_tokens": match random {
                Some(RandomPrompts::TokenIds { input_tokens, .. }) => Some(*input_tokens),
                _ => None,
            },
            "prompts_file": match random {
                Some(RandomPrompts::File { prompts_file }) => Some(prompts_file),
                _ => None,
            },
            "output_len": output_len,
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
            "tandem bench: {model} at {}, {} endpoint, {described}, {} requests per level, {} output tokens",
            args.url,
            args.endpoint.path(),
            workload.requests(),
            output_len
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

/// The workload in a few words, for the table's and the chart's titles.
fn describe(workload: &Workload) -> String {
    match workload {
        Workload::Random(_) => "random prompts".to_owned(),
        Workload::SharedPrefix(shape) => format!(
            "shared prefix: {} groups x {} prompts, {} + {} {}",
            shape.prefix_groups,
            shape.prompts_per_group,
            shape.system_prompt_len,
            shape.question_len,
            match shape.units {
                workload::PromptUnits::Words => "words",
                workload::PromptUnits::TokenIds(_) => "tokens",
            }
        ),
        Workload::MultiTurn(shape) => format!(
            "multi-turn: {} conversations x {} turns, {} words per user message",
            shape.conversations, shape.turns, shape.user_message_len
        ),
    }
}

/// What one level sends. Synthetic prompts (words or token ids) are drawn afresh for each level
/// (from the seed plus the level's index), so that a server's prefix cache cannot serve one
/// level's prompts from what an earlier level sent; prompts from a file, shared-prefix groups
/// and conversations are the same at every level (the `cached` column shows what that gives).
enum Sends {
    /// Independent requests, each an arrival of its own.
    Requests(Vec<Request>),
    /// Conversations, each an arrival that sends its turns one after the other.
    Conversations(Conversations),
}

impl Sends {
    fn of(
        workload: &Workload,
        endpoint: Endpoint,
        template: Request,
        seed: u64,
        level_index: usize,
    ) -> anyhow::Result<Self> {
        let level_seed = seed.wrapping_add(level_index as u64);
        let with = |prompt: Prompt| Request {
            prompt,
            ..template.clone()
        };
        Ok(match workload {
            Workload::Random(random) => {
                let count = random.num_prompts;
                let prompts: Vec<Prompt> = match &random.prompts {
                    RandomPrompts::File { prompts_file } => workload::from_file(prompts_file)
                        .map_err(anyhow::Error::msg)?
                        .into_iter()
                        .map(Prompt::Text)
                        .collect(),
                    RandomPrompts::TokenIds {
                        input_tokens,
                        token_ids,
                    } => workload::synthetic_tokens(
                        count,
                        *input_tokens,
                        token_ids.clone(),
                        level_seed,
                    )
                    .into_iter()
                    .map(Prompt::Tokens)
                    .collect(),
                    RandomPrompts::Words { input_len } => {
                        workload::synthetic(count, *input_len, level_seed)
                            .into_iter()
                            .map(Prompt::Text)
                            .collect()
                    }
                };
                Sends::Requests(
                    (0..count)
                        .map(|i| with(prompts[i % prompts.len()].clone()))
                        .collect(),
                )
            }
            Workload::SharedPrefix(shape) => Sends::Requests(
                shape
                    .prompts(endpoint, seed)
                    .into_iter()
                    .map(|p| with(p.prompt))
                    .collect(),
            ),
            Workload::MultiTurn(shape) => {
                Sends::Conversations(Conversations::new(shape.clone(), template, seed))
            }
        })
    }

    /// What a level's rate counts per second.
    fn rate_unit(&self) -> &'static str {
        match self {
            Sends::Requests(_) => "req/s",
            Sends::Conversations(_) => "conv/s",
        }
    }

    /// Sends everything of one level; replies in request order (conversation by conversation,
    /// turn by turn for multi-turn).
    fn run_level(
        &self,
        client: &Client,
        endpoint: Endpoint,
        level: Level,
        seed: u64,
        progress: &ProgressBar,
    ) -> Results {
        match self {
            Sends::Requests(requests) => {
                let results = Results::new(requests.len());
                schedule::run(requests.len(), level, seed, |i| {
                    let reply = client
                        .send(endpoint, &requests[i], |_| {})
                        .map_err(|e| e.to_string());
                    results.set(i, reply);
                    progress.inc(1);
                });
                results
            }
            Sends::Conversations(conversations) => {
                conversations.run_level(client, endpoint, level, seed, progress)
            }
        }
    }
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
