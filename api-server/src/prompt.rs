//! Prompts to token ids, and token ids to the strings logprobs show.
//!
//! The work itself is tandem-text's (tokenizer with the model's special tokens, the model's
//! chat template); this module is the api-server's one door to it, so the routes see a small
//! trait ([`PromptCodec`]) and tokenizing runs off the async executor.

use std::collections::HashMap;
use std::sync::Arc;

use tandem_protocol::config::{ReasoningParser, ToolCallParser};
use tandem_text::chat_template::{ChatMessage, ChatTemplate, ChatTemplateError, RenderOptions};
use tandem_text::tokenizer::TextTokenizer;

use crate::error::ApiError;
use crate::reasoning::{THINK_END, THINK_START};
use crate::tools::render::template_input;
use crate::tools::{ToolFormat, ToolRequest, ToolSupport};
use crate::validation::chat_rendering::cut_after_final_message;
use crate::validation::{ChatRendering, OutputOptions, PromptInput, Turn};

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The chat template refused the conversation (for example roles that do not alternate);
    /// the message is about the request and is shown to the client.
    #[error("{0}")]
    Template(String),
    #[error("tokenizer failed: {0}")]
    Tokenizer(String),
}

impl From<PromptError> for ApiError {
    fn from(err: PromptError) -> Self {
        match err {
            PromptError::Template(message) => ApiError::invalid(message, "messages"),
            PromptError::Tokenizer(detail) => ApiError::Internal(detail),
        }
    }
}

/// `err` with the request field that holds the prompt as its `param`: template errors name
/// `messages`, which on `/v1/responses` is `input`.
pub fn naming_prompt_param(err: ApiError, prompt_param: &str) -> ApiError {
    match err {
        ApiError::InvalidRequest {
            message,
            param: Some(param),
            code,
        } if param == "messages" => ApiError::InvalidRequest {
            message,
            param: Some(prompt_param.to_string()),
            code,
        },
        other => other,
    }
}

/// Tokenization as the api-server needs it. Implementations are CPU-bound and synchronous;
/// [`tokenize`] moves the call to a blocking thread.
pub trait PromptCodec: Send + Sync + 'static {
    /// Renders `turns` (and `tools`, when the request lets the model call them) with the
    /// model's chat template as `rendering` says (by default ending with the assistant's
    /// generation prompt), and tokenizes the result without adding special tokens a second
    /// time.
    fn encode_chat(
        &self,
        turns: &[Turn],
        tools: Option<&ToolRequest>,
        rendering: &ChatRendering,
    ) -> Result<Vec<u32>, PromptError>;
    /// Tokenizes a completion prompt, adding the tokenizer's special tokens (BOS) as
    /// Hugging Face's `encode` does by default.
    fn encode_text(&self, text: &str) -> Result<Vec<u32>, PromptError>;
    /// Tokenizes text without adding the tokenizer's special tokens (`/tokenize` with
    /// `add_special_tokens: false`).
    fn encode_plain(&self, text: &str) -> Result<Vec<u32>, PromptError>;
    /// The text of one token, for logprobs (`token` and `bytes`).
    fn token_text(&self, id: u32) -> String;
    /// The text of a prompt given as token ids (special tokens included), for `echo`.
    fn decode_text(&self, ids: &[u32]) -> Result<String, PromptError>;
    /// How this model's tool calls are rendered and parsed; `None`: tool calling is off.
    fn tool_support(&self) -> Option<ToolSupport>;
    /// The text of `id` when it is a special token of the tool-call markup (Mistral's
    /// `[TOOL_CALLS]`, Llama's `<|python_tag|>`) or, with a reasoning parser, a think marker:
    /// the workers' detokenizer skips special tokens, so the parsers get their text from here.
    fn marker_text(&self, id: u32) -> Option<&str>;
}

