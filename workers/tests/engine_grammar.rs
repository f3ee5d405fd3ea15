//! Constrained decoding through the engine on SmolLM2 and the CPU backend: requests under a
//! JSON schema give JSON that parses and fits it, ending with `stop`; batched with free
//! requests in small steps, and with a cache small enough to preempt, every request gives the
//! tokens it gives alone; a request resumed after some of its tokens (a migration) continues
//! with the same tokens; a grammar at its end stops the request without an EOS.

mod engine_support;

use engine_support::*;
use serde_json::{Value, json};
use tandem_text::grammar::{GrammarCompiler, GrammarSource};
use tandem_text::tokenizer::TextTokenizer;
use tandem_workers::engine::{EngineConfig, FinishReason, GenerationRequest};
use tandem_workers::sampler::SamplingParams;

const MAX_TOKENS: usize = 60;

fn schema() -> Value {
    json!({"type": "object", "additionalProperties": false, "required": ["name", "age", "pet"],
           "properties": {"name": {"type": "string", "maxLength": 10},
                          "age": {"type": "integer", "minimum": 0, "maximum": 99},
                          "pet": {"enum": ["cat", "dog"]}}})
}

struct Setup {
    model: std::path::PathBuf,
    tokenizer: TextTokenizer,
    compiler: GrammarCompiler,
    prompts: Vec<Vec<u32>>,
}

fn setup() -> Setup {
    let model = test_model("smollm2-bf16");
    let tokenizer = TextTokenizer::load(&model).unwrap();
    let config = tandem_model::ModelConfig::load(&model).unwrap();
    let compiler =
        GrammarCompiler::from_model_dir(&model, config.vocab_size, tokenizer.stop_token_ids())
            .unwrap();
    let prompts = [
        "A person as JSON:",
        "Describe someone who owns a pet.",
        "JSON please",
        "The quick brown fox jumps over the lazy dog. Now give a record:",
    ]
    .iter()
    .map(|p| tokenizer.encode(p).unwrap())
    .collect();
    Setup {
        model,
        tokenizer,
        compiler,
        prompts,
    }
}

/// Request `i`: even ones under the schema, odd ones free; greedy and seeded alternate in
/// pairs so both kinds are greedy and sampled.
fn request(setup: &Setup, i: usize) -> GenerationRequest {
    let sampling = if (i / 2).is_multiple_of(2) {
        SamplingParams::greedy()
    } else {
        SamplingParams {
            temperature: 0.9,
            seed: Some(40 + i as u64),
            ..SamplingParams::default()
        }
    };
    let schema = schema();
    GenerationRequest {
        sampling,
        stop_token_ids: setup.tokenizer.stop_token_ids().to_vec(),
        grammar: i.is_multiple_of(2).then(|| {
            setup
                .compiler
                .compile(GrammarSource::JsonSchema(&schema))
                .unwrap()
        }),
        ..GenerationRequest::greedy(setup.prompts[i % setup.prompts.len()].clone(), MAX_TOKENS)
    }
}

fn config(max_num_batched_tokens: usize, num_blocks: usize) -> EngineConfig {
    EngineConfig {
        block_size: 16,
        num_blocks,
        max_num_batched_tokens,
        max_num_seqs: 8,
        max_model_len: None,
        // Admission on the first chunk alone: the small caches here are there to preempt.
        growth_reserve_tokens: None,
        prefix_caching: true,
        ..EngineConfig::default()
    }
}

fn run(setup: &Setup, requests: Vec<GenerationRequest>, config: EngineConfig) -> Vec<Outcome> {
    let mut engine = cpu_engine(&setup.model, config.clone());
    let ids: Vec<_> = requests
        .into_iter()
        .map(|r| engine.add_request(r).unwrap())
        .collect();
    let mut rec = Recorder::default();
    run_to_idle(&mut engine, &mut rec);
    assert_eq!(engine.free_blocks(), config.num_blocks, "blocks leaked");
    ids.iter().map(|&id| rec.get(id).clone()).collect()
}

#[test]
fn constrained_requests_give_valid_json_and_the_same_tokens_batched_preempted_or_resumed() {
    let setup = setup();
    const N: usize = 8;
    let alone: Vec<Outcome> = (0..N)
        .map(|i| run(&setup, vec![request(&setup, i)], config(256, 32)).remove(0))
        .collect();
    for (i, out) in alone.iter().enumerate().step_by(2) {
        let text = setup.tokenizer.decode(&out.tokens, true).unwrap();
        assert_eq!(
            out.reason,
            Some(FinishReason::Stop),
            "request {i}: {text:?}"
        );
        let value: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("request {i}: {e}: {text:?}"));
        assert!(
            value["name"]
                .as_str()
                .is_some_and(|n| n.chars().count() <= 10),
            "{value}"
        );
        assert!(value["age"].as_u64().is_some_and(|a| a <= 99), "{value}");
        assert!(value["pet"] == "cat" || value["pet"] == "dog", "{value}");
        assert!(
            !setup
                .tokenizer
                .stop_token_ids()
                .contains(out.tokens.last().unwrap()),
            "the grammar's end stops the request without an EOS token"
        );
    }

    // All together, in steps of 8 tokens (prefill chunks beside decodes), with room for all
    // and then with 8 blocks for 8 requests of up to 5 blocks each: preemptions.
    for num_blocks in [64, 8] {
        let batched = run(
            &setup,
            (0..N).map(|i| request(&setup, i)).collect(),
            config(8, num_blocks),
        );
        for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
            assert_eq!(a.tokens, b.tokens, "request {i} with {num_blocks} blocks");
            assert_eq!(a.reason, b.reason, "request {i} with {num_blocks} blocks");
        }
    }

    // A constrained request resumed after part of its output continues with the same tokens.
    for i in [0, 2] {
        let whole = &alone[i].tokens;
        let cut = whole.len() / 2;
        let resumed = GenerationRequest {
            resume_ids: whole[..cut].to_vec(),
            ..request(&setup, i)
        };
        let rest = run(&setup, vec![resumed], config(256, 32)).remove(0);
        assert_eq!(rest.tokens, whole[cut..], "request {i} resumed at {cut}");
        assert_eq!(rest.reason, Some(FinishReason::Stop));
    }
}

#[test]
fn resumed_tokens_outside_the_grammar_are_refused() {
    let setup = setup();
    let mut engine = cpu_engine(&setup.model, config(256, 32));
    let not_json = setup.tokenizer.encode_templated("hello").unwrap();
    let error = engine
        .add_request(GenerationRequest {
            resume_ids: not_json,
            ..request(&setup, 0)
        })
        .unwrap_err();
    assert!(
        error.to_string().contains("do not fit the grammar"),
        "{error}"
    );
}
