//! `model-prep fetch`: a model directory from a Hugging Face Hub repository.
//!
//! Downloads go through the standard Hugging Face cache (`HF_HUB_CACHE`, `HF_HOME`), so files
//! fetched before (by us or by Python's `huggingface_hub`) are not downloaded again, and
//! `HF_HUB_OFFLINE=1` works from that cache alone. `HF_TOKEN` (or the token file of
//! `huggingface-cli login`) is sent for private and gated repositories.
//!
//! hf-hub has no timeouts of its own and retries connection errors several times, so a
//! machine without network could hang for minutes. Before any download we therefore check
//! that the Hub answers at all, with a short connect timeout; when it does not, we use the
//! cache if it has every file, and otherwise stop with an error that says how to work offline.
//!
//! The files are copied (not linked) out of the cache into a staged directory, validated as a
//! model directory, and only then moved to the destination.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use hf_hub::progress::{DownloadEvent, Progress, ProgressEvent, ProgressHandler};
use hf_hub::{HFClient, HFError, HFRepository, RepoTypeModel, split_id};
use indicatif::ProgressBar;
use serde::Deserialize;
use tandem_model::{
    CONFIG_FILE, ConfigError, GENERATION_CONFIG_FILE, ModelConfig, SAFETENSORS_INDEX_FILE,
    TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, read_json,
};

use crate::output::{OutputError, StagedDir};
use crate::progress;
use tandem_model::sentence_transformers::{MODULES_FILE, Module};

/// What to fetch and how.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// `owner/name`.
    pub repo_id: String,
    /// Branch, tag or commit; `main` when `None`.
    pub revision: Option<String>,
    /// Replace a non-empty output directory.
    pub force: bool,
    /// Use only the local cache (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// How long to wait for a TCP connection to the Hub.
    pub connect_timeout: Duration,
}

/// What was fetched.
#[derive(Debug, Clone)]
pub struct FetchSummary {
    pub directory: PathBuf,
    pub config: ModelConfig,
    /// File name and size in bytes, in the order written.
    pub files: Vec<(String, u64)>,
    /// True when the Hub was not contacted (offline mode, or unreachable with everything cached).
    pub from_cache_only: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "cannot reach the Hugging Face Hub at {endpoint} ({reason}), and {repo_id} is not fully in the local cache ({cache_dir}). \
         To work offline, fetch the model once on a machine with network access and reuse its Hugging Face cache with HF_HUB_OFFLINE=1, \
         or use `model-prep default` (the embedded SmolLM2, no network needed), `model-prep import-gguf FILE` or `model-prep random`"
    )]
    Unreachable {
        endpoint: String,
        reason: String,
        repo_id: String,
        cache_dir: PathBuf,
    },
    #[error(
        "offline mode (HF_HUB_OFFLINE): {file} of {repo_id} is not in the local cache {cache_dir}; run once with network access (and without HF_HUB_OFFLINE) to cache it"
    )]
    NotCached {
        repo_id: String,
        file: String,
        cache_dir: PathBuf,
    },
    #[error(
        "repository {repo_id} was not found on the Hub (check the id; private or gated repositories also need HF_TOKEN with access)"
    )]
    RepoNotFound { repo_id: String },
    #[error("revision {revision:?} does not exist in {repo_id}")]
    RevisionNotFound { repo_id: String, revision: String },
    #[error(
        "{repo_id} has no {file} at revision {revision} (is it a model repository with Hugging Face transformers files?)"
    )]
    FileNotFound {
        repo_id: String,
        file: String,
        revision: String,
    },
    #[error(
        "{repo_id} has neither {WEIGHTS_FILE} nor {SAFETENSORS_INDEX_FILE} at revision {revision} (only safetensors weights are supported)"
    )]
    NoSafetensors { repo_id: String, revision: String },
    #[error(
        "access to {repo_id} was refused ({reason}); set HF_TOKEN to a token that has access (gated models must be accepted on their Hub page first)"
    )]
    AccessDenied { repo_id: String, reason: String },
    #[error("downloading {file} from {repo_id} failed: {source}")]
    Hub {
        repo_id: String,
        file: String,
        source: HFError,
    },
    #[error("invalid repository id {0:?} (expected owner/name)")]
    InvalidRepoId(String),
    #[error("{SAFETENSORS_INDEX_FILE} of {repo_id} is invalid: {source}")]
    BadIndex {
        repo_id: String,
        source: ConfigError,
    },
    #[error("the downloaded model is not usable: {0}")]
    Invalid(String),
    #[error("cannot copy {from} into the output directory: {source}")]
    Copy {
        from: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the download runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot set up the Hub client: {0}")]
    Client(String),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Fetches `options.repo_id` into `out`.
pub fn fetch(options: &FetchOptions, out: &Path) -> Result<FetchSummary, FetchError> {
    let (owner, name) = split_id(&options.repo_id);
    if owner.is_empty() || name.is_empty() || name.contains('/') {
        return Err(FetchError::InvalidRepoId(options.repo_id.clone()));
    }
    // Fail on an unusable destination before downloading gigabytes.
    let staged = StagedDir::new(out, options.force)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(FetchError::Runtime)?;
    let downloaded = runtime.block_on(download(options))?;

    let mut files = Vec::new();
    for (file, cached) in &downloaded.files {
        let target = staged.path().join(file);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|source| FetchError::Copy {
                from: cached.clone(),
                source,
            })?;
        }
        let bytes = std::fs::copy(cached, &target).map_err(|source| FetchError::Copy {
            from: cached.clone(),
            source,
        })?;
        files.push((file.clone(), bytes));
    }
    let config = ModelConfig::load(staged.path())?;
    let report =
        crate::inspect::inspect(staged.path()).map_err(|e| FetchError::Invalid(e.to_string()))?;
    if !report.problems.is_empty() {
        return Err(FetchError::Invalid(report.problems.join("; ")));
    }
    let directory = staged.commit()?;
    Ok(FetchSummary {
        directory,
        config,
        files,
        from_cache_only: downloaded.from_cache_only,
    })
}

