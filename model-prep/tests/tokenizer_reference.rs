//! Tokenizers rebuilt from GGUF metadata against Hugging Face transformers' tokenizers for the
//! same GGUF files.
//!
//! Each fixture (`tests/fixtures/tokenizer/<case>.json.gz`, made by
//! `scripts/fixtures/tokenizer_reference.py`) holds the GGUF's `tokenizer.ggml.*` metadata and,
//! for a set of strings, the ids of `AutoTokenizer.from_pretrained(dir, gguf_file=...)(text)`
//! (BOS/EOS included) and its decoding of them. We build the tokenizer from the metadata alone
//! and require the same ids, token for token, and the same decoded text.

use std::io::Read;
use std::path::PathBuf;

use model_prep::gguf_tokenizer::{GgufVocab, TokenizerFiles, build_tokenizer};
use serde::Deserialize;
use tokenizers::Tokenizer;

#[derive(Deserialize)]
struct Fixture {
    case: String,
    vocab: VocabDump,
    reference: Vec<Reference>,
}

/// `GgufVocab`, as the fixture script dumps it.
#[derive(Deserialize)]
struct VocabDump {
    model: String,
    pre: Option<String>,
    tokens: Vec<String>,
    scores: Option<Vec<f32>>,
    token_types: Option<Vec<i32>>,
    merges: Option<Vec<String>>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    unknown_token_id: Option<u32>,
    padding_token_id: Option<u32>,
    eot_token_id: Option<u32>,
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    add_space_prefix: Option<bool>,
    chat_template: Option<String>,
}

impl From<VocabDump> for GgufVocab {
    fn from(dump: VocabDump) -> Self {
        GgufVocab {
            model: dump.model,
            pre: dump.pre,
            tokens: dump.tokens,
            scores: dump.scores,
            token_types: dump.token_types,
            merges: dump.merges,
            bos_token_id: dump.bos_token_id,
            eos_token_id: dump.eos_token_id,
            unknown_token_id: dump.unknown_token_id,
            padding_token_id: dump.padding_token_id,
            eot_token_id: dump.eot_token_id,
            add_bos_token: dump.add_bos_token,
            add_eos_token: dump.add_eos_token,
            add_space_prefix: dump.add_space_prefix,
            chat_template: dump.chat_template,
        }
    }
}

#[derive(Deserialize)]
struct Reference {
    text: String,
    ids: Vec<u32>,
    decoded: String,
    /// The original SentencePiece model's ids (with BOS), for "llama" vocabularies.
    sentencepiece_ids: Option<Vec<u32>>,
    /// transformers' ids with `add_space_prefix = false` honoured (it ignores the flag).
    ids_add_space_prefix_honoured: Option<Vec<u32>>,
    decoded_add_space_prefix_honoured: Option<String>,
}

fn load_fixture(case: &str) -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer")
        .join(format!("{case}.json.gz"));
    let file = std::fs::File::open(&path).unwrap_or_else(|e| {
        panic!(
            "cannot open {} ({e}); it is made by scripts/fixtures/tokenizer_reference.py",
            path.display()
        )
    });
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("cannot gunzip {}: {e}", path.display()));
    let fixture: Fixture = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not a tokenizer fixture: {e}", path.display()));
    assert_eq!(fixture.case, case);
    assert!(
        fixture.reference.len() >= 20,
        "{case}: the fixture has only {} strings",
        fixture.reference.len()
    );
    fixture
}

