//! Worker logprobs (token ids) to OpenAI's two logprobs forms.

use tandem_protocol::messages::{PromptLogprob, TokenEvent};

use crate::openai::{CompletionLogprobs, TokenLogprob, TopLogprob, TopLogprobMap};
use crate::prompt::PromptCodec;

/// The lowest logprob written, as vLLM writes it: a token a grammar, `allowed_token_ids` or a
/// held stop token rules out has logprob `-inf`, which JSON cannot carry (serde writes
/// `null`, which OpenAI's clients refuse where a number is due).
pub const LOWEST_LOGPROB: f32 = -9999.0;

/// `logprob` as written: at least [`LOWEST_LOGPROB`].
fn shown(logprob: f32) -> f32 {
    if logprob < LOWEST_LOGPROB {
        LOWEST_LOGPROB
    } else {
        logprob
    }
}

/// vLLM's `prompt_logprobs` form: for each prompt token, `null` for the first (nothing
/// precedes it), then an object keyed by token id (as a string) holding the prompt token and
/// its `top` best alternatives, each `{"logprob", "rank", "decoded_token"}` (the alternatives
/// ranked 1 .. in order, the prompt token by its rank in the distribution).
pub fn vllm_prompt_logprobs(
    codec: &dyn PromptCodec,
    prompt_ids: &[u32],
    logprobs: &[PromptLogprob],
    top: usize,
) -> Vec<Option<serde_json::Map<String, serde_json::Value>>> {
    let entry = |id: u32, logprob: f32, rank: u32| {
        serde_json::json!({
            "logprob": shown(logprob),
            "rank": rank,
            "decoded_token": codec.token_text(id),
        })
    };
    std::iter::once(None)
        .chain(
            prompt_ids
                .iter()
                .skip(1)
                .zip(logprobs)
                .map(|(&id, position)| {
                    let mut map = serde_json::Map::new();
                    for (rank, &(alternative, logprob)) in
                        position.top_logprobs.iter().take(top).enumerate()
                    {
                        map.insert(
                            alternative.to_string(),
                            entry(alternative, logprob, rank as u32 + 1),
                        );
                    }
                    map.insert(id.to_string(), entry(id, position.logprob, position.rank));
                    Some(map)
                }),
        )
        .take(prompt_ids.len())
        .collect()
}

/// The chat form of one token; `None` when the worker sent no logprob for it.
pub fn chat_entry(codec: &dyn PromptCodec, token: &TokenEvent) -> Option<TokenLogprob> {
    let logprob = token.logprob?;
    let text = codec.token_text(token.id);
    Some(TokenLogprob {
        bytes: Some(text.as_bytes().to_vec()),
        token: text,
        logprob: shown(logprob),
        top_logprobs: token
            .top_logprobs
            .iter()
            .map(|&(id, logprob)| {
                let text = codec.token_text(id);
                TopLogprob {
                    bytes: Some(text.as_bytes().to_vec()),
                    token: text,
                    logprob: shown(logprob),
                }
            })
            .collect(),
    })
}

/// The completion form's alternatives of one token: `(token id, logprob)` pairs by text.
fn top_map(codec: &dyn PromptCodec, top_logprobs: &[(u32, f32)]) -> TopLogprobMap {
    TopLogprobMap(
        top_logprobs
            .iter()
            .map(|&(id, logprob)| (codec.token_text(id), shown(logprob)))
            .collect(),
    )
}

/// Appends tokens to the completion form, keeping `text_offset` (characters of the choice's
/// text before each token) running across chunks.
#[derive(Debug, Default)]
pub struct CompletionLogprobsBuilder {
    text_chars: u32,
}

impl CompletionLogprobsBuilder {
    /// The echoed prompt (`ids`, whose text is `text`) first: its tokens with their logprobs
    /// (`logprobs`: positions 1 ..), the first with `null`. Each prompt token's
    /// offset counts the characters of the prompt tokens before it, as vLLM does; the
    /// completion's tokens then count from the end of `text`.
    pub fn append_prompt(
        &mut self,
        codec: &dyn PromptCodec,
        ids: &[u32],
        text: &str,
        logprobs: &[PromptLogprob],
        into: &mut CompletionLogprobs,
    ) {
        let start = self.text_chars;
        let mut offset = start;
        for (position, &id) in ids.iter().enumerate() {
            let token = codec.token_text(id);
            let chars = token.chars().count() as u32;
            into.tokens.push(token);
            into.text_offset.push(offset);
            offset += chars;
            match position.checked_sub(1).and_then(|i| logprobs.get(i)) {
                Some(entry) => {
                    into.token_logprobs.push(Some(shown(entry.logprob)));
                    into.top_logprobs
                        .push(Some(top_map(codec, &entry.top_logprobs)));
                }
                None => {
                    into.token_logprobs.push(None);
                    into.top_logprobs.push(None);
                }
            }
        }
        self.text_chars = start + text.chars().count() as u32;
    }

