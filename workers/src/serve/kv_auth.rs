//! Authenticated KV handles: the deployment's KV secret, and the MAC a context worker puts on
//! each handle it exports and a decode worker checks before it reads or allocates anything.
//!
//! A handle names memory of a context worker (its UCX address and remote key, or its CUDA IPC
//! allocation, and regions in it) that a decode worker copies into a request's sequence. The
//! bus carries handles in `kv_ready` and in decode jobs, and whoever can publish a job can put
//! any handle in it: a job for request B whose handle names request A's export would make B's
//! output continue A's prompt. The transports do not keep a reader within the regions a handle
//! names (UCX over shared memory, cma or tcp reads whatever the exporter registered, which is
//! its whole transfer pool), so the decode worker must decide before it reads.
//!
//! The context worker signs each handle: HMAC-SHA256 under the deployment's secret over a
//! [`Canonical`] encoding of the handle and of the request it was exported for (request id,
//! stream subject, a digest of the prompt). The decode worker computes the same encoding
//! from the handle and from the job that carries it, and compares in constant time. So a
//! handle is honoured only as its context worker made it, and only for the request it was
//! made for: altered, forged, or moved into another request's job, it fails.
//!
//! The secret is the deployment's (every context and decode worker holds the same one):
//! `TANDEM_KV_SECRET`, or a file (`--kv-secret-file`, `TANDEM_KV_SECRET_FILE`), never a flag's
//! value (every local user reads command lines in `ps`). `tandem serve` makes a fresh one per
//! deployment.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tandem_protocol::messages::{
    CudaIpcSource, GenerateJob, KvHandle, KvLayoutSpec, KvRegion, KvSeal, TokenEvent,
};
use thiserror::Error;

use crate::transfer::{from_hex, to_hex};

/// The environment variable holding the secret itself (`tandem serve` hands its children the
/// deployment's this way).
pub use tandem_cli::args::KV_SECRET_VAR;

/// The shortest secret taken, in bytes: 32 hex digits are 128 bits. A MAC of a handle seen on
/// the bus must not let anyone search the secret out.
pub const MIN_SECRET_BYTES: usize = 32;

/// Bytes of an HMAC-SHA256 tag (64 hex digits on the wire).
const MAC_BYTES: usize = 32;

/// The first bytes of every encoding: a MAC of a KV handle is never valid for anything else,
/// nor for another version of the encoding (v2 added the seal).
const DOMAIN: &[u8] = b"tandem kv handle v2";

type HmacSha256 = Hmac<Sha256>;

/// The deployment's KV secret. Its `Debug` does not show it.
pub struct KvSecret(Vec<u8>);

impl std::fmt::Debug for KvSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KvSecret(..)")
    }
}

#[derive(Debug, Error)]
pub enum KvSecretError {
    #[error("reading the KV secret from {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the KV secret in {origin} is {len} bytes long; it needs at least {MIN_SECRET_BYTES} \
         (e.g. `openssl rand -hex 32`), the same on every context and decode worker"
    )]
    TooShort { origin: String, len: usize },
}

/// Why a handle's MAC does not authenticate it for a job.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MacError {
    #[error(
        "the handle carries no MAC, and this worker authenticates KV handles (a context worker \
         without the deployment's KV secret, or a forged handle)"
    )]
    Missing,
    #[error("the handle's MAC is not {} hex digits", 2 * MAC_BYTES)]
    Malformed,
    #[error(
        "the handle's MAC does not verify for request {request_id}: the handle was altered or \
         forged, made for another request, or signed with another KV secret"
    )]
    Mismatch { request_id: String },
}

