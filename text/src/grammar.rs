//! Constrained decoding: grammars compiled by llguidance against the model's tokenizer, and a
//! per-sequence [`Constraint`] that says which tokens may come next.
//!
//! llguidance (the library vLLM, SGLang and llama.cpp use) compiles a JSON schema or a grammar
//! in its Lark dialect into an Earley parser over a token trie built from `tokenizer.json`
//! (`toktrie_hf_tokenizers`). The api-server compiles a request's grammar to refuse one that
//! does not compile with a 400 (the same code, the same tokenizer, as the worker); the workers
//! compile it again per request and keep one [`Constraint`] per sequence: before each sampled
//! token [`Constraint::compute_mask`], after it [`Constraint::advance`].
//!
//! Compiling a schema costs milliseconds to tens of milliseconds; the [`GrammarCompiler`]
//! keeps the compiled parsers of the last [`GrammarCompiler::CACHE_ENTRIES`] grammars, so
//! requests sharing a schema (an application's one response format) pay it once. A parser
//! taken from the cache is cloned: the clone shares the compiled grammar and lexer, and has a
//! state of its own.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use llguidance::api::{GrammarWithLexer, TopLevelGrammar};
use llguidance::{Matcher, ParserFactory, TokenParser};
use toktrie::SimpleVob;

