//! `POST /v1/chat/completions`, streamed (`chat.completion.chunk` events) or not.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use actix_web::{HttpMessage, HttpRequest, HttpResponse, post, web};
use bytes::Bytes;
use tandem_protocol::messages::{FinishReason as WireFinish, TokenEvent, Usage as WireUsage};

use super::logprobs::{chat_entry, vllm_prompt_logprobs};
use super::{
    ChoiceFormat, client_left, finish_reason, reasoning_splitter, reply_choices, start_generation,
    unless_client_leaves,
};
use crate::auth::TenantSalt;
use crate::disconnect::ClientSocket;
use crate::dispatch::{Completed, RequestRecord};
use crate::error::ApiError;
use crate::metrics::{Endpoint, Event, Metrics};
use crate::openai::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    ChatLogprobs, ChunkChoice, Delta, FinishReason, FunctionCall, FunctionCallDelta, ToolCall,
    ToolCallDelta, Usage,
};
use crate::prompt::PromptCodec;
use crate::reasoning::{ReasoningSplitter, THINK_END, THINK_START};
use crate::sse::{ChunkFormat, sse_data};
use crate::state::{AppState, unix_now_s};
use crate::tools::new_call_id;
use crate::tools::parser::{CallParser, ParseEvent, ParsedReply};
use crate::validation::validate_chat;

#[post("/v1/chat/completions")]
pub async fn chat_completions(
    request: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let socket = ClientSocket::of(&request);
    let mut record = RequestRecord::new(state.metrics.clone(), Endpoint::Chat);
    let valid = crate::fields::CHAT_COMPLETIONS
        .parse::<ChatCompletionRequest>(body.into_inner())
        .and_then(|body| validate_chat(&body, &state.limits))
        .inspect_err(|err| record.fail(err))?;
    record.set_adapter(valid.lora.as_deref());
    if let Some(grammar) = &valid.sampling.grammar {
        // From `response_format` or `structured_outputs` (which name themselves), or else
        // built from `tools` for a required or named tool call.
        let checked = match (valid.grammar_param, &valid.tools) {
            (Some(param), _) => state.grammars.check(grammar, param).await,
            (None, Some(tools)) => {
                state
                    .grammars
                    .check_tool_calls(grammar, tools, |i| {
                        format!("tools[{i}].function.parameters")
                    })
                    .await
            }
            (None, None) => state.grammars.check(grammar, "tools").await,
        };
        checked.inspect_err(|err| record.fail(err))?;
    }
    let ids =
        crate::reply_id::ReplyId::of(&request, "chatcmpl", valid.client_request_id.as_deref())
            .inspect_err(|err| record.fail(err))?;
    let id = ids.response.clone();
    let tenant = request.extensions().get::<TenantSalt>().cloned();
    let started = start_generation(&state, &valid, record, ids.internal.clone(), tenant);
    let Some(generation) = unless_client_leaves(socket.clone(), started).await else {
        return Ok(client_left());
    };
    let generations = generation?;
    let created = unix_now_s();
    let prompt_len = generations.first().map_or(0, |g| g.prompt_ids().len());
    let prompt_logprobs = valid.prompt_logprobs.and_then(|top| {
        let prompt_ids: Arc<[u32]> = Arc::from(generations.first()?.prompt_ids());
        Some((prompt_ids, top as usize))
    });
    // With a reasoning parser, each choice's reply is split (the same prompt for all).
    let splitter = generations
        .first()
        .and_then(|g| reasoning_splitter(&state, g.prompt_ids()));
    let reasoning_tokens = Arc::new(AtomicU32::new(0));
    // One format per choice: each choice's tool calls are parsed from its own text.
    let chunks = |index: usize| ChatChunks {
        reasoning: splitter.clone(),
        reasoning_tokens: reasoning_tokens.clone(),
        prompt_logprobs: prompt_logprobs.clone(),
        echo: valid.chat_echo.clone(),
        running: valid
            .continuous_usage
            .then(|| super::RunningUsage::new(prompt_len)),
        id: id.clone(),
        index: index as u32,
        created,
        // The model the request named: the served model or a LoRA adapter.
        model: valid
            .lora
            .clone()
            .unwrap_or_else(|| state.limits.served_model_name.clone()),
        include_usage: valid.include_usage,
        logprobs: valid.logprobs.is_some(),
        codec: crate::prompt::reply_codec(&state.codec, valid.output),
        calls: match (&valid.tools, state.limits.tool_support) {
            (Some(tools), Some(support)) if tools.active() => {
                Some(CallParser::new(support.format, tools.parallel))
            }
            _ => None,
        },
        call_ids: Vec::new(),
        metrics: state.metrics.clone(),
    };
    let reply = reply_choices(generations, valid.stream, socket, chunks, valid.n as usize).await?;
    Ok(ids.echoed(reply))
}