impl KvSecret {
    /// The secret from `file` (`--kv-secret-file`, `TANDEM_KV_SECRET_FILE`), else from
    /// [`KV_SECRET_VAR`] as `env` reads it; `None` when neither is set. Surrounding
    /// whitespace (a file's newline) is not part of it; one shorter than
    /// [`MIN_SECRET_BYTES`], empty included, is an error rather than no authentication.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, KvSecretError> {
        let (text, origin) = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| KvSecretError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                (text, path.display().to_string())
            }
            None => match env(KV_SECRET_VAR) {
                Some(text) => (text, KV_SECRET_VAR.to_string()),
                None => return Ok(None),
            },
        };
        let secret = text.trim().as_bytes().to_vec();
        if secret.len() < MIN_SECRET_BYTES {
            return Err(KvSecretError::TooShort {
                origin,
                len: secret.len(),
            });
        }
        Ok(Some(KvSecret(secret)))
    }

    fn hmac(&self, canonical: &Canonical) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(&canonical.0);
        mac
    }

    /// The MAC of `canonical`, hex: what [`KvHandle::mac`] carries.
    pub fn mac(&self, canonical: &Canonical) -> String {
        to_hex(&self.hmac(canonical).finalize().into_bytes())
    }

    /// Signs `handle` for the request of `binding` (sets its `mac`).
    pub fn sign(&self, handle: &mut KvHandle, binding: &HandleBinding<'_>) {
        handle.mac = self.mac(&Canonical::of(handle, binding));
    }

    /// Whether `mac` (hex, as a handle carries it) is the MAC of `canonical`, compared in
    /// constant time.
    pub fn verify(
        &self,
        canonical: &Canonical,
        mac: &str,
        binding: &HandleBinding<'_>,
    ) -> Result<(), MacError> {
        if mac.is_empty() {
            return Err(MacError::Missing);
        }
        let tag = from_hex(mac)
            .ok()
            .filter(|tag| tag.len() == MAC_BYTES)
            .ok_or(MacError::Malformed)?;
        self.hmac(canonical)
            .verify_slice(&tag)
            .map_err(|_| MacError::Mismatch {
                request_id: binding.request_id.to_owned(),
            })
    }
}

/// The request a handle is exported for and read into: the prefill job's, at the context
/// worker, and the decode job's, at the decode worker (the api-server sends the same request
/// id, stream subject and prompt in both).
#[derive(Debug, Clone, Copy)]
pub struct HandleBinding<'a> {
    pub request_id: &'a str,
    /// Where the tokens go: a handle moved to a job whose stream someone else reads fails.
    pub stream_subject: &'a str,
    /// The tokens whose K/V the export holds.
    pub prompt_ids: &'a [u32],
}

impl<'a> HandleBinding<'a> {
    pub fn of(job: &'a GenerateJob) -> Self {
        HandleBinding {
            request_id: &job.request_id,
            stream_subject: &job.stream_subject,
            prompt_ids: &job.prompt_ids,
        }
    }
}

/// The bytes a handle's MAC covers: a fixed label, the [`HandleBinding`], then every field of
/// the handle a reader acts on, in a fixed order. Strings and byte strings are prefixed with
/// their length, numbers are 8 bytes little-endian, an absent option is one 0 byte and a
/// present one a 1 byte before its value: two different handles never encode alike.
///
/// The handle is destructured field by field, so a field added to [`KvHandle`] (or to its
/// layout, region, token or CUDA IPC types) does not compile here until it is encoded or said
/// to be left out.
pub struct Canonical(Vec<u8>);