/// The codec a request's reply is written with: `codec`, except that with vLLM's
/// `return_tokens_as_token_ids` a token's logprobs text is `token_id:<id>`, and with
/// `skip_special_tokens: false` (the workers' text has the special tokens already) the tool
/// parser is given no marker text of its own.
pub fn reply_codec(codec: &Arc<dyn PromptCodec>, output: OutputOptions) -> Arc<dyn PromptCodec> {
    if output == OutputOptions::default() {
        return Arc::clone(codec);
    }
    Arc::new(ReplyCodec {
        model: Arc::clone(codec),
        output,
    })
}

struct ReplyCodec {
    model: Arc<dyn PromptCodec>,
    output: OutputOptions,
}

impl PromptCodec for ReplyCodec {
    fn encode_chat(
        &self,
        turns: &[Turn],
        tools: Option<&ToolRequest>,
        rendering: &ChatRendering,
    ) -> Result<Vec<u32>, PromptError> {
        self.model.encode_chat(turns, tools, rendering)
    }
    fn encode_text(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        self.model.encode_text(text)
    }
    fn encode_plain(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        self.model.encode_plain(text)
    }
    fn token_text(&self, id: u32) -> String {
        if self.output.tokens_as_ids {
            format!("token_id:{id}")
        } else {
            self.model.token_text(id)
        }
    }
    fn decode_text(&self, ids: &[u32]) -> Result<String, PromptError> {
        self.model.decode_text(ids)
    }
    fn tool_support(&self) -> Option<ToolSupport> {
        self.model.tool_support()
    }
    fn marker_text(&self, id: u32) -> Option<&str> {
        if self.output.skip_special_tokens {
            self.model.marker_text(id)
        } else {
            None
        }
    }
}

/// Tokenizes `prompt` on a blocking thread.
pub async fn tokenize(
    codec: Arc<dyn PromptCodec>,
    prompt: PromptInput,
    tools: Option<ToolRequest>,
    rendering: ChatRendering,
) -> Result<Vec<u32>, ApiError> {
    match prompt {
        PromptInput::Tokens(ids) => Ok(ids),
        PromptInput::Text(text) => tokio::task::spawn_blocking(move || codec.encode_text(&text))
            .await
            .map_err(|err| ApiError::Internal(format!("tokenizer task failed: {err}")))?
            .map_err(ApiError::from),
        PromptInput::Chat(turns) => tokio::task::spawn_blocking(move || {
            codec.encode_chat(&turns, tools.as_ref(), &rendering)
        })
        .await
        .map_err(|err| ApiError::Internal(format!("tokenizer task failed: {err}")))?
        .map_err(ApiError::from),
    }
}

/// Tokens all of a request's `bad_words` sequences may hold together: the workers match each
/// against the generated tokens' tail at every step.
pub const MAX_BAD_WORDS_TOKENS: usize = 4096;

/// [`bad_words_token_ids`] on a blocking thread; more than [`MAX_BAD_WORDS_TOKENS`] tokens
/// in all is a 400 naming `bad_words`.
pub async fn tokenize_bad_words(
    codec: Arc<dyn PromptCodec>,
    words: Vec<String>,
) -> Result<Vec<Vec<u32>>, ApiError> {
    if words.is_empty() {
        return Ok(Vec::new());
    }
    let sequences = tokio::task::spawn_blocking(move || bad_words_token_ids(&*codec, &words))
        .await
        .map_err(|err| ApiError::Internal(format!("tokenizer task failed: {err}")))?
        .map_err(ApiError::from)?;
    let tokens: usize = sequences.iter().map(Vec::len).sum();
    if tokens > MAX_BAD_WORDS_TOKENS {
        return Err(ApiError::invalid(
            format!(
                "bad_words tokenize to {tokens} tokens (with and without a leading space); at \
                 most {MAX_BAD_WORDS_TOKENS} are allowed"
            ),
            "bad_words",
        ));
    }
    Ok(sequences)
}