/// The chunks of one streamed chat completion, or the whole completion of one that is not.
pub struct ChatChunks {
    /// Splits the reply's reasoning from its answer (`--reasoning-parser`).
    pub reasoning: Option<ReasoningSplitter>,
    /// The reasoning tokens of every choice of the request, added as each finishes; the
    /// usage (sent once, after them all) reads it.
    pub reasoning_tokens: Arc<AtomicU32>,
    pub id: String,
    /// The choice these chunks carry.
    pub index: u32,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
    pub logprobs: bool,
    pub codec: Arc<dyn PromptCodec>,
    /// The tool-call parser, when the request lets the model call tools.
    pub calls: Option<CallParser>,
    /// vLLM's `prompt_logprobs`: the prompt's ids and the alternatives to show, when asked.
    pub prompt_logprobs: Option<(Arc<[u32]>, usize)>,
    /// vLLM's `echo`: the text the content starts with (the last, assistant, message's).
    pub echo: Option<String>,
    /// vLLM's `continuous_usage_stats`: this choice's usage so far, in every chunk.
    pub running: Option<super::RunningUsage>,
    /// The ids of the calls parsed so far, by index.
    pub call_ids: Vec<String>,
    pub metrics: Metrics,
}

/// The output text of `tokens` as the tool-call parser reads it: with the text of the
/// markup's special tokens, which the workers' detokenizer leaves out.
pub(super) fn parser_text(codec: &dyn PromptCodec, tokens: &[TokenEvent]) -> String {
    tokens
        .iter()
        .map(|t| match codec.marker_text(t.id) {
            Some(marker) => format!("{marker}{}", t.text),
            None => t.text.clone(),
        })
        .collect()
}

/// The text of one output token as the reasoning splitter reads it: with the text of a
/// special `<think>` or `</think>` (which the workers' detokenizer leaves out), and, for the
/// tool-call parser (`tools`), of the call markup's special tokens.
pub(super) fn piece_text<'t>(
    codec: &dyn PromptCodec,
    token: &'t TokenEvent,
    tools: bool,
) -> Cow<'t, str> {
    match codec.marker_text(token.id) {
        Some(marker) if tools || marker == THINK_START || marker == THINK_END => {
            Cow::Owned(format!("{marker}{}", token.text))
        }
        _ => Cow::Borrowed(&token.text),
    }
}

/// Counts a reply's calls (`tandem_tool_calls_total`) and logs call markup the model wrote
/// that did not parse (returned to the client as content): an operator seeing it often may
/// have the wrong `--tool-call-parser`.
pub(super) fn record_tool_calls(metrics: &Metrics, request_id: &str, parser: &CallParser) {
    metrics.record(Event::ToolCalls {
        parsed: parser.calls(),
        malformed: parser.malformed(),
    });
    if parser.malformed() > 0 {
        tracing::warn!(
            request_id = %request_id,
            malformed = parser.malformed(),
            parsed = parser.calls(),
            "the model wrote tool-call markup that is not a call (a JSON object with a name \
             and arguments); it was returned as content"
        );
    }
}

impl ChatChunks {
    /// The reply text of `tokens` that is answer (what the tool-call parser reads, or the
    /// content), and the reasoning among them (empty without a reasoning parser).
    fn answer_text(&mut self, tokens: &[TokenEvent]) -> (String, String) {
        let tools = self.calls.is_some();
        let codec = self.codec.as_ref();
        match self.reasoning.as_mut() {
            Some(splitter) => {
                let (mut reasoning, mut answer) = (String::new(), String::new());
                for token in tokens {
                    let split = splitter.push_token(&piece_text(codec, token, tools));
                    reasoning.push_str(&split.reasoning);
                    answer.push_str(&split.content);
                }
                (answer, reasoning)
            }
            None if tools => (parser_text(codec, tokens), String::new()),
            None => (
                tokens.iter().map(|t| t.text.as_str()).collect(),
                String::new(),
            ),
        }
    }

    /// The end of the reply for the reasoning splitter: what it held back, split, and its
    /// reasoning tokens added to the request's.
    fn finish_reasoning(&mut self) -> (String, String) {
        match self.reasoning.as_mut() {
            Some(splitter) => {
                let split = splitter.finish();
                let tokens = splitter.reasoning_tokens();
                self.reasoning_tokens.fetch_add(tokens, Ordering::Relaxed);
                if splitter.reasoned() {
                    self.metrics.record(Event::Reasoning { tokens });
                }
                (split.content, split.reasoning)
            }
            None => (String::new(), String::new()),
        }
    }

