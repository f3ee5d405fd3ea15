//! The generation parameters' checks ([`crate::openai::sampling`]), one for every endpoint:
//! the ranges OpenAI documents (vLLM's for its extensions), into the job's [`SamplingSpec`],
//! its stop sequences and the number of choices.
//!
//! The checks run in a fixed order, the same for every endpoint, so that a request with
//! several values out of range is refused naming the same one wherever it is sent.

use tandem_protocol::messages::SamplingSpec;

use super::ModelLimits;
use crate::error::ApiError;
use crate::openai::{GenerationFields, LogitBiasField, StopField};

/// OpenAI's limit on stop sequences.
pub const MAX_STOP_SEQUENCES: usize = 4;

/// Most choices per request (`n`): OpenAI's limit. Each choice is a sequence on the worker;
/// those past its free slots wait in its queue, and past its queue bound go to other workers.
pub const MAX_N: i64 = 128;
/// Bytes of one stop sequence at most. Stop strings travel in the job message over NATS, whose
/// payload limit (1 MiB by default) a longer one could pass, and a stop sequence is a few
/// words in practice (a 1.1 MB one was answered 503 instead of 400).
pub const MAX_STOP_BYTES: usize = 4096;
/// OpenAI's bounds on `logit_bias`: entries, and the bias of one.
pub const MAX_LOGIT_BIAS_ENTRIES: usize = 300;
pub const MAX_LOGIT_BIAS: f64 = 100.0;
/// `stop_token_ids` at most (vLLM sets none; they travel in every job message).
pub const MAX_STOP_TOKEN_IDS: usize = 256;

/// The generation parameters with concrete values.
pub(super) struct ValidGeneration {
    /// Choices to generate (`n`), 1 to [`MAX_N`].
    pub(super) n: u32,
    pub(super) sampling: SamplingSpec,
    pub(super) stop_strings: Vec<String>,
    pub(super) stop_token_ids: Vec<u32>,
    pub(super) ignore_eos: bool,
    /// vLLM's `min_tokens`: tokens generated before a stop token or string may end the
    /// completion (checked against the token limit with it).
    pub(super) min_tokens: u32,
    /// The request field `sampling.grammar` came from (`structured_outputs.regex`, ...).
    pub(super) grammar_param: Option<&'static str>,
    pub(super) output: OutputOptions,
    /// vLLM's `truncate_prompt_tokens`.
    pub(super) truncate_prompt: Option<PromptTruncation>,
    /// vLLM's `prompt_logprobs`: alternatives shown per prompt token.
    pub(super) prompt_logprobs: Option<u32>,
    /// vLLM's `bad_words`, tokenized with the prompt ([`crate::prompt::bad_words_token_ids`]).
    pub(super) bad_words: Vec<String>,
    /// vLLM's `request_id`, checked ([`crate::reply_id::checked`]).
    pub(super) client_request_id: Option<String>,
    pub(super) cache_salt: Option<String>,
    /// vLLM's `priority`: lower is served first.
    pub(super) priority: i32,
}

/// How a completion's text and logprobs are written (vLLM's options; OpenAI's are the
/// defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputOptions {
    /// The text ends with the stop string that ended it.
    pub include_stop_str_in_output: bool,
    /// Special tokens write no text.
    pub skip_special_tokens: bool,
    /// Logprobs name each token `token_id:<id>`.
    pub tokens_as_ids: bool,
}

impl Default for OutputOptions {
    fn default() -> Self {
        OutputOptions {
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            tokens_as_ids: false,
        }
    }
}

/// vLLM's `truncate_prompt_tokens`: the prompt's first tokens dropped, after tokenizing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptTruncation {
    /// The last this many tokens.
    Last(u32),
    /// As many of the last tokens as leave room for the token limit (-1).
    ToFit,
}

/// Most alternatives `prompt_logprobs` may ask for per token (as `top_logprobs`).
pub const MAX_PROMPT_LOGPROBS: i64 = 20;

/// Most ids `allowed_token_ids` may list (they travel in every job message).
pub const MAX_ALLOWED_TOKEN_IDS: usize = 16_384;

/// Most words `bad_words` may list, and bytes of one: vLLM's GPU runner takes 128 words.
/// Each is matched against the tail of the generated tokens at every step.
pub const MAX_BAD_WORDS: usize = 128;
pub const MAX_BAD_WORD_BYTES: usize = 1024;