/// llguidance's options for a JSON schema that sets none (`"x-guidance"` in the schema): no
/// whitespace between JSON tokens, so the output is compact JSON. llguidance's default allows
/// any whitespace there, and a small model then emits newlines until `max_tokens` instead of
/// closing the value (SmolLM2 does, greedy).
pub fn json_options() -> serde_json::Value {
    serde_json::json!({ "whitespace_flexible": false })
}

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSource<'a> {
    /// One JSON value valid against this JSON schema.
    JsonSchema(&'a serde_json::Value),
    /// A grammar in llguidance's Lark dialect (which may embed `%json { schema }`).
    Lark(&'a str),
    /// `then`, after a reasoning model's thinking: the output may start with a think block
    /// (`<think>`, any text, `</think>`, whitespace), whose text is free; `opened`: the prompt
    /// opened the block, so the output starts inside it and must close it. Only `then` (a
    /// schema or a Lark grammar) is constrained.
    AfterThinking {
        opened: bool,
        then: Box<GrammarSource<'a>>,
    },
}

/// The name the answer's grammar has in [`GrammarSource::AfterThinking`]'s list.
const ANSWER_GRAMMAR: &str = "answer";

impl GrammarSource<'_> {
    /// The cache key: the kind and the exact text of the grammar.
    fn key(&self) -> String {
        match self {
            GrammarSource::JsonSchema(schema) => format!("json_schema:{schema}"),
            GrammarSource::Lark(grammar) => format!("lark:{grammar}"),
            GrammarSource::AfterThinking { opened, then } => {
                format!("after_thinking:{opened}:{}", then.key())
            }
        }
    }

    /// The Lark grammar of the thinking before the answer (`@answer`, the second grammar):
    /// the thought is lazy free text, so it ends at the first `</think>`.
    fn thinking_lark(opened: bool) -> String {
        let start = if opened {
            "start: thought SPACE? @answer"
        } else {
            "start: (\"<think>\" thought SPACE?)? @answer"
        };
        format!(
            "{start}\nthought[lazy]: TEXT \"</think>\"\nTEXT: /(.|\\n)*/\nSPACE: /[ \\t\\r\\n]+/\n"
        )
    }

    fn top_level(&self) -> TopLevelGrammar {
        match self {
            GrammarSource::AfterThinking { opened, then } => {
                let mut answer = then.top_level();
                let mut grammars = vec![GrammarWithLexer::from_lark(Self::thinking_lark(*opened))];
                // A nested list (never built) would need its references renumbered.
                debug_assert_eq!(answer.grammars.len(), 1, "one answer grammar");
                let mut first = answer.grammars.remove(0);
                first.name = Some(ANSWER_GRAMMAR.into());
                grammars.push(first);
                TopLevelGrammar {
                    grammars,
                    max_tokens: None,
                }
            }
            GrammarSource::JsonSchema(schema) => {
                let mut schema = (*schema).clone();
                // llguidance's options ride in the schema; a client's own are kept.
                if let Some(object) = schema.as_object_mut()
                    && !object.contains_key("x-guidance")
                {
                    object.insert("x-guidance".into(), json_options());
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            GrammarSource::Lark(grammar) => TopLevelGrammar::from_lark(grammar.to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    #[error("cannot build the grammar tokenizer from {path}: {reason}")]
    Tokenizer { path: String, reason: String },
    /// The grammar does not compile; llguidance's message, fit for the client.
    #[error("{0}")]
    Compile(String),
    /// The matcher failed on a step (a token the grammar does not allow, a parser limit).
    #[error("grammar: {0}")]
    Step(String),
}

/// Compiles grammars for one tokenizer, with a bounded cache of compiled grammars. Shared by
/// every request of a worker (or an api-server); compiling takes `&self`.
pub struct GrammarCompiler {
    factory: ParserFactory,
    cache: Mutex<ParserCache>,
    vocab_size: usize,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

/// Compiled parsers by grammar, the least recently used dropped past the bound.
#[derive(Default)]
struct ParserCache {
    entries: HashMap<String, (TokenParser, u64)>,
    clock: u64,
}

impl ParserCache {
    fn get(&mut self, key: &str) -> Option<TokenParser> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(key).map(|(parser, used)| {
            *used = clock;
            parser.clone()
        })
    }

    fn insert(&mut self, key: String, parser: TokenParser, bound: usize) {
        self.clock += 1;
        if self.entries.len() >= bound
            && !self.entries.contains_key(&key)
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
        {
            self.entries.remove(&oldest);
        }
        self.entries.insert(key, (parser, self.clock));
    }
}

impl GrammarCompiler {
    /// Compiled grammars kept per compiler.
    pub const CACHE_ENTRIES: usize = 64;

    /// From a model directory's `tokenizer.json`. `vocab_size` is the model's (its logits
    /// rows; a tokenizer may have fewer tokens, the rest are never allowed); `eos_ids` the ids
    /// that end generation, allowed where the grammar is complete.
    pub fn from_model_dir(
        model_dir: &Path,
        vocab_size: usize,
        eos_ids: &[u32],
    ) -> Result<Self, GrammarError> {
        let path = model_dir.join(tandem_model::TOKENIZER_FILE);
        let bytes = std::fs::read(&path).map_err(|e| GrammarError::Tokenizer {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_tokenizer_json(&bytes, vocab_size, eos_ids).map_err(|e| match e {
            GrammarError::Tokenizer { reason, .. } => GrammarError::Tokenizer {
                path: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// From the bytes of a `tokenizer.json`; see [`Self::from_model_dir`].
    pub fn from_tokenizer_json(
        bytes: &[u8],
        vocab_size: usize,
        eos_ids: &[u32],
    ) -> Result<Self, GrammarError> {
        let fail = |reason: String| GrammarError::Tokenizer {
            path: "tokenizer.json".into(),
            reason,
        };
        let mut tokenizer = toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(bytes)
            .map_err(|e| fail(e.to_string()))?;
        let tokens = tokenizer.tokrx_info().vocab_size as usize;
        let eos: Vec<u32> = eos_ids
            .iter()
            .copied()
            .filter(|&id| (id as usize) < tokens)
            .collect();
        if !eos.is_empty() {
            tokenizer.set_eos_tokens(&eos);
        }
        let env = tokenizer
            .into_tok_env(Some(vocab_size.max(tokens)))
            .map_err(|e| fail(e.to_string()))?;
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| fail(e.to_string()))?;
        // Errors reach the caller as values; nothing is printed to stderr.
        factory.quiet();
        Ok(Self {
            factory,
            cache: Mutex::new(ParserCache::default()),
            vocab_size,
        })
    }

    /// The logits row length the masks cover.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// A fresh [`Constraint`] for `source`, compiled or taken from the cache.
    pub fn compile(&self, source: GrammarSource<'_>) -> Result<Constraint, GrammarError> {
        let key = source.key();
        let cached = self.lock_cache().get(&key);
        let parser = match cached {
            Some(parser) => parser,
            None => {
                let parser = self
                    .factory
                    .create_parser(source.top_level())
                    .map_err(|e| GrammarError::Compile(e.to_string()))?;
                self.lock_cache()
                    .insert(key.clone(), parser.clone(), Self::CACHE_ENTRIES);
                parser
            }
        };
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(GrammarError::Compile(error));
        }
        Ok(Constraint {
            matcher,
            key: key.into(),
        })
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, ParserCache> {
        // A panic while holding the lock leaves a consistent map (every write is one call).
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One sequence's grammar state: which tokens may come next, advanced token by token.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    /// The grammar it was compiled from (kind and text), for equality and logs.
    key: Arc<str>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown: String = self.key.chars().take(80).collect();
        if shown.len() < self.key.len() {
            shown.push('…');
        }
        f.debug_struct("Constraint")
            .field("grammar", &shown)
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

/// Constraints compare by the grammar they were compiled from, not by their state.
impl PartialEq for Constraint {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Constraint {
    /// The tokens allowed next: the grammar's continuations, and the EOS ids where the
    /// grammar is complete (only them once it cannot continue).
    pub fn compute_mask(&mut self) -> Result<TokenMask, GrammarError> {
        self.matcher
            .compute_mask_or_eos()
            .map(TokenMask)
            .map_err(|e| GrammarError::Step(e.to_string()))
    }

    /// Moves past `token` (sampled under this constraint's mask, or generated before by
    /// another worker under the same grammar).
    pub fn advance(&mut self, token: u32) -> Result<(), GrammarError> {
        self.matcher
            .consume_token(token)
            .map_err(|e| GrammarError::Step(e.to_string()))
    }

    /// Moves past `tokens`, in order.
    pub fn advance_all(&mut self, tokens: &[u32]) -> Result<(), GrammarError> {
        self.matcher
            .consume_tokens(tokens)
            .map_err(|e| GrammarError::Step(e.to_string()))
    }

    /// The grammar is complete and allows nothing more: the output ends here.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// The set of tokens a grammar allows at one position.
#[derive(Clone)]
pub struct TokenMask(SimpleVob);

impl std::fmt::Debug for TokenMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenMask")
            .field("allowed", &self.0.num_set())
            .field("of", &self.0.len())
            .finish()
    }
}

impl TokenMask {
    pub fn is_allowed(&self, token: u32) -> bool {
        (token as usize) < self.0.len() && self.0.is_allowed(token)
    }

    /// Tokens allowed.
    pub fn count(&self) -> usize {
        self.0.num_set()
    }

    /// The bits, 32 tokens per word (token `i` is bit `i % 32` of word `i / 32`).
    pub fn words(&self) -> &[u32] {
        self.0.as_slice()
    }

    /// Sets the logit of every token not allowed to `-inf`; logits past the mask's end too.
    pub fn apply(&self, logits: &mut [f32]) {
        let words = self.0.as_slice();
        for (chunk, &word) in logits.chunks_mut(32).zip(words) {
            if word == u32::MAX {
                continue;
            }
            for (bit, logit) in chunk.iter_mut().enumerate() {
                if word & (1 << bit) == 0 {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        // Bits past the mask's length in its last word are never set, so they were masked
        // above; rows longer than the words are masked here.
        let covered = (words.len() * 32).min(logits.len());
        logits[covered..].fill(f32::NEG_INFINITY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vocabulary, padded to a model's larger row.
    const VOCAB: usize = 768;

    fn tokenizer() -> crate::tokenizer::TextTokenizer {
        crate::test_tokenizers::byte_level_bpe()
    }

    fn compiler(tokenizer: &crate::tokenizer::TextTokenizer) -> GrammarCompiler {
        let json = tokenizer.inner().to_string(false).unwrap();
        let eos = tokenizer.stop_token_ids().to_vec();
        GrammarCompiler::from_tokenizer_json(json.as_bytes(), VOCAB, &eos).unwrap()
    }

    /// Decoding under the mask with a "model" that prefers the highest id allowed (long,
    /// merged tokens), until EOS or the grammar's end; the text generated.
    fn run(constraint: &mut Constraint, tokenizer: &crate::tokenizer::TextTokenizer) -> String {
        let eos = tokenizer.stop_token_ids();
        let mut ids = Vec::new();
        for _ in 0..300 {
            let mask = constraint.compute_mask().unwrap();
            let mut logits: Vec<f32> = (0..VOCAB).map(|i| i as f32 / 1000.0).collect();
            mask.apply(&mut logits);
            let token = (0..VOCAB as u32)
                .rev()
                .find(|&i| logits[i as usize].is_finite())
                .expect("the mask allows a token");
            assert!(
                token < tokenizer.vocab_size() as u32,
                "padding is never allowed"
            );
            if eos.contains(&token) {
                break;
            }
            ids.push(token);
            constraint.advance(token).unwrap();
            if constraint.is_finished() {
                break;
            }
        }
        tokenizer.decode(&ids, false).unwrap()
    }

    #[test]
    fn lark_grammars_with_embedded_json_compile_and_constrain() {
        let tokenizer = tokenizer();
        let compiler = compiler(&tokenizer);
        let grammar = r#"
start: "<tool_call>" call "</tool_call>"
call: %json {"x-guidance": {"whitespace_flexible": false},
      "type": "object", "properties": {"name": {"const": "get_weather"},
      "arguments": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 3}},
                    "required": ["city"], "additionalProperties": false}},
      "required": ["name", "arguments"], "additionalProperties": false}
"#;
        // A `%json` in Lark takes llguidance's options in the schema ("x-guidance"): without
        // `whitespace_flexible: false` (or a bounded `whitespace_pattern`) a model may emit
        // whitespace without end, which is what this test's "model" would do.
        let mut constraint = compiler.compile(GrammarSource::Lark(grammar)).unwrap();
        let out = run(&mut constraint, &tokenizer);
        let inner = out
            .strip_prefix("<tool_call>")
            .and_then(|s| s.strip_suffix("</tool_call>"))
            .unwrap_or_else(|| panic!("{out:?}"));
        let call: serde_json::Value = serde_json::from_str(inner).unwrap();
        assert_eq!(call["name"], "get_weather", "{out}");
        assert!(call["arguments"]["city"].is_string(), "{out}");
    }

    /// Whether `constraint` takes `text` (tokenized without special tokens) and may end there.
    fn takes_whole(
        constraint: &mut Constraint,
        tokenizer: &crate::tokenizer::TextTokenizer,
        text: &str,
    ) -> bool {
        let ids = tokenizer.encode_with(text, false).unwrap();
        ids.iter().all(|&id| {
            constraint
                .compute_mask()
                .is_ok_and(|mask| mask.is_allowed(id))
                && constraint.advance(id).is_ok()
        }) && (constraint.is_finished()
            || constraint
                .compute_mask()
                .is_ok_and(|mask| mask.is_allowed(tokenizer.stop_token_ids()[0])))
    }

    #[test]
    fn the_answer_after_a_think_block_is_constrained_and_the_thinking_is_free() {
        let tokenizer = tokenizer();
        let compiler = compiler(&tokenizer);
        let schema = serde_json::json!({"type": "object", "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"], "additionalProperties": false});
        let answer = GrammarSource::JsonSchema(&schema);
        let after = |opened| GrammarSource::AfterThinking {
            opened,
            then: Box::new(answer.clone()),
        };
        for (opened, text, taken) in [
            (
                false,
                "<think>\nIs it {ok}? Yes.\n</think>\n\n{\"ok\":true}",
                true,
            ),
            (false, "<think></think>{\"ok\":false}", true),
            (false, "{\"ok\":true}", true),
            (false, "<think>\nfree\n</think>\n\nnot json", false),
            (false, "Sure: {\"ok\":true}", false),
            (true, "\nIs it? Yes.\n</think>\n\n{\"ok\":true}", true),
            (true, "{\"ok\":true}", false),
        ] {
            let mut constraint = compiler.compile(after(opened)).unwrap();
            assert_eq!(
                takes_whole(&mut constraint, &tokenizer, text),
                taken,
                "opened {opened}: {text:?}"
            );
        }
        // A Lark answer too; and the thinking's source is cached apart from the answer's.
        let lark = GrammarSource::Lark(r#"start: "yes" | "no""#);
        let mut constraint = compiler
            .compile(GrammarSource::AfterThinking {
                opened: false,
                then: Box::new(lark.clone()),
            })
            .unwrap();
        assert!(takes_whole(
            &mut constraint,
            &tokenizer,
            "<think>hm</think> yes"
        ));
        let mut plain = compiler.compile(lark).unwrap();
        assert!(!takes_whole(
            &mut plain,
            &tokenizer,
            "<think>hm</think> yes"
        ));
    }

    #[test]
    fn json_schemas_constrain_and_bad_ones_are_refused_with_llguidance_message() {
        let tokenizer = tokenizer();
        let compiler = compiler(&tokenizer);
        let schema = serde_json::json!({"type": "object",
            "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2]}},
            "required": ["ok", "n"], "additionalProperties": false});
        let mut constraint = compiler
            .compile(GrammarSource::JsonSchema(&schema))
            .unwrap();
        let value: serde_json::Value =
            serde_json::from_str(&run(&mut constraint, &tokenizer)).unwrap();
        assert!(value["ok"].is_boolean() && (value["n"] == 1 || value["n"] == 2));

        let bad = serde_json::json!({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}});
        let error = compiler
            .compile(GrammarSource::JsonSchema(&bad))
            .unwrap_err();
        assert!(matches!(error, GrammarError::Compile(_)), "{error}");
        let error = compiler
            .compile(GrammarSource::Lark("start: undefined_rule"))
            .unwrap_err();
        assert!(error.to_string().contains("undefined_rule"), "{error}");
    }

    #[test]
    fn cached_grammars_give_independent_states_and_the_cache_is_bounded() {
        let tokenizer = tokenizer();
        let compiler = compiler(&tokenizer);
        let grammar = GrammarSource::Lark(r#"start: "yes""#);
        let mut first = compiler.compile(grammar.clone()).unwrap();
        let mut second = compiler.compile(grammar).unwrap();
        assert_eq!(first, second);
        for id in tokenizer.encode_templated("yes").unwrap() {
            first.advance(id).unwrap();
        }
        assert!(first.is_finished(), "the grammar's end");
        assert!(!second.is_finished(), "a state of its own");
        assert_eq!(run(&mut second, &tokenizer), "yes");
        for i in 0..GrammarCompiler::CACHE_ENTRIES + 5 {
            let lark = format!(r#"start: "x{i}""#);
            compiler.compile(GrammarSource::Lark(&lark)).unwrap();
        }
        assert_eq!(
            compiler.lock_cache().entries.len(),
            GrammarCompiler::CACHE_ENTRIES
        );
    }

    #[test]
    fn masks_set_disallowed_and_out_of_vocabulary_logits_to_minus_infinity() {
        let mut vob = SimpleVob::alloc(40);
        vob.allow_token(3);
        vob.allow_token(33);
        let mask = TokenMask(vob);
        let mut logits = vec![1.0f32; 70];
        mask.apply(&mut logits);
        let finite: Vec<usize> = (0..70).filter(|&i| logits[i].is_finite()).collect();
        assert_eq!(finite, vec![3, 33]);
        assert!(mask.is_allowed(33) && !mask.is_allowed(34) && !mask.is_allowed(1000));
        assert_eq!(mask.count(), 2);
    }
}
