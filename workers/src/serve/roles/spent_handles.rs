//! The KV handles a decode worker has taken, so that a replay of one reads nothing.
//!
//! A handle's MAC binds it to its request, not to one use: the same decode job published
//! again (the same request id, stream subject, prompt and handle) verifies as well as the
//! first. But the context worker frees an export at the first pull's release, and its
//! transfer pool hands that memory to the next export, so a second read of the same regions
//! would read another request's K/V. This worker therefore takes each handle once: it
//! remembers the handles it has taken (by [`Canonical::digest`], which covers the handle and
//! its request) until well after their exports expired, and refuses one it has seen.
//!
//! [`Canonical::digest`]: crate::serve::kv_auth::Canonical::digest

use std::collections::HashMap;
use std::collections::hash_map::Entry;

/// How long a handle is remembered past its expiry: the exporter keeps an expired export
/// registered for 5 s (a pull that started before), and hosts' clocks differ. Past that, a
/// replay's export has expired long ago: its wait for room ends at once and it is prefilled
/// locally, never read.
pub const RETAIN_AFTER_EXPIRY_MS: u64 = 60_000;

/// The longest a handle is remembered before its expiry: an unsigned handle's expiry is
/// whatever its sender wrote, and a forged far-future one must not hold memory forever.
pub const MAX_RETAIN_MS: u64 = 3_600_000;

/// Handles taken, by digest, with the time (unix ms) until which each is remembered.
#[derive(Default)]
pub struct SpentHandles {
    until: HashMap<[u8; 32], u64>,
    /// Forgotten handles are dropped when the map reaches this size (then twice what is
    /// left), so pruning costs O(1) per handle taken.
    prune_at: usize,
}

impl SpentHandles {
    /// Takes the handle of `digest`, which expires at `expires_unix_ms`: false when it was
    /// taken before (a replay).
    pub fn take(&mut self, digest: [u8; 32], expires_unix_ms: u64, now_ms: u64) -> bool {
        if self.until.len() >= self.prune_at {
            self.until.retain(|_, until| *until > now_ms);
            self.prune_at = (2 * self.until.len()).max(1024);
        }
        let until =
            expires_unix_ms.min(now_ms.saturating_add(MAX_RETAIN_MS)) + RETAIN_AFTER_EXPIRY_MS;
        match self.until.entry(digest) {
            Entry::Occupied(mut seen) => {
                if *seen.get() > now_ms {
                    return false;
                }
                seen.insert(until);
                true
            }
            Entry::Vacant(new) => {
                new.insert(until);
                true
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.until.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_is_taken_once_until_long_after_it_expired() {
        let mut spent = SpentHandles::default();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let now = 1_000_000;
        assert!(spent.take(a, now + 30_000, now));
        assert!(!spent.take(a, now + 30_000, now + 1), "a replay");
        assert!(spent.take(b, now + 30_000, now), "another handle");
        let expired = now + 30_000;
        assert!(
            !spent.take(a, expired, expired + RETAIN_AFTER_EXPIRY_MS - 1),
            "still remembered a minute past its expiry"
        );
        assert!(spent.take(a, expired, expired + RETAIN_AFTER_EXPIRY_MS));
    }

    #[test]
    fn far_future_expiries_are_capped_and_forgotten_handles_pruned() {
        let mut spent = SpentHandles::default();
        let now = 5_000;
        assert!(spent.take([9u8; 32], u64::MAX, now));
        let later = now + MAX_RETAIN_MS + RETAIN_AFTER_EXPIRY_MS;
        assert!(!spent.take([9u8; 32], u64::MAX, later - 1));
        assert!(spent.take([9u8; 32], u64::MAX, later), "capped at an hour");
        // Many handles, each expired by the time the map is pruned: it does not grow.
        for i in 0..10_000u32 {
            let mut digest = [0u8; 32];
            digest[..4].copy_from_slice(&i.to_le_bytes());
            let at = 10_000_000 + u64::from(i) * 100_000;
            assert!(spent.take(digest, at, at));
        }
        assert!(spent.len() < 2048, "{} remembered", spent.len());
    }
}
