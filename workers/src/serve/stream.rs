//! A request's engine events, turned into the stream messages the api-server reads.
//!
//! The engine thread hands events to a tokio channel (its `send` never blocks the step loop);
//! one task per request takes whatever has arrived, packs consecutive tokens into one
//! `tokens` message (fewer, larger NATS messages when the bus is slower than the engine),
//! and ends the stream with exactly one `finished` or `error`.

use tandem_protocol::messages::{
    self, PromptLogprob, StreamMessage, TokenEvent, Usage as WireUsage,
};
use tokio::sync::mpsc::UnboundedSender;

use crate::engine::{EngineEvent, EventKind, EventSink, FinishReason};

impl EventSink for UnboundedSender<EngineEvent> {
    fn send(&mut self, event: EngineEvent) -> bool {
        UnboundedSender::send(self, event).is_ok()
    }
}

/// Converts a run of events (in order) into stream messages: prompt logprobs as
/// `prompt_logprobs` messages where they come, the tokens among them in one `tokens`
/// message, then the end if one of them is the `Finished` event. `with_logprobs`
/// says whether the job asked for log-probabilities (otherwise none are sent). `next_index`
/// is the position of the next generated token in the request (its `tokens` message's
/// `index`); it moves past the tokens sent.
pub fn stream_messages(
    events: Vec<EngineEvent>,
    with_logprobs: bool,
    next_index: &mut u32,
) -> Vec<StreamMessage> {
    let mut tokens_message = |tokens: Vec<TokenEvent>| {
        let index = *next_index;
        *next_index += tokens.len() as u32;
        StreamMessage::Tokens {
            tokens,
            index: Some(index),
        }
    };
    let mut out = Vec::new();
    let mut tokens = Vec::new();
    for event in events {
        match event.kind {
            EventKind::Token {
                id,
                text_delta,
                logprob,
                top_logprobs,
            } => tokens.push(token_event(
                id,
                text_delta,
                logprob,
                top_logprobs,
                with_logprobs,
            )),
            EventKind::Finished { reason, usage, .. } => {
                if !tokens.is_empty() {
                    out.push(tokens_message(std::mem::take(&mut tokens)));
                }
                let usage = WireUsage {
                    prompt_tokens: usage.prompt_tokens as u32,
                    completion_tokens: usage.completion_tokens as u32,
                    cached_tokens: usage.cached_tokens as u32,
                    accepted_prediction_tokens: usage.prediction.map_or(0, |p| p.accepted as u32),
                    rejected_prediction_tokens: usage.prediction.map_or(0, |p| p.rejected as u32),
                };
                out.push(match reason {
                    FinishReason::Stop => StreamMessage::Finished {
                        reason: messages::FinishReason::Stop,
                        usage,
                    },
                    FinishReason::Length => StreamMessage::Finished {
                        reason: messages::FinishReason::Length,
                        usage,
                    },
                    FinishReason::Cancelled => StreamMessage::Finished {
                        reason: messages::FinishReason::Cancelled,
                        usage,
                    },
                    FinishReason::Error(message) => StreamMessage::Error {
                        message,
                        param: None,
                    },
                    FinishReason::Refused { message, param } => StreamMessage::Error {
                        message,
                        param: Some(param.to_string()),
                    },
                });
                return out;
            }
            EventKind::PromptLogprobs { start, logprobs } => {
                if !tokens.is_empty() {
                    out.push(tokens_message(std::mem::take(&mut tokens)));
                }
                out.push(StreamMessage::PromptLogprobs {
                    start: start as u32,
                    logprobs: logprobs
                        .into_iter()
                        .map(|l| PromptLogprob {
                            logprob: l.logprob,
                            rank: l.rank,
                            top_logprobs: l.top_logprobs,
                        })
                        .collect(),
                });
            }
            EventKind::Hidden { vector } => {
                if !tokens.is_empty() {
                    out.push(tokens_message(std::mem::take(&mut tokens)));
                }
                out.push(StreamMessage::Embedding { vector });
            }
            // The puller's business: nothing the api-server reads.
            EventKind::RoomReserved { .. } => {}
        }
    }
    if !tokens.is_empty() {
        out.push(tokens_message(tokens));
    }
    out
}

/// The wire form of a generated token; log-probabilities only when `with_logprobs`.
pub fn token_event(
    id: u32,
    text: String,
    logprob: f32,
    top_logprobs: Vec<(u32, f32)>,
    with_logprobs: bool,
) -> TokenEvent {
    TokenEvent {
        id,
        text,
        logprob: with_logprobs.then_some(logprob),
        top_logprobs: if with_logprobs {
            top_logprobs
        } else {
            Vec::new()
        },
    }
}

