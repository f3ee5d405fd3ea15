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
    /// Groups of entries shared with other endpoints.
    pub shared: &'static [&'static [(&'static str, Support)]],
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

fn is_one(value: &Value) -> bool {
    value.as_f64() == Some(1.0)
}

fn empty_list(value: &Value) -> bool {
    value.as_array().is_some_and(Vec::is_empty)
}

use Support::{Accepted, Refused, Served};

/// The sampling parameters every endpoint serves: the fields of [`SamplingFields`], which each
/// request type flattens.
///
/// [`SamplingFields`]: crate::openai::SamplingFields
const SAMPLING: &[(&str, Support)] = &[("temperature", Served), ("top_p", Served)];

/// What chat and text completions serve to generate besides [`SAMPLING`]: the fields of
/// [`GenerationFields`], which both request types flatten.
///
/// [`GenerationFields`]: crate::openai::GenerationFields
const GENERATION: &[(&str, Support)] = &[
    ("n", Served),
    ("stop", Served),
    ("presence_penalty", Served),
    ("frequency_penalty", Served),
    ("seed", Served),
    // vLLM's extensions.
    ("top_k", Served),
    ("min_p", Served),
    ("min_tokens", Served),
    ("repetition_penalty", Served),
    ("ignore_eos", Served),
    ("stop_token_ids", Served),
    // Served through the "grammar" path.
    ("logit_bias", Served),
    ("cache_salt", Served),
    ("structured_outputs", Served),
    ("allowed_token_ids", Served),
    ("bad_words", Served),
    ("request_id", Served),
    ("include_stop_str_in_output", Served),
    ("skip_special_tokens", Served),
    ("return_tokens_as_token_ids", Served),
    ("truncate_prompt_tokens", Served),
    ("prompt_logprobs", Served),
    ("priority", Served),
];

/// vLLM's detokenizer option for slow tokenizers: tandem's are Hugging Face's fast ones,
/// which never put spaces between special tokens, so only the value that matches is taken.
fn is_true(value: &Value) -> bool {
    value == &Value::Bool(true)
}

/// vLLM's fields tandem refuses with a 400 that says why: its constrained-decoding fields
/// before 0.12, which replaced them with `structured_outputs`, and a detokenizer option.
const VLLM_REFUSED: &[(&str, Support)] = &[
    (
        "use_beam_search",
        Refused {
            why: "beam search is not served: use n or best_of",
            allowed: is_false,
        },
    ),
    (
        "length_penalty",
        Refused {
            why: "length_penalty applies to beam search, which is not served: only 1",
            allowed: is_one,
        },
    ),
    (
        "logits_processors",
        Refused {
            why: "tandem runs no request-supplied logits processors",
            allowed: never,
        },
    ),
    (
        "vllm_xargs",
        Refused {
            why: "tandem runs no vLLM plugins",
            allowed: never,
        },
    ),
    (
        "kv_transfer_params",
        Refused {
            why: "tandem hands KV caches over between its own workers: no request sets it",
            allowed: never,
        },
    ),
    (
        "spaces_between_special_tokens",
        Refused {
            why: "tandem's tokenizers put no spaces between special tokens: only true (vLLM's \
                  default, which its fast tokenizers do the same way) is taken",
            allowed: is_true,
        },
    ),
    (
        "guided_json",
        Refused {
            why: "guided_json is vLLM's name before 0.12: send structured_outputs: {\"json\": ...}",
            allowed: never,
        },
    ),
    (
        "guided_regex",
        Refused {
            why: "guided_regex is vLLM's name before 0.12: send structured_outputs: {\"regex\": ...}",
            allowed: never,
        },
    ),
    (
        "guided_choice",
        Refused {
            why: "guided_choice is vLLM's name before 0.12: send structured_outputs: {\"choice\": [...]}",
            allowed: never,
        },
    ),
    (
        "guided_grammar",
        Refused {
            why: "guided_grammar is vLLM's name before 0.12: send structured_outputs: {\"grammar\": ...}",
            allowed: never,
        },
    ),
    (
        "guided_decoding_backend",
        Refused {
            why: "tandem has one constrained-decoding backend (llguidance): leave it out",
            allowed: never,
        },
    ),
    (
        "guided_whitespace_pattern",
        Refused {
            why: "tandem's JSON output is compact: no whitespace pattern is read",
            allowed: never,
        },
    ),
];

/// vLLM's `structured_outputs` object of chat and text completions.
pub const STRUCTURED_OUTPUTS: EndpointFields = EndpointFields {
    path: "structured_outputs",
    fields: &[
        ("json", Served),
        ("regex", Served),
        ("choice", Served),
        ("grammar", Served),
        ("json_object", Served),
        // JSON is written compact whatever it says: whitespace is allowed there, never needed.
        ("disable_any_whitespace", Served),
        // llguidance is the one backend: there is nothing to fall back to, or from.
        ("disable_fallback", Served),
        (
            "disable_additional_properties",
            Refused {
                why: "a schema's additionalProperties are as the schema says: set \
                      \"additionalProperties\": false in it",
                allowed: is_false,
            },
        ),
        (
            "whitespace_pattern",
            Refused {
                why: "tandem's JSON output is compact: no whitespace pattern is read",
                allowed: never,
            },
        ),
        ("structural_tag", Served),
    ],
    shared: &[],
    nested: &[],
};

/// vLLM's chat template fields, of chat completions and `/tokenize`: the fields of
/// [`ChatTemplateFields`], which both request types flatten. A template of the request's own
/// is refused: the model directory's is the one the tool parser and the tests know.
///
/// [`ChatTemplateFields`]: crate::openai::ChatTemplateFields
const CHAT_TEMPLATE: &[(&str, Support)] = &[
    ("add_generation_prompt", Served),
    ("continue_final_message", Served),
    ("chat_template_kwargs", Served),
    ("documents", Served),
    (
        "mm_processor_kwargs",
        Refused {
            why: "tandem serves text models",
            allowed: never,
        },
    ),
    (
        "chat_template",
        Refused {
            why: "the model directory's chat template is the one requests use",
            allowed: never,
        },
    ),
];

/// Fields chat and text completions accept: tags and hints about OpenAI's own accounting,
/// caching and storage, which mean nothing to a server that stores no chat completions and has
/// one service tier (docs/api.md says what each means here).
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
        ("stream", Served),
        ("stream_options", Served),
        ("logprobs", Served),
        ("top_logprobs", Served),
        // Served through other paths: tools ("tools"), structured outputs ("grammar").
        ("tools", Served),
        ("tool_choice", Served),
        ("parallel_tool_calls", Served),
        ("functions", Served),
        ("function_call", Served),
        ("response_format", Served),
        ("echo", Served),
        (
            "add_special_tokens",
            Refused {
                why: "the chat template writes the special tokens: a chat prompt takes none \
                      more (only false)",
                allowed: is_false,
            },
        ),
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
        ("prediction", Served),
        (
            "reasoning_effort",
            Refused {
                why: "tandem has no reasoning effort setting: a reasoning model's thinking is \
                      switched by its chat template (chat_template_kwargs, such as Qwen3's \
                      enable_thinking)",
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
    shared: &[
        SAMPLING,
        GENERATION,
        VLLM_REFUSED,
        ACCEPTED_HINTS,
        CHAT_TEMPLATE,
    ],
    nested: &[
        ("messages", &CHAT_MESSAGE),
        ("stream_options", &STREAM_OPTIONS),
        ("structured_outputs", &STRUCTURED_OUTPUTS),
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
        ("reasoning", Served),
        ("reasoning_content", Served),
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
        ("continuous_usage_stats", Served),
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
        ("best_of", Served),
        ("stream", Served),
        ("stream_options", Served),
        ("logprobs", Served),
        ("echo", Served),
        ("suffix", Served),
        ("response_format", Served),
    ],
    // OpenAI's reference lists only `user` of the hints here; the others are accepted too, as
    // clients that share settings between endpoints send them.
    shared: &[SAMPLING, GENERATION, VLLM_REFUSED, ACCEPTED_HINTS],
    nested: &[
        ("stream_options", &STREAM_OPTIONS),
        ("structured_outputs", &STRUCTURED_OUTPUTS),
    ],
};

/// `POST /v1/embeddings`.
pub const EMBEDDINGS: EndpointFields = EndpointFields {
    path: "/v1/embeddings",
    fields: &[
        ("model", Served),
        ("input", Served),
        ("encoding_format", Served),
        ("dimensions", Served),
        ("user", Accepted(Kind::String)),
        ("truncate_prompt_tokens", Served),
        ("priority", Served),
        (
            "add_special_tokens",
            Refused {
                why: "inputs are tokenized with the tokenizer's special tokens (as the model's \
                      pooling expects them): only true",
                allowed: is_true,
            },
        ),
    ],
    shared: &[],
    nested: &[],
};

/// `POST /v1/responses`.
pub const RESPONSES: EndpointFields = EndpointFields {
    path: "/v1/responses",
    fields: &[
        ("model", Served),
        ("input", Served),
        ("instructions", Served),
        ("max_output_tokens", Served),
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
        ("cache_salt", Served),
        ("priority", Served),
        ("prompt_cache_retention", Accepted(Kind::String)),
        ("prompt_cache_options", Accepted(Kind::Object)),
        ("background", Served),
        (
            "background_options",
            Refused {
                why: "background responses take no options",
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
    shared: &[SAMPLING],
    // Input items are walked by validation, which knows each item type's fields.
    nested: &[("stream_options", &RESPONSES_STREAM_OPTIONS)],
};

/// `POST /v1/conversations`. Items are walked by validation, as a response's input items.
pub const CONVERSATION_CREATE: EndpointFields = EndpointFields {
    path: "/v1/conversations",
    fields: &[("items", Served), ("metadata", Served)],
    shared: &[],
    nested: &[],
};

/// `POST /v1/conversations/{id}`.
pub const CONVERSATION_UPDATE: EndpointFields = EndpointFields {
    path: "/v1/conversations/{id}",
    fields: &[("metadata", Served)],
    shared: &[],
    nested: &[],
};

/// `POST /v1/conversations/{id}/items`.
pub const CONVERSATION_ITEMS: EndpointFields = EndpointFields {
    path: "/v1/conversations/{id}/items",
    fields: &[("items", Served)],
    shared: &[],
    nested: &[],
};

/// `POST /tokenize` (vLLM's).
pub const TOKENIZE: EndpointFields = EndpointFields {
    path: "/tokenize",
    fields: &[
        ("model", Served),
        ("prompt", Served),
        ("messages", Served),
        ("tools", Served),
        ("add_special_tokens", Served),
        ("return_token_strs", Served),
    ],
    shared: &[CHAT_TEMPLATE],
    nested: &[("messages", &CHAT_MESSAGE)],
};

/// `POST /detokenize` (vLLM's).
pub const DETOKENIZE: EndpointFields = EndpointFields {
    path: "/detokenize",
    fields: &[("model", Served), ("tokens", Served)],
    shared: &[],
    nested: &[],
};

impl EndpointFields {
    /// Every field of the endpoint and its support.
    pub fn entries(&self) -> impl Iterator<Item = &(&'static str, Support)> {
        self.fields
            .iter()
            .chain(self.shared.iter().flat_map(|group| group.iter()))
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
        let body = Value::Object(object);
        T::deserialize(&body).map_err(|err| {
            let first = first_unreadable_field::<T>(&body).unwrap_or(err);
            ApiError::InvalidJson(first.to_string())
        })
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

/// The error of the first field of `body`, in the body's order, that `T` cannot read alone;
/// `None` when `T` has a required field (a field alone then says nothing) or each field reads.
///
/// serde reads a request type's own fields in the body's order, but those of the structs it
/// flattens ([`crate::openai::sampling`]) after all of its own, so of two malformed fields it
/// may name the later one. The client is told about the first, whichever struct declares it.
fn first_unreadable_field<T: DeserializeOwned>(body: &Value) -> Option<serde_json::Error> {
    T::deserialize(&Value::Object(Map::new())).ok()?;
    body.as_object()?.iter().find_map(|(name, value)| {
        let alone = Value::Object(Map::from_iter([(name.clone(), value.clone())]));
        T::deserialize(&alone).err()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::{
        AddItemsRequest, ChatCompletionRequest, ChatMessage, ChatTemplateFields, CompletionRequest,
        CreateConversationRequest, DetokenizeRequest, GenerationFields, ResponsesRequest,
        ResponsesStreamOptions, SamplingFields, StreamOptions, StructuredOutputs, TokenizeRequest,
        UpdateConversationRequest,
    };
    use serde_json::json;
    use std::collections::BTreeSet;

    /// Every table, and so every name a request type may declare.
    const TABLES: [&EndpointFields; 12] = [
        &CHAT_COMPLETIONS,
        &COMPLETIONS,
        &RESPONSES,
        &CHAT_MESSAGE,
        &STREAM_OPTIONS,
        &STRUCTURED_OUTPUTS,
        &RESPONSES_STREAM_OPTIONS,
        &TOKENIZE,
        &DETOKENIZE,
        &CONVERSATION_CREATE,
        &CONVERSATION_UPDATE,
        &CONVERSATION_ITEMS,
    ];

    /// The field names a derived `Deserialize` struct reads itself: those it hands to
    /// `deserialize_struct`. A struct that flattens another is read as a map instead and
    /// names none, so it is offered every name of every table, and its own are those it reads
    /// as a field (each an `Option`, read with `deserialize_option`) rather than keeping for
    /// the struct it flattens (whose names are that struct's `declared_fields`).
    fn declared_fields<T: DeserializeOwned>() -> BTreeSet<&'static str> {
        use serde::de::value::BorrowedStrDeserializer;
        use serde::de::{DeserializeSeed, MapAccess, Visitor};

        struct Probe {
            declared: Option<&'static [&'static str]>,
            offered: Vec<&'static str>,
            read: BTreeSet<&'static str>,
        }
        impl<'de> serde::Deserializer<'de> for &mut Probe {
            type Error = serde_json::Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(serde::de::Error::custom("probe"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                self.declared = Some(fields);
                Err(serde::de::Error::custom("probe"))
            }
            fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
                visitor.visit_map(Offer { probe: self, at: 0 })
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct enum
                identifier ignored_any
            }
        }

        /// Offers the probe's names one by one, each with a [`FieldValue`].
        struct Offer<'a> {
            probe: &'a mut Probe,
            at: usize,
        }
        impl<'de> MapAccess<'de> for Offer<'_> {
            type Error = serde_json::Error;
            fn next_key_seed<K: DeserializeSeed<'de>>(
                &mut self,
                seed: K,
            ) -> Result<Option<K::Value>, Self::Error> {
                let Some(&name) = self.probe.offered.get(self.at) else {
                    return Ok(None);
                };
                seed.deserialize(BorrowedStrDeserializer::new(name))
                    .map(Some)
            }
            fn next_value_seed<V: DeserializeSeed<'de>>(
                &mut self,
                seed: V,
            ) -> Result<V::Value, Self::Error> {
                let name = self.probe.offered[self.at];
                self.at += 1;
                seed.deserialize(FieldValue {
                    name,
                    read: &mut self.probe.read,
                })
            }
        }

        /// The value of an offered name: `null` to a field of the struct, which is noted, and
        /// to what the struct keeps for the one it flattens.
        struct FieldValue<'a> {
            name: &'static str,
            read: &'a mut BTreeSet<&'static str>,
        }
        impl<'de> serde::Deserializer<'de> for FieldValue<'_> {
            type Error = serde_json::Error;
            fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
                visitor.visit_unit()
            }
            fn deserialize_option<V: Visitor<'de>>(
                self,
                visitor: V,
            ) -> Result<V::Value, Self::Error> {
                self.read.insert(self.name);
                visitor.visit_none()
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
                identifier ignored_any
            }
        }

        let offered: BTreeSet<&'static str> = TABLES
            .iter()
            .flat_map(|table| table.entries().map(|&(name, _)| name))
            .collect();
        let mut probe = Probe {
            declared: None,
            offered: offered.into_iter().collect(),
            read: BTreeSet::new(),
        };
        match T::deserialize(&mut probe) {
            Ok(_) => probe.read,
            Err(_) => probe.declared.expect("a struct").iter().copied().collect(),
        }
    }

    fn names(group: &[(&'static str, Support)]) -> BTreeSet<&'static str> {
        group.iter().map(|&(name, _)| name).collect()
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
        let sampling = declared_fields::<SamplingFields>();
        let generation = &declared_fields::<GenerationFields>() | &sampling;
        let template = declared_fields::<ChatTemplateFields>();
        assert_eq!(
            served(&CHAT_COMPLETIONS),
            &(&declared_fields::<ChatCompletionRequest>() | &generation) | &template
        );
        assert_eq!(
            served(&COMPLETIONS),
            &declared_fields::<CompletionRequest>() | &generation
        );
        assert_eq!(
            served(&RESPONSES),
            &declared_fields::<ResponsesRequest>() | &sampling
        );
        assert_eq!(served(&CHAT_MESSAGE), declared_fields::<ChatMessage>());
        assert_eq!(served(&STREAM_OPTIONS), declared_fields::<StreamOptions>());
        assert_eq!(
            served(&STRUCTURED_OUTPUTS),
            declared_fields::<StructuredOutputs>()
        );
        assert_eq!(
            served(&RESPONSES_STREAM_OPTIONS),
            declared_fields::<ResponsesStreamOptions>()
        );
        assert_eq!(
            served(&TOKENIZE),
            &declared_fields::<TokenizeRequest>() | &template
        );
        assert_eq!(served(&DETOKENIZE), declared_fields::<DetokenizeRequest>());
        assert_eq!(
            served(&CONVERSATION_CREATE),
            declared_fields::<CreateConversationRequest>()
        );
        assert_eq!(
            served(&CONVERSATION_UPDATE),
            declared_fields::<UpdateConversationRequest>()
        );
        assert_eq!(
            served(&CONVERSATION_ITEMS),
            declared_fields::<AddItemsRequest>()
        );
    }

    /// The shared groups are the structs the request types flatten, so a sampling parameter
    /// is listed once here as it is declared once there.
    #[test]
    fn shared_groups_are_the_flattened_structs() {
        assert_eq!(names(SAMPLING), declared_fields::<SamplingFields>());
        assert_eq!(names(GENERATION), declared_fields::<GenerationFields>());
        let template_served: BTreeSet<_> = CHAT_TEMPLATE
            .iter()
            .filter(|(_, s)| matches!(s, Served))
            .map(|&(name, _)| name)
            .collect();
        assert_eq!(template_served, declared_fields::<ChatTemplateFields>());
        assert!(declared_fields::<ChatCompletionRequest>().is_disjoint(&names(GENERATION)));
    }

    #[test]
    fn each_name_is_listed_once() {
        for endpoint in TABLES {
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
        let (param, _, _) = refusal(&RESPONSES, json!({"background_options": {}}));
        assert_eq!(param, "background_options");

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

    /// Of two malformed fields the first in the body is named, whether or not the request
    /// type declares it itself.
    #[test]
    fn the_first_malformed_field_is_the_one_named() {
        let message = |body: Value| match CHAT_COMPLETIONS.parse::<ChatCompletionRequest>(body) {
            Err(ApiError::InvalidJson(message)) => message,
            other => panic!("expected invalid JSON, got {other:?}"),
        };
        let sampling_first = message(json!({"temperature": "hot", "stream": 1}));
        assert!(
            sampling_first.contains("string \"hot\""),
            "{sampling_first}"
        );
        let own_first = message(json!({"stream": 1, "temperature": "hot"}));
        assert!(own_first.contains("integer `1`"), "{own_first}");
        assert_eq!(
            message(json!({"top_p": "x"})),
            serde_json::from_value::<f64>(json!("x"))
                .unwrap_err()
                .to_string()
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
