//! A request's grammar (`response_format`), compiled at the edge with the worker's code:
//! llguidance against the model's tokenizer (`tandem_text::grammar`). A schema llguidance
//! cannot compile is the client's mistake and is answered 400 here, naming the field, with
//! llguidance's message; a worker would otherwise refuse it after routing and queueing.
//!
//! The compiler (a token trie over the vocabulary) is built on the first request that has a
//! grammar, not at start, so deployments that never use one pay nothing; compiled grammars
//! are cached ([`GrammarCompiler::CACHE_ENTRIES`]), so checking an application's one schema
//! costs its compile once.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tandem_protocol::messages::GrammarSpec;
use tandem_text::grammar::{GrammarCompiler, GrammarError, GrammarSource};

use crate::error::ApiError;
use crate::tools::ToolRequest;

pub struct GrammarCheck {
    model_dir: PathBuf,
    vocab_size: usize,
    compiler: OnceLock<Result<GrammarCompiler, String>>,
}

/// The llguidance source of a wire grammar.
pub fn source(spec: &GrammarSpec) -> GrammarSource<'_> {
    match spec {
        GrammarSpec::JsonSchema { schema } => GrammarSource::JsonSchema(schema),
        GrammarSpec::Lark { grammar } => GrammarSource::Lark(grammar),
        GrammarSpec::AfterThinking { opened, then } => GrammarSource::AfterThinking {
            opened: *opened,
            then: Box::new(source(then)),
        },
    }
}

impl GrammarCheck {
    pub fn new(model_dir: PathBuf, vocab_size: usize) -> Self {
        Self {
            model_dir,
            vocab_size,
            compiler: OnceLock::new(),
        }
    }

    /// Compiles `spec` on a blocking thread; a grammar that does not compile is a 400 naming
    /// `param`.
    pub async fn check(self: &Arc<Self>, spec: &GrammarSpec, param: &str) -> Result<(), ApiError> {
        self.compile_after(spec, param, || Ok(())).await
    }

    /// [`Self::check`] of the grammar `tools` were made into (`tool_choice` required or a named
    /// function): each callable tool's `parameters` schema is compiled alone first, on the
    /// same blocking thread, so that one llguidance cannot compile is a 400 naming that tool's
    /// field (`parameters_param` of its index); then the whole grammar, a 400 naming `tools` if
    /// it does not compile.
    pub async fn check_tool_calls(
        self: &Arc<Self>,
        spec: &GrammarSpec,
        tools: &ToolRequest,
        parameters_param: fn(usize) -> String,
    ) -> Result<(), ApiError> {
        let tools = tools.clone();
        self.compile_after(spec, "tools", move || {
            crate::tools::grammar::check_schemas(&tools, parameters_param)
        })
        .await
    }

    /// On a blocking thread (compiling is CPU work that must not hold an async worker): `first`,
    /// then `spec` against the tokenizer.
    async fn compile_after(
        self: &Arc<Self>,
        spec: &GrammarSpec,
        param: &str,
        first: impl FnOnce() -> Result<(), ApiError> + Send + 'static,
    ) -> Result<(), ApiError> {
        let this = Arc::clone(self);
        let spec = spec.clone();
        let compiled = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
            first()?;
            let compiler = this
                .compiler
                .get_or_init(|| {
                    GrammarCompiler::from_model_dir(&this.model_dir, this.vocab_size, &[])
                        .map_err(|e| e.to_string())
                })
                .as_ref()
                .map_err(|e| GrammarError::Tokenizer {
                    path: this.model_dir.display().to_string(),
                    reason: e.clone(),
                });
            Ok(compiler.and_then(|compiler| compiler.compile(source(&spec)).map(drop)))
        })
        .await
        .map_err(|err| ApiError::Internal(format!("grammar task failed: {err}")))?;
        match compiled? {
            Ok(()) => Ok(()),
            Err(GrammarError::Compile(message)) => Err(ApiError::invalid(
                format!("the grammar does not compile: {message}"),
                param,
            )),
            Err(other) => Err(ApiError::Internal(other.to_string())),
        }
    }
}
