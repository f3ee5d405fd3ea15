//! vLLM's `structured_outputs` (chat and text completions): one constraint on the output, as
//! the grammar the workers enforce with llguidance. A JSON schema is sent as such; a regular
//! expression, a list of choices and a grammar become llguidance's Lark dialect (the regular
//! expression through llguidance's own translation, the choices as quoted alternatives).

use serde_json::Value;
use tandem_protocol::messages::GrammarSpec;

use crate::error::ApiError;
use crate::openai::StructuredOutputs;

/// The grammar `fields` ask for, and the field it came from (which a grammar that does not
/// compile is a 400 naming).
pub fn structured_outputs(
    fields: &StructuredOutputs,
) -> Result<(GrammarSpec, &'static str), ApiError> {
    let asked: Vec<&'static str> = [
        ("json", fields.json.is_some()),
        ("regex", fields.regex.is_some()),
        ("choice", fields.choice.is_some()),
        ("grammar", fields.grammar.is_some()),
        ("json_object", fields.json_object == Some(true)),
        ("structural_tag", fields.structural_tag.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    let kind = match asked.as_slice() {
        [one] => *one,
        [] => {
            return Err(ApiError::invalid(
                "structured_outputs needs one constraint: json, regex, choice, grammar, \
                 json_object or structural_tag",
                "structured_outputs",
            ));
        }
        several => {
            return Err(ApiError::invalid(
                format!(
                    "structured_outputs takes one constraint, got {}",
                    several.join(", ")
                ),
                "structured_outputs",
            ));
        }
    };
    let grammar = match kind {
        "json" => GrammarSpec::JsonSchema {
            schema: json_schema(fields.json.as_ref().expect("json is set"))?,
        },
        "json_object" => GrammarSpec::JsonSchema {
            schema: serde_json::json!({"type": "object"}),
        },
        "regex" => {
            let regex = fields.regex.as_deref().expect("regex is set");
            if regex.is_empty() {
                return Err(ApiError::invalid(
                    "structured_outputs.regex is empty",
                    "structured_outputs.regex",
                ));
            }
            GrammarSpec::Lark {
                grammar: format!("start: /{}/", llguidance::regex_to_lark(regex, "")),
            }
        }
        "choice" => GrammarSpec::Lark {
            grammar: choices(fields.choice.as_deref().expect("choice is set"))?,
        },
        "grammar" => {
            let grammar = fields.grammar.as_deref().expect("grammar is set");
            if grammar.trim().is_empty() {
                return Err(ApiError::invalid(
                    "structured_outputs.grammar is empty",
                    "structured_outputs.grammar",
                ));
            }
            GrammarSpec::Lark {
                grammar: grammar.to_owned(),
            }
        }
        "structural_tag" => structural_tag(
            fields
                .structural_tag
                .as_ref()
                .expect("structural_tag is set"),
        )?,
        _ => unreachable!("one of the kinds listed above"),
    };
    let param = match kind {
        "json" => "structured_outputs.json",
        "json_object" => "structured_outputs.json_object",
        "regex" => "structured_outputs.regex",
        "choice" => "structured_outputs.choice",
        "structural_tag" => "structured_outputs.structural_tag",
        _ => "structured_outputs.grammar",
    };
    Ok((grammar, param))
}

/// `structural_tag`: vLLM takes the tag as a string holding its JSON; an object is taken too.
fn structural_tag(value: &Value) -> Result<GrammarSpec, ApiError> {
    const PARAM: &str = "structured_outputs.structural_tag";
    let tag = match value {
        Value::String(text) => serde_json::from_str(text)
            .map_err(|e| ApiError::invalid(format!("{PARAM} is not JSON: {e}"), PARAM))?,
        other => other.clone(),
    };
    let Value::Object(tag) = tag else {
        return Err(ApiError::invalid(
            format!("{PARAM} must be a structural tag (an object with structures and triggers)"),
            PARAM,
        ));
    };
    super::structural_tag::structural_tag(&tag, PARAM)
}

/// `json`: a schema (an object, or `true`/`false`), or a string holding one (vLLM takes both).
fn json_schema(json: &Value) -> Result<Value, ApiError> {
    let invalid = |why: String| ApiError::invalid(why, "structured_outputs.json");
    let schema = match json {
        Value::String(text) => serde_json::from_str(text)
            .map_err(|e| invalid(format!("structured_outputs.json is not JSON: {e}")))?,
        other => other.clone(),
    };
    match schema {
        Value::Object(_) | Value::Bool(_) => Ok(schema),
        other => Err(invalid(format!(
            "structured_outputs.json must be a JSON schema (an object), got {other}"
        ))),
    }
}

/// The Lark grammar whose sentences are exactly `choices`.
fn choices(choices: &[String]) -> Result<String, ApiError> {
    if choices.is_empty() {
        return Err(ApiError::invalid(
            "structured_outputs.choice is empty: give the strings the output may be",
            "structured_outputs.choice",
        ));
    }
    if let Some(i) = choices.iter().position(String::is_empty) {
        return Err(ApiError::invalid(
            "a choice must not be empty",
            &format!("structured_outputs.choice[{i}]"),
        ));
    }
    let alternatives: Vec<String> = choices
        .iter()
        .map(|choice| serde_json::to_string(choice).expect("a string serializes"))
        .collect();
    Ok(format!("start: {}", alternatives.join(" | ")))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(value: Value) -> StructuredOutputs {
        serde_json::from_value(value).unwrap()
    }

    fn param_of(result: Result<(GrammarSpec, &'static str), ApiError>) -> String {
        match result {
            Err(ApiError::InvalidRequest { param, .. }) => param.unwrap_or_default(),
            other => panic!("expected an invalid request error, got {other:?}"),
        }
    }

    use crate::tools::grammar::accepts_bytes as accepts;

    fn lark(value: Value) -> String {
        match structured_outputs(&fields(value)).unwrap().0 {
            GrammarSpec::Lark { grammar } => grammar,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_structural_tag_is_taken_as_a_string_or_an_object() {
        let tag = json!({"structures": [{"begin": "<f>", "end": "</f>",
                                         "schema": {"type": "integer"}}],
                         "triggers": ["<f>"]});
        for value in [tag.clone(), json!(tag.to_string())] {
            let grammar = lark(json!({"structural_tag": value}));
            assert!(accepts(&grammar, "x <f>12</f> y"), "{grammar}");
            assert!(!accepts(&grammar, "x <f>\"a\"</f>"), "{grammar}");
        }
        assert_eq!(
            structured_outputs(&fields(json!({"structural_tag": tag})))
                .unwrap()
                .1,
            "structured_outputs.structural_tag"
        );
        assert_eq!(
            param_of(structured_outputs(&fields(json!({"structural_tag": "{"})))),
            "structured_outputs.structural_tag"
        );
        assert_eq!(
            param_of(structured_outputs(&fields(
                json!({"structural_tag": "{}", "regex": "a"})
            ))),
            "structured_outputs"
        );
    }

    #[test]
    fn each_constraint_becomes_its_grammar() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        for json in [schema.clone(), json!(schema.to_string())] {
            assert_eq!(
                structured_outputs(&fields(json!({"json": json}))).unwrap(),
                (
                    GrammarSpec::JsonSchema {
                        schema: schema.clone()
                    },
                    "structured_outputs.json"
                )
            );
        }
        assert_eq!(
            structured_outputs(&fields(json!({"json_object": true, "regex": null}))).unwrap(),
            (
                GrammarSpec::JsonSchema {
                    schema: json!({"type": "object"})
                },
                "structured_outputs.json_object"
            )
        );

        let choice = lark(json!({"choice": ["yes", "no", "a \"quoted\" / word"]}));
        for text in ["yes", "no", "a \"quoted\" / word"] {
            assert!(accepts(&choice, text), "{choice} should accept {text:?}");
        }
        for text in ["maybe", "yesno", "ye", ""] {
            assert!(!accepts(&choice, text), "{choice} should refuse {text:?}");
        }

        let email = lark(json!({"regex": r"\w+@\w+\.com/x\n"}));
        assert!(accepts(&email, "alan@enigma.com/x\n"), "{email}");
        assert!(!accepts(&email, "alan@enigma.org/x\n"), "{email}");

        let grammar = "start: \"a\" b\nb: \"b\"+";
        assert_eq!(lark(json!({"grammar": grammar})), grammar);
        assert!(accepts(grammar, "abbb"));
    }

    #[test]
    fn refusals_name_their_field() {
        for (body, param) in [
            (json!({}), "structured_outputs"),
            (json!({"json_object": false}), "structured_outputs"),
            (json!({"regex": "a", "choice": ["a"]}), "structured_outputs"),
            (json!({"json": 5}), "structured_outputs.json"),
            (json!({"json": "{not json"}), "structured_outputs.json"),
            (json!({"choice": []}), "structured_outputs.choice"),
            (json!({"choice": ["a", ""]}), "structured_outputs.choice[1]"),
            (json!({"regex": ""}), "structured_outputs.regex"),
            (json!({"grammar": " "}), "structured_outputs.grammar"),
        ] {
            assert_eq!(
                param_of(structured_outputs(&fields(body.clone()))),
                param,
                "{body}"
            );
        }
    }
}