    /// Whether this reply reasoned (it then has a `reasoning`, maybe empty).
    fn reasoned(&self) -> bool {
        self.reasoning
            .as_ref()
            .is_some_and(ReasoningSplitter::reasoned)
    }

    /// The request's usage with the reasoning tokens of its replies.
    fn with_reasoning(&self, usage: WireUsage) -> Usage {
        let mut usage = Usage::from(usage);
        usage.completion_tokens_details.reasoning_tokens =
            self.reasoning_tokens.load(Ordering::Relaxed);
        usage
    }

    /// [`record_tool_calls`] of this choice's parser.
    fn record_calls(&self) {
        if let Some(parser) = &self.calls {
            record_tool_calls(&self.metrics, &self.id, parser);
        }
    }

    /// `length` stays; a reply that called tools ends with `tool_calls`.
    fn reply_finish(&self, reason: WireFinish) -> FinishReason {
        match finish_reason(reason) {
            FinishReason::Stop if self.calls.as_ref().is_some_and(|p| p.calls() > 0) => {
                FinishReason::ToolCalls
            }
            other => other,
        }
    }

    /// The content and tool-call deltas of parser events; call ids are made here.
    fn deltas(&mut self, events: Vec<ParseEvent>) -> (Option<String>, Vec<ToolCallDelta>) {
        let mut content: Option<String> = None;
        let mut calls = Vec::new();
        for event in events {
            match event {
                ParseEvent::Content(text) => {
                    content.get_or_insert_with(String::new).push_str(&text)
                }
                ParseEvent::CallStart { index, name } => {
                    let id = new_call_id();
                    self.call_ids.push(id.clone());
                    calls.push(ToolCallDelta {
                        index,
                        id: Some(id),
                        kind: Some("function"),
                        function: FunctionCallDelta {
                            name: Some(name),
                            arguments: String::new(),
                        },
                    });
                }
                ParseEvent::Arguments { index, text } => match calls.last_mut() {
                    // One delta per call and chunk: the first carries the arguments' start.
                    Some(last) if last.index == index => last.function.arguments.push_str(&text),
                    _ => calls.push(ToolCallDelta {
                        index,
                        id: None,
                        kind: None,
                        function: FunctionCallDelta {
                            name: None,
                            arguments: text,
                        },
                    }),
                },
            }
        }
        (content, calls)
    }

    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: None,
            choices,
            usage: self
                .include_usage
                .then_some(usage.or(self.running.map(|r| r.usage()))),
        }
    }
}

impl ChoiceFormat for ChatChunks {
    type Choice = ChatChoice;
    type Response = ChatCompletion;

    /// The `chat.completion` object of a request that is not streamed, with its choices.
    fn completion(self, choices: Vec<ChatChoice>, usage: WireUsage) -> ChatCompletion {
        let usage = self.with_reasoning(usage);
        ChatCompletion {
            id: self.id,
            object: "chat.completion",
            created: self.created,
            model: self.model,
            system_fingerprint: None,
            prompt_logprobs: choices.iter().find_map(|c| c.prompt_logprobs.clone()),
            choices,
            usage,
        }
    }

    /// This choice of a request that is not streamed.
    fn choice(mut self, completed: Completed) -> ChatChoice {
        let (answer, reasoning) = if self.reasoning.is_some() {
            let (mut answer, mut reasoning) = self.answer_text(&completed.tokens);
            let (answer_tail, reasoning_tail) = self.finish_reasoning();
            answer.push_str(&answer_tail);
            reasoning.push_str(&reasoning_tail);
            (answer, self.reasoned().then_some(reasoning))
        } else if self.calls.is_some() {
            (parser_text(self.codec.as_ref(), &completed.tokens), None)
        } else {
            (completed.text(), None)
        };
        let (content, tool_calls) = match self.calls.as_mut() {
            // A reply that only reasoned (cut off before its answer) has no content.
            None if reasoning.is_some() && answer.is_empty() => (None, Vec::new()),
            None => (Some(answer), Vec::new()),
            Some(parser) => {
                let mut reply = ParsedReply::default();
                reply.add(parser.push(&answer));
                reply.add(parser.finish());
                let calls = reply
                    .calls
                    .into_iter()
                    .map(|(name, arguments)| ToolCall {
                        id: new_call_id(),
                        kind: "function",
                        function: FunctionCall { name, arguments },
                    })
                    .collect();
                (reply.content, calls)
            }
        };
        self.record_calls();
        let content = match self.echo.take() {
            Some(mut echoed) => {
                echoed.push_str(content.as_deref().unwrap_or_default());
                Some(echoed)
            }
            None => content,
        };
        let finish = self.reply_finish(completed.reason);
        let logprobs = ChatLogprobs {
            content: completed
                .tokens
                .iter()
                .filter_map(|t| chat_entry(self.codec.as_ref(), t))
                .collect(),
            refusal: None,
        };
        ChatChoice {
            index: self.index,
            message: AssistantMessage {
                role: "assistant",
                content,
                reasoning_content: reasoning.clone(),
                reasoning,
                refusal: None,
                tool_calls,
            },
            logprobs: self.logprobs.then_some(logprobs),
            finish_reason: finish,
            prompt_logprobs: self.prompt_logprobs.as_ref().map(|(ids, top)| {
                vllm_prompt_logprobs(self.codec.as_ref(), ids, &completed.prompt_logprobs, *top)
            }),
        }
    }
}

