//! Text through the engine on real models: streamed deltas add up to the decoded output, and
//! a stop string ends the request with the text cut before it and every block returned.

mod engine_support;

use engine_support::*;
use tandem_text::chat_template::{ChatMessage, ChatTemplate, RenderOptions};
use tandem_text::tokenizer::TextTokenizer;
use tandem_workers::engine::{EngineConfig, FinishReason, GenerationRequest};

fn config() -> EngineConfig {
    EngineConfig {
        block_size: 16,
        num_blocks: 32,
        max_num_batched_tokens: 32,
        max_num_seqs: 4,
        max_model_len: None,
        growth_reserve_tokens: Some(tandem_workers::engine::DEFAULT_GROWTH_RESERVE_TOKENS),
        prefix_caching: true,
        ..EngineConfig::default()
    }
}

fn chat_ids(tokenizer: &TextTokenizer, prompt: &str) -> Vec<u32> {
    let template = ChatTemplate::from_tokenizer(tokenizer).unwrap();
    let text = template
        .render(
            &[ChatMessage::new("user", prompt)],
            &RenderOptions {
                add_generation_prompt: true,
                ..RenderOptions::default()
            },
        )
        .unwrap();
    tokenizer.encode_templated(&text).unwrap()
}

#[test]
fn streamed_text_is_the_decoded_output_and_stop_strings_cut_it() {
    let model = test_model("smollm2-bf16");
    let tokenizer = TextTokenizer::load(&model).unwrap();
    let mut engine = cpu_engine_with_text(&model, config());
    let baseline = engine.free_blocks();
    let prompt = chat_ids(&tokenizer, "Write a haiku about the sea.");
    let mut rec = Recorder::default();

    let id = engine
        .add_request(GenerationRequest {
            stop_token_ids: tokenizer.stop_token_ids().to_vec(),
            ..GenerationRequest::greedy(prompt.clone(), 24)
        })
        .unwrap();
    run_to_idle(&mut engine, &mut rec);
    let full = rec.get(id).clone();
    let decoded = tokenizer.decode(&full.tokens, true).unwrap();
    assert_eq!(full.text, decoded, "deltas must add up to the decoded text");
    assert!(full.text.len() > 20, "{:?}", full.text);

    // A stop string from the middle of that text (a word after the first 10 bytes).
    let start = full.text[10..].find(' ').unwrap() + 11;
    let stop: String = full.text[start..].chars().take(4).collect();
    let id = engine
        .add_request(GenerationRequest {
            stop_strings: vec![stop.clone()],
            ..GenerationRequest::greedy(prompt, 24)
        })
        .unwrap();
    run_to_idle(&mut engine, &mut rec);
    let cut = rec.get(id);
    assert_eq!(cut.reason, Some(FinishReason::Stop));
    assert_eq!(cut.text, full.text[..full.text.find(&stop).unwrap()]);
    assert!(cut.tokens.len() < full.tokens.len());
    assert_eq!(engine.free_blocks(), baseline, "after a stop string");
}

#[test]
fn stop_string_on_the_tiny_model_returns_every_block() {
    let model = test_model("tiny");
    let mut engine = cpu_engine_with_text(&model, config());
    let baseline = engine.free_blocks();
    let prompt: Vec<u32> = (0..40).map(|i| 3 + (i * 37) % 500).collect();
    let mut rec = Recorder::default();
    let request = |stop: Vec<String>| GenerationRequest {
        ignore_eos: true,
        stop_strings: stop,
        ..GenerationRequest::greedy(prompt.clone(), 20)
    };
    let id = engine.add_request(request(vec![])).unwrap();
    run_to_idle(&mut engine, &mut rec);
    let full = rec.get(id).text.clone();
    let stop: String = full
        .chars()
        .skip(full.chars().count() / 2)
        .take(2)
        .collect();
    assert!(!stop.is_empty(), "{full:?}");
    let id = engine.add_request(request(vec![stop.clone()])).unwrap();
    run_to_idle(&mut engine, &mut rec);
    assert_eq!(rec.get(id).reason, Some(FinishReason::Stop));
    assert_eq!(rec.get(id).text, full[..full.find(&stop).unwrap()]);
    assert_eq!(engine.free_blocks(), baseline);
}
