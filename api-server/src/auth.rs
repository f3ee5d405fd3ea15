//! API keys: with any configured (`--api-key`, `TANDEM_API_KEY`, `--api-key-file`), every
//! `/v1` request must send `Authorization: Bearer <key>`; anything else gets 401 with an
//! OpenAI-shaped error body before a route runs. `/health` stays open for probes, `/metrics`
//! too unless `--metrics-require-key`. Keys are compared in constant time and never logged.
//!
//! With `--cache-salt-by-api-key`, a request is also given its key's [`TenantSalt`], which
//! salts its prompt in the workers' prefix caches: clients of different keys never share
//! cached blocks, so none can learn (by timing) what another has sent.

use std::path::Path;

use actix_web::HttpMessage;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::AUTHORIZATION;
use actix_web::middleware::Next;
use actix_web::web;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tandem_cli::args::ApiKey;

use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::metrics::Event;
use crate::state::AppState;

/// The keys a request may present, and which paths need one.
pub struct ApiKeys {
    keys: Vec<ApiKey>,
    metrics_require_key: bool,
    /// Each key's cache salt, in the order of `keys`, when requests are salted by key.
    salts: Option<Vec<TenantSalt>>,
    /// Each key's owner name, in the order of `keys`.
    owners: Vec<KeyOwner>,
}

/// Who a request's API key makes it (a request extension, set whenever keys are configured):
/// a digest of the key, never the key. What a key stores (the Responses API's responses)
/// only the same key finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOwner(pub String);

impl KeyOwner {
    fn of(key: &ApiKey) -> Self {
        KeyOwner(key_digest(b"tandem response owner\0", key))
    }
}

/// The first 16 bytes of SHA-256 over `domain` and `key`, in hex: a name of the key for one
/// use (`domain`), from which neither the key nor its names for other uses can be read.
fn key_digest(domain: &[u8], key: &ApiKey) -> String {
    let digest = Sha256::new()
        .chain_update(domain)
        .chain_update(key.as_bytes())
        .finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The prefix-cache salt of the API key a request came with (a request extension): a digest of
/// the key, never the key, since it travels in job messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSalt(pub String);

impl TenantSalt {
    fn of(key: &ApiKey) -> Self {
        TenantSalt(format!(
            "key:{}",
            key_digest(b"tandem prefix-cache salt\0", key)
        ))
    }

    /// The salt of a request that also sent `cache_salt` (`None`: it did not): the key's salt
    /// first, so that no request salt can name another key's cache.
    pub fn with_request_salt(&self, request: Option<&str>) -> String {
        match request {
            Some(salt) => format!("{}/{salt}", self.0),
            None => self.0.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read the API key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the API key file {path}, line {line}: {reason}")]
    Invalid {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("the API key file {path} holds no key")]
    Empty { path: String },
    #[error(
        "--cache-salt-by-api-key salts the prefix caches by API key, and none is configured: \
         set --api-key, TANDEM_API_KEY or --api-key-file, or leave it out"
    )]
    SaltWithoutKeys,
}

impl ApiKeys {
    /// The configured keys; `None` when there are none (every request is served).
    pub fn from_config(config: &ServerConfig) -> Result<Option<ApiKeys>, KeyFileError> {
        let mut keys = config.api_keys.clone();
        if let Some(path) = &config.api_key_file {
            keys.extend(read_key_file(path)?);
        }
        if keys.is_empty() && config.cache_salt_by_api_key {
            return Err(KeyFileError::SaltWithoutKeys);
        }
        let salts = config
            .cache_salt_by_api_key
            .then(|| keys.iter().map(TenantSalt::of).collect());
        Ok((!keys.is_empty()).then_some(ApiKeys {
            owners: keys.iter().map(KeyOwner::of).collect(),
            keys,
            metrics_require_key: config.metrics_require_key,
            salts,
        }))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `path` needs a key: the API, and vLLM's tokenizer routes beside it.
    fn guards(&self, path: &str) -> bool {
        path == "/v1"
            || path.starts_with("/v1/")
            || path == "/tokenize"
            || path == "/detokenize"
            || (self.metrics_require_key && path == "/metrics")
    }

    /// Which key `authorization` (the header's value) presents as `Bearer <key>`, if any.
    /// Every key is compared, each in constant time, so the time taken says nothing about
    /// which one came close.
    fn admits(&self, authorization: Option<&[u8]>) -> Option<usize> {
        let token = authorization.and_then(bearer_token)?;
        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, key) in self.keys.iter().enumerate() {
            let matches = key.as_bytes().ct_eq(token);
            index.conditional_assign(&(i as u64), matches);
            found |= matches;
        }
        bool::from(found).then_some(index as usize)
    }

    /// The cache salt of key `index`, when requests are salted by key.
    fn salt(&self, index: usize) -> Option<&TenantSalt> {
        self.salts.as_ref().map(|salts| &salts[index])
    }
}

/// The token of `Bearer <token>` (the scheme in any case, as RFC 7235 allows).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

fn read_key_file(path: &Path) -> Result<Vec<ApiKey>, KeyFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: shown.clone(),
        source,
    })?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        keys.push(ApiKey::parse(line).map_err(|reason| KeyFileError::Invalid {
            path: shown.clone(),
            line: i + 1,
            reason,
        })?);
    }
    if keys.is_empty() {
        return Err(KeyFileError::Empty { path: shown });
    }
    Ok(keys)
}