impl Canonical {
    pub fn of(handle: &KvHandle, binding: &HandleBinding<'_>) -> Self {
        let KvHandle {
            worker_id,
            model_fingerprint,
            backend,
            address,
            rkey,
            blocks,
            layout,
            num_tokens,
            first_token,
            seed,
            expires_unix_ms,
            cuda_ipc,
            cuda_ipc_ranks,
            seal,
            // What is signed.
            mac: _,
        } = handle;
        let mut out = Encoder(Vec::with_capacity(256 + 16 * blocks.len()));
        out.bytes(DOMAIN);
        out.str(binding.request_id);
        out.str(binding.stream_subject);
        out.bytes(&prompt_digest(binding.prompt_ids));
        out.str(worker_id);
        out.str(model_fingerprint);
        out.str(backend.as_str());
        out.str(address);
        out.str(rkey);
        out.u64(blocks.len() as u64);
        for &KvRegion { addr, len } in blocks {
            out.u64(addr);
            out.u64(len);
        }
        let KvLayoutSpec {
            num_layers,
            num_kv_heads,
            head_dim,
            block_size,
            dtype,
            block_bytes,
        } = layout;
        for n in [*num_layers, *num_kv_heads, *head_dim, *block_size] {
            out.u64(n.into());
        }
        out.str(dtype.as_str());
        out.u64(*block_bytes);
        out.u64((*num_tokens).into());
        let TokenEvent {
            id,
            text,
            // Reported to the client, never acted on, and only on the stream the MAC binds;
            // floats are left out because their decimal text on the wire need not read back
            // to the same bits.
            logprob: _,
            top_logprobs: _,
        } = first_token;
        out.u64((*id).into());
        out.str(text);
        out.u64(*seed);
        out.u64(*expires_unix_ms);
        match cuda_ipc.as_deref() {
            None => out.0.push(0),
            Some(source) => {
                out.0.push(1);
                out.cuda_ipc_source(source);
            }
        }
        out.u64(cuda_ipc_ranks.len() as u64);
        for source in cuda_ipc_ranks {
            out.cuda_ipc_source(source);
        }
        match seal {
            None => out.0.push(0),
            Some(KvSeal { addr, nonce }) => {
                out.0.push(1);
                out.u64(*addr);
                out.str(nonce);
            }
        }
        Canonical(out.0)
    }

    /// SHA-256 of the encoding: one handle for one request (a decode worker remembers the
    /// handles it has taken by it, signed or not).
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(&self.0).into()
    }
}

/// SHA-256 of the prompt's token ids (4 bytes little-endian each).
fn prompt_digest(prompt_ids: &[u32]) -> [u8; 32] {
    let mut digest = Sha256::new();
    digest.update((prompt_ids.len() as u64).to_le_bytes());
    for id in prompt_ids {
        digest.update(id.to_le_bytes());
    }
    digest.finalize().into()
}

struct Encoder(Vec<u8>);

impl Encoder {
    fn u64(&mut self, n: u64) {
        self.0.extend_from_slice(&n.to_le_bytes());
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.u64(bytes.len() as u64);
        self.0.extend_from_slice(bytes);
    }

    fn str(&mut self, text: &str) {
        self.bytes(text.as_bytes());
    }

