//! Hugging Face chat templates rendered with minijinja.
//!
//! The environment mirrors transformers' `_compile_jinja_template`: `trim_blocks` and
//! `lstrip_blocks` on, lenient undefined values (printing one gives `""`, testing one is false,
//! only attribute access on one fails — Jinja2's default `Undefined`), loop controls, and the
//! globals templates call: `raise_exception(msg)` (→ [`ChatTemplateError::Raised`] carrying
//! the message), `strftime_now(fmt)` (UTC), `namespace()` (built in), the HF `tojson` filter
//! (Python `json.dumps` layout, no HTML escaping) and Python string/dict methods
//! (`.strip()`, `.startswith()`, `.split()`, `.items()`, `.get()`… via minijinja-contrib's
//! pycompat). Not supported: the `{% generation %}` tag (only used for training masks).
//!
//! A template is compiled once ([`ChatTemplate::new`]) and rendered for every request.

mod strftime;
mod tojson;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior, Value};
use serde::{Deserialize, Serialize};

pub use strftime::DateTime;

use crate::tokenizer::TextTokenizer;

const TEMPLATE_NAME: &str = "chat_template";

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("the model has no chat template (tokenizer_config.json has no `chat_template`)")]
    Missing,
    #[error("invalid chat template: {0:#}")]
    Compile(#[source] Error),
    /// The template called `raise_exception(message)`: the conversation is not one the model
    /// accepts (e.g. roles that do not alternate). Clients should see `message`.
    #[error("{message}")]
    Raised { message: String },
    #[error("chat template failed: {0:#}")]
    Render(#[source] Error),
    #[error("message {index}: {reason}")]
    InvalidMessage { index: usize, reason: String },
}

/// One chat message, as OpenAI requests carry it. `content` is a string or a list of parts;
/// only text parts are accepted, and they are joined with `"\n"` (vLLM's "string" content
/// format). Other fields (`name`, `tool_calls`, `tool_call_id`, …) are passed to the template
/// untouched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Some(MessageContent::Text(content.into())),
            extra: serde_json::Map::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

impl MessageContent {
    /// The text the template sees: the string itself, or the text parts joined by `"\n"`.
    pub fn to_text(&self) -> Result<String, String> {
        match self {
            MessageContent::Text(text) => Ok(text.clone()),
            MessageContent::Parts(parts) => {
                let texts = parts
                    .iter()
                    .map(|part| match (part.kind.as_str(), &part.text) {
                        ("text", Some(text)) => Ok(text.as_str()),
                        ("text", None) => Err("a text content part has no `text`".to_string()),
                        (other, _) => Err(format!(
                            "content parts of type {other:?} are not supported (only \"text\")"
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(texts.join("\n"))
            }
        }
    }
}

/// Per-request rendering options.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// End with the header of an assistant turn so the model answers.
    pub add_generation_prompt: bool,
    /// Further template variables, as transformers' `**kwargs` (`tools`, `documents`,
    /// `date_string`, `enable_thinking`, …). They override the special-token variables.
    pub variables: serde_json::Map<String, serde_json::Value>,
}

/// Special token texts exposed to the template, as transformers exposes
/// `tokenizer.special_tokens_map`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    tokens: TemplateTokens,
}

impl ChatTemplate {
    /// Compiles `source`; syntax errors are reported here, not at the first request.
    pub fn new(source: &str, tokens: TemplateTokens) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters with trim/lstrip blocks are a valid syntax"),
        );
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |format: String| {
            DateTime::now().strftime(&format)
        });
        env.add_filter("tojson", tojson::tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(ChatTemplateError::Compile)?;
        Ok(Self { env, tokens })
    }

    /// The model's default template with its special tokens.
    pub fn from_tokenizer(tokenizer: &TextTokenizer) -> Result<Self, ChatTemplateError> {
        let source = tokenizer
            .chat_template()
            .ok_or(ChatTemplateError::Missing)?;
        let config = tokenizer.config();
        let text = |entry: &Option<tandem_model::AddedTokenEntry>| {
            entry.as_ref().map(|e| e.content().to_string())
        };
        Self::new(
            source,
            TemplateTokens {
                bos_token: text(&config.bos_token),
                eos_token: text(&config.eos_token),
                unk_token: text(&config.unk_token),
                pad_token: text(&config.pad_token),
            },
        )
    }

    /// Renders `messages` into the prompt text. Encode the result with
    /// [`TextTokenizer::encode_templated`] (no added BOS: the template wrote it).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        options: &RenderOptions,
    ) -> Result<String, ChatTemplateError> {
        let messages = messages
            .iter()
            .enumerate()
            .map(|(index, message)| template_message(index, message))
            .collect::<Result<Vec<_>, _>>()?;

        let mut context = serde_json::Map::new();
        let tokens = [
            ("bos_token", &self.tokens.bos_token),
            ("eos_token", &self.tokens.eos_token),
            ("unk_token", &self.tokens.unk_token),
            ("pad_token", &self.tokens.pad_token),
        ];
        for (name, token) in tokens {
            if let Some(token) = token {
                context.insert(name.into(), token.clone().into());
            }
        }
        // transformers always passes these two, as None when absent: templates test
        // `tools is not none`, which is true for an undefined value.
        context.insert("tools".into(), serde_json::Value::Null);
        context.insert("documents".into(), serde_json::Value::Null);
        context.extend(options.variables.clone());
        context.insert("messages".into(), serde_json::Value::Array(messages));
        context.insert(
            "add_generation_prompt".into(),
            options.add_generation_prompt.into(),
        );

        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .expect("the template was added under this name in ChatTemplate::new");
        template
            .render(Value::from(Serde(&context)))
            .map_err(|err| match raised_message(&err) {
                Some(message) => ChatTemplateError::Raised { message },
                None => ChatTemplateError::Render(err),
            })
    }
}

