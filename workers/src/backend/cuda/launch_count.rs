//! Kernel launches counted by operation while counting is on: tests check which kernels a
//! step ran (a fused kernel, and not the launch it replaces), which the logits alone cannot
//! show when the two give the same bits. Off, a launch pays one relaxed load.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Default)]
pub(super) struct LaunchCount {
    on: AtomicBool,
    counts: Mutex<HashMap<&'static str, u64>>,
}

impl LaunchCount {
    /// Starts counting from zero (`true`) or stops (`false`).
    pub fn set(&self, on: bool) {
        self.lock().clear();
        self.on.store(on, Ordering::Relaxed);
    }

    /// Counts one launch of `op`, while counting is on.
    pub fn record(&self, op: &'static str) {
        if self.on.load(Ordering::Relaxed) {
            *self.lock().entry(op).or_default() += 1;
        }
    }

    /// The launches of each operation since counting started.
    pub fn counts(&self) -> HashMap<&'static str, u64> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, u64>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launches_are_counted_only_while_on() {
        let count = LaunchCount::default();
        count.record("a");
        assert!(count.counts().is_empty());
        count.set(true);
        count.record("a");
        count.record("a");
        count.record("b");
        assert_eq!(count.counts().get("a"), Some(&2));
        assert_eq!(count.counts().get("b"), Some(&1));
        count.set(false);
        count.record("a");
        assert!(count.counts().is_empty());
    }
}
