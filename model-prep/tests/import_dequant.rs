//! Dequantization against gguf-py, bit for bit, on the committed fixture made by
//! `scripts/fixtures/gguf_quants.py`; and the reader's view of that file's metadata.

use std::path::PathBuf;

use model_prep::gguf::{GgmlType, GgufFile, MetaValue, dequantize};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

#[derive(serde::Deserialize)]
struct Index {
    tensors: Vec<Entry>,
}

#[derive(serde::Deserialize)]
struct Entry {
    name: String,
    #[serde(rename = "type")]
    ggml_type: String,
    shape: Vec<usize>,
    offset: usize,
    count: usize,
}

#[test]
fn every_type_matches_gguf_py_bit_for_bit() {
    let file = GgufFile::open(&fixture("quants.gguf")).unwrap();
    let index: Index =
        serde_json::from_slice(&std::fs::read(fixture("quants_expected.json")).unwrap()).unwrap();
    let expected = std::fs::read(fixture("quants_expected.bin")).unwrap();
    let mut types_seen = std::collections::BTreeSet::new();
    for entry in &index.tensors {
        let info = file
            .tensor(&entry.name)
            .unwrap_or_else(|| panic!("{} missing from quants.gguf", entry.name));
        assert_eq!(info.ggml_type.name(), entry.ggml_type, "{}", entry.name);
        assert_eq!(info.shape(), entry.shape, "{}", entry.name);
        let values = dequantize(&info.name, info.ggml_type, file.tensor_data(info)).unwrap();
        assert_eq!(values.len(), entry.count, "{}", entry.name);
        let want = &expected[entry.offset..entry.offset + 4 * entry.count];
        for (i, (got, want)) in values.iter().zip(want.chunks_exact(4)).enumerate() {
            let want = f32::from_le_bytes(want.try_into().unwrap());
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{} element {i}: got {got:e}, gguf-py {want:e}",
                entry.name
            );
        }
        types_seen.insert(entry.ggml_type.clone());
    }
    let supported: std::collections::BTreeSet<String> =
        GgmlType::SUPPORTED.iter().map(|t| t.name()).collect();
    assert_eq!(
        types_seen, supported,
        "the fixture covers every supported type"
    );
}

#[test]
fn reads_every_metadata_type_written_by_gguf_py() {
    let file = GgufFile::open(&fixture("quants.gguf")).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 32);
    let get = |k: &str| file.get(k).unwrap_or_else(|| panic!("{k} missing")).clone();
    assert_eq!(get("test.u8"), MetaValue::U8(200));
    assert_eq!(get("test.i8"), MetaValue::I8(-5));
    assert_eq!(get("test.u16"), MetaValue::U16(60000));
    assert_eq!(get("test.i16"), MetaValue::I16(-30000));
    assert_eq!(get("test.u32"), MetaValue::U32(4_000_000_000));
    assert_eq!(get("test.i32"), MetaValue::I32(-2_000_000_000));
    assert_eq!(get("test.f32"), MetaValue::F32(0.1));
    assert_eq!(get("test.u64"), MetaValue::U64(1 << 60));
    assert_eq!(get("test.i64"), MetaValue::I64(-(1 << 60)));
    assert_eq!(get("test.f64"), MetaValue::F64(0.1));
    assert_eq!(get("test.bool"), MetaValue::Bool(true));
    assert_eq!(get("test.string").as_str(), Some("héllo ✓"));
    let strings: Vec<_> = get("test.strings")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(strings, ["a", "", "日本"]);
    let ints: Vec<_> = get("test.ints")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(ints, [1, -2, 3]);
    let floats: Vec<_> = get("test.floats")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(floats, [0.5, -1.25]);
    let nested = get("test.nested");
    let nested = nested.as_array().unwrap();
    assert_eq!(nested.len(), 2);
    assert_eq!(
        nested[0]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(get("general.architecture").as_str(), Some("llama"));
}