/// The message as the template sees it: `content` flattened to a string (or none).
fn template_message(
    index: usize,
    message: &ChatMessage,
) -> Result<serde_json::Value, ChatTemplateError> {
    let mut object = serde_json::Map::new();
    object.insert("role".into(), message.role.clone().into());
    let content = match &message.content {
        None => serde_json::Value::Null,
        Some(content) => content
            .to_text()
            .map_err(|reason| ChatTemplateError::InvalidMessage { index, reason })?
            .into(),
    };
    object.insert("content".into(), content);
    for (key, value) in &message.extra {
        object.entry(key.clone()).or_insert_with(|| value.clone());
    }
    Ok(serde_json::Value::Object(object))
}

/// The marker source attached to errors from `raise_exception`, so they can be told apart
/// from template bugs.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedException(message)))
}

fn raised_message(err: &Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = source {
        if let Some(raised) = current.downcast_ref::<RaisedException>() {
            return Some(raised.0.clone());
        }
        source = current.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[ChatMessage]) -> Result<String, ChatTemplateError> {
        let template = ChatTemplate::new(source, TemplateTokens::default())?;
        template.render(messages, &RenderOptions::default())
    }

    fn render_value(source: &str, value: serde_json::Value) -> String {
        let template = ChatTemplate::new(source, TemplateTokens::default()).expect("compiles");
        let mut options = RenderOptions::default();
        options.variables.insert("x".into(), value);
        template.render(&[], &options).expect("renders")
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let value = serde_json::json!({"b": [1, 2.5, null], "a": "é<&>'\"", "c": {}});
        // Python: json.dumps(v, ensure_ascii=False) and friends.
        assert_eq!(
            render_value("{{ x|tojson }}", value.clone()),
            r#"{"b": [1, 2.5, null], "a": "é<&>'\"", "c": {}}"#
        );
        assert_eq!(
            render_value("{{ x|tojson(indent=2) }}", value.clone()),
            "{\n  \"b\": [\n    1,\n    2.5,\n    null\n  ],\n  \"a\": \"é<&>'\\\"\",\n  \"c\": {}\n}"
        );
        assert_eq!(
            render_value(
                "{{ x|tojson(sort_keys=true, ensure_ascii=true) }}",
                value.clone()
            ),
            r#"{"a": "\u00e9<&>'\"", "b": [1, 2.5, null], "c": {}}"#
        );
        assert_eq!(
            render_value("{{ x|tojson(separators=[',', ':']) }}", value),
            r#"{"b":[1,2.5,null],"a":"é<&>'\"","c":{}}"#
        );
        assert_eq!(
            render_value("{{ x|tojson(ensure_ascii=true) }}", "🚀".into()),
            r#""\ud83d\ude80""#
        );
    }

    #[test]
    fn raise_exception_carries_the_message() {
        let source = "{% if messages|length > 1 %}{{ raise_exception('too many: ' ~ messages|length) }}{% endif %}ok";
        let one = [ChatMessage::new("user", "a")];
        assert_eq!(render(source, &one).unwrap(), "ok");
        let two = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
        match render(source, &two) {
            Err(ChatTemplateError::Raised { message }) => assert_eq!(message, "too many: 2"),
            other => panic!("expected Raised, got {other:?}"),
        }
    }

    #[test]
    fn errors_are_classified() {
        assert!(matches!(
            render("{% for %}", &[]),
            Err(ChatTemplateError::Compile(_))
        ));
        // Attribute access on an undefined value fails, as in Jinja2.
        assert!(matches!(
            render("{{ nothing.attr }}", &[]),
            Err(ChatTemplateError::Render(_))
        ));
        // Printing or testing an undefined value does not.
        assert_eq!(
            render("[{{ nothing }}]{% if nothing %}x{% endif %}", &[]).unwrap(),
            "[]"
        );
    }

    #[test]
    fn content_parts_are_flattened_and_non_text_parts_refused() {
        let messages: Vec<ChatMessage> = serde_json::from_value(serde_json::json!([
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null, "name": "bot"}
        ]))
        .unwrap();
        let source =
            "{% for m in messages %}{{ m.role }}={{ m.content }}|{{ m.name }};{% endfor %}";
        assert_eq!(
            render(source, &messages).unwrap(),
            "user=a\nb|;assistant=None|bot;"
        );

        let image: Vec<ChatMessage> = serde_json::from_value(serde_json::json!([
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        ]))
        .unwrap();
        assert!(matches!(
            render(source, &image),
            Err(ChatTemplateError::InvalidMessage { index: 0, .. })
        ));
    }

    #[test]
    fn strftime_now_prints_the_current_date() {
        let year = DateTime::now().year.to_string();
        assert_eq!(render("{{ strftime_now('%Y') }}", &[]).unwrap(), year);
    }
}
