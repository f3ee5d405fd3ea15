//! How a chat's messages become its prompt beyond the turns themselves: vLLM's
//! `add_generation_prompt`, `continue_final_message` and `chat_template_kwargs`, checked
//! once for chat completions and `/tokenize`.

use serde_json::{Map, Value};

use super::{Role, Turn};
use crate::error::ApiError;
use crate::openai::ChatTemplateFields;

/// Template variables a request may not set: the api-server fills them (the conversation,
/// the tools it renders and parses calls of, the generation prompt, the tokenizer's special
/// tokens), and a second value would render a prompt the rest of the request does not match.
const RESERVED_VARIABLES: &[&str] = &[
    "messages",
    "tools",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
];

/// Chat template options of one request, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRendering {
    /// The prompt ends with the assistant's header.
    pub add_generation_prompt: bool,
    /// The prompt ends right after the last message's content (an assistant's, not empty),
    /// which the completion continues: the template's end of that turn is cut off.
    pub continue_final_message: bool,
    /// Extra template variables, none of the names tandem sets itself.
    pub variables: Map<String, Value>,
}

impl Default for ChatRendering {
    /// A chat request's prompt: the conversation, then the assistant's header.
    fn default() -> Self {
        ChatRendering {
            add_generation_prompt: true,
            continue_final_message: false,
            variables: Map::new(),
        }
    }
}

/// The rendering `fields` ask for `turns`; 400s name the field.
pub fn chat_rendering(
    fields: &ChatTemplateFields,
    turns: &[Turn],
) -> Result<ChatRendering, ApiError> {
    let continue_final_message = fields.continue_final_message.unwrap_or(false);
    if continue_final_message {
        if fields.add_generation_prompt == Some(true) {
            return Err(ApiError::invalid(
                "continue_final_message and add_generation_prompt cannot both be true: the \
                 prompt either continues the last message or starts the assistant's answer",
                "continue_final_message",
            ));
        }
        match turns.last() {
            Some(last) if last.role == Role::Assistant && last.tool_calls.is_empty() => {
                if last.content.trim().is_empty() {
                    return Err(ApiError::invalid(
                        "continue_final_message continues the last message's text, and it has \
                         none: leave it out (with add_generation_prompt, the default) to start \
                         the assistant's answer",
                        "continue_final_message",
                    ));
                }
            }
            _ => {
                return Err(ApiError::invalid(
                    "continue_final_message needs the last message to be an assistant's text \
                     (without tool_calls), which the completion continues",
                    "continue_final_message",
                ));
            }
        }
    }
    let mut variables = fields.chat_template_kwargs.clone().unwrap_or_default();
    if let Some(documents) = &fields.documents {
        if variables.contains_key("documents") {
            return Err(ApiError::invalid(
                "documents is sent twice: as a field and in chat_template_kwargs",
                "documents",
            ));
        }
        variables.insert("documents".into(), Value::Array(documents.clone()));
    }
    if let Some(reserved) = variables
        .keys()
        .find(|key| RESERVED_VARIABLES.contains(&key.as_str()))
    {
        return Err(ApiError::invalid(
            format!(
                "{reserved} is set by tandem when it renders the chat template (from the \
                 request's messages, tools and options, and the tokenizer)"
            ),
            &format!("chat_template_kwargs.{reserved}"),
        ));
    }
    Ok(ChatRendering {
        add_generation_prompt: fields.add_generation_prompt.unwrap_or(true)
            && !continue_final_message,
        continue_final_message,
        variables,
    })
}

/// The prompt text with the final message continued: cut right after the last place the
/// message's content appears in the rendered `text` (the template closes the turn after it).
/// Templates that trim a message render its content trimmed, so that is looked for too.
/// `None` when the template does not render the content at all.
pub fn cut_after_final_message(text: &str, content: &str) -> Option<usize> {
    [content, content.trim_end(), content.trim()]
        .into_iter()
        .filter(|needle| !needle.is_empty())
        .find_map(|needle| text.rfind(needle).map(|at| at + needle.len()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(value: Value) -> ChatTemplateFields {
        serde_json::from_value(value).unwrap()
    }

    fn param_of(result: Result<ChatRendering, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidRequest { param, .. }) => param.unwrap_or_default(),
            other => panic!("expected an invalid request error, got {other:?}"),
        }
    }

    #[test]
    fn options_and_their_refusals() {
        let answered = [
            Turn::text(Role::User, "Name a colour."),
            Turn::text(Role::Assistant, "The colour is"),
        ];
        assert_eq!(
            chat_rendering(&fields(json!({})), &answered).unwrap(),
            ChatRendering::default()
        );
        let continued =
            chat_rendering(&fields(json!({"continue_final_message": true})), &answered).unwrap();
        assert!(continued.continue_final_message && !continued.add_generation_prompt);
        let bare =
            chat_rendering(&fields(json!({"add_generation_prompt": false})), &answered).unwrap();
        assert!(!bare.add_generation_prompt && !bare.continue_final_message);
        let with_documents = chat_rendering(
            &fields(json!({"documents": [{"title": "a", "text": "b"}]})),
            &answered,
        )
        .unwrap();
        assert_eq!(
            with_documents.variables["documents"],
            json!([{"title": "a", "text": "b"}])
        );
        let with_variables = chat_rendering(
            &fields(json!({"chat_template_kwargs": {"enable_thinking": false}})),
            &answered,
        )
        .unwrap();
        assert_eq!(with_variables.variables["enable_thinking"], json!(false));

        let asked = [Turn::text(Role::User, "Name a colour.")];
        let empty = [
            Turn::text(Role::User, "Name a colour."),
            Turn::text(Role::Assistant, " "),
        ];
        for (body, turns, param) in [
            (
                json!({"continue_final_message": true, "add_generation_prompt": true}),
                &answered[..],
                "continue_final_message",
            ),
            (
                json!({"continue_final_message": true}),
                &asked[..],
                "continue_final_message",
            ),
            (
                json!({"continue_final_message": true}),
                &empty[..],
                "continue_final_message",
            ),
            (
                json!({"chat_template_kwargs": {"tools": []}}),
                &answered[..],
                "chat_template_kwargs.tools",
            ),
            (
                json!({"chat_template_kwargs": {"messages": []}}),
                &answered[..],
                "chat_template_kwargs.messages",
            ),
            (
                json!({"documents": [], "chat_template_kwargs": {"documents": []}}),
                &answered[..],
                "documents",
            ),
        ] {
            assert_eq!(
                param_of(chat_rendering(&fields(body.clone()), turns)),
                param,
                "{body}"
            );
        }
    }

    #[test]
    fn the_prompt_is_cut_after_the_last_rendering_of_the_content() {
        let text = "<|user|>The colour is<|end|><|assistant|>The colour is<|end|>\n";
        let at = cut_after_final_message(text, "The colour is").unwrap();
        assert_eq!(
            &text[..at],
            "<|user|>The colour is<|end|><|assistant|>The colour is"
        );
        // A template that trims the message.
        let trimmed = "<|assistant|>Red and<|end|>";
        let at = cut_after_final_message(trimmed, "  Red and \n").unwrap();
        assert_eq!(&trimmed[..at], "<|assistant|>Red and");
        assert_eq!(
            cut_after_final_message("<|assistant|><|end|>", "Blue"),
            None
        );
    }
}
