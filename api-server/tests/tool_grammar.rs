//! The grammar `tool_choice: "required"` (or a named function) sends to the workers, compiled
//! by llguidance against a real model's vocabulary (SmolLM2's tokenizer.json, from
//! `$TANDEM_TEST_MODELS`), as a worker compiles it: the tokens of a valid call are allowed
//! one by one and the call may end there (end of sequence allowed, nothing else); a prose
//! answer's first token, an undeclared function and arguments that break the schema are not.

use api_server::tools::{ToolChoice, ToolDef, ToolFormat, ToolRequest, grammar};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{InferenceCapabilities, TokEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::json;
use tandem_protocol::messages::{GrammarSpec, SamplingSpec};
use toktrie_hf_tokenizers::ByteTokenizer;

fn smollm2() -> (TokEnv, ParserFactory, u32) {
    let dir = tandem_test_kit::model_dir("smollm2-bf16");
    let mut tokenizer =
        ByteTokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer.json");
    // SmolLM2's chat end of turn.
    let eos = 2;
    tokenizer.set_eos_token(eos);
    let env = tokenizer.into_tok_env(None).expect("token env");
    let factory = ParserFactory::new(&env, InferenceCapabilities::default(), &[]).expect("factory");
    (env, factory, eos)
}

fn tools(choice: ToolChoice) -> ToolRequest {
    ToolRequest {
        tools: vec![
            ToolDef {
                name: "get_weather".into(),
                description: None,
                parameters: json!({"type": "object",
                    "properties": {"city": {"type": "string"},
                                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                    "required": ["city"], "additionalProperties": false}),
                strict: false,
            },
            ToolDef {
                name: "add".into(),
                description: None,
                parameters: json!({"type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"], "additionalProperties": false}),
                strict: false,
            },
        ],
        choice,
        parallel: true,
    }
}

fn lark_of(request: &ToolRequest) -> String {
    let mut sampling = SamplingSpec::default();
    grammar::constrain(request, ToolFormat::Hermes, &mut sampling).expect("constrains");
    match sampling.grammar {
        Some(GrammarSpec::Lark { grammar }) => grammar,
        other => panic!("{other:?}"),
    }
}

/// What the grammar does with `text`'s tokens.
struct Walk {
    /// Tokens allowed in a row, of `total`.
    allowed: usize,
    total: usize,
    /// After all of them: end of sequence allowed, and nothing else.
    may_end: bool,
    must_end: bool,
}

/// Feeds `text`'s tokens to the grammar while it allows them.
fn walk(env: &TokEnv, factory: &ParserFactory, eos: u32, lark: &str, text: &str) -> Walk {
    let mut matcher = Matcher::new(factory.create_parser(TopLevelGrammar::from_lark(lark.into())));
    assert!(!matcher.is_error(), "{:?}", matcher.get_error());
    let tokens = env.tokenize(text);
    for (i, &token) in tokens.iter().enumerate() {
        let mask = matcher.compute_mask().expect("mask");
        if !mask.is_allowed(token) {
            return Walk {
                allowed: i,
                total: tokens.len(),
                may_end: false,
                must_end: false,
            };
        }
        matcher
            .consume_token(token)
            .expect("consumes an allowed token");
    }
    let mask = matcher.compute_mask_or_eos().expect("mask");
    Walk {
        allowed: tokens.len(),
        total: tokens.len(),
        may_end: mask.is_allowed(eos),
        must_end: mask.is_allowed(eos) && mask.num_set() == 1,
    }
}

#[test]
fn a_required_call_grammar_guides_smollm2_tokens() {
    let (env, factory, eos) = smollm2();
    let required = lark_of(&tools(ToolChoice::Required));
    let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Paris\",\"unit\":\"celsius\"}}\n</tool_call>";
    let walked = walk(&env, &factory, eos, &required, call);
    assert_eq!(
        walked.allowed, walked.total,
        "every token of a valid call is allowed"
    );
    assert!(
        walked.may_end && !walked.must_end,
        "one call may end the reply, or another follow"
    );
    let two = format!(
        "{call}\n<tool_call>\n{{\"name\": \"add\", \"arguments\": {{\"a\":1,\"b\":2}}}}\n</tool_call>"
    );
    let walked = walk(&env, &factory, eos, &required, &two);
    assert!(
        walked.allowed == walked.total && walked.may_end,
        "parallel calls"
    );

    for bad in [
        "The weather in Paris is sunny.",
        "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\":\"one\",\"b\":2}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"unit\":\"kelvin\"}}\n</tool_call>",
    ] {
        let walked = walk(&env, &factory, eos, &required, bad);
        assert!(walked.allowed < walked.total, "{bad:?} is refused");
    }

    // A named function: that one, once; then only the end.
    let named = lark_of(&tools(ToolChoice::Named("add".into())));
    let add = "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\":40,\"b\":2}}\n</tool_call>";
    let walked = walk(&env, &factory, eos, &named, add);
    assert!(walked.allowed == walked.total && walked.must_end, "{named}");
    let walked = walk(&env, &factory, eos, &named, call);
    assert!(walked.allowed < walked.total, "another function is refused");
}