/// A chat request's `prediction` as the token ids its decoding worker drafts from: the text
/// tokenized alone, without special tokens (a draft is compared token by token with what the
/// model picks, so a boundary tokenized differently only costs that draft). Empty: none.
pub async fn tokenize_prediction(
    codec: Arc<dyn PromptCodec>,
    prediction: Option<String>,
) -> Result<Vec<u32>, ApiError> {
    let Some(text) = prediction.filter(|t| !t.is_empty()) else {
        return Ok(Vec::new());
    };
    tokio::task::spawn_blocking(move || codec.encode_plain(&text))
        .await
        .map_err(|err| ApiError::Internal(format!("tokenizer task failed: {err}")))?
        .map_err(|err| ApiError::invalid(format!("tokenizing prediction: {err}"), "prediction"))
}

/// vLLM's `bad_words` as the token sequences the workers ban: each word with its leading
/// whitespace dropped, and again after one space (the form it takes inside a text) where that
/// tokenizes to as many tokens starting with another one, without special tokens added.
pub fn bad_words_token_ids(
    codec: &dyn PromptCodec,
    words: &[String],
) -> Result<Vec<Vec<u32>>, PromptError> {
    let mut sequences = Vec::with_capacity(2 * words.len());
    for word in words {
        let word = word.trim_start();
        let alone = codec.encode_plain(word)?;
        let spaced = codec.encode_plain(&format!(" {word}"))?;
        let distinct = spaced.len() == alone.len() && spaced.first() != alone.first();
        if !alone.is_empty() {
            sequences.push(alone);
        }
        if distinct && !spaced.is_empty() {
            sequences.push(spaced);
        }
    }
    Ok(sequences)
}

/// Loads the model directory's tokenizer and chat template (tandem-text), and decides how
/// tool calls are rendered and parsed (`parser`, `--tool-call-parser`) and whether replies'
/// think markers are read (`reasoning`, `--reasoning-parser`).
pub fn load_codec(
    model_dir: &std::path::Path,
    parser: ToolCallParser,
    reasoning: ReasoningParser,
) -> Result<Box<dyn PromptCodec>, PromptError> {
    let tokenizer =
        TextTokenizer::load(model_dir).map_err(|e| PromptError::Tokenizer(e.to_string()))?;
    // A model without a template still serves /v1/completions; chat requests are refused.
    let template = match ChatTemplate::from_tokenizer(&tokenizer) {
        Ok(template) => Some(template),
        Err(ChatTemplateError::Missing) => None,
        Err(err) => return Err(PromptError::Tokenizer(err.to_string())),
    };
    let tool_support = match (&template, tokenizer.chat_template()) {
        (Some(template), Some(source)) => tool_support(parser, template, source),
        _ => None,
    };
    match tool_support {
        Some(support) => tracing::info!(
            format = %support.format,
            native = support.native,
            "tool calls: {} markup, tools {}",
            support.format,
            if support.native {
                "rendered by the chat template"
            } else {
                "written into the system prompt (the chat template ignores them)"
            }
        ),
        None => tracing::info!("tool calling off (--tool-call-parser none, or no chat template)"),
    }
    let mut wanted: Vec<&'static str> = tool_support
        .map(|support| support.format.markers().to_vec())
        .unwrap_or_default();
    if reasoning != ReasoningParser::None {
        wanted.extend([THINK_START, THINK_END]);
    }
    let markers = marker_tokens(&tokenizer, &wanted);
    Ok(Box::new(TextCodec {
        tokenizer,
        template,
        tool_support,
        markers,
    }))
}

/// The tool-call format for `parser`, and whether the template renders tools (it does if a
/// probe tool's name appears in its rendering).
pub fn tool_support(
    parser: ToolCallParser,
    template: &ChatTemplate,
    source: &str,
) -> Option<ToolSupport> {
    let probe = "tandem_probe_function";
    let mut options = RenderOptions {
        add_generation_prompt: true,
        ..RenderOptions::default()
    };
    options.variables.insert(
        "tools".into(),
        serde_json::json!([{"type": "function", "function": {"name": probe,
            "description": "probe", "parameters": {"type": "object", "properties": {}}}}]),
    );
    let native = template
        .render(&[ChatMessage::new("user", "hello")], &options)
        .is_ok_and(|text| text.contains(probe));
    let format = match parser {
        ToolCallParser::None => return None,
        ToolCallParser::Auto if native => ToolFormat::detect(source).unwrap_or(ToolFormat::Hermes),
        ToolCallParser::Auto => ToolFormat::Hermes,
        ToolCallParser::Hermes => ToolFormat::Hermes,
        ToolCallParser::Llama3Json => ToolFormat::Llama3Json,
        ToolCallParser::Mistral => ToolFormat::Mistral,
    };
    Some(ToolSupport { format, native })
}

