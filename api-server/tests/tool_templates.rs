//! Tool-calling chat templates of the families tandem parses (Qwen2.5, Hermes 2 Pro,
//! Llama 3.1, Mistral v0.3): tandem builds the template inputs transformers would be given
//! (`tools`, `tool_calls`, `tool` messages), renders them as transformers' Jinja does, tells
//! the family and that the template renders tools, and parses the call markup the template
//! writes for an assistant turn back into the same call. Fixture made by
//! scripts/fixtures/tool_templates.py.

use std::collections::BTreeMap;

use api_server::prompt::tool_support;
use api_server::tools::parser::{CallParser, ParsedReply};
use api_server::tools::render::template_input;
use api_server::tools::{ToolCallRecord, ToolChoice, ToolDef, ToolFormat, ToolRequest};
use api_server::validation::{Role, Turn};
use serde::Deserialize;
use tandem_protocol::config::ToolCallParser;
use tandem_text::chat_template::{ChatTemplate, ChatTemplateError, RenderOptions, TemplateTokens};

#[derive(Deserialize)]
struct Fixture {
    templates: BTreeMap<String, Template>,
    tools: Vec<serde_json::Value>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Template {
    family: String,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

#[derive(Deserialize)]
struct Case {
    template: String,
    conversation: String,
    add_generation_prompt: bool,
    messages: Vec<serde_json::Value>,
    expected: Option<String>,
    error: Option<String>,
}

fn fixture() -> Fixture {
    serde_json::from_str(include_str!("fixtures/tool_templates.json")).expect("fixture parses")
}

fn family(name: &str) -> ToolFormat {
    match name {
        "hermes" => ToolFormat::Hermes,
        "llama3_json" => ToolFormat::Llama3Json,
        "mistral" => ToolFormat::Mistral,
        other => panic!("unknown family {other}"),
    }
}

fn tool_request(tools: &[serde_json::Value]) -> ToolRequest {
    ToolRequest {
        tools: tools
            .iter()
            .map(|t| ToolDef {
                name: t["function"]["name"].as_str().unwrap().into(),
                description: t["function"]["description"].as_str().map(Into::into),
                parameters: t["function"]["parameters"].clone(),
                strict: false,
            })
            .collect(),
        choice: ToolChoice::Auto,
        parallel: true,
    }
}

/// The validated turns a client's messages become (what `validation.rs` makes of them).
fn turns(messages: &[serde_json::Value]) -> Vec<Turn> {
    messages
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "tool" => Role::Tool,
                other => panic!("role {other}"),
            };
            let tool_calls = m["tool_calls"]
                .as_array()
                .map(|calls| {
                    calls
                        .iter()
                        .map(|c| ToolCallRecord {
                            id: c["id"].as_str().unwrap().into(),
                            name: c["function"]["name"].as_str().unwrap().into(),
                            // Clients send arguments as a JSON string.
                            arguments: serde_json::to_string(&c["function"]["arguments"]).unwrap(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            Turn {
                tool_calls,
                tool_call_id: m["tool_call_id"].as_str().map(Into::into),
                name: m["name"].as_str().map(Into::into),
                ..Turn::text(role, m["content"].as_str().unwrap_or_default())
            }
        })
        .collect()
}

fn compile(t: &Template) -> ChatTemplate {
    let tokens = TemplateTokens {
        bos_token: t.bos_token.clone(),
        eos_token: t.eos_token.clone(),
        ..Default::default()
    };
    ChatTemplate::new(&t.source, tokens).expect("template compiles")
}

#[test]
fn each_family_is_detected_and_renders_tools_itself() {
    let fixture = fixture();
    for (name, t) in &fixture.templates {
        let support = tool_support(ToolCallParser::Auto, &compile(t), &t.source)
            .unwrap_or_else(|| panic!("{name}: tool calling on"));
        assert_eq!(support.format, family(&t.family), "{name}");
        assert!(support.native, "{name} renders tools");
        assert_eq!(
            tool_support(ToolCallParser::None, &compile(t), &t.source),
            None
        );
    }
}

#[test]
fn tools_and_round_trips_render_like_transformers() {
    let fixture = fixture();
    let tools = tool_request(&fixture.tools);
    let mut failures = Vec::new();
    for case in &fixture.cases {
        let t = &fixture.templates[&case.template];
        let support = tool_support(ToolCallParser::Auto, &compile(t), &t.source).unwrap();
        let input = template_input(&turns(&case.messages), Some(&tools), Some(support));
        let label = format!(
            "{} / {} / add_generation_prompt={}",
            case.template, case.conversation, case.add_generation_prompt
        );
        assert_eq!(
            serde_json::to_value(&input.messages).unwrap(),
            serde_json::Value::Array(case.messages.clone()),
            "{label}: the template's messages"
        );
        assert_eq!(
            input.variables["tools"],
            serde_json::Value::Array(fixture.tools.clone()),
            "{label}: the tools variable"
        );
        let options = RenderOptions {
            add_generation_prompt: case.add_generation_prompt,
            variables: input.variables,
        };
        match (
            &case.expected,
            &case.error,
            compile(t).render(&input.messages, &options),
        ) {
            (Some(expected), _, Ok(got)) if &got == expected => {}
            (None, Some(message), Err(ChatTemplateError::Raised { message: got }))
                if &got == message => {}
            (expected, error, got) => failures.push(format!(
                "{label}\n--- expected\n{expected:?} / raise {error:?}\n--- got\n{got:?}"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The assistant turn the template writes for a call, as the model generates it (up to its
/// end-of-turn token), parses back into that call.
#[test]
fn the_markup_each_template_writes_parses_back() {
    let fixture = fixture();
    let find = |template: &str, conversation: &str, add_generation_prompt: bool| {
        fixture
            .cases
            .iter()
            .find(|c| {
                c.template == template
                    && c.conversation == conversation
                    && c.add_generation_prompt == add_generation_prompt
            })
            .unwrap_or_else(|| panic!("{template} {conversation}"))
    };
    for (name, t) in &fixture.templates {
        let prompt = find(name, "user_only", true).expected.clone().unwrap();
        let with_call = find(name, "assistant_call", false)
            .expected
            .clone()
            .unwrap();
        let generated = with_call
            .strip_prefix(&prompt)
            .unwrap_or_else(|| panic!("{name}: the call turn follows the prompt:\n{with_call}"));
        let eos = t.eos_token.as_deref().unwrap();
        let generated = &generated[..generated.find(eos).expect("the turn ends with EOS")];
        let mut parser = CallParser::new(family(&t.family), true);
        let mut reply = ParsedReply::default();
        reply.add(parser.push(generated));
        reply.add(parser.finish());
        assert_eq!(reply.content, None, "{name}: {generated:?}");
        assert_eq!(reply.calls.len(), 1, "{name}: {generated:?}");
        assert_eq!(reply.calls[0].0, "get_weather");
        let arguments: serde_json::Value = serde_json::from_str(&reply.calls[0].1).unwrap();
        assert_eq!(
            arguments,
            serde_json::json!({"city": "Zürich", "unit": "celsius"}),
            "{name}"
        );
    }
}
