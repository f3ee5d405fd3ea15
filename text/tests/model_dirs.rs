//! The text pipeline on the model directories `scripts/test-models` prepares under
//! `$TANDEM_TEST_MODELS` (default `<workspace>/target/test-models`): SmolLM2 imported from its
//! GGUF by model-prep, and the tiny random model.

use serde::Deserialize;
use tandem_test_kit::model_dir;
use tandem_text::chat_template::{ChatMessage, ChatTemplate, RenderOptions};
use tandem_text::detokenizer::IncrementalDetokenizer;
use tandem_text::tokenizer::TextTokenizer;

fn smollm2() -> TextTokenizer {
    let dir = model_dir("smollm2-bf16");
    TextTokenizer::load(&dir).expect("SmolLM2's tokenizer loads")
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct ChatFixture {
    cases: Vec<ChatCase>,
}

/// Model directory → chat template → `encode_templated` gives transformers' prompt ids
/// (fixture from `scripts/fixtures/chat_templates.py`).
#[test]
fn smollm2_chat_prompts_match_transformers() {
    let tokenizer = smollm2();
    assert_eq!(tokenizer.vocab_size(), 49152);
    assert_eq!(tokenizer.bos_token().map(|t| t.id), Some(1));
    assert!(tokenizer.is_stop_token(2), "<|im_end|> ends generation");
    let template = ChatTemplate::from_tokenizer(&tokenizer).expect("SmolLM2 has a chat template");
    let fixture: ChatFixture =
        serde_json::from_str(include_str!("fixtures/smollm2_chat.json")).expect("valid fixture");
    for case in &fixture.cases {
        let options = RenderOptions {
            add_generation_prompt: case.add_generation_prompt,
            ..Default::default()
        };
        let text = template.render(&case.messages, &options).expect("renders");
        assert_eq!(text, case.text);
        let ids = tokenizer.encode_templated(&text).expect("encodes");
        assert_eq!(ids, case.ids, "ids of {text:?}");
    }
}

const TEXTS: &[&str] = &[
    "The capital of France is Paris.",
    "Café crème brûlée, naïve façade, Zürich.",
    "你好，世界。今天天气很好。こんにちは！",
    "🚀🎉😀 👍🏽 🇫🇷 ❤️ 👨‍👩‍👧",
    "fn main() {\n\tprintln!(\"{}\", x);\n}  // trailing  spaces  ",
    "Привет, мир! Ελληνικά. مرحبا",
];

fn check_streaming(tokenizer: &TextTokenizer) {
    let prompt = tokenizer.encode_templated("Answer:").expect("encodes");
    for text in TEXTS {
        let ids = tokenizer.encode_templated(text).expect("encodes");
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| tokenizer.token_bytes(id).expect("known id"))
            .collect();
        assert_eq!(bytes, text.as_bytes(), "token bytes spell {text:?}");
        for context in [&[][..], &prompt[..]] {
            let all: Vec<u32> = context.iter().chain(&ids).copied().collect();
            let full = tokenizer.decode(&all, true).unwrap();
            let expected = full
                .strip_prefix(tokenizer.decode(context, true).unwrap().as_str())
                .expect("context decodes to a prefix");
            let mut detokenizer = IncrementalDetokenizer::with_context(context, true);
            let mut streamed = String::new();
            for &id in &ids {
                let delta = detokenizer.step(tokenizer, id).unwrap();
                assert!(!delta.contains('\u{FFFD}'), "broken character in {delta:?}");
                streamed.push_str(&delta);
            }
            streamed.push_str(&detokenizer.finish(tokenizer).unwrap());
            assert_eq!(streamed, expected);
        }
    }
}

#[test]
fn smollm2_streaming_detokenization_equals_full_decode() {
    check_streaming(&smollm2());
}

#[test]
fn tiny_model_tokenizer_and_template() {
    let dir = model_dir("tiny");
    let tokenizer = TextTokenizer::load(&dir).expect("tiny tokenizer loads");
    let template = ChatTemplate::from_tokenizer(&tokenizer).expect("tiny has a chat template");
    let prompt = template
        .render(
            &[ChatMessage::new("user", "Hi")],
            &RenderOptions {
                add_generation_prompt: true,
                ..Default::default()
            },
        )
        .unwrap();
    let ids = tokenizer.encode_templated(&prompt).unwrap();
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), prompt);
    check_streaming(&tokenizer);
}
