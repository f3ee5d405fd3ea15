//! `/tokenize` and `/detokenize` requests. Messages go through [`validate_chat`], so that
//! `/tokenize` counts exactly the tokens a chat request with the same messages and tools is
//! prefilled with; a prompt is tokenized as `/v1/completions` tokenizes it.

use crate::error::ApiError;
use crate::openai::{ChatCompletionRequest, DetokenizeRequest, TokenizeRequest};
use crate::tools::ToolRequest;

use super::{ChatRendering, ModelLimits, PromptInput, check_model, validate_chat, vocabulary_ids};

/// A validated `/tokenize` request.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidTokenize {
    pub prompt: PromptInput,
    pub tools: Option<ToolRequest>,
    /// How messages are rendered (the default for a prompt).
    pub rendering: ChatRendering,
    /// A prompt's: whether the tokenizer adds its special tokens.
    pub add_special_tokens: bool,
    pub return_token_strs: bool,
}

pub fn validate_tokenize(
    request: &TokenizeRequest,
    limits: &ModelLimits,
) -> Result<ValidTokenize, ApiError> {
    check_model(&request.model, limits)?;
    let return_token_strs = request.return_token_strs.unwrap_or(false);
    match (&request.prompt, &request.messages) {
        (Some(prompt), None) => {
            let template = &request.template;
            for (set, param) in [
                (request.tools.is_some(), "tools"),
                (
                    template.add_generation_prompt.is_some(),
                    "add_generation_prompt",
                ),
                (
                    template.continue_final_message.is_some(),
                    "continue_final_message",
                ),
                (
                    template.chat_template_kwargs.is_some(),
                    "chat_template_kwargs",
                ),
                (template.documents.is_some(), "documents"),
            ] {
                if set {
                    return Err(ApiError::invalid(
                        format!("{param} goes with messages, not with a prompt"),
                        param,
                    ));
                }
            }
            Ok(ValidTokenize {
                prompt: PromptInput::Text(prompt.clone()),
                tools: None,
                rendering: ChatRendering::default(),
                add_special_tokens: request.add_special_tokens.unwrap_or(true),
                return_token_strs,
            })
        }
        (None, Some(messages)) => {
            if request.add_special_tokens == Some(true) {
                return Err(ApiError::unsupported(
                    "add_special_tokens true is not supported with messages: the chat \
                     template writes the special tokens, and a chat request adds none more",
                    "add_special_tokens",
                ));
            }
            let chat = ChatCompletionRequest {
                model: request.model.clone(),
                messages: Some(messages.clone()),
                tools: request.tools.clone(),
                template: request.template.clone(),
                ..Default::default()
            };
            let valid = validate_chat(&chat, limits)?;
            Ok(ValidTokenize {
                prompt: valid.prompt,
                tools: valid.tools,
                rendering: valid.rendering,
                add_special_tokens: false,
                return_token_strs,
            })
        }
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "send either prompt (a completion's) or messages (a chat's), not both",
            "prompt",
        )),
        (None, None) => Err(ApiError::invalid(
            "prompt (a completion's) or messages (a chat's) is required",
            "prompt",
        )),
    }
}

/// A validated `/detokenize` request: its token ids.
pub fn validate_detokenize(
    request: &DetokenizeRequest,
    limits: &ModelLimits,
) -> Result<Vec<u32>, ApiError> {
    check_model(&request.model, limits)?;
    let tokens = request
        .tokens
        .as_ref()
        .ok_or_else(|| ApiError::invalid("tokens is required", "tokens"))?;
    vocabulary_ids(tokens, limits, |i| format!("tokens[{i}]"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation::{Role, Turn};
    use serde_json::{Value, json};

    fn limits() -> ModelLimits {
        ModelLimits {
            adapters: Default::default(),
            served_model_name: "smol".into(),
            max_model_len: 100,
            vocab_size: 1000,
            tool_support: Some(crate::tools::ToolSupport {
                format: crate::tools::ToolFormat::Hermes,
                native: false,
            }),
            sampling_defaults: Default::default(),
            reasoning_parser: Default::default(),
        }
    }

    fn tokenize(body: Value) -> Result<ValidTokenize, ApiError> {
        validate_tokenize(&serde_json::from_value(body).unwrap(), &limits())
    }

    fn param_of<T: std::fmt::Debug>(result: Result<T, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidRequest { param, .. }) => param.unwrap_or_default(),
            other => panic!("expected an invalid request error, got {other:?}"),
        }
    }

    #[test]
    fn a_prompt_or_messages_as_their_endpoints_take_them() {
        let valid = tokenize(json!({"prompt": "Hi", "return_token_strs": true})).unwrap();
        assert_eq!(valid.prompt, PromptInput::Text("Hi".into()));
        assert!(valid.add_special_tokens && valid.return_token_strs);
        assert!(
            !tokenize(json!({"prompt": "Hi", "add_special_tokens": false}))
                .unwrap()
                .add_special_tokens
        );
        let valid = tokenize(json!({"model": "smol",
            "messages": [{"role": "user", "content": "Weather?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather"}}]}))
        .unwrap();
        assert_eq!(
            valid.prompt,
            PromptInput::Chat(vec![Turn::text(Role::User, "Weather?")])
        );
        assert!(valid.tools.unwrap().active());
        assert!(!valid.add_special_tokens);
    }

    #[test]
    fn refusals_name_their_field() {
        for (body, param) in [
            (json!({}), "prompt"),
            (json!({"prompt": "x", "messages": []}), "prompt"),
            (json!({"prompt": "x", "tools": []}), "tools"),
            (
                json!({"prompt": "x", "add_generation_prompt": true}),
                "add_generation_prompt",
            ),
            (
                json!({"prompt": "x", "continue_final_message": false}),
                "continue_final_message",
            ),
            (
                json!({"prompt": "x", "chat_template_kwargs": {}}),
                "chat_template_kwargs",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "continue_final_message": true}),
                "continue_final_message",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "add_special_tokens": true}),
                "add_special_tokens",
            ),
            (
                json!({"messages": [{"role": "wizard", "content": "x"}]}),
                "messages[0].role",
            ),
        ] {
            assert_eq!(param_of(tokenize(body.clone())), param, "{body}");
        }
        assert!(matches!(
            tokenize(json!({"model": "gpt-4", "prompt": "x"})),
            Err(ApiError::ModelNotFound { .. })
        ));
        let detokenize =
            |body: Value| validate_detokenize(&serde_json::from_value(body).unwrap(), &limits());
        assert_eq!(detokenize(json!({"tokens": [1, 999]})).unwrap(), [1, 999]);
        assert_eq!(
            param_of(detokenize(json!({"tokens": [1, 1000]}))),
            "tokens[1]"
        );
        assert_eq!(param_of(detokenize(json!({"tokens": [-1]}))), "tokens[0]");
        assert_eq!(param_of(detokenize(json!({}))), "tokens");
    }
}
