//! `tool_choice: "required"` and a named function, enforced by a grammar: the reply must be
//! one call of the named function, or for `required` one or (with `parallel_tool_calls`, the
//! default) several calls of the declared tools, in the family's markup, with arguments valid
//! against each tool's `parameters` schema.
//!
//! The grammar is llguidance's Lark dialect with each tool's schema embedded by `%json`
//! (`SamplingSpec.grammar` = `GrammarSpec::Lark`); the workers compile it against their
//! tokenizer and mask the logits with it. The api-server compiles it first, off the async
//! workers ([`GrammarCheck::check_tool_calls`](crate::grammar::GrammarCheck::check_tool_calls)):
//! each tool's schema alone ([`check_schemas`], against a byte-level vocabulary), so that a
//! schema llguidance cannot compile is a 400 naming the tool, not a failure on a worker; then
//! the whole grammar against the model's tokenizer. The call is written exactly as
//! [`render::calls_markup`](super::render::calls_markup) writes a call, so the model sees
//! the same markup in its history as it is made to produce.

use std::sync::OnceLock;

use llguidance::ParserFactory;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities};
use tandem_protocol::messages::{GrammarSpec, SamplingSpec};

use super::{ToolChoice, ToolDef, ToolFormat, ToolRequest};
use crate::error::ApiError;

/// Sets `sampling.grammar` when `tools` must be called; leaves it alone otherwise.
pub fn constrain(
    tools: &ToolRequest,
    format: ToolFormat,
    sampling: &mut SamplingSpec,
) -> Result<(), ApiError> {
    if !matches!(tools.choice, ToolChoice::Required | ToolChoice::Named(_)) {
        return Ok(());
    }
    if sampling.grammar.is_some() {
        return Err(ApiError::invalid(
            "tool_choice \"required\" or a named function cannot be combined with a \
             constrained output (response_format, structured_outputs, or text.format on \
             /v1/responses): both constrain the whole reply",
            "tool_choice",
        ));
    }
    let callable = tools.callable();
    // A named function is called once (as OpenAI's forced function call); `required` may
    // call several tools unless `parallel_tool_calls` is false.
    let parallel = tools.parallel && tools.choice == ToolChoice::Required;
    let grammar = lark(&callable, format, parallel);
    sampling.grammar = Some(GrammarSpec::Lark { grammar });
    Ok(())
}

/// Compiles each callable tool's `parameters` schema alone (CPU work: on a blocking thread);
/// one llguidance cannot compile is a 400 naming the field `parameters_param` gives for the
/// tool's index (`tools[i].function.parameters` on chat completions).
pub fn check_schemas(
    tools: &ToolRequest,
    parameters_param: fn(usize) -> String,
) -> Result<(), ApiError> {
    for tool in tools.callable() {
        if let Err(reason) = compile(&format!("start: {}", json_rule(tool))) {
            let index = tools
                .tools
                .iter()
                .position(|t| t.name == tool.name)
                .expect("callable tools are declared tools");
            return Err(ApiError::invalid(
                format!(
                    "the parameters schema of function {:?} cannot be enforced: {reason}",
                    tool.name
                ),
                &parameters_param(index),
            ));
        }
    }
    Ok(())
}

