//! A job's grammar (`SamplingSpec.grammar`), compiled by llguidance against this worker's
//! tokenizer before the job goes to the engine, off the engine thread and off the bus loop
//! (a blocking task): a schema can take tens of milliseconds to compile, which a step of every
//! other request must not wait for. Compiled grammars are cached
//! ([`GrammarCompiler::CACHE_ENTRIES`]), so a schema an application sends with every request
//! compiles once per worker.
//!
//! The compiler (the vocabulary's token trie) is built on the first job with a grammar.
//! Context and decode workers compile the same grammar from the same job, so a decode worker
//! continues a request prefilled elsewhere by feeding its grammar the imported first token.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tandem_protocol::messages::{GenerateJob, GrammarSpec};
use tandem_text::grammar::{Constraint, GrammarCompiler, GrammarSource};

pub struct WorkerGrammars {
    model_dir: PathBuf,
    vocab_size: usize,
    eos_ids: Vec<u32>,
    compiler: OnceLock<Result<GrammarCompiler, String>>,
}

impl WorkerGrammars {
    /// For the model in `model_dir`, whose logits rows have `vocab_size` entries and whose
    /// generation ends with `eos_ids`.
    pub fn new(model_dir: PathBuf, vocab_size: usize, eos_ids: Vec<u32>) -> Self {
        Self {
            model_dir,
            vocab_size,
            eos_ids,
            compiler: OnceLock::new(),
        }
    }

    /// The job's grammar in its start state; `Ok(None)` for a job without one. The error is
    /// the message for the client.
    pub async fn compile(
        self: &Arc<Self>,
        job: &GenerateJob,
    ) -> Result<Option<Constraint>, String> {
        let Some(spec) = job.sampling.grammar.clone() else {
            return Ok(None);
        };
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.compile_now(&spec).map(Some))
            .await
            .map_err(|e| format!("the grammar compile task failed: {e}"))?
    }

    /// Compiles `spec` on this thread.
    pub fn compile_now(&self, spec: &GrammarSpec) -> Result<Constraint, String> {
        let compiler = self
            .compiler
            .get_or_init(|| {
                GrammarCompiler::from_model_dir(&self.model_dir, self.vocab_size, &self.eos_ids)
                    .map_err(|e| e.to_string())
            })
            .as_ref()?;
        compiler
            .compile(source(spec))
            .map_err(|e| format!("the request's grammar does not compile: {e}"))
    }
}

/// The llguidance source of a wire grammar.
fn source(spec: &GrammarSpec) -> GrammarSource<'_> {
    match spec {
        GrammarSpec::JsonSchema { schema } => GrammarSource::JsonSchema(schema),
        GrammarSpec::Lark { grammar } => GrammarSource::Lark(grammar),
        GrammarSpec::AfterThinking { opened, then } => GrammarSource::AfterThinking {
            opened: *opened,
            then: Box::new(source(then)),
        },
    }
}