/// Sampling values for requests that omit them, from the model directory's
/// `generation_config.json` (`temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`), as vLLM
/// takes them by default: a model whose card recommends, say, temperature 0.2 answers a request
/// without one at 0.2, not at OpenAI's 1.0. A field the file lacks keeps OpenAI's default;
/// `do_sample` is not read (vLLM does not either); a request's own value always wins.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl SamplingDefaults {
    /// The defaults `generation` gives, checked against the ranges a request's values must
    /// meet; the error names the key and its value.
    pub fn from_generation_config(
        generation: &tandem_model::GenerationConfig,
    ) -> Result<Self, String> {
        let check = |value: Option<f64>, low: f64, high: f64, open_low: bool, key: &str| {
            value
                .map(|v| {
                    in_range(v, low, high, open_low, key)
                        .map_err(|_| format!("{key} {v} is outside the range requests may ask for"))
                })
                .transpose()
        };
        Ok(SamplingDefaults {
            temperature: check(generation.temperature, 0.0, 2.0, false, "temperature")?,
            top_p: check(generation.top_p, 0.0, 1.0, true, "top_p")?,
            // As in a request, 0 means no top-k limit.
            top_k: generation.top_k,
            min_p: check(generation.min_p, 0.0, 1.0, false, "min_p")?,
            repetition_penalty: check(
                generation.repetition_penalty,
                0.0,
                10.0,
                true,
                "repetition_penalty",
            )?,
        })
    }

    /// OpenAI's defaults with these in their place.
    pub fn spec(&self) -> SamplingSpec {
        let mut spec = SamplingSpec::default();
        if let Some(t) = self.temperature {
            spec.temperature = t;
        }
        if let Some(p) = self.top_p {
            spec.top_p = p;
        }
        if let Some(k) = self.top_k {
            spec.top_k = k;
        }
        if let Some(p) = self.min_p {
            spec.min_p = p;
        }
        if let Some(r) = self.repetition_penalty {
            spec.repetition_penalty = r;
        }
        spec
    }

    /// `temperature=0.2 top_p=0.9`, for the startup log; empty where the file sets none.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = self.temperature {
            parts.push(format!("temperature={t}"));
        }
        if let Some(p) = self.top_p {
            parts.push(format!("top_p={p}"));
        }
        if let Some(k) = self.top_k {
            parts.push(format!("top_k={k}"));
        }
        if let Some(p) = self.min_p {
            parts.push(format!("min_p={p}"));
        }
        if let Some(r) = self.repetition_penalty {
            parts.push(format!("repetition_penalty={r}"));
        }
        parts.join(" ")
    }
}

