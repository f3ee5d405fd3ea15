//! The request fields each endpoint knows, in one table per endpoint, and the check that a
//! request body holds nothing else.
//!
//! serde drops fields a request type does not declare, so a client that sends a parameter
//! tandem does not serve (a misspelling, or a feature such as `audio`) would get an answer that
//! silently ignores it. Every body is therefore read as a JSON object first: a name outside the
//! endpoint's table is a 400 `unknown_parameter` naming it, a known name tandem refuses is a 400
//! `unsupported_parameter` naming it, and only then is the object turned into the endpoint's
//! request type. The table is the list docs/api.md gives field by field.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// What tandem does with one request field.
#[derive(Debug, Clone, Copy)]
pub enum Support {
    /// Read by the endpoint's request type; its values are checked by [`crate::validation`].
    Served,
    /// Accepted with a documented meaning that needs no work from tandem (a tag such as `user`,
    /// a hint such as `service_tier`); its value must have the JSON type OpenAI documents.
    Accepted(Kind),
    /// Refused with a 400 saying `why`, unless the value is null or `allowed` says it asks for
    /// nothing tandem lacks (for example `modalities: ["text"]`).
    Refused {
        why: &'static str,
        allowed: fn(&Value) -> bool,
    },
}

/// The JSON type of an accepted field's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    String,
    Bool,
    Object,
    /// Any value, left to the field's documentation.
    Any,
}

impl Kind {
    fn admits(self, value: &Value) -> bool {
        match self {
            Kind::String => value.is_string(),
            Kind::Bool => value.is_boolean(),
            Kind::Object => value.is_object(),
            Kind::Any => true,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::String => "a string",
            Kind::Bool => "a boolean",
            Kind::Object => "an object",
            Kind::Any => "any value",
        }
    }
}

/// One endpoint's table (or the table of an object inside its body).
#[derive(Debug)]
pub struct EndpointFields {
    /// `/v1/chat/completions`, `a chat message`, ...: what the errors name.
    pub path: &'static str,
    pub fields: &'static [(&'static str, Support)],
    /// Entries shared with other endpoints.
    pub shared: &'static [(&'static str, Support)],
    /// Fields whose value (an object, or a list of objects) is checked against a table of its
    /// own, the errors naming the inner field (`messages[2].tool_call_id`).
    pub nested: &'static [(&'static str, &'static EndpointFields)],
}

fn never(_: &Value) -> bool {
    false
}

fn text_modalities(value: &Value) -> bool {
    value
        .as_array()
        .is_some_and(|list| list.iter().all(|m| m == "text"))
}

fn is_false(value: &Value) -> bool {
    value == &Value::Bool(false)
}

fn empty_list(value: &Value) -> bool {
    value.as_array().is_some_and(Vec::is_empty)
}

use Support::{Accepted, Refused, Served};

/// Fields chat and text completions accept: tags and hints about OpenAI's own accounting,
/// caching and storage, which mean nothing to a server that stores nothing and has one service
/// tier (docs/api.md says what each means here).
const ACCEPTED_HINTS: &[(&str, Support)] = &[
    ("user", Accepted(Kind::String)),
    ("safety_identifier", Accepted(Kind::String)),
    ("metadata", Accepted(Kind::Object)),
    ("store", Accepted(Kind::Bool)),
    ("service_tier", Accepted(Kind::String)),
    ("prompt_cache_key", Accepted(Kind::String)),
    ("prompt_cache_retention", Accepted(Kind::String)),
    ("prompt_cache_options", Accepted(Kind::Object)),
];

/// `POST /v1/chat/completions`.
pub const CHAT_COMPLETIONS: EndpointFields = EndpointFields {
    path: "/v1/chat/completions",
    fields: &[
        ("model", Served),
        ("messages", Served),
        ("max_tokens", Served),
        ("max_completion_tokens", Served),
        ("temperature", Served),
        ("top_p", Served),
        ("n", Served),
        ("stream", Served),
        ("stream_options", Served),
        ("stop", Served),
        ("presence_penalty", Served),
        ("frequency_penalty", Served),
        ("seed", Served),
        ("logprobs", Served),
        ("top_logprobs", Served),
        // vLLM's extensions.
        ("top_k", Served),
        ("repetition_penalty", Served),
        ("ignore_eos", Served),
        // Served through other paths: tools ("tools"), structured outputs and logit_bias
        // ("grammar").
        ("tools", Served),
        ("tool_choice", Served),
        ("parallel_tool_calls", Served),
        ("functions", Served),
        ("function_call", Served),
        ("response_format", Served),
        ("logit_bias", Served),
        (
            "modalities",
            Refused {
                why: "tandem generates text only: modalities may only be [\"text\"]",
                allowed: text_modalities,
            },
        ),
        (
            "audio",
            Refused {
                why: "tandem generates text only, not audio",
                allowed: never,
            },
        ),
        (
            "prediction",
            Refused {
                why: "predicted outputs are not supported",
                allowed: never,
            },
        ),
        (
            "reasoning_effort",
            Refused {
                why: "the served model is not a reasoning model",
                allowed: never,
            },
        ),
        (
            "verbosity",
            Refused {
                why: "the served model has no verbosity setting",
                allowed: never,
            },
        ),
        (
            "web_search_options",
            Refused {
                why: "tandem has no web search",
                allowed: never,
            },
        ),
        (
            "moderation",
            Refused {
                why: "tandem runs no moderation model",
                allowed: never,
            },
        ),
    ],
    shared: ACCEPTED_HINTS,
    nested: &[
        ("messages", &CHAT_MESSAGE),
        ("stream_options", &STREAM_OPTIONS),
    ],
};