struct Downloaded {
    /// Name in the repository -> path in the cache.
    files: Vec<(String, PathBuf)>,
    from_cache_only: bool,
}

/// One repository at one revision, and whether to stay off the network.
struct Source {
    repo: HFRepository<RepoTypeModel>,
    repo_id: String,
    revision: Option<String>,
    cache_dir: PathBuf,
    cache_only: bool,
}

async fn download(options: &FetchOptions) -> Result<Downloaded, FetchError> {
    let http = reqwest::Client::builder()
        .connect_timeout(options.connect_timeout)
        .read_timeout(Duration::from_secs(120))
        .user_agent(concat!(
            "model-prep/",
            env!("CARGO_PKG_VERSION"),
            "; hf-hub/1.0"
        ))
        .build()
        .map_err(|e| FetchError::Client(e.to_string()))?;
    let client = HFClient::builder()
        .client(http.clone())
        .retry_max_attempts(2)
        .build()
        .map_err(|e| FetchError::Client(e.to_string()))?;
    let (owner, name) = split_id(&options.repo_id);
    let mut source = Source {
        repo: client.model(owner, name),
        repo_id: options.repo_id.clone(),
        revision: options.revision.clone(),
        cache_dir: client.cache_dir().to_path_buf(),
        cache_only: options.offline,
    };
    if !options.offline
        && let Err(reason) =
            check_reachable(&http, client.endpoint(), options.connect_timeout).await
    {
        tracing::warn!(
            "the Hub at {} is unreachable ({reason}); trying the local cache",
            client.endpoint()
        );
        source.cache_only = true;
        return download_all(&source).await.map_err(|e| match e {
            FetchError::NotCached { .. } => FetchError::Unreachable {
                endpoint: client.endpoint().to_string(),
                reason,
                repo_id: options.repo_id.clone(),
                cache_dir: source.cache_dir.clone(),
            },
            other => other,
        });
    }
    download_all(&source).await
}

/// Whether anything answers at the endpoint (any HTTP status counts as reachable).
async fn check_reachable(
    http: &reqwest::Client,
    endpoint: &str,
    connect_timeout: Duration,
) -> Result<(), String> {
    let request = http.head(endpoint).timeout(connect_timeout * 2).send();
    match request.await {
        Ok(_) => Ok(()),
        Err(e) => Err(root_cause(&e)),
    }
}