/// A Lark string literal.
fn literal(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

/// The tool's arguments as llguidance's `%json`, written compactly (`{"city":"Paris"}`, no
/// whitespace between tokens): as the history's calls are shown to a model whose template
/// ignores tools, and so that a small model cannot spend its tokens on whitespace.
fn json_rule(tool: &ToolDef) -> String {
    let mut schema = tool.parameters.clone();
    if let Some(object) = schema.as_object_mut() {
        object
            .entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
    }
    format!(
        "%json {}",
        serde_json::to_string(&schema).expect("a JSON value serializes")
    )
}

/// The grammar of a reply that calls `tools` (one call, or several with `parallel`).
pub fn lark(tools: &[&ToolDef], format: ToolFormat, parallel: bool) -> String {
    let key = match format {
        ToolFormat::Llama3Json => "parameters",
        ToolFormat::Hermes | ToolFormat::Mistral => "arguments",
    };
    let mut rules = Vec::new();
    let alternatives: Vec<String> = (0..tools.len()).map(|i| format!("fn_{i}")).collect();
    let (open, separator, close) = match format {
        ToolFormat::Hermes => ("", "\n", ""),
        ToolFormat::Llama3Json => ("", "; ", ""),
        ToolFormat::Mistral => ("[TOOL_CALLS] [", ", ", "]"),
    };
    let call = match format {
        ToolFormat::Hermes => format!(
            "call: {} ({}) {}",
            literal("<tool_call>\n"),
            alternatives.join(" | "),
            literal("\n</tool_call>")
        ),
        _ => format!("call: {}", alternatives.join(" | ")),
    };
    let repeat = if parallel {
        format!(" ({} call)*", literal(separator))
    } else {
        String::new()
    };
    let mut start = String::from("start:");
    if !open.is_empty() {
        start.push_str(&format!(" {}", literal(open)));
    }
    start.push_str(&format!(" call{repeat}"));
    if !close.is_empty() {
        start.push_str(&format!(" {}", literal(close)));
    }
    rules.push(start);
    rules.push(call);
    for (i, tool) in tools.iter().enumerate() {
        let head = format!("{{\"name\": {}, \"{key}\": ", literal(&tool.name));
        rules.push(format!(
            "fn_{i}: {} args_{i} {}",
            literal(&head),
            literal("}")
        ));
        rules.push(format!("args_{i}: {}", json_rule(tool)));
    }
    rules.join("\n") + "\n"
}

fn factory() -> &'static ParserFactory {
    static FACTORY: OnceLock<ParserFactory> = OnceLock::new();
    FACTORY.get_or_init(|| {
        let env = ApproximateTokEnv::single_byte_env();
        let mut factory = ParserFactory::new(&env, InferenceCapabilities::default(), &[])
            .expect("llguidance builds a parser factory over the byte vocabulary");
        factory.quiet();
        factory
    })
}

/// Compiles `grammar` (llguidance Lark); the error message if it does not.
fn compile(grammar: &str) -> Result<(), String> {
    factory()
        .create_parser(TopLevelGrammar::from_lark(grammar.to_string()))
        .map(|_| ())
        .map_err(|err| format!("{err:#}"))
}