impl ChunkFormat for ChatChunks {
    fn opening(&mut self) -> Vec<Bytes> {
        let choice = ChunkChoice {
            index: self.index,
            delta: Delta {
                role: Some("assistant"),
                content: Some(self.echo.take().unwrap_or_default()),
                ..Delta::default()
            },
            logprobs: None,
            finish_reason: None,
        };
        vec![sse_data(&self.chunk(vec![choice], None))]
    }

    fn tokens(&mut self, tokens: &[TokenEvent]) -> Option<Bytes> {
        if let Some(running) = &mut self.running {
            running.completion_tokens += tokens.len() as u32;
        }
        let (answer, reasoning) = self.answer_text(tokens);
        let (text, calls) = match self.calls.as_mut() {
            None => (answer, Vec::new()),
            Some(parser) => {
                let events = parser.push(&answer);
                let (content, calls) = self.deltas(events);
                (content.unwrap_or_default(), calls)
            }
        };
        let logprobs = self.logprobs.then(|| ChatLogprobs {
            content: tokens
                .iter()
                .filter_map(|t| chat_entry(self.codec.as_ref(), t))
                .collect(),
            refusal: None,
        });
        // Tokens held back by the worker (a partial character or a possible stop string) carry
        // no text; send nothing unless their logprobs are wanted.
        if text.is_empty()
            && calls.is_empty()
            && reasoning.is_empty()
            && logprobs.as_ref().is_none_or(|l| l.content.is_empty())
        {
            return None;
        }
        let choice = ChunkChoice {
            index: self.index,
            delta: Delta {
                role: None,
                content: (!text.is_empty() || (calls.is_empty() && reasoning.is_empty()))
                    .then_some(text),
                tool_calls: (!calls.is_empty()).then_some(calls),
                ..Delta::reasoning(reasoning)
            },
            logprobs,
            finish_reason: None,
        };
        Some(sse_data(&self.chunk(vec![choice], None)))
    }

    fn finished(&mut self, reason: WireFinish, usage: WireUsage) -> Vec<Bytes> {
        if let Some(running) = &mut self.running {
            running.completion_tokens = usage.completion_tokens;
        }
        let mut chunks = Vec::new();
        // What the splitter and the parser held back (a possible marker, an unfinished
        // call) is decided now.
        let (answer, reasoning) = self.finish_reasoning();
        let (content, calls) = match self.calls.as_mut() {
            Some(parser) => {
                let mut events = parser.push(&answer);
                events.extend(parser.finish());
                self.record_calls();
                self.deltas(events)
            }
            None => ((!answer.is_empty()).then_some(answer), Vec::new()),
        };
        if content.is_some() || !calls.is_empty() || !reasoning.is_empty() {
            let choice = ChunkChoice {
                index: self.index,
                delta: Delta {
                    role: None,
                    content,
                    tool_calls: (!calls.is_empty()).then_some(calls),
                    ..Delta::reasoning(reasoning)
                },
                logprobs: None,
                finish_reason: None,
            };
            chunks.push(sse_data(&self.chunk(vec![choice], None)));
        }
        let choice = ChunkChoice {
            index: self.index,
            delta: Delta::default(),
            logprobs: None,
            finish_reason: Some(self.reply_finish(reason)),
        };
        chunks.push(sse_data(&self.chunk(vec![choice], None)));
        chunks
    }

    fn usage(&self, usage: WireUsage) -> Option<Bytes> {
        let usage = self.with_reasoning(usage);
        self.include_usage
            .then(|| sse_data(&self.chunk(Vec::new(), Some(usage))))
    }
}