/// The innermost error message (reqwest's own is just "error sending request").
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

async fn download_all(source: &Source) -> Result<Downloaded, FetchError> {
    let mut files = Vec::new();
    for file in [CONFIG_FILE, TOKENIZER_FILE] {
        files.push((file.to_string(), get(source, file).await?));
    }
    for file in [GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE] {
        match get(source, file).await {
            Ok(path) => files.push((file.to_string(), path)),
            Err(FetchError::FileNotFound { .. }) => {
                tracing::warn!("{} has no {file}; continuing without it", source.repo_id);
            }
            Err(e) => return Err(e),
        }
    }
    // An embedding model's sentence-transformers modules: how the api-server pools its
    // embeddings (the Pooling module's config beside the list).
    match get(source, MODULES_FILE).await {
        Ok(path) => {
            let modules: Vec<Module> = read_json(&path)
                .map_err(|e| FetchError::Invalid(format!("{MODULES_FILE}: {e}")))?;
            files.push((MODULES_FILE.to_string(), path));
            for module in modules.iter().filter(|m| m.class() == "Pooling") {
                if module.path.contains("..") || module.path.starts_with('/') {
                    return Err(FetchError::Invalid(format!(
                        "{MODULES_FILE} names a module outside the repository: {:?}",
                        module.path
                    )));
                }
                let file = module.config_file();
                files.push((file.clone(), get(source, &file).await?));
            }
        }
        Err(FetchError::FileNotFound { .. }) => {}
        // Offline, a list never cached is taken as absent: most repositories have none, and
        // the api-server then pools as a decoder model's default (last token, normalized).
        Err(FetchError::NotCached { .. }) => {
            tracing::info!(
                "{}: no {MODULES_FILE} in the local cache; continuing without it",
                source.repo_id
            );
        }
        Err(e) => return Err(e),
    }
    match get(source, WEIGHTS_FILE).await {
        Ok(path) => files.push((WEIGHTS_FILE.to_string(), path)),
        Err(FetchError::FileNotFound { .. } | FetchError::NotCached { .. }) => {
            let index_path = match get(source, SAFETENSORS_INDEX_FILE).await {
                Ok(path) => path,
                Err(FetchError::FileNotFound { .. }) => {
                    return Err(FetchError::NoSafetensors {
                        repo_id: source.repo_id.clone(),
                        revision: revision_name(source),
                    });
                }
                Err(FetchError::NotCached { cache_dir, .. }) => {
                    return Err(FetchError::NotCached {
                        repo_id: source.repo_id.clone(),
                        file: format!("{WEIGHTS_FILE} (or {SAFETENSORS_INDEX_FILE})"),
                        cache_dir,
                    });
                }
                Err(e) => return Err(e),
            };
            #[derive(Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let index: Index =
                read_json(&index_path).map_err(|source_error| FetchError::BadIndex {
                    repo_id: source.repo_id.clone(),
                    source: source_error,
                })?;
            files.push((SAFETENSORS_INDEX_FILE.to_string(), index_path));
            let shards: BTreeSet<String> = index.weight_map.into_values().collect();
            for shard in shards {
                if shard.contains('/') || shard.starts_with('.') {
                    return Err(FetchError::Invalid(format!(
                        "{SAFETENSORS_INDEX_FILE} names a shard outside the repository root: {shard:?}"
                    )));
                }
                let path = get(source, &shard).await?;
                files.push((shard, path));
            }
        }
        Err(e) => return Err(e),
    }
    Ok(Downloaded {
        files,
        from_cache_only: source.cache_only,
    })
}

fn revision_name(source: &Source) -> String {
    source.revision.clone().unwrap_or_else(|| "main".into())
}