/// A message of `messages` in a chat completion request.
pub const CHAT_MESSAGE: EndpointFields = EndpointFields {
    path: "a chat message",
    fields: &[
        ("role", Served),
        ("content", Served),
        ("name", Served),
        // An assistant message sent back as the client received it.
        (
            "refusal",
            Refused {
                why: "an assistant message's refusal cannot be sent back: send its content",
                allowed: never,
            },
        ),
        ("tool_calls", Served),
        ("tool_call_id", Served),
        (
            "function_call",
            Refused {
                why: "function_call is OpenAI's deprecated form of a call: send tool_calls",
                allowed: never,
            },
        ),
        (
            "audio",
            Refused {
                why: "tandem takes text only, not audio",
                allowed: never,
            },
        ),
    ],
    shared: &[],
    nested: &[],
};

/// `stream_options` of chat and text completions.
pub const STREAM_OPTIONS: EndpointFields = EndpointFields {
    path: "stream_options",
    fields: &[
        ("include_usage", Served),
        // OpenAI pads deltas against side channels when this is true; tandem never does.
        ("include_obfuscation", Accepted(Kind::Bool)),
    ],
    shared: &[],
    nested: &[],
};

/// `stream_options` of `/v1/responses`.
pub const RESPONSES_STREAM_OPTIONS: EndpointFields = EndpointFields {
    path: "stream_options",
    fields: &[("include_obfuscation", Served)],
    shared: &[],
    nested: &[],
};

/// `POST /v1/completions`.
pub const COMPLETIONS: EndpointFields = EndpointFields {
    path: "/v1/completions",
    fields: &[
        ("model", Served),
        ("prompt", Served),
        ("max_tokens", Served),
        ("temperature", Served),
        ("top_p", Served),
        ("n", Served),
        ("best_of", Served),
        ("stream", Served),
        ("stream_options", Served),
        ("stop", Served),
        ("presence_penalty", Served),
        ("frequency_penalty", Served),
        ("seed", Served),
        ("logprobs", Served),
        ("echo", Served),
        ("suffix", Served),
        ("top_k", Served),
        ("repetition_penalty", Served),
        ("ignore_eos", Served),
        // Served through the "grammar" path.
        ("logit_bias", Served),
    ],
    // OpenAI's reference lists only `user` here; the other hints are accepted too, as clients
    // that share settings between endpoints send them.
    shared: ACCEPTED_HINTS,
    nested: &[("stream_options", &STREAM_OPTIONS)],
};

/// `POST /v1/responses`.
pub const RESPONSES: EndpointFields = EndpointFields {
    path: "/v1/responses",
    fields: &[
        ("model", Served),
        ("input", Served),
        ("instructions", Served),
        ("max_output_tokens", Served),
        ("temperature", Served),
        ("top_p", Served),
        ("stream", Served),
        ("stream_options", Served),
        ("text", Served),
        ("top_logprobs", Served),
        ("include", Served),
        ("tools", Served),
        ("tool_choice", Served),
        ("parallel_tool_calls", Served),
        ("max_tool_calls", Served),
        ("reasoning", Served),
        ("truncation", Served),
        ("previous_response_id", Served),
        ("conversation", Served),
        ("metadata", Served),
        ("user", Served),
        ("store", Served),
        ("service_tier", Served),
        ("safety_identifier", Served),
        ("prompt_cache_key", Served),
        ("prompt_cache_retention", Accepted(Kind::String)),
        ("prompt_cache_options", Accepted(Kind::Object)),
        (
            "background",
            Refused {
                why: "tandem runs every response in the foreground: background may only be false",
                allowed: is_false,
            },
        ),
        (
            "background_options",
            Refused {
                why: "tandem runs every response in the foreground",
                allowed: never,
            },
        ),
        (
            "prompt",
            Refused {
                why: "tandem keeps no stored prompt templates: send the text in input and instructions",
                allowed: never,
            },
        ),
        (
            "context_management",
            Refused {
                why: "tandem does no context compaction",
                allowed: empty_list,
            },
        ),
        (
            "moderation",
            Refused {
                why: "tandem runs no moderation model",
                allowed: never,
            },
        ),
        (
            "image",
            Refused {
                why: "tandem takes and generates text only",
                allowed: never,
            },
        ),
        (
            "access_programs",
            Refused {
                why: "tandem has no access programs",
                allowed: never,
            },
        ),
    ],
    shared: &[],
    // Input items are walked by validation, which knows each item type's fields.
    nested: &[("stream_options", &RESPONSES_STREAM_OPTIONS)],
};

