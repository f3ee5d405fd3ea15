//! Which model directory to serve: `--model`, else the config's `model`, else the embedded
//! default model (SmolLM2-135M-Instruct), prepared once into the cache by model-prep's library
//! (idempotent: a prepared directory is used as is, without looking for the wheel).
//!
//! Every directory is inspected before any process starts, so a wrong path is one clear
//! error instead of a worker and an api-server failing side by side.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use model_prep::default_model::{self, DefaultOptions, DefaultOutcome};
use model_prep::import::{ImportOptions, import_gguf};
use model_prep::safetensors_writer::WeightDType;
use tandem_protocol::config::DeploymentConfig;

/// The default model's served name; also its directory under `<cache>/models/` in bf16.
pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct";
/// The default model's directory under `<cache>/models/` with its GGUF blocks kept.
pub const DEFAULT_KEPT_DIR_NAME: &str = "SmolLM2-135M-Instruct-gguf";

/// Which form of the default model to prepare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultForm {
    /// The GGUF's Q4_1 and Q8_0 blocks as they are, for CPU workers: twice the bf16 decode
    /// speed in three quarters of the memory, the dequantized weights' results
    /// (docs/benchmarks.md).
    KeptBlocks,
    /// Dequantized to bf16: what a GPU or a tensor-parallel group loads.
    Bf16,
}

impl DefaultForm {
    /// Kept blocks where every worker of the deployment runs on the CPU unsplit (the CPU
    /// backend alone multiplies GGUF blocks, and not over ranks), else bf16.
    pub fn for_deployment(config: Option<&DeploymentConfig>) -> Self {
        let Some(config) = config else {
            return DefaultForm::KeptBlocks;
        };
        let groups = [&config.context_servers, &config.generation_servers];
        let cpu_only = groups.iter().all(|group| {
            group.tensor_parallel_size.unwrap_or(1) <= 1
                && (0..group.instances()).all(|i| group.device_of(i) == "cpu")
        });
        if cpu_only {
            DefaultForm::KeptBlocks
        } else {
            DefaultForm::Bf16
        }
    }
}

/// The model to serve.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub dir: PathBuf,
    /// The default model's own name, served unless the flag or config names one (its
    /// directory name could be anything a cache symlink points at).
    pub default_served_name: Option<&'static str>,
}

/// The model to serve; `None` for both means the default model, in `form`.
pub async fn resolve(
    flag: Option<&Path>,
    config: Option<&str>,
    form: DefaultForm,
) -> anyhow::Result<Model> {
    let model = match (flag, config) {
        (Some(dir), _) => Model {
            dir: dir.to_path_buf(),
            default_served_name: None,
        },
        (None, Some(dir)) => Model {
            dir: PathBuf::from(dir),
            default_served_name: None,
        },
        (None, None) => Model {
            dir: tokio::task::spawn_blocking(move || prepare_default_model(form))
                .await
                .context("the default-model preparation panicked")??,
            default_served_name: Some(DEFAULT_MODEL_NAME),
        },
    };
    check(&model.dir)?;
    Ok(model)
}

/// Fails with the reason when `dir` is not a model directory a worker can load.
fn check(dir: &Path) -> anyhow::Result<()> {
    let report = model_prep::inspect::inspect(dir).with_context(|| {
        let hint = if looks_like_hub_id(dir) {
            format!(
                " ({} looks like a Hugging Face repo id: download it with `model-prep fetch {} \
                 -o DIR` and serve DIR)",
                dir.display(),
                dir.display()
            )
        } else {
            String::new()
        };
        format!("model directory {}{hint}", dir.display())
    })?;
    if !report.problems.is_empty() {
        bail!(
            "model directory {} is not usable: {} (prepare one with `model-prep`)",
            dir.display(),
            report.problems.join("; ")
        );
    }
    Ok(())
}

/// `org/name` that is not a directory here: what TensorRT-LLM configs put in `model`.
fn looks_like_hub_id(path: &Path) -> bool {
    let text = path.to_string_lossy();
    !path.exists()
        && !text.starts_with(['/', '.', '~'])
        && text.split('/').filter(|part| !part.is_empty()).count() == 2
}

