//! The flags of `tandem bench`, their help, and their validation into what a run needs: the
//! [`Workload`] (flags of another workload, or that contradict this one, are errors that say
//! what to use instead) and the levels.

use std::path::PathBuf;

use anyhow::bail;

use super::metrics::Slo;
use super::multi_turn::MultiTurn;
use super::schedule::Level;
use super::shared_prefix::SharedPrefix;
use super::spec::{Random, RandomPrompts, Workload, WorkloadKind};
use super::workload::PromptUnits;
use crate::openai_client::Endpoint;

/// What `tandem bench --help` explains (the subcommand's variant names it too: its doc comment
/// would otherwise stand in for it).
pub const BENCH_LONG_ABOUT: &str = "\
Measure an OpenAI-compatible server under load: tandem's (`tandem serve`) or any other.

Each level sends its requests (--num-prompts of them with the default workload) either at a
fixed number in flight (--concurrency 1,4,16 runs three levels in turn) or arriving as a
Poisson process (--request-rate 2,8: requests per second, each level capped at --concurrency
in flight if given), or all at once (--offline: maximum throughput). Prompts are synthetic
(--input-len words drawn from common English words, about one token each; the server's usage
counts are reported), exactly --input-tokens random token ids (the completions endpoint: the
fixed shapes of published throughput tables), or come from --prompts FILE (a JSON list of
strings, of {\"prompt\": ...} objects, or ShareGPT records). Synthetic prompts are drawn
afresh for each level (--seed plus the level's index), so a prefix cache does not serve a
level from the prompts of the one before; a --prompts file sends the same at every level.
Every request asks for
--output-len tokens with `ignore_eos` (servers that do not know the field stop at their end of
sequence token; the token counts reported are the server's).

Workloads (--workload) that measure prefix caching:
  random         independent prompts, as above (the default).
  shared-prefix  --prefix-groups G groups of --prompts-per-group P prompts: each group has a
                 system prompt of its own (--system-prompt-len S) and each prompt a distinct
                 question after it (--question-len Q); G x P requests per level, all groups'
                 prompts shuffled together (--seed) so a group's prompts do not all arrive
                 back to back. Lengths are words (about one token each; chat: a system and a
                 user message), or exact token counts with --random-token-ids (random ids
                 from --token-ids; needs --endpoint completions). --num-prompts, --input-len,
                 --input-tokens and --prompts do not apply. Default output: 256 tokens.
  multi-turn     --conversations C conversations of --turns T turns: each turn sends the whole
                 history (every earlier user message and the replies as streamed back: a
                 messages array on chat, the concatenated text on completions) and a new user
                 message of --input-len words. A level's concurrency or rate counts
                 conversations; a conversation's next turn is sent once the last reply has
                 ended, after --think-time-ms. Prompts are text only (the replies come back
                 as text, not token ids), so --input-tokens and --random-token-ids are
                 refused, and so are --num-prompts and --prompts. TTFT is also reported by
                 turn: the first turn apart from later turns, which a prefix cache serves.

Measured per request: time to first token (TTFT), inter-token latency (ITL: gaps between
streamed pieces), time per output token after the first (TPOT) and end-to-end latency (E2E);
per level: mean/p50/p90/p99 of each, requests/s, output and total tokens/s, and goodput
(requests/s whose TTFT and mean ITL meet --goodput ttft:MS,itl:MS). Where the server reports
`usage.prompt_tokens_details.cached_tokens` (OpenAI's field: prompt tokens served from its
prefix cache), each level gives the cached share of the prompt tokens (table: `cached`,
JSON: prompt_cache); `-` and null where it does not say. Results: a table on stdout,
--output-json (with the workload and its parameters), --output-png (latency and throughput
against the level). Failed requests are counted and their first errors reported; each request
is bounded by --timeout-s.

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
      --output-len 128

  # prefix caching on a GPU: 64 groups x 16 prompts, system prompts of exactly 2048 tokens,
  # questions of 128, 256 output tokens (the defaults)
  tandem bench --workload shared-prefix --endpoint completions --random-token-ids \\
      --request-rate 4,8,16

  # the same shape on the CPU, small: 8 groups x 4 prompts, 256 + 32 words, 32 tokens out
  tandem bench --workload shared-prefix --prefix-groups 8 --prompts-per-group 4 \\
      --system-prompt-len 256 --question-len 32 --output-len 32 --concurrency 4

  # conversations on a GPU: 32 of 5 turns, 128-word user messages, 128 tokens out
  tandem bench --workload multi-turn --conversations 32 --turns 5 --request-rate 1,2

  # conversations on the CPU: 4 of 3 turns, 32-word messages, 16 tokens out, 500 ms to think
  tandem bench --workload multi-turn --conversations 4 --turns 3 --input-len 32 \\
      --output-len 16 --think-time-ms 500 --concurrency 2";

/// `--num-prompts` of the random workload when not given.
const DEFAULT_NUM_PROMPTS: usize = 64;
/// `--input-len` when not given.
const DEFAULT_INPUT_LEN: usize = 128;
/// `--output-len` when not given, but for shared-prefix.
const DEFAULT_OUTPUT_LEN: usize = 128;
/// `--output-len` of shared-prefix when not given (SGLang's generated-shared-prefix default).
const DEFAULT_SHARED_PREFIX_OUTPUT_LEN: usize = 256;
const DEFAULT_PREFIX_GROUPS: usize = 64;
const DEFAULT_PROMPTS_PER_GROUP: usize = 16;
const DEFAULT_SYSTEM_PROMPT_LEN: usize = 2048;
const DEFAULT_QUESTION_LEN: usize = 128;
const DEFAULT_CONVERSATIONS: usize = 32;
const DEFAULT_TURNS: usize = 5;

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
    /// What to send: independent prompts (`random`), groups of prompts that share a system
    /// prompt (`shared-prefix`), or conversations that resend their history every turn
    /// (`multi-turn`).
    #[arg(long, value_enum, default_value = "random")]
    pub workload: WorkloadKind,
    /// Requests per level [default: 64] (random workload only: shared-prefix sends
    /// --prefix-groups x --prompts-per-group, multi-turn --conversations x --turns).
    #[arg(long, value_name = "N")]
    pub num_prompts: Option<usize>,
    /// Requests in flight (multi-turn: conversations in flight); a list runs one level per
    /// value.
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub concurrency: Vec<usize>,
    /// Poisson arrivals, requests per second (multi-turn: conversations started per second);
    /// a list runs one level per value.
    #[arg(long, value_delimiter = ',', value_name = "R,...")]
    pub request_rate: Vec<f64>,
    /// Every request of the level at once (multi-turn: every conversation), one level: the
    /// server's maximum throughput, as offline benchmarks (TensorRT-LLM's, vLLM's) measure it.
    #[arg(long, conflicts_with_all = ["concurrency", "request_rate"])]
    pub offline: bool,
    /// Words per synthetic prompt [default: 128] (multi-turn: per new user message).
    #[arg(long, value_name = "N")]
    pub input_len: Option<usize>,
    /// Tokens per synthetic prompt, exactly: each prompt is that many random token ids from
    /// --token-ids, sent as a token array (needs --endpoint completions). The fixed input
    /// lengths of TensorRT-LLM's and vLLM's throughput tables; instead of --input-len.
    #[arg(long, value_name = "N", conflicts_with_all = ["input_len", "prompts"])]
    pub input_tokens: Option<usize>,
    /// The ids --input-tokens and --random-token-ids draw from, `LO-HI` (HI excluded): all
    /// below the model's vocabulary size. The default suits every vocabulary of 30k tokens or
    /// more.
    #[arg(long, value_name = "LO-HI", default_value = "1000-30000", value_parser = id_range)]
    pub token_ids: std::ops::Range<u32>,
    /// Tokens to generate per request (`max_tokens`) [default: 128; shared-prefix: 256].
    #[arg(long, value_name = "N")]
    pub output_len: Option<usize>,
    /// Prompts from a JSON file instead of synthetic ones (reused in turn if fewer than
    /// --num-prompts).
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// shared-prefix: groups of prompts, each with a system prompt of its own [default: 64].
    #[arg(long, value_name = "G")]
    pub prefix_groups: Option<usize>,
    /// shared-prefix: prompts per group, each a distinct question after the group's system
    /// prompt [default: 16].
    #[arg(long, value_name = "P")]
    pub prompts_per_group: Option<usize>,
    /// shared-prefix: length of each group's system prompt, in words (exact tokens with
    /// --random-token-ids) [default: 2048].
    #[arg(long, value_name = "S")]
    pub system_prompt_len: Option<usize>,
    /// shared-prefix: length of each question after the system prompt, in words (exact tokens
    /// with --random-token-ids) [default: 128].
    #[arg(long, value_name = "Q")]
    pub question_len: Option<usize>,
    /// shared-prefix: prompts of random token ids from --token-ids (needs --endpoint
    /// completions), so that --system-prompt-len and --question-len are exact token counts.
    #[arg(long)]
    pub random_token_ids: bool,
    /// multi-turn: conversations per level [default: 32].
    #[arg(long, value_name = "C")]
    pub conversations: Option<usize>,
    /// multi-turn: turns (requests) per conversation [default: 5].
    #[arg(long, value_name = "T")]
    pub turns: Option<usize>,
    /// multi-turn: pause between the end of a reply and the conversation's next turn
    /// [default: 0].
    #[arg(long, value_name = "MS")]
    pub think_time_ms: Option<u64>,
    /// Seed of the synthetic prompts, of the shared-prefix order and of the arrival times.
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

impl BenchArgs {
    /// Tokens to generate per request.
    pub fn output_len(&self) -> usize {
        self.output_len.unwrap_or(match self.workload {
            WorkloadKind::SharedPrefix => DEFAULT_SHARED_PREFIX_OUTPUT_LEN,
            WorkloadKind::Random | WorkloadKind::MultiTurn => DEFAULT_OUTPUT_LEN,
        })
    }

    /// The workload the flags describe, checked.
    pub fn workload(&self) -> anyhow::Result<Workload> {
        if self.output_len == Some(0) {
            bail!("--output-len must be at least 1");
        }
        // Multi-turn refuses --random-token-ids for a reason of its own (below).
        let shared_prefix_shape = [
            ("--prefix-groups", self.prefix_groups.is_some()),
            ("--prompts-per-group", self.prompts_per_group.is_some()),
            ("--system-prompt-len", self.system_prompt_len.is_some()),
            ("--question-len", self.question_len.is_some()),
        ];
        let multi_turn_flags = [
            ("--conversations", self.conversations.is_some()),
            ("--turns", self.turns.is_some()),
            ("--think-time-ms", self.think_time_ms.is_some()),
        ];
        match self.workload {
            WorkloadKind::Random => {
                refuse(&shared_prefix_shape, "is for --workload shared-prefix")?;
                refuse(
                    &[("--random-token-ids", self.random_token_ids)],
                    "is for --workload shared-prefix (random token ids here: --input-tokens)",
                )?;
                refuse(&multi_turn_flags, "is for --workload multi-turn")?;
                let num_prompts =
                    at_least_one("--num-prompts", self.num_prompts)?.unwrap_or(DEFAULT_NUM_PROMPTS);
                let prompts = match (&self.prompts, self.input_tokens) {
                    (Some(file), _) => RandomPrompts::File {
                        prompts_file: file.clone(),
                    },
                    (None, Some(tokens)) => {
                        if self.endpoint != Endpoint::Completions {
                            bail!(
                                "--input-tokens sends token ids, which only --endpoint completions takes"
                            );
                        }
                        RandomPrompts::TokenIds {
                            input_tokens: tokens.max(1),
                            token_ids: self.token_ids.clone(),
                        }
                    }
                    (None, None) => RandomPrompts::Words {
                        input_len: self.input_len.unwrap_or(DEFAULT_INPUT_LEN).max(1),
                    },
                };
                Ok(Workload::Random(Random {
                    num_prompts,
                    prompts,
                }))
            }
            WorkloadKind::SharedPrefix => {
                refuse(&multi_turn_flags, "is for --workload multi-turn")?;
                refuse(
                    &[
                        ("--num-prompts", self.num_prompts.is_some()),
                        ("--prompts", self.prompts.is_some()),
                    ],
                    "does not apply to --workload shared-prefix: it sends --prefix-groups x \
                     --prompts-per-group requests per level",
                )?;
                refuse(
                    &[
                        ("--input-len", self.input_len.is_some()),
                        ("--input-tokens", self.input_tokens.is_some()),
                    ],
                    "does not apply to --workload shared-prefix: its prompts are \
                     --system-prompt-len and --question-len long (tokens with \
                     --random-token-ids)",
                )?;
                let units = if self.random_token_ids {
                    if self.endpoint != Endpoint::Completions {
                        bail!(
                            "--random-token-ids sends token ids, which only --endpoint completions takes"
                        );
                    }
                    PromptUnits::TokenIds(self.token_ids.clone())
                } else {
                    PromptUnits::Words
                };
                Ok(Workload::SharedPrefix(SharedPrefix {
                    prefix_groups: at_least_one("--prefix-groups", self.prefix_groups)?
                        .unwrap_or(DEFAULT_PREFIX_GROUPS),
                    prompts_per_group: at_least_one("--prompts-per-group", self.prompts_per_group)?
                        .unwrap_or(DEFAULT_PROMPTS_PER_GROUP),
                    system_prompt_len: at_least_one("--system-prompt-len", self.system_prompt_len)?
                        .unwrap_or(DEFAULT_SYSTEM_PROMPT_LEN),
                    question_len: at_least_one("--question-len", self.question_len)?
                        .unwrap_or(DEFAULT_QUESTION_LEN),
                    units,
                }))
            }
            WorkloadKind::MultiTurn => {
                refuse(&shared_prefix_shape, "is for --workload shared-prefix")?;
                refuse(
                    &[
                        ("--input-tokens", self.input_tokens.is_some()),
                        ("--random-token-ids", self.random_token_ids),
                    ],
                    "does not apply to --workload multi-turn: each turn resends the earlier \
                     replies, which come back as text, not token ids; its prompts are text \
                     (--input-len words per user message)",
                )?;
                refuse(
                    &[
                        ("--num-prompts", self.num_prompts.is_some()),
                        ("--prompts", self.prompts.is_some()),
                    ],
                    "does not apply to --workload multi-turn: it sends --conversations x \
                     --turns requests per level",
                )?;
                Ok(Workload::MultiTurn(MultiTurn {
                    conversations: at_least_one("--conversations", self.conversations)?
                        .unwrap_or(DEFAULT_CONVERSATIONS),
                    turns: at_least_one("--turns", self.turns)?.unwrap_or(DEFAULT_TURNS),
                    user_message_len: at_least_one("--input-len", self.input_len)?
                        .unwrap_or(DEFAULT_INPUT_LEN),
                    think_time_ms: self.think_time_ms.unwrap_or(0),
                }))
            }
        }
    }

    /// The levels to run, each starting `arrivals` requests (or conversations).
    pub fn levels(&self, arrivals: usize) -> anyhow::Result<Vec<Level>> {
        if self.offline {
            return Ok(vec![Level {
                concurrency: arrivals.max(1),
                rate: None,
            }]);
        }
        if self.concurrency.contains(&0) {
            bail!("--concurrency must be at least 1");
        }
        if self
            .request_rate
            .iter()
            .any(|r| !(r.is_finite() && *r > 0.0))
        {
            bail!("--request-rate must be positive");
        }
        if self.request_rate.is_empty() {
            let list = if self.concurrency.is_empty() {
                vec![1]
            } else {
                self.concurrency.clone()
            };
            return Ok(list
                .into_iter()
                .map(|c| Level {
                    concurrency: c,
                    rate: None,
                })
                .collect());
        }
        let cap = match self.concurrency.as_slice() {
            [] => arrivals.max(1),
            [c] => *c,
            _ => bail!("with --request-rate, give at most one --concurrency (the cap in flight)"),
        };
        Ok(self
            .request_rate
            .iter()
            .map(|&r| Level {
                concurrency: cap,
                rate: Some(r),
            })
            .collect())
    }
}

/// An error naming the first of `flags` that was given, followed by `why`.
fn refuse(flags: &[(&str, bool)], why: &str) -> anyhow::Result<()> {
    match flags.iter().find(|(_, given)| *given) {
        Some((flag, _)) => bail!("{flag} {why}"),
        None => Ok(()),
    }
}

/// `value` unless it was given as zero.
fn at_least_one(flag: &str, value: Option<usize>) -> anyhow::Result<Option<usize>> {
    if value == Some(0) {
        bail!("{flag} must be at least 1");
    }
    Ok(value)
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

    /// The levels of `args`, for its workload's arrivals.
    fn levels(args: &BenchArgs) -> anyhow::Result<Vec<Level>> {
        args.levels(args.workload()?.arrivals())
    }

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

    fn refused(argv: &[&str]) -> String {
        parse(argv).workload().unwrap_err().to_string()
    }

    #[test]
    fn the_default_workload_is_random_prompts_as_before() {
        let args = parse(&[]);
        assert_eq!(
            args.workload().unwrap(),
            Workload::Random(Random {
                num_prompts: 64,
                prompts: RandomPrompts::Words { input_len: 128 },
            })
        );
        assert_eq!(args.output_len(), 128);
        let args = parse(&["--endpoint", "completions", "--input-tokens", "40"]);
        assert_eq!(
            args.workload().unwrap(),
            Workload::Random(Random {
                num_prompts: 64,
                prompts: RandomPrompts::TokenIds {
                    input_tokens: 40,
                    token_ids: 1000..30_000
                },
            })
        );
        assert!(refused(&["--input-tokens", "40"]).contains("--endpoint completions"));
        assert!(refused(&["--num-prompts", "0"]).contains("--num-prompts must be at least 1"));
        assert!(refused(&["--output-len", "0"]).contains("--output-len must be at least 1"));
        assert!(refused(&["--turns", "3"]).contains("--turns is for --workload multi-turn"));
        assert!(
            refused(&["--prefix-groups", "3"])
                .contains("--prefix-groups is for --workload shared-prefix")
        );
        assert!(refused(&["--random-token-ids"]).contains("--input-tokens"));
    }

    #[test]
    fn shared_prefix_defaults_to_the_gpu_shape_and_takes_token_ids_on_completions() {
        let args = parse(&["--workload", "shared-prefix"]);
        let Workload::SharedPrefix(shape) = args.workload().unwrap() else {
            panic!("shared-prefix");
        };
        assert_eq!(
            (
                shape.prefix_groups,
                shape.prompts_per_group,
                shape.system_prompt_len,
                shape.question_len
            ),
            (64, 16, 2048, 128)
        );
        assert_eq!(shape.units, PromptUnits::Words);
        assert_eq!(args.output_len(), 256);
        assert_eq!(args.workload().unwrap().requests(), 1024);
        let args = parse(&[
            "--workload",
            "shared-prefix",
            "--endpoint",
            "completions",
            "--random-token-ids",
            "--token-ids",
            "3-500",
            "--prefix-groups",
            "8",
            "--prompts-per-group",
            "4",
            "--system-prompt-len",
            "256",
            "--question-len",
            "32",
            "--output-len",
            "32",
        ]);
        assert_eq!(
            args.workload().unwrap(),
            Workload::SharedPrefix(SharedPrefix {
                prefix_groups: 8,
                prompts_per_group: 4,
                system_prompt_len: 256,
                question_len: 32,
                units: PromptUnits::TokenIds(3..500),
            })
        );
        assert_eq!(args.output_len(), 32);
        // Offline: all 32 prompts at once.
        let args = parse(&[
            "--workload",
            "shared-prefix",
            "--prefix-groups",
            "2",
            "--offline",
        ]);
        assert_eq!(levels(&args).unwrap()[0].concurrency, 32);
    }

    #[test]
    fn shared_prefix_refuses_what_contradicts_it() {
        let sp = |extra: &[&str]| {
            let argv: Vec<&str> = ["--workload", "shared-prefix"]
                .iter()
                .chain(extra)
                .copied()
                .collect();
            refused(&argv)
        };
        assert!(sp(&["--random-token-ids"]).contains("--endpoint completions"));
        assert!(sp(&["--num-prompts", "5"]).contains("--prefix-groups x --prompts-per-group"));
        assert!(sp(&["--input-len", "5"]).contains("--system-prompt-len"));
        assert!(
            sp(&["--endpoint", "completions", "--input-tokens", "5"])
                .contains("--random-token-ids")
        );
        assert!(sp(&["--question-len", "0"]).contains("--question-len must be at least 1"));
        assert!(sp(&["--conversations", "2"]).contains("is for --workload multi-turn"));
    }

    #[test]
    fn multi_turn_counts_conversations_and_refuses_token_ids() {
        let args = parse(&[
            "--workload",
            "multi-turn",
            "--conversations",
            "4",
            "--turns",
            "3",
            "--input-len",
            "32",
            "--think-time-ms",
            "500",
        ]);
        let workload = args.workload().unwrap();
        assert_eq!(
            workload,
            Workload::MultiTurn(MultiTurn {
                conversations: 4,
                turns: 3,
                user_message_len: 32,
                think_time_ms: 500,
            })
        );
        assert_eq!((workload.requests(), workload.arrivals()), (12, 4));
        assert_eq!(args.output_len(), 128);
        let defaults = parse(&["--workload", "multi-turn"]).workload().unwrap();
        assert_eq!(
            defaults,
            Workload::MultiTurn(MultiTurn {
                conversations: 32,
                turns: 5,
                user_message_len: 128,
                think_time_ms: 0,
            })
        );
        // A rate without a cap: every conversation may be in flight.
        let l = levels(&parse(&[
            "--workload",
            "multi-turn",
            "--conversations",
            "6",
            "--request-rate",
            "1",
        ]))
        .unwrap();
        assert_eq!((l[0].concurrency, l[0].rate), (6, Some(1.0)));
        let mt = |extra: &[&str]| {
            let argv: Vec<&str> = ["--workload", "multi-turn"]
                .iter()
                .chain(extra)
                .copied()
                .collect();
            refused(&argv)
        };
        let err = mt(&["--endpoint", "completions", "--input-tokens", "64"]);
        assert!(
            err.contains("--input-tokens does not apply to --workload multi-turn"),
            "{err}"
        );
        assert!(err.contains("not token ids"), "{err}");
        assert!(mt(&["--random-token-ids"]).contains("not token ids"));
        assert!(mt(&["--num-prompts", "8"]).contains("--conversations x --turns"));
        assert!(mt(&["--turns", "0"]).contains("--turns must be at least 1"));
        assert!(mt(&["--system-prompt-len", "8"]).contains("is for --workload shared-prefix"));
    }
}