impl EndpointFields {
    /// Every field of the endpoint and its support.
    pub fn entries(&self) -> impl Iterator<Item = &(&'static str, Support)> {
        self.fields.iter().chain(self.shared)
    }

    fn support(&self, name: &str) -> Option<Support> {
        self.entries()
            .find(|(known, _)| *known == name)
            .map(|&(_, support)| support)
    }

    /// Checks every top-level field of `body` against the table, then reads it as `T`.
    pub fn parse<T: DeserializeOwned>(&self, body: Value) -> Result<T, ApiError> {
        let Value::Object(object) = body else {
            return Err(ApiError::InvalidJson(format!(
                "the body of {} must be a JSON object",
                self.path
            )));
        };
        self.check(&object, "")?;
        serde_json::from_value(Value::Object(object))
            .map_err(|err| ApiError::InvalidJson(err.to_string()))
    }

    /// Checks `object`, whose fields are named `{prefix}{name}` in errors.
    fn check(&self, object: &Map<String, Value>, prefix: &str) -> Result<(), ApiError> {
        for (name, value) in object {
            let param = format!("{prefix}{name}");
            let Some(support) = self.support(name) else {
                return Err(ApiError::InvalidRequest {
                    message: format!(
                        "Unknown parameter: '{param}'. {} has no such parameter (docs/api.md \
                         lists the parameters tandem serves).",
                        self.path
                    ),
                    param: Some(param),
                    code: Some("unknown_parameter"),
                });
            };
            match support {
                Served => {}
                _ if value.is_null() => {}
                Accepted(kind) if kind.admits(value) => {}
                Accepted(kind) => {
                    return Err(ApiError::InvalidRequest {
                        message: format!("'{param}' must be {}, got {value}", kind.name()),
                        param: Some(param),
                        code: None,
                    });
                }
                Refused { allowed, .. } if allowed(value) => {}
                Refused { why, .. } => {
                    return Err(ApiError::unsupported(
                        format!("Unsupported parameter: '{param}': {why}."),
                        &param,
                    ));
                }
            }
            if let Some((_, inner)) = self.nested.iter().find(|(field, _)| *field == name) {
                match value {
                    Value::Object(object) => inner.check(object, &format!("{param}."))?,
                    Value::Array(items) => {
                        for (i, item) in items.iter().enumerate() {
                            if let Value::Object(object) = item {
                                inner.check(object, &format!("{param}[{i}]."))?;
                            }
                        }
                    }
                    // Other values are the request type's to refuse.
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::{
        ChatCompletionRequest, ChatMessage, CompletionRequest, ResponsesRequest,
        ResponsesStreamOptions, StreamOptions,
    };
    use serde_json::json;
    use std::collections::BTreeSet;

    /// The field names a derived `Deserialize` struct declares (serde hands them to
    /// `deserialize_struct`).
    fn declared_fields<T: DeserializeOwned>() -> BTreeSet<&'static str> {
        struct Probe(Option<&'static [&'static str]>);
        impl<'de> serde::Deserializer<'de> for &mut Probe {
            type Error = serde_json::Error;
            fn deserialize_any<V: serde::de::Visitor<'de>>(
                self,
                _: V,
            ) -> Result<V::Value, Self::Error> {
                Err(serde::de::Error::custom("probe"))
            }
            fn deserialize_struct<V: serde::de::Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                self.0 = Some(fields);
                Err(serde::de::Error::custom("probe"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
                identifier ignored_any
            }
        }
        let mut probe = Probe(None);
        let _ = T::deserialize(&mut probe);
        probe.0.expect("a struct").iter().copied().collect()
    }

    fn served(endpoint: &EndpointFields) -> BTreeSet<&'static str> {
        endpoint
            .entries()
            .filter(|(_, s)| matches!(s, Served))
            .map(|&(name, _)| name)
            .collect()
    }

    /// The table and the request types cannot drift: a `Served` name the type does not read
    /// would be silently dropped, and a field the type reads but the table lacks refused.
    #[test]
    fn served_fields_are_exactly_the_request_types_fields() {
        assert_eq!(
            served(&CHAT_COMPLETIONS),
            declared_fields::<ChatCompletionRequest>()
        );
        assert_eq!(served(&COMPLETIONS), declared_fields::<CompletionRequest>());
        assert_eq!(served(&RESPONSES), declared_fields::<ResponsesRequest>());
        assert_eq!(served(&CHAT_MESSAGE), declared_fields::<ChatMessage>());
        assert_eq!(served(&STREAM_OPTIONS), declared_fields::<StreamOptions>());
        assert_eq!(
            served(&RESPONSES_STREAM_OPTIONS),
            declared_fields::<ResponsesStreamOptions>()
        );
    }

    #[test]
    fn each_name_is_listed_once() {
        for endpoint in [
            &CHAT_COMPLETIONS,
            &COMPLETIONS,
            &RESPONSES,
            &CHAT_MESSAGE,
            &STREAM_OPTIONS,
            &RESPONSES_STREAM_OPTIONS,
        ] {
            let names: BTreeSet<_> = endpoint.entries().map(|(n, _)| n).collect();
            assert_eq!(names.len(), endpoint.entries().count(), "{}", endpoint.path);
        }
    }

    fn refusal(endpoint: &EndpointFields, body: Value) -> (String, String, Option<&'static str>) {
        match endpoint.parse::<ChatCompletionRequest>(body) {
            Err(ApiError::InvalidRequest {
                message,
                param,
                code,
            }) => (param.unwrap_or_default(), message, code),
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn unknown_and_unsupported_fields_are_400s_naming_them() {
        let (param, message, code) = refusal(
            &CHAT_COMPLETIONS,
            json!({"messages": [], "temprature": 0.5}),
        );
        assert_eq!(
            (param.as_str(), code),
            ("temprature", Some("unknown_parameter"))
        );
        assert!(message.contains("'temprature'") && message.contains("/v1/chat/completions"));

        let (param, message, code) = refusal(&CHAT_COMPLETIONS, json!({"audio": {"voice": "x"}}));
        assert_eq!(
            (param.as_str(), code),
            ("audio", Some("unsupported_parameter"))
        );
        assert!(message.contains("text only"), "{message}");

        let (param, _, code) = refusal(&CHAT_COMPLETIONS, json!({"modalities": ["text", "audio"]}));
        assert_eq!(
            (param.as_str(), code),
            ("modalities", Some("unsupported_parameter"))
        );
        let (param, _, _) = refusal(&CHAT_COMPLETIONS, json!({"user": 7}));
        assert_eq!(param, "user");
        let (param, _, _) = refusal(&RESPONSES, json!({"background": true}));
        assert_eq!(param, "background");

        // Inside the body: a message's fields, stream_options.
        let (param, message, code) = refusal(
            &CHAT_COMPLETIONS,
            json!({"messages": [{"role": "user", "content": "x"},
                                {"role": "user", "content": "y", "nmae": "z"}]}),
        );
        assert_eq!(
            (param.as_str(), code),
            ("messages[1].nmae", Some("unknown_parameter"))
        );
        assert!(message.contains("a chat message"), "{message}");
        let (param, _, code) = refusal(
            &CHAT_COMPLETIONS,
            json!({"messages": [{"role": "assistant", "content": null,
                                 "function_call": {"name": "f", "arguments": "{}"}}]}),
        );
        assert_eq!(
            (param.as_str(), code),
            ("messages[0].function_call", Some("unsupported_parameter"))
        );
        let (param, _, _) = refusal(
            &COMPLETIONS,
            json!({"stream": true, "stream_options": {"include_usage": true, "usage": 1}}),
        );
        assert_eq!(param, "stream_options.usage");
    }

    #[test]
    fn accepted_hints_nulls_and_trivial_values_pass() {
        let request: ChatCompletionRequest = CHAT_COMPLETIONS
            .parse(
                json!({"messages": [], "user": "u-1", "store": true, "metadata": {"a": "b"},
                          "service_tier": "flex", "modalities": ["text"], "audio": null,
                          "tools": null, "prompt_cache_key": "k"}),
            )
            .unwrap();
        assert_eq!(request.messages, Some(vec![]));
        assert!(
            RESPONSES
                .parse::<ResponsesRequest>(json!({"background": false, "context_management": []}))
                .is_ok()
        );
    }

    #[test]
    fn a_body_that_is_not_an_object_is_invalid_json() {
        assert!(matches!(
            COMPLETIONS.parse::<CompletionRequest>(json!([1])),
            Err(ApiError::InvalidJson(_))
        ));
        assert!(matches!(
            COMPLETIONS.parse::<CompletionRequest>(json!({"prompt": 5.5})),
            Err(ApiError::InvalidJson(_))
        ));
    }
}
