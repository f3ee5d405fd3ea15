//! A fingerprint of a model directory: what a KV handle names, so a decode worker refuses K/V
//! computed by another model.
//!
//! Two workers agree on the KV layout (layers, heads, head dim, block size, dtype) whenever
//! they serve models of the same shapes, yet K/V computed with other weights is garbage to a
//! decode worker: a fine-tune, another seed of a random model, the same model in another dtype.
//! The fingerprint covers what makes K/V differ: `config.json`, every safetensors file's
//! header (tensor names, dtypes, shapes, offsets) and size (or, for weights the workers
//! generate, `random_weights.json`: seed, dtype, generator), and samples of its weight bytes
//! (the first, middle and last [`SAMPLE_BYTES`] of the data). Sampling keeps it fast on a 16 GB
//! model (a few MB read, against hashing every byte) while any two independently trained or
//! generated weight sets differ in every sample.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::ModelDirError;

/// Bytes hashed at each of the three places in a weights file's data.
pub const SAMPLE_BYTES: u64 = 256 << 10;
/// Hex digits of a fingerprint (the first 128 bits of a SHA-256).
pub const FINGERPRINT_HEX: usize = 32;
/// A safetensors header larger than this is not one (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// The fingerprint of the model directory `dir`, as [`FINGERPRINT_HEX`] hex digits.
pub fn model_fingerprint(dir: &Path) -> Result<String, ModelDirError> {
    let fail = |reason: String| ModelDirError::Invalid {
        path: dir.to_owned(),
        reason,
    };
    let mut hash = Sha256::new();
    let config = std::fs::read(dir.join(tandem_model::CONFIG_FILE))
        .map_err(|e| fail(format!("reading config.json for its fingerprint: {e}")))?;
    hash.update(b"config.json\0");
    hash.update((config.len() as u64).to_le_bytes());
    hash.update(&config);
    let mut weights: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| fail(format!("listing for the fingerprint: {e}")))?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name())
        .filter(|name| name.to_string_lossy().ends_with(".safetensors"))
        .collect();
    weights.sort();
    if weights.is_empty() {
        // A random-weight directory whose weights the workers generate: its seed, dtype and
        // generator version define them.
        let spec = dir.join(tandem_model::RANDOM_WEIGHTS_FILE);
        let spec = std::fs::read(&spec).map_err(|_| {
            fail(format!(
                "no .safetensors file or {} to fingerprint",
                tandem_model::RANDOM_WEIGHTS_FILE
            ))
        })?;
        hash.update(tandem_model::RANDOM_WEIGHTS_FILE.as_bytes());
        hash.update(b"\0");
        hash.update(&spec);
    }
    for name in weights {
        let path = dir.join(&name);
        let err = |e: std::io::Error| fail(format!("{}: {e}", path.display()));
        let mut file = File::open(&path).map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        hash.update(name.to_string_lossy().as_bytes());
        hash.update(b"\0");
        hash.update(size.to_le_bytes());
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(err)?;
        let header_len = u64::from_le_bytes(len);
        if header_len > MAX_HEADER_BYTES || 8 + header_len > size {
            return Err(fail(format!(
                "{}: not a safetensors file (header of {header_len} bytes)",
                path.display()
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(err)?;
        hash.update(&header);
        let data_start = 8 + header_len;
        let data_len = size - data_start;
        let middle = data_start + data_len.saturating_sub(SAMPLE_BYTES) / 2;
        let last = size.saturating_sub(SAMPLE_BYTES).max(data_start);
        let mut sample = Vec::with_capacity(SAMPLE_BYTES as usize);
        for at in [data_start, middle, last] {
            sample.clear();
            file.seek(SeekFrom::Start(at)).map_err(err)?;
            (&mut file)
                .take(SAMPLE_BYTES)
                .read_to_end(&mut sample)
                .map_err(err)?;
            hash.update(at.to_le_bytes());
            hash.update(&sample);
        }
    }
    let digest = hash.finalize();
    Ok(digest[..FINGERPRINT_HEX / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with `config` and one safetensors file of one tensor of `data`.
    fn model(dir: &Path, config: &str, data: &[u8]) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), config).unwrap();
        let header = format!(
            r#"{{"w":{{"dtype":"BF16","shape":[{}],"data_offsets":[0,{}]}}}}"#,
            data.len() / 2,
            data.len()
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    }

    #[test]
    fn the_same_model_anywhere_has_one_fingerprint_and_any_change_another() {
        let root = std::env::temp_dir().join(format!("tandem-fingerprint-{}", std::process::id()));
        // Weights larger than three samples, so the bytes between them are not hashed.
        let data: Vec<u8> = (0..(4 * SAMPLE_BYTES as usize))
            .map(|i| (i % 251) as u8)
            .collect();
        model(&root.join("a"), r#"{"hidden_size": 8}"#, &data);
        model(&root.join("copy"), r#"{"hidden_size": 8}"#, &data);
        let a = model_fingerprint(&root.join("a")).unwrap();
        assert_eq!(a.len(), FINGERPRINT_HEX);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(model_fingerprint(&root.join("copy")).unwrap(), a);

        // Other weights of the same shapes (first sample), other config, other dtype header.
        let mut other = data.clone();
        other[7] ^= 1;
        model(&root.join("weights"), r#"{"hidden_size": 8}"#, &other);
        model(&root.join("config"), r#"{"hidden_size": 9}"#, &data);
        for changed in ["weights", "config"] {
            assert_ne!(
                model_fingerprint(&root.join(changed)).unwrap(),
                a,
                "{changed}"
            );
        }
        let mut tail = data.clone();
        *tail.last_mut().unwrap() ^= 1;
        model(&root.join("tail"), r#"{"hidden_size": 8}"#, &tail);
        assert_ne!(
            model_fingerprint(&root.join("tail")).unwrap(),
            a,
            "the last sample"
        );

        // No weights, or a file that is no safetensors: a clear error.
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::fs::write(root.join("empty/config.json"), "{}").unwrap();
        let err = model_fingerprint(&root.join("empty")).unwrap_err();
        assert!(err.to_string().contains("no .safetensors"), "{err}");
        std::fs::write(root.join("empty/model.safetensors"), u64::MAX.to_le_bytes()).unwrap();
        let err = model_fingerprint(&root.join("empty")).unwrap_err();
        assert!(err.to_string().contains("not a safetensors file"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
