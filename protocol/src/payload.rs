//! Messages within the NATS server's `max_payload`.
//!
//! A NATS server refuses a message whose payload is larger than its `max_payload` (1 MiB
//! unless its config says otherwise; every client learns it from the server's `INFO`, and
//! async-nats refuses such a publish itself). Most of tandem's messages are a few hundred
//! bytes; three kinds grow with the request and are sized against the limit before they are
//! published:
//!
//! - jobs (`GenerateJob`), by the api-server: the prompt's token ids, a migrated job's
//!   `resume_ids`, a decode job's KV handle. It refuses a request whose first job cannot fit
//!   (400, telling how many of the prompt's tokens fit: [`prompt_tokens_within`]).
//! - `tokens` messages, by the workers: a batch of generated tokens (thousands, with 20
//!   alternatives each, when the bus is slower than the engine) is split into as many
//!   messages as the limit needs ([`tokens_messages`]), numbered so the api-server sees one
//!   gapless stream.
//! - `prompt_logprobs` messages, by the workers: a prefill chunk's prompt logprobs (thousands
//!   of positions with 20 alternatives each) are split in the same way
//!   ([`prompt_logprobs_messages`]), each part naming its first position.
//! - `kv_ready`, by context workers: its handle lists the export's regions, one per block for
//!   readers that ask for that, else one per contiguous run of blocks (an export is one).
//!
//! Sizes are those of the encoded message (what goes on the wire), never estimates.

use serde::Serialize;

use crate::messages::{GenerateJob, PromptLogprob, StreamMessage, TokenEvent, encode};

/// An encoded message larger than the server's `max_payload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{bytes} bytes, over the NATS server's max_payload of {max_payload} bytes")]
pub struct TooLarge {
    /// The encoded message.
    pub bytes: usize,
    pub max_payload: usize,
}

/// `message` encoded ([`encode`]) if it fits in `max_payload` bytes.
pub fn encode_within<T: Serialize>(message: &T, max_payload: usize) -> Result<Vec<u8>, TooLarge> {
    let bytes = encode(message);
    if bytes.len() <= max_payload {
        Ok(bytes)
    } else {
        Err(TooLarge {
            bytes: bytes.len(),
            max_payload,
        })
    }
}

/// Bytes of `ids` as a JSON array.
fn ids_json_len(ids: &[u32]) -> usize {
    2 + ids.len().saturating_sub(1) + ids.iter().map(|&id| decimal_digits(id)).sum::<usize>()
}

fn decimal_digits(n: u32) -> usize {
    n.checked_ilog10().map_or(1, |log| log as usize + 1)
}

/// How many of `job`'s prompt tokens (its first ones) fit in a message of `max_payload` bytes
/// with the rest of the job as it is; `job_bytes` is the job's encoded size. The answer to a
/// client whose prompt is too long for the bus.
pub fn prompt_tokens_within(job: &GenerateJob, job_bytes: usize, max_payload: usize) -> usize {
    let rest = job_bytes.saturating_sub(ids_json_len(&job.prompt_ids));
    // `[` and `]`, then each id and the comma before all but the first.
    let Some(mut room) = max_payload.checked_sub(rest + 2) else {
        return 0;
    };
    let mut fit = 0;
    for (i, &id) in job.prompt_ids.iter().enumerate() {
        let bytes = decimal_digits(id) + usize::from(i > 0);
        if bytes > room {
            break;
        }
        room -= bytes;
        fit += 1;
    }
    fit
}

/// `tokens`, generated tokens whose first is the request's token number `index`, as encoded
/// `tokens` messages of at most `max_payload` bytes each, in order, numbered consecutively.
/// One message when they fit in one. A token that does not fit in a message of its own is an
/// error (its size with the message around it).
pub fn tokens_messages(
    tokens: Vec<TokenEvent>,
    index: Option<u32>,
    max_payload: usize,
) -> Result<Vec<Vec<u8>>, TooLarge> {
    let count = tokens.len() as u32;
    let whole = StreamMessage::Tokens { tokens, index };
    let bytes = encode(&whole);
    if bytes.len() <= max_payload {
        return Ok(vec![bytes]);
    }
    let StreamMessage::Tokens { tokens, index } = whole else {
        unreachable!("built as a tokens message above");
    };
    // A message without tokens, numbered with the largest index any part can have: an upper
    // bound of every part's bytes besides its tokens.
    let frame = encode(&StreamMessage::Tokens {
        tokens: Vec::new(),
        index: index.map(|i| i.saturating_add(count)),
    })
    .len();
    let mut messages = Vec::new();
    let mut part: Vec<TokenEvent> = Vec::new();
    let mut part_bytes = frame;
    let mut next_index = index;
    let mut flush = |part: &mut Vec<TokenEvent>, next_index: &mut Option<u32>| {
        let taken = std::mem::take(part);
        let n = taken.len() as u32;
        messages.push(encode(&StreamMessage::Tokens {
            tokens: taken,
            index: *next_index,
        }));
        *next_index = next_index.map(|i| i + n);
    };
    for token in tokens {
        let token_bytes = serde_json::to_vec(&token)
            .expect("a token event is JSON-representable")
            .len();
        if frame + token_bytes > max_payload {
            return Err(TooLarge {
                bytes: frame + token_bytes,
                max_payload,
            });
        }
        let comma = usize::from(!part.is_empty());
        if part_bytes + comma + token_bytes > max_payload {
            flush(&mut part, &mut next_index);
            part_bytes = frame;
        }
        part_bytes += usize::from(!part.is_empty()) + token_bytes;
        part.push(token);
    }
    if !part.is_empty() {
        flush(&mut part, &mut next_index);
    }
    Ok(messages)
}

