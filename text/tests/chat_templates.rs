//! Golden test: tandem's chat templates render exactly what transformers'
//! `apply_chat_template(tokenize=False)` does. Fixture made by
//! `scripts/fixtures/chat_templates.py` (see there for the templates and conversations).

use std::collections::BTreeMap;

use serde::Deserialize;
use tandem_text::chat_template::{
    ChatMessage, ChatTemplate, ChatTemplateError, RenderOptions, TemplateTokens,
};

#[derive(Deserialize)]
struct Fixture {
    templates: BTreeMap<String, TemplateSource>,
    conversations: BTreeMap<String, Vec<ChatMessage>>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct TemplateSource {
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

#[derive(Deserialize)]
struct Case {
    template: String,
    conversation: String,
    variables: serde_json::Map<String, serde_json::Value>,
    add_generation_prompt: bool,
    expected: Option<String>,
    error: Option<String>,
}

#[test]
fn renders_like_transformers() {
    let text = include_str!("fixtures/chat_templates.json");
    let fixture: Fixture = serde_json::from_str(text).expect("fixture is valid JSON");
    let templates: BTreeMap<&str, ChatTemplate> = fixture
        .templates
        .iter()
        .map(|(name, t)| {
            let tokens = TemplateTokens {
                bos_token: t.bos_token.clone(),
                eos_token: t.eos_token.clone(),
                ..Default::default()
            };
            let template = ChatTemplate::new(&t.source, tokens)
                .unwrap_or_else(|err| panic!("template {name} does not compile: {err}"));
            (name.as_str(), template)
        })
        .collect();

    let mut failures = Vec::new();
    for case in &fixture.cases {
        let label = format!(
            "{} / {} / {:?} / add_generation_prompt={}",
            case.template,
            case.conversation,
            case.variables.keys().collect::<Vec<_>>(),
            case.add_generation_prompt
        );
        let options = RenderOptions {
            add_generation_prompt: case.add_generation_prompt,
            variables: case.variables.clone(),
        };
        let result = templates[case.template.as_str()]
            .render(&fixture.conversations[&case.conversation], &options);
        match (&case.expected, &case.error, result) {
            (Some(expected), _, Ok(got)) if &got == expected => {}
            (Some(expected), _, got) => failures.push(format!(
                "{label}\n--- expected\n{expected}\n--- got\n{got:?}"
            )),
            (None, Some(message), Err(ChatTemplateError::Raised { message: got }))
                if &got == message => {}
            (None, error, got) => failures.push(format!(
                "{label}: expected raise_exception({error:?}), got {got:?}"
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        fixture.cases.len(),
        failures.join("\n\n")
    );
    assert!(fixture.cases.len() >= 60 && fixture.cases.iter().any(|c| c.error.is_some()));
}