/// The `markers` that are special tokens of this tokenizer (skipped when detokenized), by
/// id.
fn marker_tokens(
    tokenizer: &TextTokenizer,
    markers: &[&'static str],
) -> HashMap<u32, &'static str> {
    markers
        .iter()
        .filter_map(|&marker| {
            let id = tokenizer.token_to_id(marker)?;
            let skipped = tokenizer
                .decode(&[id], true)
                .is_ok_and(|text| text.is_empty());
            skipped.then_some((id, marker))
        })
        .collect()
}

/// [`PromptCodec`] over tandem-text: the same tokenizer and template code the workers use.
struct TextCodec {
    tokenizer: TextTokenizer,
    template: Option<ChatTemplate>,
    tool_support: Option<ToolSupport>,
    markers: HashMap<u32, &'static str>,
}

impl PromptCodec for TextCodec {
    fn encode_chat(
        &self,
        turns: &[Turn],
        tools: Option<&ToolRequest>,
        rendering: &ChatRendering,
    ) -> Result<Vec<u32>, PromptError> {
        let template = self.template.as_ref().ok_or_else(|| {
            PromptError::Template("this model has no chat template; use /v1/completions".into())
        })?;
        let input = template_input(turns, tools, self.tool_support);
        let mut variables = rendering.variables.clone();
        // The tools' rendering after the request's variables (which validation keeps apart
        // from these names anyway).
        variables.extend(input.variables);
        let options = RenderOptions {
            add_generation_prompt: rendering.add_generation_prompt,
            variables,
        };
        let mut text = template
            .render(&input.messages, &options)
            .map_err(|err| match err {
                ChatTemplateError::Raised { message } => PromptError::Template(message),
                ChatTemplateError::InvalidMessage { .. } => PromptError::Template(err.to_string()),
                // A variable of the request's may be of a type the template cannot use.
                ChatTemplateError::Render(err) if !rendering.variables.is_empty() => {
                    PromptError::Template(format!(
                        "the chat template failed with the request's chat_template_kwargs: {err}"
                    ))
                }
                other => PromptError::Tokenizer(other.to_string()),
            })?;
        if rendering.continue_final_message {
            let content = turns.last().map_or("", |turn| turn.content.as_str());
            let end = cut_after_final_message(&text, content).ok_or_else(|| {
                PromptError::Template(
                    "continue_final_message: the chat template does not render the last \
                     message's content as sent, so the prompt cannot end inside it"
                        .into(),
                )
            })?;
            text.truncate(end);
        }
        self.tokenizer
            .encode_templated(&text)
            .map_err(|e| PromptError::Tokenizer(e.to_string()))
    }

    fn encode_text(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        self.tokenizer
            .encode(text)
            .map_err(|e| PromptError::Tokenizer(e.to_string()))
    }

