//! `import_gguf` on the tiny valid fixture (`scripts/fixtures/gguf_tiny.py`): the directory is
//! complete, tensors carry HF names and shapes, f32 keeps the dequantized values exactly
//! (q/k un-permuted), and bf16 is their rounding.

use std::path::PathBuf;

use model_prep::gguf::names::unpermute_rows;
use model_prep::gguf::{GgufFile, dequantize};
use model_prep::import::{ImportOptions, import_gguf};
use tandem_model::WeightDType;
use tandem_model::{GenerationConfig, ModelConfig, read_json};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

fn dequantized(file: &GgufFile, name: &str) -> Vec<f32> {
    let info = file.tensor(name).unwrap();
    dequantize(name, info.ggml_type, file.tensor_data(info)).unwrap()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn imports_a_complete_model_directory() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("tiny");
    let gguf = fixture("tiny.gguf");
    let options = ImportOptions {
        dtype: WeightDType::F32,
        force: false,
        keep_quant: false,
    };
    let summary = import_gguf(&gguf, &out, &options).unwrap();
    assert_eq!(summary.output, out);
    assert_eq!(summary.tensor_count, 11);
    for file in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let config = ModelConfig::load(&out).unwrap();
    assert_eq!(config.hidden_size, 32);
    assert_eq!(config.num_kv_heads(), 1);
    assert!(config.tie_word_embeddings);
    assert_eq!(config.torch_dtype.as_deref(), Some("float32"));
    let generation: GenerationConfig = read_json(&out.join("generation_config.json")).unwrap();
    assert!(generation.eos_token_id.is_some());

    let file = GgufFile::open(&gguf).unwrap();
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let embed = st.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!(embed.shape(), &[262, 32]);
    assert_eq!(f32s(embed.data()), dequantized(&file, "token_embd.weight"));
    let q = st.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    let raw_q = dequantized(&file, "blk.0.attn_q.weight");
    assert_eq!(f32s(q.data()), unpermute_rows("q", &raw_q, 32, 2).unwrap());
    assert_ne!(f32s(q.data()), raw_q, "q rows were un-permuted");
    let k = st.tensor("model.layers.0.self_attn.k_proj.weight").unwrap();
    assert_eq!(k.shape(), &[16, 32]);
    let raw_k = dequantized(&file, "blk.0.attn_k.weight");
    assert_eq!(f32s(k.data()), unpermute_rows("k", &raw_k, 16, 1).unwrap());
    assert!(
        st.tensor("lm_head.weight").is_err(),
        "tied embeddings: no lm_head"
    );

    // bf16: the same values rounded to nearest even; `--force` replaces the directory.
    let options = ImportOptions {
        dtype: WeightDType::Bf16,
        force: true,
        keep_quant: false,
    };
    import_gguf(&gguf, &out, &options).unwrap();
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let down = st.tensor("model.layers.0.mlp.down_proj.weight").unwrap();
    assert_eq!(down.dtype(), safetensors::Dtype::BF16);
    assert_eq!(down.shape(), &[32, 64]);
    let want = WeightDType::Bf16.encode(&dequantized(&file, "blk.0.ffn_down.weight"));
    assert_eq!(down.data(), want.as_slice());
    let leftovers: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("tiny")]);
}