/// `logprobs`, those of prompt positions `start ..`, as encoded `prompt_logprobs` messages of
/// at most `max_payload` bytes each, in order, each naming its first position. One message
/// when they fit in one; otherwise halves, split again until each fits. A single position that
/// does not fit in a message of its own is an error.
pub fn prompt_logprobs_messages(
    start: u32,
    logprobs: Vec<PromptLogprob>,
    max_payload: usize,
) -> Result<Vec<Vec<u8>>, TooLarge> {
    let count = logprobs.len();
    let message = StreamMessage::PromptLogprobs { start, logprobs };
    let bytes = encode(&message);
    if bytes.len() <= max_payload {
        return Ok(vec![bytes]);
    }
    let StreamMessage::PromptLogprobs { mut logprobs, .. } = message else {
        unreachable!("built as a prompt_logprobs message above");
    };
    if count <= 1 {
        return Err(TooLarge {
            bytes: bytes.len(),
            max_payload,
        });
    }
    let second = logprobs.split_off(count / 2);
    let mut messages = prompt_logprobs_messages(start, logprobs, max_payload)?;
    messages.extend(prompt_logprobs_messages(
        start + (count / 2) as u32,
        second,
        max_payload,
    )?);
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{SamplingSpec, StopSpec, decode};

    fn job(prompt_ids: Vec<u32>) -> GenerateJob {
        GenerateJob {
            lora: None,
            request_id: "chatcmpl-1".into(),
            prompt_ids,
            sampling: SamplingSpec::default(),
            stop: StopSpec {
                max_tokens: 16,
                strings: vec!["\n\n".into()],
                ..StopSpec::default()
            },
            stream_subject: "tandem.m.stream.chatcmpl-1".into(),
            deadline_unix_ms: Some(1_700_000_000_000),
            kv: None,
            kv_reader: None,
            resume_ids: vec![],
            samples: None,
            cache_salt: None,
            priority: 0,
            prediction_ids: Vec::new(),
            embedding: false,
        }
    }

    #[test]
    fn ids_are_measured_as_serde_writes_them() {
        for ids in [
            vec![],
            vec![0],
            vec![9, 10, 99, 100, 12345, u32::MAX],
            (0..1000).collect(),
        ] {
            assert_eq!(
                ids_json_len(&ids),
                serde_json::to_vec(&ids).unwrap().len(),
                "{ids:?}"
            );
        }
    }

    #[test]
    fn encode_within_says_by_how_much() {
        let message = job(vec![1, 2, 3]);
        let bytes = encode(&message);
        assert_eq!(encode_within(&message, bytes.len()), Ok(bytes.clone()));
        assert_eq!(
            encode_within(&message, bytes.len() - 1),
            Err(TooLarge {
                bytes: bytes.len(),
                max_payload: bytes.len() - 1
            })
        );
    }

    #[test]
    fn the_prompt_tokens_that_fit_are_exactly_those_that_fit() {
        let ids: Vec<u32> = (0..5000).map(|i| (i * 7919) % 50_000).collect();
        let whole = job(ids.clone());
        let bytes = encode(&whole).len();
        for max_payload in [0, 300, bytes / 3, bytes / 2, bytes - 1, bytes, bytes + 10] {
            let fit = prompt_tokens_within(&whole, bytes, max_payload);
            let size = |n: usize| encode(&job(ids[..n].to_vec())).len();
            if fit > 0 {
                assert!(
                    size(fit) <= max_payload,
                    "{fit} tokens fit in {max_payload}"
                );
            }
            if fit < ids.len() {
                assert!(
                    size(fit + 1) > max_payload,
                    "{} tokens do not fit in {max_payload}",
                    fit + 1
                );
            }
        }
        assert_eq!(prompt_tokens_within(&whole, bytes, bytes), ids.len());
    }

    fn token(id: u32, alternatives: usize) -> TokenEvent {
        TokenEvent {
            id,
            text: format!(" t{id}"),
            logprob: Some(-0.123_456_7),
            top_logprobs: (0..alternatives as u32)
                .map(|a| (a * 1000 + 7, -1.234_567_8 - a as f32))
                .collect(),
        }
    }

    fn read(messages: &[Vec<u8>]) -> Vec<(Option<u32>, Vec<TokenEvent>)> {
        messages
            .iter()
            .map(
                |bytes| match decode::<StreamMessage>("tokens", bytes).unwrap() {
                    StreamMessage::Tokens { tokens, index } => (index, tokens),
                    other => panic!("{other:?}"),
                },
            )
            .collect()
    }

    #[test]
    fn a_batch_that_fits_is_one_message() {
        let tokens: Vec<TokenEvent> = (0..3).map(|i| token(i, 2)).collect();
        let messages = tokens_messages(tokens.clone(), Some(7), 1 << 20).unwrap();
        assert_eq!(read(&messages), vec![(Some(7), tokens)]);
    }

    #[test]
    fn a_large_batch_is_split_into_numbered_messages_within_the_limit() {
        // 2,000 tokens with 20 alternatives each: about 900 KB in one message.
        let tokens: Vec<TokenEvent> = (0..2000).map(|i| token(i, 20)).collect();
        let one = encode(&StreamMessage::Tokens {
            tokens: tokens.clone(),
            index: Some(98),
        });
        assert!(one.len() > 64 * 1024 * 10, "{} bytes", one.len());
        for max_payload in [64 * 1024, 4096, 1000] {
            let messages = tokens_messages(tokens.clone(), Some(98), max_payload).unwrap();
            assert!(messages.len() > 1);
            assert!(messages.iter().all(|m| m.len() <= max_payload));
            // Not needlessly many: every message but the last is at least half full.
            assert!(
                messages[..messages.len() - 1]
                    .iter()
                    .all(|m| m.len() > max_payload / 2)
            );
            let parts = read(&messages);
            let mut expected_index = 98;
            let mut all = Vec::new();
            for (index, part) in parts {
                assert_eq!(index, Some(expected_index));
                expected_index += part.len() as u32;
                all.extend(part);
            }
            assert_eq!(all, tokens, "every token, in order, at {max_payload}");
        }
        // Unnumbered (an older worker's form) stays unnumbered.
        let parts = read(&tokens_messages(tokens[..100].to_vec(), None, 4096).unwrap());
        assert!(parts.len() > 1 && parts.iter().all(|(index, _)| index.is_none()));
    }

    #[test]
    fn a_token_too_large_for_any_message_is_an_error() {
        let err = tokens_messages(vec![token(1, 0), token(2, 20)], Some(0), 300).unwrap_err();
        assert_eq!(err.max_payload, 300);
        assert!(err.bytes > 300, "{err}");
        assert!(
            err.to_string().contains("max_payload of 300 bytes"),
            "{err}"
        );
    }

    #[test]
    fn prompt_logprobs_split_into_numbered_parts_that_fit() {
        let logprobs: Vec<PromptLogprob> = (0..300)
            .map(|i| PromptLogprob {
                logprob: -(i as f32) / 7.0,
                rank: 1,
                top_logprobs: (0..20).map(|k| (i * 20 + k, -(k as f32) / 3.0)).collect(),
            })
            .collect();
        let whole = encode(&StreamMessage::PromptLogprobs {
            start: 1,
            logprobs: logprobs.clone(),
        });
        assert_eq!(
            prompt_logprobs_messages(1, logprobs.clone(), whole.len()).unwrap(),
            vec![whole.clone()]
        );
        let max_payload = whole.len() / 5;
        let parts = prompt_logprobs_messages(1, logprobs.clone(), max_payload).unwrap();
        assert!(parts.len() >= 5, "{} parts", parts.len());
        let mut next = 1;
        let mut joined = Vec::new();
        for part in &parts {
            assert!(part.len() <= max_payload);
            let StreamMessage::PromptLogprobs { start, logprobs } =
                decode::<StreamMessage>("part", part).unwrap()
            else {
                panic!("not a prompt_logprobs message")
            };
            assert_eq!(start, next, "parts continue each other");
            next += logprobs.len() as u32;
            joined.extend(logprobs);
        }
        assert_eq!(joined, logprobs);
        assert!(prompt_logprobs_messages(1, logprobs[..1].to_vec(), 40).is_err());
    }
}
