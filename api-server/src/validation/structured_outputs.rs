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
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    let kind = match asked.as_slice() {
        [one] => *one,
        [] => {
            return Err(ApiError::invalid(
                "structured_outputs needs one constraint: json, regex, choice, grammar or \
                 json_object",
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
        _ => unreachable!("one of the kinds listed above"),
    };
    let param = match kind {
        "json" => "structured_outputs.json",
        "json_object" => "structured_outputs.json_object",
        "regex" => "structured_outputs.regex",
        "choice" => "structured_outputs.choice",
        _ => "structured_outputs.grammar",
    };
    Ok((grammar, param))
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