/// Builds the tokenizer of `case` and compares it with the reference; returns what it built.
fn check_case(case: &str) -> TokenizerFiles {
    let fixture = load_fixture(case);
    let files = build_tokenizer(&fixture.vocab.into())
        .unwrap_or_else(|e| panic!("{case}: build_tokenizer failed: {e}"));
    let tokenizer: Tokenizer = files
        .tokenizer_json
        .parse()
        .unwrap_or_else(|e| panic!("{case}: tokenizer.json does not load: {e}"));

    let mut mismatches = Vec::new();
    for reference in &fixture.reference {
        let expected_ids = reference
            .ids_add_space_prefix_honoured
            .as_ref()
            .unwrap_or(&reference.ids);
        let expected_decoded = reference
            .decoded_add_space_prefix_honoured
            .as_ref()
            .unwrap_or(&reference.decoded);
        let encoding = tokenizer
            .encode(reference.text.as_str(), true)
            .unwrap_or_else(|e| panic!("{case}: cannot encode {:?}: {e}", reference.text));
        let ids = encoding.get_ids();
        if ids != expected_ids.as_slice() {
            mismatches.push(format!(
                "{:?}: ids\n    ours:         {ids:?}\n    transformers: {expected_ids:?}",
                reference.text
            ));
        }
        if reference.ids_add_space_prefix_honoured.is_some()
            && let Some(sentencepiece_ids) = &reference.sentencepiece_ids
            && ids != sentencepiece_ids.as_slice()
        {
            mismatches.push(format!(
                "{:?}: ids\n    ours:          {ids:?}\n    sentencepiece: {sentencepiece_ids:?}",
                reference.text
            ));
        }
        let decoded = tokenizer
            .decode(expected_ids, false)
            .unwrap_or_else(|e| panic!("{case}: cannot decode {expected_ids:?}: {e}"));
        if &decoded != expected_decoded {
            mismatches.push(format!(
                "{:?}: decoded\n    ours:         {decoded:?}\n    transformers: {expected_decoded:?}",
                reference.text
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{case}: {} mismatches with the reference:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    files
}

#[test]
fn smollm2_matches_transformers() {
    let files = check_case("smollm2");
    // SmolLM2's GGUF: BOS <|im_start|> (1), EOS <|im_end|> (2), no BOS added.
    assert_eq!(files.bos_token_id, Some(1));
    assert_eq!(files.tokenizer_config.add_bos_token, Some(false));
    assert_eq!(
        files
            .tokenizer_config
            .eos_token
            .as_ref()
            .map(|t| t.content()),
        Some("<|im_end|>")
    );
    // Generation stops at <|im_end|> (the file's EOS) and at <|endoftext|>.
    assert_eq!(files.eos_token_ids, vec![2, 0]);
    let template = files
        .tokenizer_config
        .default_chat_template()
        .expect("SmolLM2's GGUF has a chat template");
    assert!(template.contains("<|im_start|>"), "{template}");
}

#[test]
fn llama_bpe_matches_transformers() {
    let files = check_case("bpe-llama-bpe");
    // EOS <|end_of_text|> (1), EOT <|eot_id|> (2), then the other end markers in the vocabulary.
    assert_eq!(files.eos_token_ids, vec![1, 2, 4, 5]);
    assert_eq!(files.tokenizer_config.add_bos_token, Some(true));
}

#[test]
fn qwen2_matches_transformers() {
    check_case("bpe-qwen2");
}

#[test]
fn gpt2_matches_transformers() {
    check_case("bpe-gpt2");
}

#[test]
fn default_pre_with_bos_and_eos_matches_transformers() {
    let files = check_case("bpe-default");
    assert_eq!(files.tokenizer_config.add_eos_token, Some(true));
}

#[test]
fn sentencepiece_matches_transformers() {
    let files = check_case("spm");
    assert_eq!(
        files
            .tokenizer_config
            .unk_token
            .as_ref()
            .map(|t| t.content()),
        Some("<unk>")
    );
    // EOS </s>, and <|im_end|> (a ChatML end of turn the vocabulary happens to have).
    assert_eq!(files.eos_token_ids, vec![2, 4]);
}

/// transformers ignores `add_space_prefix = false`; the reference is its tokenizer with the flag
/// honoured, and the original SentencePiece model's ids, which must agree with ours.
#[test]
fn sentencepiece_without_prefix_matches_sentencepiece() {
    check_case("spm-no-prefix");
}

#[test]
fn written_files_load_back() {
    let fixture = load_fixture("bpe-qwen2");
    let files = build_tokenizer(&fixture.vocab.into()).expect("the qwen2 fixture builds");
    let dir = tempfile::tempdir().expect("a temporary directory");
    files
        .write_to(dir.path())
        .expect("writes into an empty directory");
    let tokenizer = Tokenizer::from_file(dir.path().join("tokenizer.json"))
        .expect("tokenizer.json loads with the tokenizers library");
    let config_text = std::fs::read_to_string(dir.path().join("tokenizer_config.json"))
        .expect("tokenizer_config.json is written");
    let config: tandem_model::TokenizerConfig =
        serde_json::from_str(&config_text).expect("tokenizer_config.json parses");
    assert_eq!(config, files.tokenizer_config);
    let im_end = tokenizer
        .token_to_id("<|im_end|>")
        .expect("<|im_end|> is in the vocabulary");
    let ids = tokenizer
        .encode("<|im_start|>user\nhi<|im_end|>", true)
        .expect("encodes")
        .get_ids()
        .to_vec();
    assert_eq!(ids.last(), Some(&im_end), "{ids:?}");
}