/// Downloads (or finds in the cache) one file; errors say which file of which repository.
async fn get(source: &Source, file: &str) -> Result<PathBuf, FetchError> {
    tracing::info!("{}: {file}", source.repo_id);
    let bar = progress::bytes_bar(0, file);
    let result = source
        .repo
        .download_file()
        .filename(file)
        .maybe_revision(source.revision.clone())
        .local_files_only(source.cache_only)
        .progress(Progress::new(BarProgress::new(bar.clone())))
        .send()
        .await;
    bar.finish_and_clear();
    result.map_err(|error| classify(source, file, error))
}

fn classify(source: &Source, file: &str, error: HFError) -> FetchError {
    let repo_id = source.repo_id.clone();
    match error {
        HFError::RepoNotFound { .. } => FetchError::RepoNotFound { repo_id },
        HFError::RevisionNotFound { revision, .. } => {
            FetchError::RevisionNotFound { repo_id, revision }
        }
        HFError::EntryNotFound { .. } => FetchError::FileNotFound {
            repo_id,
            file: file.to_string(),
            revision: revision_name(source),
        },
        HFError::LocalEntryNotFound { .. } => FetchError::NotCached {
            repo_id,
            file: file.to_string(),
            cache_dir: source.cache_dir.clone(),
        },
        HFError::AuthRequired { context } | HFError::Forbidden { context } => {
            // The Hub answers 401 for repositories that do not exist, to hide private ones.
            if context.error_code.as_deref() == Some("RepoNotFound") {
                FetchError::RepoNotFound { repo_id }
            } else if context.error_code.as_deref() == Some("RevisionNotFound") {
                FetchError::RevisionNotFound {
                    repo_id,
                    revision: revision_name(source),
                }
            } else {
                let reason = context
                    .server_message
                    .clone()
                    .unwrap_or_else(|| format!("HTTP {}", context.status));
                FetchError::AccessDenied { repo_id, reason }
            }
        }
        HFError::Request {
            source: ref request_error,
            ..
        } if request_error.is_connect() || request_error.is_timeout() => FetchError::Unreachable {
            endpoint: request_error
                .url()
                .map(|u| u.origin().ascii_serialization())
                .unwrap_or_default(),
            reason: root_cause(request_error),
            repo_id,
            cache_dir: source.cache_dir.clone(),
        },
        other => FetchError::Hub {
            repo_id,
            file: file.to_string(),
            source: other,
        },
    }
}

/// Shows hf-hub's download events on an indicatif byte bar.
struct BarProgress {
    bar: ProgressBar,
    /// Bytes done per file: hf-hub reports per-file deltas.
    done: Mutex<BTreeMap<String, u64>>,
}

impl BarProgress {
    fn new(bar: ProgressBar) -> Self {
        BarProgress {
            bar,
            done: Mutex::new(BTreeMap::new()),
        }
    }
}

impl ProgressHandler for BarProgress {
    fn on_progress(&self, event: &ProgressEvent) {
        let ProgressEvent::Download(event) = event else {
            return;
        };
        match event {
            DownloadEvent::Start { total_bytes, .. } => self.bar.set_length(*total_bytes),
            DownloadEvent::Progress { files } => {
                // A poisoned lock only means an earlier callback panicked; the counts are
                // still usable for a progress bar.
                let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
                for file in files {
                    done.insert(file.filename.clone(), file.bytes_completed);
                }
                self.bar.set_position(done.values().sum());
            }
            DownloadEvent::AggregateProgress {
                bytes_completed, ..
            } => self.bar.set_position(*bytes_completed),
            DownloadEvent::Complete => self.bar.finish_and_clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(repo_id: &str) -> FetchOptions {
        FetchOptions {
            repo_id: repo_id.into(),
            revision: None,
            force: false,
            offline: true,
            connect_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn repo_id_must_have_an_owner() {
        let root = tempfile::tempdir().unwrap();
        let err = fetch(&options("gpt2"), &root.path().join("m")).unwrap_err();
        assert!(matches!(err, FetchError::InvalidRepoId(_)), "{err}");
    }

    #[test]
    fn root_cause_is_the_innermost_message() {
        let inner = std::io::Error::other("connection refused");
        let outer = FetchError::Copy {
            from: "x".into(),
            source: inner,
        };
        assert_eq!(root_cause(&outer), "connection refused");
    }
}
