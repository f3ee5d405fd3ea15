//! Shared helpers of the engine and `worker generate` tests: the prepared model directories
//! and an engine on the real model and CPU backend.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;

use tandem_workers::backend::cpu::{CpuBackend, CpuOptions};
use tandem_workers::engine::{
    Engine, EngineConfig, EngineEvent, EventKind, FinishReason, ModelRunner, RequestId, StepModel,
    TokenizerText,
};
use tandem_workers::model::{Model, ModelOptions};

/// A model directory prepared by `scripts/test-models` under `$TANDEM_TEST_MODELS` (default
/// `<workspace>/target/test-models`). Panics with the command that makes it when missing:
/// these tests must not pass by skipping.
pub fn test_model(name: &str) -> PathBuf {
    tandem_test_kit::model_dir(name)
}

pub type CpuEngine = Engine<ModelRunner<CpuBackend>>;

/// An engine on `model_dir` with the given config, on 2 CPU threads, without text.
pub fn cpu_engine(model_dir: &std::path::Path, config: EngineConfig) -> CpuEngine {
    build_engine(model_dir, config, false)
}

/// An engine with the model's tokenizer: text deltas and stop strings.
pub fn cpu_engine_with_text(model_dir: &std::path::Path, config: EngineConfig) -> CpuEngine {
    build_engine(model_dir, config, true)
}

fn build_engine(model_dir: &std::path::Path, config: EngineConfig, with_text: bool) -> CpuEngine {
    let backend = CpuBackend::new(&CpuOptions {
        threads: 2,
        ..Default::default()
    })
    .expect("cpu backend");
    let model = Model::load(model_dir, backend, &ModelOptions::default())
        .unwrap_or_else(|e| panic!("loading {}: {e}", model_dir.display()));
    let runner = ModelRunner::new(model, config.block_size, config.num_blocks).expect("kv cache");
    let text: Option<std::sync::Arc<dyn tandem_workers::engine::TextDecoder>> =
        with_text.then(|| {
            let tokenizer = tandem_text::tokenizer::TextTokenizer::load(model_dir)
                .unwrap_or_else(|e| panic!("tokenizer of {}: {e}", model_dir.display()));
            std::sync::Arc::new(TokenizerText::new(std::sync::Arc::new(tokenizer))) as _
        });
    Engine::new(runner, config, text).expect("engine")
}

/// What one request produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub text: String,
    pub reason: Option<FinishReason>,
}

/// Records events per request.
#[derive(Debug, Default)]
pub struct Recorder {
    pub outcomes: std::collections::HashMap<RequestId, Outcome>,
}

impl Recorder {
    pub fn record(&mut self, events: Vec<EngineEvent>) {
        for ev in events {
            let out = self.outcomes.entry(ev.request_id).or_insert(Outcome {
                tokens: vec![],
                text: String::new(),
                reason: None,
            });
            match ev.kind {
                EventKind::Token { id, text_delta, .. } => {
                    assert!(out.reason.is_none(), "token after Finished");
                    out.tokens.push(id);
                    out.text.push_str(&text_delta);
                }
                EventKind::Finished { reason, .. } => {
                    assert!(out.reason.is_none(), "Finished twice");
                    out.reason = Some(reason);
                }
                EventKind::RoomReserved { .. } => panic!("room reserved for a plain request"),
                EventKind::Hidden { .. } => panic!("a hidden state not asked for"),
                EventKind::PromptLogprobs { .. } => {
                    panic!("prompt logprobs for a request that asked none")
                }
            }
        }
    }

    pub fn get(&self, id: RequestId) -> &Outcome {
        &self.outcomes[&id]
    }
}

/// Steps `engine` (on any backend) until it has no work, recording every event.
pub fn run_to_idle<M: StepModel>(engine: &mut Engine<M>, recorder: &mut Recorder) -> usize {
    let mut steps = 0;
    while engine.has_work() {
        recorder.record(engine.step());
        steps += 1;
        assert!(steps < 100_000, "engine made no progress");
    }
    steps
}