/// `<cache>/models/SmolLM2-135M-Instruct-gguf` (blocks kept) or
/// `<cache>/models/SmolLM2-135M-Instruct` (bf16), importing it on first use as `model-prep
/// default [--keep-quant]` does. The cache is `TANDEM_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/tandem` or `~/.cache/tandem`; `TANDEM_SMOLLM2_WHEEL` and `TANDEM_PYTHON`
/// are model-prep's.
fn prepare_default_model(form: DefaultForm) -> anyhow::Result<PathBuf> {
    let cache_dir = match std::env::var_os("TANDEM_CACHE_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => default_model::default_cache_dir()?,
    };
    let keep_quant = form == DefaultForm::KeptBlocks;
    let out = cache_dir.join("models").join(if keep_quant {
        DEFAULT_KEPT_DIR_NAME
    } else {
        DEFAULT_MODEL_NAME
    });
    let options = DefaultOptions {
        dtype: WeightDType::Bf16,
        keep_quant,
        wheel: std::env::var_os("TANDEM_SMOLLM2_WHEEL")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
        cache_dir,
        python: std::env::var("TANDEM_PYTHON").unwrap_or_else(|_| "python3".into()),
        force: false,
    };
    tracing::info!(
        "no model given (--model or the config's `model`): using the default model, {DEFAULT_MODEL_NAME}, {}, in {}",
        match form {
            DefaultForm::KeptBlocks => "its GGUF blocks kept (every worker on the CPU)",
            DefaultForm::Bf16 => "in bf16 (GPU or tensor-parallel workers)",
        },
        out.display()
    );
    let started = Instant::now();
    let outcome = default_model::prepare_default(&options, &out, |gguf, dir, dtype| {
        tracing::info!(
            "importing {} (first run only; later runs reuse it)",
            gguf.display()
        );
        import_gguf(
            gguf,
            dir,
            &ImportOptions {
                dtype,
                force: false,
                keep_quant,
            },
        )
        .map(|summary| format!("{} tensors", summary.tensor_count))
    })
    .with_context(|| {
        format!(
            "cannot prepare the default model {DEFAULT_MODEL_NAME} in {} (or pass --model DIR)",
            out.display()
        )
    })?;
    match outcome {
        DefaultOutcome::UpToDate { directory } => {
            tracing::debug!("{} is up to date", directory.display());
            Ok(directory)
        }
        DefaultOutcome::Imported {
            directory, details, ..
        } => {
            tracing::info!(
                "prepared {} ({details}) in {:.1} s",
                directory.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(directory)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn the_flag_wins_and_a_missing_directory_is_named() {
        let err = resolve(
            Some(Path::new("/no/such/model")),
            Some("/other"),
            DefaultForm::KeptBlocks,
        )
        .await
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("/no/such/model"), "{text}");
        assert!(!text.contains("/other"), "{text}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_hub_id_gets_a_fetch_hint() {
        let err = resolve(
            None,
            Some("TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
            DefaultForm::KeptBlocks,
        )
        .await
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("model-prep fetch TinyLlama/TinyLlama-1.1B-Chat-v1.0 -o DIR"),
            "{text}"
        );
        assert!(!looks_like_hub_id(Path::new("/abs/path")));
        assert!(!looks_like_hub_id(Path::new("models")));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_directory_without_config_is_refused() {
        let dir = std::env::temp_dir();
        let err = resolve(None, Some(dir.to_str().unwrap()), DefaultForm::Bf16)
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("config.json"), "{err:#}");
    }

    #[test]
    fn the_default_keeps_its_blocks_where_every_worker_is_an_unsplit_cpu_one() {
        let form = |yaml: &str| {
            DefaultForm::for_deployment(Some(&DeploymentConfig::parse(yaml, "c.yaml").unwrap()))
        };
        assert_eq!(DefaultForm::for_deployment(None), DefaultForm::KeptBlocks);
        assert_eq!(
            form("context_servers: { num_instances: 2 }"),
            DefaultForm::KeptBlocks
        );
        assert_eq!(
            form("context_servers: { num_instances: 0 }\ngeneration_servers: { device: cpu }"),
            DefaultForm::KeptBlocks
        );
        assert_eq!(
            form("generation_servers: { num_instances: 2, device: [cpu, \"cuda:0\"] }"),
            DefaultForm::Bf16
        );
        assert_eq!(
            form("context_servers: { device: \"cuda:0\" }"),
            DefaultForm::Bf16
        );
        assert_eq!(
            form("generation_servers: { tensor_parallel_size: 2 }"),
            DefaultForm::Bf16
        );
    }
}