/// Checks `fields` and turns them into the job's values; absent fields take the model's
/// sampling defaults ([`SamplingDefaults`]), else OpenAI's (one choice,
/// [`SamplingSpec::default`], no stop sequence).
pub(super) fn validate_generation(
    fields: &GenerationFields,
    limits: &ModelLimits,
) -> Result<ValidGeneration, ApiError> {
    let n = match fields.n {
        None => 1,
        Some(n) if (1..=MAX_N).contains(&n) => n as u32,
        Some(n) => {
            return Err(ApiError::invalid(
                format!("n must be between 1 and {MAX_N}, got {n}"),
                "n",
            ));
        }
    };
    let mut sampling = limits.sampling_defaults.spec();
    if let Some(t) = fields.sampling.temperature {
        sampling.temperature = in_range(t, 0.0, 2.0, false, "temperature")?;
    }
    if let Some(p) = fields.sampling.top_p {
        sampling.top_p = in_range(p, 0.0, 1.0, true, "top_p")?;
    }
    if let Some(p) = fields.presence_penalty {
        sampling.presence_penalty = in_range(p, -2.0, 2.0, false, "presence_penalty")?;
    }
    if let Some(p) = fields.frequency_penalty {
        sampling.frequency_penalty = in_range(p, -2.0, 2.0, false, "frequency_penalty")?;
    }
    if let Some(p) = fields.repetition_penalty {
        sampling.repetition_penalty = in_range(p, 0.0, 10.0, true, "repetition_penalty")?;
    }
    if let Some(k) = fields.top_k {
        // vLLM's convention: -1 (or 0) disables top-k.
        sampling.top_k = match k {
            -1 | 0 => 0,
            k if k > 0 && k <= u32::MAX as i64 => k as u32,
            k => {
                return Err(ApiError::invalid(
                    format!("top_k must be -1 or positive, got {k}"),
                    "top_k",
                ));
            }
        };
    }
    if let Some(p) = fields.min_p {
        sampling.min_p = in_range(p, 0.0, 1.0, false, "min_p")?;
    }
    // OpenAI's seed is any integer; the bit pattern is the worker's seed.
    sampling.seed = fields.seed.map(|s| s as u64);
    if let Some(bias) = &fields.logit_bias {
        sampling.logit_bias = logit_bias(bias, limits)?;
    }
    let mut grammar_param = None;
    if let Some(constraint) = &fields.structured_outputs {
        let (grammar, param) = super::structured_outputs::structured_outputs(constraint)?;
        sampling.grammar = Some(grammar);
        grammar_param = Some(param);
    }

    let stop_strings = match &fields.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(list)) => list.clone(),
    };
    if stop_strings.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid(
            format!(
                "stop has {} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                stop_strings.len()
            ),
            "stop",
        ));
    }
    if stop_strings.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop sequences must not be empty",
            "stop",
        ));
    }
    if let Some((i, long)) = stop_strings
        .iter()
        .enumerate()
        .find(|(_, s)| s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::invalid(
            format!(
                "stop sequence {i} is {} bytes long; at most {MAX_STOP_BYTES} are allowed",
                long.len()
            ),
            "stop",
        ));
    }

    let stop_token_ids = fields.stop_token_ids.as_deref().unwrap_or_default();
    if stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(ApiError::invalid(
            format!(
                "stop_token_ids has {} ids; at most {MAX_STOP_TOKEN_IDS} are allowed",
                stop_token_ids.len()
            ),
            "stop_token_ids",
        ));
    }
    let stop_token_ids =
        super::vocabulary_ids(stop_token_ids, limits, |i| format!("stop_token_ids[{i}]"))?;

    if let Some(ids) = &fields.allowed_token_ids {
        if ids.is_empty() || ids.len() > MAX_ALLOWED_TOKEN_IDS {
            return Err(ApiError::invalid(
                format!(
                    "allowed_token_ids has {} ids; 1 to {MAX_ALLOWED_TOKEN_IDS} are allowed",
                    ids.len()
                ),
                "allowed_token_ids",
            ));
        }
        let mut ids = super::vocabulary_ids(ids, limits, |i| format!("allowed_token_ids[{i}]"))?;
        ids.sort_unstable();
        ids.dedup();
        sampling.allowed_token_ids = ids;
    }
    let truncate_prompt = prompt_truncation(fields.truncate_prompt_tokens)?;
    let prompt_logprobs = match fields.prompt_logprobs {
        None => None,
        Some(k) if (0..=MAX_PROMPT_LOGPROBS).contains(&k) => Some(k as u32),
        Some(k) => {
            return Err(ApiError::invalid(
                format!(
                    "prompt_logprobs must be between 0 and {MAX_PROMPT_LOGPROBS} (alternatives \
                     per prompt token), got {k}"
                ),
                "prompt_logprobs",
            ));
        }
    };
    // Computed by the worker that prefills the prompt (docs/protocol.md, "Prompt logprobs").
    sampling.prompt_logprobs = prompt_logprobs;
    let output = OutputOptions {
        include_stop_str_in_output: fields.include_stop_str_in_output.unwrap_or(false),
        skip_special_tokens: fields.skip_special_tokens.unwrap_or(true),
        tokens_as_ids: fields.return_tokens_as_token_ids.unwrap_or(false),
    };
    let min_tokens = match fields.min_tokens {
        None => 0,
        Some(n) if (0..=i64::from(u32::MAX)).contains(&n) => n as u32,
        Some(n) => {
            return Err(ApiError::invalid(
                format!("min_tokens must be at least 0, got {n}"),
                "min_tokens",
            ));
        }
    };

    let bad_words = bad_words(fields.bad_words.as_deref().unwrap_or_default())?;

    Ok(ValidGeneration {
        n,
        sampling,
        stop_strings,
        stop_token_ids,
        ignore_eos: fields.ignore_eos.unwrap_or(false),
        min_tokens,
        grammar_param,
        output,
        truncate_prompt,
        prompt_logprobs,
        bad_words,
        client_request_id: fields
            .request_id
            .as_deref()
            .map(|id| crate::reply_id::checked(id, "request_id"))
            .transpose()?,
        cache_salt: cache_salt(fields.cache_salt.as_deref())?,
        priority: priority(fields.priority)?,
    })
}

/// vLLM's `truncate_prompt_tokens`: -1 (as many as fit) or a count of the prompt's last tokens.
pub(crate) fn prompt_truncation(value: Option<i64>) -> Result<Option<PromptTruncation>, ApiError> {
    match value {
        None => Ok(None),
        Some(-1) => Ok(Some(PromptTruncation::ToFit)),
        Some(n) if (1..=i64::from(u32::MAX)).contains(&n) => {
            Ok(Some(PromptTruncation::Last(n as u32)))
        }
        Some(n) => Err(ApiError::invalid(
            format!("truncate_prompt_tokens must be -1 or at least 1, got {n}"),
            "truncate_prompt_tokens",
        )),
    }
}

