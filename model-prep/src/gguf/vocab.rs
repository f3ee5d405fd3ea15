//! The tokenizer vocabulary (`tokenizer.ggml.*`, `tokenizer.chat_template`) as a
//! [`GgufVocab`], the input of [`crate::gguf_tokenizer::build_tokenizer`].

use crate::gguf_tokenizer::GgufVocab;

use super::config::{ConfigFromGgufError, Meta};
use super::reader::GgufFile;

/// Reads the tokenizer metadata. A GGUF without `tokenizer.ggml.model` or a non-empty
/// `tokenizer.ggml.tokens` is an error: a model directory without a tokenizer is useless.
pub fn vocab(file: &GgufFile) -> Result<GgufVocab, ConfigFromGgufError> {
    let meta = Meta(file);
    let model = meta
        .opt_str("tokenizer.ggml.model")?
        .ok_or(ConfigFromGgufError::MissingTokenizer(
            "tokenizer.ggml.model",
        ))?
        .to_string();
    let tokens = meta
        .opt_list("tokenizer.ggml.tokens", "an array of strings", |v| {
            v.as_str().map(str::to_string)
        })?
        .filter(|t| !t.is_empty())
        .ok_or(ConfigFromGgufError::MissingTokenizer(
            "tokenizer.ggml.tokens",
        ))?;
    Ok(GgufVocab {
        model,
        pre: meta.opt_str("tokenizer.ggml.pre")?.map(str::to_string),
        tokens,
        scores: meta.opt_list("tokenizer.ggml.scores", "an array of floats", |v| {
            v.as_f64().map(|f| f as f32)
        })?,
        token_types: meta.opt_list("tokenizer.ggml.token_type", "an array of i32", |v| {
            v.as_i64().and_then(|i| i32::try_from(i).ok())
        })?,
        merges: meta.opt_list("tokenizer.ggml.merges", "an array of strings", |v| {
            v.as_str().map(str::to_string)
        })?,
        bos_token_id: meta.opt_u32("tokenizer.ggml.bos_token_id")?,
        eos_token_id: meta.opt_u32("tokenizer.ggml.eos_token_id")?,
        unknown_token_id: meta.opt_u32("tokenizer.ggml.unknown_token_id")?,
        padding_token_id: meta.opt_u32("tokenizer.ggml.padding_token_id")?,
        eot_token_id: meta.opt_u32("tokenizer.ggml.eot_token_id")?,
        add_bos_token: meta.opt_bool("tokenizer.ggml.add_bos_token")?,
        add_eos_token: meta.opt_bool("tokenizer.ggml.add_eos_token")?,
        add_space_prefix: meta.opt_bool("tokenizer.ggml.add_space_prefix")?,
        chat_template: meta.opt_str("tokenizer.chat_template")?.map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::config::token_count;
    use crate::gguf::reader::tests::GgufBuilder;

    fn open(builder: GgufBuilder) -> (tempfile::TempDir, GgufFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, builder.build()).unwrap();
        let file = GgufFile::open(&path).unwrap();
        (dir, file)
    }

    #[test]
    fn fills_the_vocab_and_names_what_is_missing() {
        let (_d, file) = open(
            GgufBuilder::new()
                .str("tokenizer.ggml.model", "gpt2")
                .str("tokenizer.ggml.pre", "smollm")
                .strings("tokenizer.ggml.tokens", &["<s>", "a", "b"])
                .strings("tokenizer.ggml.merges", &["a b"])
                .u32("tokenizer.ggml.eos_token_id", 0)
                .bool("tokenizer.ggml.add_bos_token", false)
                .str("tokenizer.chat_template", "{{ x }}"),
        );
        let v = vocab(&file).unwrap();
        assert_eq!(v.model, "gpt2");
        assert_eq!(v.pre.as_deref(), Some("smollm"));
        assert_eq!(v.tokens, ["<s>", "a", "b"]);
        assert_eq!(v.merges, Some(vec!["a b".to_string()]));
        assert_eq!(v.eos_token_id, Some(0));
        assert_eq!(v.bos_token_id, None);
        assert_eq!(v.add_bos_token, Some(false));
        assert_eq!(v.chat_template.as_deref(), Some("{{ x }}"));
        assert_eq!(token_count(&file), Some(3));

        let (_d, file) = open(GgufBuilder::new().strings("tokenizer.ggml.tokens", &["a"]));
        let err = vocab(&file).unwrap_err().to_string();
        assert!(err.contains("tokenizer.ggml.model is missing"), "{err}");
        let (_d, file) = open(GgufBuilder::new().str("tokenizer.ggml.model", "llama"));
        let err = vocab(&file).unwrap_err().to_string();
        assert!(err.contains("tokenizer.ggml.tokens is missing"), "{err}");

        let (_d, file) = open(
            GgufBuilder::new()
                .str("tokenizer.ggml.model", "llama")
                .strings("tokenizer.ggml.tokens", &["a"])
                .str("tokenizer.ggml.scores", "oops"),
        );
        let err = vocab(&file).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.ggml.scores should be an array"),
            "{err}"
        );
    }
}