/// Whether `message` ends a stream.
pub fn is_last(message: &StreamMessage) -> bool {
    matches!(
        message,
        StreamMessage::Finished { .. } | StreamMessage::Error { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Usage;

    fn token(id: u32, text: &str) -> EngineEvent {
        EngineEvent {
            request_id: 1,
            kind: EventKind::Token {
                id,
                text_delta: text.into(),
                logprob: -0.5,
                top_logprobs: vec![(id, -0.5), (7, -1.5)],
            },
        }
    }

    fn finished(reason: FinishReason) -> EngineEvent {
        EngineEvent {
            request_id: 1,
            kind: EventKind::Finished {
                reason,
                usage: Usage {
                    prompt_tokens: 4,
                    completion_tokens: 2,
                    cached_tokens: 3,
                    prediction: Some(crate::engine::DraftCounts {
                        accepted: 5,
                        rejected: 1,
                    }),
                },
                retained_kv: None,
            },
        }
    }

    #[test]
    fn tokens_are_packed_and_the_end_comes_last() {
        let mut next_index = 3;
        let messages = stream_messages(
            vec![
                token(5, "He"),
                token(6, "llo"),
                finished(FinishReason::Length),
            ],
            false,
            &mut next_index,
        );
        assert_eq!(messages.len(), 2);
        let StreamMessage::Tokens { tokens, index } = &messages[0] else {
            panic!("{messages:?}")
        };
        assert_eq!(
            (*index, next_index),
            (Some(3), 5),
            "numbered from 3, 5 next"
        );
        assert_eq!(tokens.len(), 2);
        assert_eq!((tokens[0].id, tokens[0].text.as_str()), (5, "He"));
        assert_eq!(tokens[1].logprob, None);
        assert!(tokens[1].top_logprobs.is_empty());
        assert_eq!(
            messages[1],
            StreamMessage::Finished {
                reason: messages::FinishReason::Length,
                usage: WireUsage {
                    prompt_tokens: 4,
                    completion_tokens: 2,
                    cached_tokens: 3,
                    accepted_prediction_tokens: 5,
                    rejected_prediction_tokens: 1,
                }
            }
        );
        assert!(is_last(&messages[1]) && !is_last(&messages[0]));
    }

    #[test]
    fn prompt_logprobs_come_before_the_tokens_in_order() {
        let prompt = |start| EngineEvent {
            request_id: 1,
            kind: EventKind::PromptLogprobs {
                start,
                logprobs: vec![crate::model::TokenLogprob {
                    logprob: -2.0,
                    rank: 3,
                    top_logprobs: vec![(4, -0.5)],
                }],
            },
        };
        let messages = stream_messages(
            vec![
                prompt(1),
                prompt(2),
                token(5, "a"),
                finished(FinishReason::Stop),
            ],
            false,
            &mut 0,
        );
        assert_eq!(messages.len(), 4, "{messages:?}");
        assert_eq!(
            messages[0],
            StreamMessage::PromptLogprobs {
                start: 1,
                logprobs: vec![PromptLogprob {
                    logprob: -2.0,
                    rank: 3,
                    top_logprobs: vec![(4, -0.5)],
                }],
            }
        );
        assert!(matches!(
            messages[1],
            StreamMessage::PromptLogprobs { start: 2, .. }
        ));
        assert!(matches!(messages[2], StreamMessage::Tokens { .. }));
        assert!(is_last(&messages[3]));
    }

    #[test]
    fn logprobs_only_when_asked_and_errors_end_the_stream() {
        let messages = stream_messages(vec![token(5, "a")], true, &mut 0);
        let StreamMessage::Tokens { tokens, .. } = &messages[0] else {
            panic!("{messages:?}")
        };
        assert_eq!(tokens[0].logprob, Some(-0.5));
        assert_eq!(tokens[0].top_logprobs, vec![(5, -0.5), (7, -1.5)]);
        let messages = stream_messages(
            vec![finished(FinishReason::Error("too long".into()))],
            false,
            &mut 0,
        );
        assert_eq!(
            messages,
            vec![StreamMessage::Error {
                message: "too long".into(),
                param: None,
            }]
        );
        // The request's own fault names its field, so the api-server answers a 400.
        let refused = FinishReason::Refused {
            message: "no token".into(),
            param: "bad_words",
        };
        assert_eq!(
            stream_messages(vec![finished(refused)], false, &mut 0),
            vec![StreamMessage::Error {
                message: "no token".into(),
                param: Some("bad_words".into()),
            }]
        );
    }
}