/// vLLM's `priority`, 0 when absent: any 32-bit signed integer (vLLM takes any integer; the
/// workers order by it, lower first).
pub(crate) fn priority(priority: Option<i64>) -> Result<i32, ApiError> {
    let priority = priority.unwrap_or(0);
    i32::try_from(priority).map_err(|_| {
        ApiError::invalid(
            format!(
                "priority must be an integer from {} to {}, got {priority}",
                i32::MIN,
                i32::MAX
            ),
            "priority",
        )
    })
}

/// `bad_words` with their checks: at most [`MAX_BAD_WORDS`], each with text beside its
/// leading whitespace (which the tokenization drops) and at most [`MAX_BAD_WORD_BYTES`].
fn bad_words(words: &[String]) -> Result<Vec<String>, ApiError> {
    if words.len() > MAX_BAD_WORDS {
        return Err(ApiError::invalid(
            format!(
                "bad_words has {} words; at most {MAX_BAD_WORDS} are allowed",
                words.len()
            ),
            "bad_words",
        ));
    }
    for (i, word) in words.iter().enumerate() {
        if word.trim_start().is_empty() {
            return Err(ApiError::invalid(
                "a bad word must have text besides whitespace",
                &format!("bad_words[{i}]"),
            ));
        }
        if word.len() > MAX_BAD_WORD_BYTES {
            return Err(ApiError::invalid(
                format!(
                    "a bad word is {} bytes long; at most {MAX_BAD_WORD_BYTES} are allowed",
                    word.len()
                ),
                &format!("bad_words[{i}]"),
            ));
        }
    }
    Ok(words.to_vec())
}

/// Bytes of a `cache_salt` at most: it travels in every job message and is hashed into the
/// name of each of the request's cached blocks.
pub const MAX_CACHE_SALT_BYTES: usize = 1024;

/// `cache_salt` as the job carries it: a non-empty string of at most
/// [`MAX_CACHE_SALT_BYTES`] (an empty one would read as "salted" while meaning nothing).
pub(crate) fn cache_salt(salt: Option<&str>) -> Result<Option<String>, ApiError> {
    match salt {
        None => Ok(None),
        Some("") => Err(ApiError::invalid(
            "cache_salt must be a non-empty string",
            "cache_salt",
        )),
        Some(salt) if salt.len() > MAX_CACHE_SALT_BYTES => Err(ApiError::invalid(
            format!(
                "cache_salt is {} bytes long; at most {MAX_CACHE_SALT_BYTES} are allowed",
                salt.len()
            ),
            "cache_salt",
        )),
        Some(salt) => Ok(Some(salt.to_owned())),
    }
}

fn in_range(value: f64, low: f64, high: f64, low_open: bool, param: &str) -> Result<f32, ApiError> {
    let above_low = if low_open { value > low } else { value >= low };
    if value.is_finite() && above_low && value <= high {
        Ok(value as f32)
    } else {
        let open = if low_open { "(" } else { "[" };
        Err(ApiError::invalid(
            format!("{param} must be in {open}{low}, {high}], got {value}"),
            param,
        ))
    }
}

/// `logit_bias` as `(token id, bias)` by increasing id: ids in the vocabulary, biases in
/// [-100, 100], at most [`MAX_LOGIT_BIAS_ENTRIES`] of them (OpenAI's rules).
fn logit_bias(field: &LogitBiasField, limits: &ModelLimits) -> Result<Vec<(u32, f32)>, ApiError> {
    const PARAM: &str = "logit_bias";
    if field.len() > MAX_LOGIT_BIAS_ENTRIES {
        return Err(ApiError::invalid(
            format!(
                "logit_bias has {} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed",
                field.len()
            ),
            PARAM,
        ));
    }
    let mut biases = Vec::with_capacity(field.len());
    for (key, value) in field {
        let id = match key.trim().parse::<i64>() {
            Ok(id) if id >= 0 && id < i64::from(limits.vocab_size) => id as u32,
            _ => {
                return Err(ApiError::invalid(
                    format!(
                        "logit_bias key {key:?} is not a token id of this model's vocabulary \
                         (0..{})",
                        limits.vocab_size
                    ),
                    PARAM,
                ));
            }
        };
        let bias = value
            .as_f64()
            .filter(|b| (-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(b))
            .ok_or_else(|| {
                ApiError::invalid(
                    format!(
                        "logit_bias of token {id} must be a number in [-{MAX_LOGIT_BIAS}, \
                         {MAX_LOGIT_BIAS}], got {value}"
                    ),
                    PARAM,
                )
            })?;
        biases.push((id, bias as f32));
    }
    biases.sort_unstable_by_key(|&(id, _)| id);
    if let Some(pair) = biases.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(ApiError::invalid(
            format!("logit_bias names token {} twice", pair[0].0),
            PARAM,
        ));
    }
    Ok(biases)
}
