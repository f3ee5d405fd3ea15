//! Worker logprobs (token ids) to OpenAI's two logprobs forms.

use tandem_protocol::messages::TokenEvent;

use crate::openai::{CompletionLogprobs, TokenLogprob, TopLogprob, TopLogprobMap};
use crate::prompt::PromptCodec;

/// The chat form of one token; `None` when the worker sent no logprob for it.
pub fn chat_entry(codec: &dyn PromptCodec, token: &TokenEvent) -> Option<TokenLogprob> {
    let logprob = token.logprob?;
    let text = codec.token_text(token.id);
    Some(TokenLogprob {
        bytes: Some(text.as_bytes().to_vec()),
        token: text,
        logprob,
        top_logprobs: token
            .top_logprobs
            .iter()
            .map(|&(id, logprob)| {
                let text = codec.token_text(id);
                TopLogprob {
                    bytes: Some(text.as_bytes().to_vec()),
                    token: text,
                    logprob,
                }
            })
            .collect(),
    })
}

/// Appends tokens to the completion form, keeping `text_offset` (characters of completion text
/// before each token) running across chunks.
#[derive(Debug, Default)]
pub struct CompletionLogprobsBuilder {
    text_chars: u32,
}

impl CompletionLogprobsBuilder {
    pub fn append(
        &mut self,
        codec: &dyn PromptCodec,
        tokens: &[TokenEvent],
        into: &mut CompletionLogprobs,
    ) {
        for token in tokens {
            if let Some(logprob) = token.logprob {
                into.tokens.push(codec.token_text(token.id));
                into.token_logprobs.push(logprob);
                into.top_logprobs.push(TopLogprobMap(
                    token
                        .top_logprobs
                        .iter()
                        .map(|&(id, logprob)| (codec.token_text(id), logprob))
                        .collect(),
                ));
                into.text_offset.push(self.text_chars);
            }
            self.text_chars += token.text.chars().count() as u32;
        }
    }
}