/// Whether the Lark `grammar` accepts `text` whole on the byte vocabulary (byte tokens, then
/// the end of sequence): how the tests of the grammars the api-server writes check them.
#[cfg(test)]
pub(crate) fn accepts_bytes(grammar: &str, text: &str) -> bool {
    let parser = factory().create_parser(TopLevelGrammar::from_lark(grammar.to_string()));
    let mut matcher = llguidance::Matcher::new(parser);
    assert!(!matcher.is_error(), "{grammar}: {:?}", matcher.get_error());
    let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
    matcher.validate_tokens(&tokens).unwrap() == tokens.len()
        && matcher.consume_tokens(&tokens).is_ok()
        && matcher.is_accepting().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools() -> Vec<ToolDef> {
        vec![
            ToolDef {
                name: "get_weather".into(),
                description: None,
                parameters: json!({"type": "object",
                    "properties": {"city": {"type": "string"},
                                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                    "required": ["city"], "additionalProperties": false}),
                strict: true,
            },
            ToolDef {
                name: "add".into(),
                description: None,
                parameters: json!({"type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"]}),
                strict: false,
            },
        ]
    }

    fn accepts(grammar: &str, text: &str) -> bool {
        accepts_bytes(grammar, text)
    }

    #[test]
    fn hermes_grammar_accepts_calls_and_rejects_the_rest() {
        let tools = tools();
        let all: Vec<&ToolDef> = tools.iter().collect();
        let parallel = lark(&all, ToolFormat::Hermes, true);
        let one = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Paris\"}}\n</tool_call>";
        let two = format!(
            "{one}\n<tool_call>\n{{\"name\": \"add\", \"arguments\": {{\"a\":1,\"b\":2}}}}\n</tool_call>"
        );
        assert!(accepts(&parallel, one), "{parallel}");
        assert!(accepts(&parallel, &two));
        assert!(!accepts(&parallel, "Paris is sunny."));
        assert!(!accepts(
            &parallel,
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>"
        ));
        // Arguments must validate: required field, enum, types, no extra properties.
        for bad in [
            r#"{"unit":"celsius"}"#,
            r#"{"city":"Paris","unit":"kelvin"}"#,
            r#"{"city":7}"#,
            r#"{"city":"Paris","country":"FR"}"#,
        ] {
            let text = format!(
                "<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {bad}}}\n</tool_call>"
            );
            assert!(!accepts(&parallel, &text), "{text}");
        }
        let single = lark(&all, ToolFormat::Hermes, false);
        assert!(accepts(&single, one));
        assert!(
            !accepts(&single, &two),
            "one call without parallel_tool_calls"
        );
    }

    #[test]
    fn llama3_and_mistral_grammars() {
        let tools = tools();
        let add: Vec<&ToolDef> = vec![&tools[1]];
        let llama = lark(&add, ToolFormat::Llama3Json, true);
        assert!(accepts(
            &llama,
            r#"{"name": "add", "parameters": {"a":1,"b":2}}"#
        ));
        assert!(accepts(
            &llama,
            r#"{"name": "add", "parameters": {"a":1,"b":2}}; {"name": "add", "parameters": {"a":3,"b":4}}"#
        ));
        assert!(!accepts(
            &llama,
            r#"{"name": "add", "parameters": {"a":1.5,"b":2}}"#
        ));
        assert!(
            !accepts(&llama, r#"{"name": "add", "parameters": {"a": 1, "b": 2}}"#),
            "arguments are written compactly"
        );
        let mistral = lark(&add, ToolFormat::Mistral, true);
        assert!(accepts(
            &mistral,
            r#"[TOOL_CALLS] [{"name": "add", "arguments": {"a":1,"b":2}}]"#
        ));
        assert!(!accepts(
            &mistral,
            r#"{"name": "add", "arguments": {"a":1,"b":2}}"#
        ));
    }

    #[test]
    fn constrain_sets_a_grammar_only_when_a_call_is_required() {
        let request = |choice| ToolRequest {
            tools: tools(),
            choice,
            parallel: true,
        };
        let mut sampling = SamplingSpec::default();
        constrain(
            &request(ToolChoice::Auto),
            ToolFormat::Hermes,
            &mut sampling,
        )
        .unwrap();
        assert_eq!(sampling.grammar, None);
        constrain(
            &request(ToolChoice::Named("add".into())),
            ToolFormat::Hermes,
            &mut sampling,
        )
        .unwrap();
        let Some(GrammarSpec::Lark { grammar }) = &sampling.grammar else {
            panic!("{:?}", sampling.grammar)
        };
        assert!(
            grammar.contains(r#"\"add\""#) && !grammar.contains("get_weather"),
            "{grammar}"
        );
        // A second constraint (response_format) is refused.
        let err = constrain(
            &request(ToolChoice::Required),
            ToolFormat::Hermes,
            &mut sampling,
        )
        .unwrap_err();
        assert!(
            matches!(err, ApiError::InvalidRequest { param: Some(ref p), .. } if p == "tool_choice")
        );
    }

    #[test]
    fn a_schema_llguidance_cannot_compile_names_its_tool() {
        let mut tools = tools();
        tools[1].parameters = json!({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}});
        let request = ToolRequest {
            tools,
            choice: ToolChoice::Required,
            parallel: true,
        };
        let err =
            check_schemas(&request, |i| format!("tools[{i}].function.parameters")).unwrap_err();
        match err {
            ApiError::InvalidRequest { param, message, .. } => {
                assert_eq!(
                    param.as_deref(),
                    Some("tools[1].function.parameters"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