    fn cuda_ipc_source(&mut self, source: &CudaIpcSource) {
        let CudaIpcSource {
            host_id,
            device,
            mem_handle,
            alloc_bytes,
            // Not signed: only when to close a mapping depends on it (a reader bounds it by
            // the mapping and at worst maps again later), and an api-server of an older build
            // drops it on the way, which must not make the handle's MAC fail.
            liveness_offset: _,
        } = source;
        self.str(host_id);
        self.str(device);
        self.str(mem_handle);
        self.u64(*alloc_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::roles::fixtures;

    fn secret(text: &str) -> KvSecret {
        KvSecret::load(None, |_| Some(text.to_string()))
            .unwrap()
            .unwrap()
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn binding<'a>(request_id: &'a str, prompt: &'a [u32]) -> HandleBinding<'a> {
        HandleBinding {
            request_id,
            stream_subject: "tandem.m.stream.a",
            prompt_ids: prompt,
        }
    }

    #[test]
    fn the_secret_comes_from_its_file_or_the_environment_and_is_long_enough() {
        let no_env = |_: &str| None;
        assert!(KvSecret::load(None, no_env).unwrap().is_none());
        let dir = std::env::temp_dir().join(format!("tandem-kv-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, format!("{SECRET}\n")).unwrap();
        let env = |name: &str| (name == KV_SECRET_VAR).then(|| "x".repeat(40));
        // The file wins over the environment, without its newline.
        let from_file = KvSecret::load(Some(&file), env).unwrap().unwrap();
        assert_eq!(from_file.0, SECRET.as_bytes());
        assert_eq!(format!("{from_file:?}"), "KvSecret(..)", "never printed");
        let from_env = KvSecret::load(None, env).unwrap().unwrap();
        assert_eq!(from_env.0.len(), 40);
        let short = KvSecret::load(None, |_| Some("  short \n".into())).unwrap_err();
        assert!(
            short
                .to_string()
                .contains("TANDEM_KV_SECRET is 5 bytes long")
                && short.to_string().contains("at least 32"),
            "{short}"
        );
        assert!(
            KvSecret::load(None, |_| Some(String::new())).is_err(),
            "set but empty is an error, not no authentication"
        );
        let missing = KvSecret::load(Some(&dir.join("none")), no_env).unwrap_err();
        assert!(
            missing.to_string().contains("reading the KV secret from"),
            "{missing}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_signed_handle_verifies_only_as_made_and_for_its_request() {
        let key = secret(SECRET);
        let prompt = [1u32, 2, 3, 4, 5];
        let a = binding("a", &prompt);
        let mut handle = fixtures::handle_of(true, 7, 1_000);
        key.sign(&mut handle, &a);
        assert_eq!(handle.mac.len(), 64, "{}", handle.mac);
        let verify =
            |h: &KvHandle, b: &HandleBinding<'_>| key.verify(&Canonical::of(h, b), &h.mac, b);
        assert_eq!(verify(&handle, &a), Ok(()));
        // Signing is deterministic: the same handle for the same request, the same MAC.
        let mut again = handle.clone();
        key.sign(&mut again, &a);
        assert_eq!(again.mac, handle.mac);

        // Another request, stream or prompt: the handle was made for A.
        let mismatch = Err(MacError::Mismatch {
            request_id: "b".into(),
        });
        assert_eq!(verify(&handle, &binding("b", &prompt)), mismatch);
        let other_stream = HandleBinding {
            stream_subject: "tandem.m.stream.mine",
            ..a
        };
        assert!(matches!(
            verify(&handle, &other_stream),
            Err(MacError::Mismatch { .. })
        ));
        let other_prompt = [1u32, 2, 3, 4, 6];
        assert!(verify(&handle, &binding("a", &other_prompt)).is_err());

        // Any field altered.
        type Alteration = Box<dyn Fn(&mut KvHandle)>;
        let altered: Vec<(&str, Alteration)> = vec![
            ("worker", Box::new(|h| h.worker_id.push('x'))),
            (
                "fingerprint",
                Box::new(|h| h.model_fingerprint = "00".into()),
            ),
            ("backend", Box::new(|h| h.backend = "in-process".into())),
            ("address", Box::new(|h| h.address.push_str("00"))),
            ("rkey", Box::new(|h| h.rkey = "03".into())),
            ("region address", Box::new(|h| h.blocks[0].addr += 128)),
            ("region length", Box::new(|h| h.blocks[0].len += 128)),
            (
                "regions split",
                Box::new(|h| {
                    let r = h.blocks[0];
                    h.blocks = vec![
                        KvRegion {
                            addr: r.addr,
                            len: 128,
                        },
                        KvRegion {
                            addr: r.addr + 128,
                            len: r.len - 128,
                        },
                    ];
                }),
            ),
            ("layout", Box::new(|h| h.layout.block_size = 4)),
            ("dtype", Box::new(|h| h.layout.dtype = "bf16".into())),
            ("tokens", Box::new(|h| h.num_tokens = 4)),
            ("first token", Box::new(|h| h.first_token.id = 6)),
            ("first text", Box::new(|h| h.first_token.text = "x".into())),
            ("seed", Box::new(|h| h.seed = 8)),
            ("expiry", Box::new(|h| h.expires_unix_ms += 1)),
            (
                "cuda ipc",
                Box::new(|h| {
                    h.cuda_ipc = Some(Box::new(CudaIpcSource {
                        host_id: "h".into(),
                        device: "GPU-0".into(),
                        mem_handle: "00".repeat(64),
                        alloc_bytes: 1 << 20,
                        liveness_offset: None,
                    }))
                }),
            ),
            (
                "cuda ipc ranks",
                Box::new(|h| {
                    h.cuda_ipc_ranks = vec![CudaIpcSource {
                        host_id: "h".into(),
                        device: "GPU-1".into(),
                        mem_handle: "00".repeat(64),
                        alloc_bytes: 1 << 20,
                        liveness_offset: None,
                    }]
                }),
            ),
            (
                "seal address",
                Box::new(|h| h.seal.as_mut().unwrap().addr += 16),
            ),
            (
                "seal nonce",
                Box::new(|h| h.seal.as_mut().unwrap().nonce = "a5".repeat(16)),
            ),
            ("seal removed", Box::new(|h| h.seal = None)),
        ];
        for (what, alter) in &altered {
            let mut forged = handle.clone();
            alter(&mut forged);
            assert!(
                matches!(verify(&forged, &a), Err(MacError::Mismatch { .. })),
                "{what} altered, yet the MAC verifies"
            );
        }
        // No MAC, a malformed one, or one made with another secret.
        let mut unsigned = handle.clone();
        unsigned.mac.clear();
        assert_eq!(verify(&unsigned, &a), Err(MacError::Missing));
        for bad in ["zz".repeat(32), "ab".repeat(31), "ab".repeat(33)] {
            let mut malformed = handle.clone();
            malformed.mac = bad;
            assert_eq!(verify(&malformed, &a), Err(MacError::Malformed));
        }
        let mut other_key = handle.clone();
        secret(&"f".repeat(32)).sign(&mut other_key, &a);
        assert!(matches!(
            verify(&other_key, &a),
            Err(MacError::Mismatch { .. })
        ));
    }

    #[test]
    fn the_liveness_offset_is_not_signed_so_an_older_api_server_may_drop_it() {
        let key = secret(SECRET);
        let prompt = [1u32, 2, 3];
        let a = binding("a", &prompt);
        let mut handle = fixtures::handle_of(true, 7, 1_000);
        handle.cuda_ipc = Some(Box::new(CudaIpcSource {
            host_id: "h".into(),
            device: "GPU-0".into(),
            mem_handle: "00".repeat(64),
            alloc_bytes: 1 << 20,
            liveness_offset: Some(4096),
        }));
        key.sign(&mut handle, &a);
        let mut dropped = handle.clone();
        dropped.cuda_ipc.as_mut().unwrap().liveness_offset = None;
        assert_eq!(
            key.verify(&Canonical::of(&dropped, &a), &dropped.mac, &a),
            Ok(())
        );
    }

    #[test]
    fn a_logprob_of_the_first_token_is_not_covered_and_the_digest_tells_requests_apart() {
        let key = secret(SECRET);
        let prompt = [1u32, 2, 3];
        let a = binding("a", &prompt);
        let mut handle = fixtures::handle(7, 1_000);
        key.sign(&mut handle, &a);
        let mut reported = handle.clone();
        reported.first_token.logprob = Some(-0.1);
        reported.first_token.top_logprobs = vec![(5, -0.1)];
        assert_eq!(
            key.verify(&Canonical::of(&reported, &a), &reported.mac, &a),
            Ok(())
        );
        let digest = |h: &KvHandle, b: &HandleBinding<'_>| Canonical::of(h, b).digest();
        assert_eq!(digest(&handle, &a), digest(&reported, &a));
        assert_ne!(digest(&handle, &a), digest(&handle, &binding("b", &prompt)));
        // Lengths are part of the encoding: moving bytes between fields changes it.
        let mut moved = handle.clone();
        moved.address = format!("{}{}", handle.address, handle.rkey);
        moved.rkey.clear();
        assert_ne!(digest(&handle, &a), digest(&moved, &a));
    }
}