/// The middleware: a guarded path without a valid key ends here with 401.
pub async fn require_key(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if let Some(keys) = request.app_data::<web::Data<ApiKeys>>()
        && keys.guards(request.path())
    {
        let header = request.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
        let Some(key) = keys.admits(header) else {
            if let Some(state) = request.app_data::<web::Data<AppState>>() {
                state.metrics.record(Event::Unauthorized);
            }
            tracing::info!(path = request.path(), peer = ?request.peer_addr(),
                key_sent = header.is_some(), "refused: no valid API key");
            return Err(ApiError::Unauthorized.into());
        };
        if let Some(salt) = keys.salt(key).cloned() {
            request.extensions_mut().insert(salt);
        }
        request.extensions_mut().insert(keys.owners[key].clone());
    }
    next.call(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[&str], metrics_require_key: bool) -> ApiKeys {
        let keys: Vec<ApiKey> = list.iter().map(|k| ApiKey::parse(k).unwrap()).collect();
        ApiKeys {
            owners: keys.iter().map(KeyOwner::of).collect(),
            keys,
            metrics_require_key,
            salts: None,
        }
    }

    #[test]
    fn only_a_bearer_of_a_configured_key_is_admitted() {
        let k = keys(&["sk-a", "sk-bb"], false);
        assert_eq!(k.admits(Some(b"Bearer sk-a")), Some(0));
        assert_eq!(k.admits(Some(b"bearer sk-bb")), Some(1));
        assert_eq!(k.admits(Some(b"BEARER  sk-bb ")), Some(1));
        for refused in [
            &b"Bearer sk-b"[..],
            b"Bearer sk-a2",
            b"Bearer ",
            b"Basic sk-a",
            b"sk-a",
            b"",
        ] {
            assert_eq!(
                k.admits(Some(refused)),
                None,
                "{:?}",
                String::from_utf8_lossy(refused)
            );
        }
        assert_eq!(k.admits(None), None);
    }

    #[test]
    fn each_key_has_its_own_salt_which_does_not_show_the_key() {
        let (a, b) = (
            ApiKey::parse("sk-tenant-a").unwrap(),
            ApiKey::parse("sk-tenant-b").unwrap(),
        );
        let (salt_a, salt_b) = (TenantSalt::of(&a), TenantSalt::of(&b));
        // A key's owner name is a digest of its own, apart from its salt.
        assert_ne!(KeyOwner::of(&a), KeyOwner::of(&b));
        assert!(!salt_a.0.contains(&KeyOwner::of(&a).0));
        assert_ne!(salt_a, salt_b);
        assert_eq!(salt_a, TenantSalt::of(&a), "the same key, the same salt");
        assert!(!salt_a.0.contains("tenant"), "{}", salt_a.0);
        // A request's own salt goes after its key's, so no request salt names another key's
        // cache.
        assert_eq!(salt_a.with_request_salt(None), salt_a.0);
        assert_eq!(
            salt_a.with_request_salt(Some("s")),
            format!("{}/s", salt_a.0)
        );
        assert_ne!(
            salt_a.with_request_salt(Some("s")),
            salt_b.with_request_salt(Some("s"))
        );
    }

    #[test]
    fn v1_is_guarded_health_never_metrics_by_option() {
        let open_metrics = keys(&["k"], false);
        assert!(open_metrics.guards("/v1/chat/completions"));
        assert!(open_metrics.guards("/v1/models"));
        assert!(open_metrics.guards("/v1"));
        assert!(open_metrics.guards("/tokenize"));
        assert!(open_metrics.guards("/detokenize"));
        assert!(!open_metrics.guards("/health"));
        assert!(!open_metrics.guards("/metrics"));
        assert!(!open_metrics.guards("/v10"));
        assert!(keys(&["k"], true).guards("/metrics"));
    }

    #[test]
    fn key_files_skip_comments_and_refuse_bad_lines() {
        let dir = std::env::temp_dir().join(format!("tandem-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, "# team a\nsk-a\n\n  sk-b  \n").unwrap();
        let read: Vec<String> = read_key_file(&good)
            .unwrap()
            .iter()
            .map(|k| k.expose().to_string())
            .collect();
        assert_eq!(read, ["sk-a", "sk-b"]);
        let bad = dir.join("bad");
        std::fs::write(&bad, "sk-a\nsk b\n").unwrap();
        let err = read_key_file(&bad).unwrap_err().to_string();
        assert!(err.contains("line 2") && !err.contains("sk b"), "{err}");
        let empty = dir.join("empty");
        std::fs::write(&empty, "# nothing yet\n").unwrap();
        assert!(matches!(
            read_key_file(&empty),
            Err(KeyFileError::Empty { .. })
        ));
        assert!(matches!(
            read_key_file(&dir.join("missing")),
            Err(KeyFileError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
