//! `import_gguf` on bad input: every case fails with a message naming the problem, and leaves
//! no output directory (nor a staging directory) behind. Fixtures come from
//! `scripts/fixtures/gguf_tiny.py`.

use std::path::{Path, PathBuf};

use model_prep::import::{ImportError, ImportOptions, import_gguf};
use tandem_model::WeightDType;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

const OPTIONS: ImportOptions = ImportOptions {
    dtype: WeightDType::Bf16,
    force: false,
    keep_quant: false,
};

/// Imports `gguf` into `root/model`, expects failure, checks nothing was left in `root`
/// besides what `keep` names, and returns the message.
fn import_fails(gguf: &Path, root: &Path, keep: &[&str]) -> String {
    let out = root.join("model");
    let err: ImportError = import_gguf(gguf, &out, &OPTIONS).expect_err("import should fail");
    let left: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !keep.contains(&name.as_str()))
        .collect();
    assert!(
        left.is_empty(),
        "left behind after a failed import: {left:?} ({err})"
    );
    err.to_string()
}

/// A copy of tiny.gguf, changed by `edit`, in `dir`.
fn edited(dir: &Path, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(fixture("tiny.gguf")).unwrap();
    edit(&mut bytes);
    let path = dir.join("edited.gguf");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn truncated_file() {
    let inputs = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    // Cut inside the tensor data: the table is intact, the last tensor's bytes are not.
    let gguf = edited(inputs.path(), |b| b.truncate(b.len() - 100));
    let msg = import_fails(&gguf, root.path(), &[]);
    assert!(msg.contains("edited.gguf"), "{msg}");
    assert!(
        msg.contains("past the end of the file") && msg.contains("truncated"),
        "{msg}"
    );

    // Cut inside the metadata.
    let gguf = edited(inputs.path(), |b| b.truncate(300));
    let msg = import_fails(&gguf, root.path(), &[]);
    assert!(msg.contains("truncated file"), "{msg}");

    // Empty file.
    let gguf = edited(inputs.path(), |b| b.clear());
    let msg = import_fails(&gguf, root.path(), &[]);
    assert!(msg.contains("not a GGUF file"), "{msg}");
}

#[test]
fn corrupt_magic_and_version() {
    let inputs = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let gguf = edited(inputs.path(), |b| b[..4].copy_from_slice(b"GGML"));
    let msg = import_fails(&gguf, root.path(), &[]);
    assert!(msg.contains("bad magic"), "{msg}");

    let gguf = edited(inputs.path(), |b| {
        b[4..8].copy_from_slice(&7u32.to_le_bytes())
    });
    let msg = import_fails(&gguf, root.path(), &[]);
    assert!(msg.contains("unsupported GGUF version 7"), "{msg}");

    // An absurd tensor count must be refused, not allocated.
    let gguf = edited(inputs.path(), |b| {
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes())
    });
    let msg = import_fails(&gguf, root.path(), &[]);
    assert!(msg.contains("tensor count"), "{msg}");
}

/// The byte offset of tensor `name`'s ggml type in a GGUF file's tensor table: its name
/// (after a u64 length), then u32 dimensions, that many u64 sizes, the u32 type.
fn type_offset(bytes: &[u8], name: &str) -> usize {
    let at = bytes
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .unwrap_or_else(|| panic!("{name} not in the file"));
    let dims_at = at + name.len();
    let dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().unwrap()) as usize;
    dims_at + 4 + 8 * dims
}

#[test]
fn unsupported_tensor_type() {
    let inputs = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    // blk.0.ffn_up.weight as MXFP4 (id 39: 17 bytes a block of 32, within the Q8_0 data).
    let gguf = edited(inputs.path(), |b| {
        let at = type_offset(b, "blk.0.ffn_up.weight");
        assert_eq!(b[at..at + 4], 8u32.to_le_bytes(), "Q8_0 in the fixture");
        b[at..at + 4].copy_from_slice(&39u32.to_le_bytes());
    });
    let msg = import_fails(&gguf, root.path(), &[]);
    assert!(
        msg.contains("blk.0.ffn_up.weight") && msg.contains("MXFP4"),
        "{msg}"
    );
}

#[test]
fn a_q5_1_tensor_among_q8_0_ones_is_dequantized_or_kept() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("model");
    let summary = import_gguf(&fixture("tiny_q5_1.gguf"), &out, &OPTIONS).unwrap();
    assert_eq!(summary.source_types.get("Q5_1"), Some(&1));
    assert!(summary.config.gguf_quant().is_none());
    let kept = root.path().join("kept");
    let options = ImportOptions {
        keep_quant: true,
        ..OPTIONS
    };
    let summary = import_gguf(&fixture("tiny_q5_1.gguf"), &kept, &options).unwrap();
    let types = summary.config.gguf_quant().unwrap().tensor_types;
    assert_eq!(
        types.get("model.layers.0.mlp.up_proj.weight"),
        Some(&tandem_model::GgufQuant::Q5_1)
    );
    assert!(summary.dequantized_quant_types.is_empty());
}

#[test]
fn unknown_architecture() {
    let root = tempfile::tempdir().unwrap();
    let msg = import_fails(&fixture("tiny_unknown_arch.gguf"), root.path(), &[]);
    assert!(msg.contains("unknown architecture \"gptneox\""), "{msg}");
}

#[test]
fn missing_tokenizer_metadata() {
    let root = tempfile::tempdir().unwrap();
    let msg = import_fails(&fixture("tiny_no_tokenizer.gguf"), root.path(), &[]);
    assert!(
        msg.contains("no tokenizer") && msg.contains("tokenizer.ggml.model"),
        "{msg}"
    );
}

#[test]
fn non_empty_output_directory_without_force() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("model");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let msg = import_fails(&fixture("tiny.gguf"), root.path(), &["model"]);
    assert!(
        msg.contains("not empty") && msg.contains("--force"),
        "{msg}"
    );
    let entries: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    assert_eq!(entries.len(), 1, "the existing directory is untouched");
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn unwritable_output_directory() {
    // A parent that is a file cannot hold a directory, whoever runs the test.
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("blocker"), "x").unwrap();
    let out = root.path().join("blocker").join("model");
    let err = import_gguf(&fixture("tiny.gguf"), &out, &OPTIONS).expect_err("must fail");
    let msg = err.to_string();
    assert!(msg.contains("cannot create a staging directory"), "{msg}");
    assert!(msg.contains("blocker/model"), "{msg}");
    assert!(!out.exists());

    // A read-only parent (only meaningful when the test is not run as root).
    use std::os::unix::fs::PermissionsExt;
    let parent = root.path().join("readonly");
    std::fs::create_dir(&parent).unwrap();
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o555)).unwrap();
    let root_bypasses_permissions = std::fs::write(parent.join("probe"), "x").is_ok();
    if !root_bypasses_permissions {
        let err = import_gguf(&fixture("tiny.gguf"), &parent.join("model"), &OPTIONS)
            .expect_err("must fail");
        assert!(err.to_string().contains("staging directory"), "{err}");
        assert_eq!(std::fs::read_dir(&parent).unwrap().count(), 0);
    }
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).unwrap();
}
