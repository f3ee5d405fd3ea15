//! vLLM's structural tags (`response_format` of type `structural_tag`, and
//! `structured_outputs.structural_tag`), in the format vLLM takes from XGrammar:
//! `{"type": "structural_tag", "structures": [{"begin", "schema", "end"}], "triggers"}`. The
//! output is free text until it writes one of the triggers; from there it must complete a
//! structure whose `begin` starts with that trigger, then a JSON value its `schema` allows
//! (any JSON without one), then its `end`; then free text again, and so on. Tool calls written
//! in a model's own markup (`<function=get_weather>{...}</function>`) are the use.
//!
//! It becomes llguidance's Lark dialect, the tool-calling pattern llguidance documents: each
//! structure a rule whose head is lazy free text up to its trigger, so the text ends at the
//! first trigger written and the structure is enforced from there. Its JSON is written compact
//! (no whitespace between JSON tokens) unless the schema sets llguidance's own `x-guidance`
//! options, as tool calls' arguments are.

use serde_json::{Map, Value};
use tandem_protocol::messages::GrammarSpec;

use crate::error::ApiError;

/// A Lark string literal of `text`.
fn literal(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

/// The grammar of structural tag `tag` (the object; `param` names it in errors).
pub fn structural_tag(tag: &Map<String, Value>, param: &str) -> Result<GrammarSpec, ApiError> {
    let field = |name: &str| format!("{param}.{name}");
    if let Some(unknown) = tag
        .keys()
        .find(|key| !["type", "structures", "triggers"].contains(&key.as_str()))
    {
        let why = match unknown.as_str() {
            "format" => {
                "is XGrammar's newer structural tag format, which tandem does not serve: send \
                 structures and triggers"
            }
            _ => "is not a field of a structural tag (type, structures, triggers)",
        };
        return Err(ApiError::invalid(
            format!("{} {why}", field(unknown)),
            &field(unknown),
        ));
    }
    match tag.get("type") {
        None => {}
        Some(Value::String(kind)) if kind == "structural_tag" => {}
        Some(other) => {
            return Err(ApiError::invalid(
                format!("a structural tag's type is \"structural_tag\", got {other}"),
                &field("type"),
            ));
        }
    }
    let triggers = strings(tag.get("triggers"), &field("triggers"))?;
    let Some(Value::Array(structures)) = tag.get("structures") else {
        return Err(ApiError::invalid(
            "a structural tag needs structures: a list of {begin, schema, end}",
            &field("structures"),
        ));
    };
    if structures.is_empty() {
        return Err(ApiError::invalid(
            "structures is empty: give at least one {begin, schema, end}",
            &field("structures"),
        ));
    }
    let mut rules = Vec::with_capacity(structures.len());
    for (i, structure) in structures.iter().enumerate() {
        let param = format!("{}[{i}]", field("structures"));
        rules.push(structure_rule(i, structure, &triggers, &param)?);
    }
    let names: Vec<String> = (0..rules.len()).map(|i| format!("tag_{i}")).collect();
    let grammar = format!(
        "start: ({})* TEXT\nTEXT: /(.|\\n)*/\n{}",
        names.join(" | "),
        rules.join("")
    );
    Ok(GrammarSpec::Lark { grammar })
}

/// `triggers`: a non-empty list of non-empty strings.
fn strings(value: Option<&Value>, param: &str) -> Result<Vec<String>, ApiError> {
    let invalid = || {
        ApiError::invalid(
            "triggers must be a non-empty list of non-empty strings (what starts a structure)",
            param,
        )
    };
    let Some(Value::Array(items)) = value else {
        return Err(invalid());
    };
    let triggers: Vec<String> = items
        .iter()
        .map(|item| match item {
            Value::String(text) if !text.is_empty() => Ok(text.clone()),
            _ => Err(invalid()),
        })
        .collect::<Result<_, _>>()?;
    if triggers.is_empty() {
        return Err(invalid());
    }
    Ok(triggers)
}

/// Structure `index`'s rules: its head (free text, lazily, up to the longest trigger its
/// `begin` starts with), the rest of `begin`, the JSON value, `end`.
fn structure_rule(
    index: usize,
    structure: &Value,
    triggers: &[String],
    param: &str,
) -> Result<String, ApiError> {
    let Value::Object(fields) = structure else {
        return Err(ApiError::invalid(
            "a structure is an object {begin, schema, end}",
            param,
        ));
    };
    if let Some(unknown) = fields
        .keys()
        .find(|key| !["begin", "schema", "end"].contains(&key.as_str()))
    {
        return Err(ApiError::invalid(
            format!("{param}.{unknown} is not a field of a structure (begin, schema, end)"),
            &format!("{param}.{unknown}"),
        ));
    }
    let text = |name: &str| match fields.get(name) {
        Some(Value::String(text)) => Ok(text.as_str()),
        _ => Err(ApiError::invalid(
            format!("a structure needs {name} (a string)"),
            &format!("{param}.{name}"),
        )),
    };
    let begin = text("begin")?;
    let end = text("end")?;
    let Some(trigger) = triggers
        .iter()
        .filter(|trigger| begin.starts_with(trigger.as_str()))
        .max_by_key(|trigger| trigger.len())
    else {
        return Err(ApiError::invalid(
            format!("begin {begin:?} starts with none of the triggers {triggers:?}"),
            &format!("{param}.begin"),
        ));
    };
    let mut schema = match fields.get("schema") {
        None | Some(Value::Null) | Some(Value::Bool(true)) => Value::Object(Map::new()),
        Some(schema @ (Value::Object(_) | Value::Bool(false))) => schema.clone(),
        Some(other) => {
            return Err(ApiError::invalid(
                format!("a structure's schema is a JSON schema (an object), got {other}"),
                &format!("{param}.schema"),
            ));
        }
    };
    // Compact JSON unless the schema says otherwise, as for tool calls: with llguidance's
    // default a small model may spend its tokens on whitespace.
    if let Some(object) = schema.as_object_mut() {
        object
            .entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
    }
    let mut body = vec![format!("tag_{index}_head")];
    let rest = &begin[trigger.len()..];
    if !rest.is_empty() {
        body.push(literal(rest));
    }
    body.push(format!(
        "%json {}",
        serde_json::to_string(&schema).expect("a JSON value serializes")
    ));
    if !end.is_empty() {
        body.push(literal(end));
    }
    Ok(format!(
        "tag_{index}_head[lazy]: TEXT {}\ntag_{index}: {}\n",
        literal(trigger),
        body.join(" ")
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::tools::grammar::accepts_bytes as accepts;

    fn grammar(tag: Value) -> String {
        match structural_tag(tag.as_object().unwrap(), "response_format").unwrap() {
            GrammarSpec::Lark { grammar } => grammar,
            other => panic!("a Lark grammar, got {other:?}"),
        }
    }

    fn refused(tag: Value) -> String {
        match structural_tag(tag.as_object().unwrap(), "response_format") {
            Err(ApiError::InvalidRequest { param, .. }) => param.unwrap(),
            other => panic!("a 400, got {other:?}"),
        }
    }

    #[test]
    fn text_is_free_until_a_trigger_and_the_structure_is_enforced_from_there() {
        let grammar = grammar(json!({
            "type": "structural_tag",
            "structures": [
                {"begin": "<function=get_weather>", "end": "</function>",
                 "schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"], "additionalProperties": false}},
                {"begin": "<function=now>", "end": "</function>", "schema": {"type": "object"}},
            ],
            "triggers": ["<function="],
        }));
        for ok in [
            "",
            "No call here.",
            "Let me check.<function=get_weather>{\"city\":\"Paris\"}</function>",
            "A<function=now>{}</function> then B<function=get_weather>{\"city\":\"x\"}\
             </function> done",
        ] {
            assert!(accepts(&grammar, ok), "{ok}\n{grammar}");
        }
        for wrong in [
            // A trigger must go on into a structure.
            "Let me check.<function=weather>{}</function>",
            "<function=get_weather>{\"town\":\"Paris\"}</function>",
            "<function=get_weather>{\"city\":\"Paris\"}",
            "<function=now>[]</function>",
        ] {
            assert!(!accepts(&grammar, wrong), "{wrong}\n{grammar}");
        }
    }

    #[test]
    fn a_structure_without_a_schema_takes_any_json_and_begin_may_be_its_trigger() {
        let grammar = grammar(json!({
            "structures": [{"begin": " <", "end": ">"}],
            "triggers": [" "],
        }));
        assert!(accepts(&grammar, "a <1>b <\"x\">"), "{grammar}");
        assert!(
            !accepts(&grammar, "a b"),
            "a space starts a structure\n{grammar}"
        );
    }

    #[test]
    fn malformed_tags_are_refused_naming_the_field() {
        let structures = json!([{"begin": "<f>", "end": "</f>"}]);
        for (tag, param) in [
            (
                json!({"structures": structures, "triggers": ["<g"]}),
                "response_format.structures[0].begin",
            ),
            (
                json!({"structures": structures}),
                "response_format.triggers",
            ),
            (
                json!({"structures": structures, "triggers": [""]}),
                "response_format.triggers",
            ),
            (
                json!({"structures": [], "triggers": ["<"]}),
                "response_format.structures",
            ),
            (
                json!({"structures": [{"begin": "<f>"}], "triggers": ["<"]}),
                "response_format.structures[0].end",
            ),
            (
                json!({"structures": [{"begin": "<f>", "end": "", "schema": 3}],
                       "triggers": ["<"]}),
                "response_format.structures[0].schema",
            ),
            (
                json!({"structures": [{"begin": "<f>", "end": "", "x": 1}],
                       "triggers": ["<"]}),
                "response_format.structures[0].x",
            ),
            (
                json!({"type": "structural_tag", "format": {"type": "sequence"}}),
                "response_format.format",
            ),
            (
                json!({"type": "json_schema", "structures": structures, "triggers": ["<"]}),
                "response_format.type",
            ),
        ] {
            assert_eq!(refused(tag.clone()), param, "{tag}");
        }
    }
}