    fn encode_plain(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        self.tokenizer
            .encode_templated(text)
            .map_err(|e| PromptError::Tokenizer(e.to_string()))
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer
            .token_bytes(id)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    fn decode_text(&self, ids: &[u32]) -> Result<String, PromptError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| PromptError::Tokenizer(e.to_string()))
    }

    fn tool_support(&self) -> Option<ToolSupport> {
        self.tool_support
    }

    fn marker_text(&self, id: u32) -> Option<&str> {
        self.markers.get(&id).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_errors_name_the_endpoints_prompt_field() {
        let err = ApiError::from(PromptError::Template("roles must alternate".into()));
        match naming_prompt_param(err, "input") {
            ApiError::InvalidRequest { param, message, .. } => {
                assert_eq!(param.as_deref(), Some("input"));
                assert_eq!(message, "roles must alternate");
            }
            other => panic!("{other:?}"),
        }
        let other = ApiError::invalid("bad", "stop");
        assert!(matches!(
            naming_prompt_param(other, "input"),
            ApiError::InvalidRequest { param: Some(p), .. } if p == "stop"
        ));
    }

    /// Tokenizes whole words: as byte-level BPE vocabularies do (a word and the one space
    /// before it make one token, `" dog"`), or, `spaces_dropped`, with spaces dropped as
    /// some tokenizers' normalizers do. A token's id is its text's bytes summed.
    struct WordCodec {
        spaces_dropped: bool,
    }

    fn word_id(piece: &str) -> u32 {
        piece.bytes().map(u32::from).sum()
    }

    impl PromptCodec for WordCodec {
        fn encode_chat(
            &self,
            _: &[Turn],
            _: Option<&ToolRequest>,
            _: &ChatRendering,
        ) -> Result<Vec<u32>, PromptError> {
            unreachable!()
        }
        fn encode_text(&self, _: &str) -> Result<Vec<u32>, PromptError> {
            unreachable!()
        }
        fn encode_plain(&self, text: &str) -> Result<Vec<u32>, PromptError> {
            if self.spaces_dropped {
                return Ok(text.split_whitespace().map(word_id).collect());
            }
            let mut ids = Vec::new();
            let mut piece = String::new();
            for c in text.chars() {
                if c == ' ' && !piece.trim().is_empty() {
                    ids.push(word_id(&piece));
                    piece.clear();
                }
                piece.push(c);
            }
            if !piece.is_empty() {
                ids.push(word_id(&piece));
            }
            Ok(ids)
        }
        fn token_text(&self, _: u32) -> String {
            unreachable!()
        }
        fn decode_text(&self, _: &[u32]) -> Result<String, PromptError> {
            unreachable!()
        }
        fn tool_support(&self) -> Option<ToolSupport> {
            None
        }
        fn marker_text(&self, _: u32) -> Option<&str> {
            None
        }
    }

    #[test]
    fn bad_words_are_banned_alone_and_after_a_space() {
        let words = ["the end".to_string(), "  dog".to_string()];
        let bpe = WordCodec {
            spaces_dropped: false,
        };
        assert_eq!(
            bad_words_token_ids(&bpe, &words).unwrap(),
            [
                vec![word_id("the"), word_id(" end")],
                vec![word_id(" the"), word_id(" end")],
                vec![word_id("dog")],
                vec![word_id(" dog")],
            ],
            "leading whitespace dropped, then each word with one space before it"
        );
        // Where the space changes nothing, each word is banned once.
        let dropping = WordCodec {
            spaces_dropped: true,
        };
        assert_eq!(
            bad_words_token_ids(&dropping, &words).unwrap(),
            [vec![word_id("the"), word_id("end")], vec![word_id("dog")]]
        );
    }
}

/// A codec for the route tests that need one and no tokenizer: token `id`'s text is `t{id}`;
/// it encodes nothing.
#[cfg(test)]
pub(crate) mod test_codec {
    use super::{PromptCodec, PromptError};
    use crate::validation::Turn;

    pub(crate) struct Codec;

    impl PromptCodec for Codec {
        fn encode_chat(
            &self,
            _: &[Turn],
            _: Option<&crate::tools::ToolRequest>,
            _: &crate::validation::ChatRendering,
        ) -> Result<Vec<u32>, PromptError> {
            unreachable!()
        }
        fn encode_text(&self, _: &str) -> Result<Vec<u32>, PromptError> {
            unreachable!()
        }
        fn encode_plain(&self, _: &str) -> Result<Vec<u32>, PromptError> {
            unreachable!()
        }
        fn token_text(&self, id: u32) -> String {
            format!("t{id}")
        }
        fn decode_text(&self, ids: &[u32]) -> Result<String, PromptError> {
            Ok(ids.iter().map(|&id| self.token_text(id)).collect())
        }
        fn tool_support(&self) -> Option<crate::tools::ToolSupport> {
            None
        }
        fn marker_text(&self, _: u32) -> Option<&str> {
            None
        }
    }
}