    pub fn append(
        &mut self,
        codec: &dyn PromptCodec,
        tokens: &[TokenEvent],
        into: &mut CompletionLogprobs,
    ) {
        for token in tokens {
            if let Some(logprob) = token.logprob {
                into.tokens.push(codec.token_text(token.id));
                into.token_logprobs.push(Some(shown(logprob)));
                into.top_logprobs
                    .push(Some(top_map(codec, &token.top_logprobs)));
                into.text_offset.push(self.text_chars);
            }
            self.text_chars += token.text.chars().count() as u32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::test_codec::Codec;

    /// An echoed prompt's tokens come first, the first with `null`, offsets through the
    /// prompt; the completion's tokens follow, their offsets counted from the prompt's end.
    #[test]
    fn prompt_logprobs_in_vllms_form() {
        let logprobs = [
            PromptLogprob {
                logprob: -1.0,
                rank: 2,
                top_logprobs: vec![(7, -0.5), (22, -1.0), (9, -3.0)],
            },
            PromptLogprob {
                logprob: -0.25,
                rank: 1,
                top_logprobs: vec![(333, -0.25), (8, -2.0)],
            },
        ];
        let shown = vllm_prompt_logprobs(&Codec, &[1, 22, 333], &logprobs, 2);
        let json = serde_json::to_value(&shown).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                null,
                {"7": {"logprob": -0.5, "rank": 1, "decoded_token": "t7"},
                 "22": {"logprob": -1.0, "rank": 2, "decoded_token": "t22"}},
                {"333": {"logprob": -0.25, "rank": 1, "decoded_token": "t333"},
                 "8": {"logprob": -2.0, "rank": 2, "decoded_token": "t8"}},
            ])
        );
        // No alternatives: the prompt token alone.
        let alone = vllm_prompt_logprobs(&Codec, &[1, 22, 333], &logprobs, 0);
        assert_eq!(alone[1].as_ref().unwrap().len(), 1);
    }

    #[test]
    fn ruled_out_tokens_are_written_at_the_lowest_logprob() {
        let token = TokenEvent {
            id: 3,
            text: "t3".into(),
            logprob: Some(-0.5),
            top_logprobs: vec![(3, -0.5), (9, f32::NEG_INFINITY)],
        };
        let entry = chat_entry(&Codec, &token).unwrap();
        assert_eq!(entry.top_logprobs[1].logprob, LOWEST_LOGPROB);
        let json = serde_json::to_value(&entry).unwrap();
        assert_eq!(json["top_logprobs"][1]["logprob"], -9999.0);
        let mut into = CompletionLogprobs::default();
        CompletionLogprobsBuilder::default().append(&Codec, &[token], &mut into);
        let json = serde_json::to_value(&into).unwrap();
        assert_eq!(json["top_logprobs"][0]["t9"], -9999.0);
    }

    #[test]
    fn the_echoed_prompt_comes_first_with_a_null_first_logprob() {
        let mut builder = CompletionLogprobsBuilder::default();
        let mut into = CompletionLogprobs::default();
        let prompt = [1, 22, 333];
        let logprobs = [
            PromptLogprob {
                logprob: -1.0,
                rank: 1,
                top_logprobs: vec![(7, -0.5)],
            },
            PromptLogprob {
                logprob: -2.0,
                rank: 1,
                top_logprobs: vec![(8, -0.25)],
            },
        ];
        builder.append_prompt(&Codec, &prompt, "t1t22t333", &logprobs, &mut into);
        let generated = [TokenEvent {
            id: 4,
            text: " four".into(),
            logprob: Some(-0.125),
            top_logprobs: vec![(4, -0.125)],
        }];
        builder.append(&Codec, &generated, &mut into);
        assert_eq!(into.tokens, vec!["t1", "t22", "t333", "t4"]);
        assert_eq!(
            into.token_logprobs,
            vec![None, Some(-1.0), Some(-2.0), Some(-0.125)]
        );
        assert_eq!(into.top_logprobs[0], None);
        assert_eq!(
            into.top_logprobs[1],
            Some(TopLogprobMap(vec![("t7".into(), -0.5)]))
        );
        assert_eq!(into.text_offset, vec![0, 2, 5, 9]);
        let json = serde_json::to_value(&into).unwrap();
        assert!(json["token_logprobs"][0].is_null() && json["top_logprobs"][0].is_null());
    }
}
