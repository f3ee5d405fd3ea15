//! Fresh secrets the launcher makes for a deployment it starts: its nats-server's token and
//! the workers' KV secret. They reach the children in their environment, never on a command
//! line (every local user reads those in `ps`), and never in a log line.

use std::io::Read as _;

use anyhow::Context as _;

/// `bytes` bytes from the kernel's random source, as hex digits (`what` names the secret in
/// the error).
pub fn random_hex(bytes: usize, what: &str) -> anyhow::Result<String> {
    let mut random = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .with_context(|| format!("reading /dev/urandom for the {what}"))?;
    Ok(random.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_hex_of_the_length_asked_and_differ() {
        let a = random_hex(32, "test secret").unwrap();
        let b = random_hex(32, "test secret").unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
    }
}
