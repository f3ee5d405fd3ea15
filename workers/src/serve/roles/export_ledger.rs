//! The context worker's ledger of exports: the K/V it holds for decode workers.
//!
//! [`ExportLedger`] bounds the exports by a token budget (`max_tokens_in_buffer`: a prefill
//! reserves its prompt's tokens before it starts, and jobs wait for room instead of growing
//! it), holds each export until the decode worker's release or until it expires
//! (`kv_transfer_timeout_ms`), whichever comes first, and counts both for heartbeats. An
//! export read in place is the prompt's blocks pinned in the KV cache, so the budget bounds
//! how much of the cache exports may pin, and the expiry frees what dead or slow decode
//! workers never release: the context worker's own prefills are never starved for good. The
//! memory itself belongs to the transport (or the engine); the ledger keeps each
//! [`Exported`] alive.
//!
//! An expired export is not unregistered at once: it lingers for [`EXPIRED_EXPORT_GRACE`]
//! outside the budget. A decode worker bounds its pull by the handle's expiry, but a pull
//! started just before it (its deadline is at least 100 ms, and hosts' clocks differ) may
//! still be reading; the transfer pool hands freed memory to the next export, and such a pull
//! would find the export's seal changed and fail ([`crate::transfer::seal`]): the grace spares
//! it that. Every way an export ends here (release, cancel, expiry, the worker leaving) drops
//! its [`Exported`], whose keepalive clears the seal before the memory goes back.
//!
//! A request cancelled while its export is being made (its prefill done, the export not yet
//! held) is remembered ([`ExportLedger::cancel`]), and its export is freed when it comes
//! instead of held for a decode worker that will never pull it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tandem_protocol::messages::KvTransferStats;

use crate::transfer::Exported;

/// How long an expired export stays registered before its memory is reused.
pub const EXPIRED_EXPORT_GRACE: Duration = Duration::from_secs(5);

/// An export held for its decode worker.
struct HeldExport {
    exported: Exported,
    tokens: usize,
    blocks: usize,
    expires: Instant,
}

/// Exports waiting for their decode worker, bounded by a token budget.
pub struct ExportLedger {
    max_tokens: usize,
    timeout: Duration,
    held: HashMap<String, HeldExport>,
    /// Tokens of held exports plus prefills admitted but not yet exported.
    tokens: usize,
    expirations: u64,
    releases: u64,
    /// Releases of no held export ([`KvTransferStats::unmatched_releases`]).
    unmatched_releases: u64,
    /// Expired exports, when they may be unregistered, and the blocks they pin.
    lingering: Vec<(Instant, Exported, usize)>,
    /// Requests cancelled while their export was being made.
    cancelled_in_export: HashSet<String>,
}

impl ExportLedger {
    pub fn new(max_tokens: usize, timeout: Duration) -> Self {
        Self {
            max_tokens,
            timeout,
            held: HashMap::new(),
            tokens: 0,
            expirations: 0,
            releases: 0,
            unmatched_releases: 0,
            lingering: Vec::new(),
            cancelled_in_export: HashSet::new(),
        }
    }

    /// How long an export is held without a release.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Reserves room for a prompt of `tokens` before its prefill starts; false when the
    /// budget is spent (the job waits). A prompt larger than the whole budget is let through
    /// when nothing else is held, so it cannot wait forever.
    pub fn try_reserve(&mut self, tokens: usize) -> bool {
        if self.tokens + tokens <= self.max_tokens || self.tokens == 0 {
            self.tokens += tokens;
            true
        } else {
            false
        }
    }

    /// Gives back a reservation whose prefill did not end in an export.
    pub fn unreserve(&mut self, tokens: usize) {
        self.tokens = self.tokens.saturating_sub(tokens);
    }

    /// Records the export of a reserved prefill; it expires [`Self::timeout`] from now.
    ///
    /// A request cancelled meanwhile ([`Self::cancel`]) is not held: its tokens leave the
    /// budget and the export comes back, for the caller to drop.
    pub fn hold(
        &mut self,
        request_id: String,
        exported: Exported,
        tokens: usize,
        blocks: usize,
    ) -> Result<(), Exported> {
        if self.cancelled_in_export.remove(&request_id) {
            self.unreserve(tokens);
            return Err(exported);
        }
        let held = HeldExport {
            exported,
            tokens,
            blocks,
            expires: Instant::now() + self.timeout,
        };
        if let Some(old) = self.held.insert(request_id, held) {
            self.unreserve(old.tokens);
        }
        Ok(())
    }

    /// A cancel of `request_id`: frees its export if one is held (true). One still being made
    /// (`exporting`: its prefill is in flight here) is remembered, and [`Self::hold`] gives
    /// it back instead of holding it; otherwise the cancel counts as a release of nothing.
    pub fn cancel(&mut self, request_id: &str, exporting: bool) -> bool {
        if exporting && !self.held.contains_key(request_id) {
            self.cancelled_in_export.insert(request_id.to_owned());
            return false;
        }
        self.release(request_id)
    }

    /// `request_id`'s prefill is over here (held, answered or failed): a cancel remembered
    /// for it is dropped.
    pub fn prefill_over(&mut self, request_id: &str) {
        self.cancelled_in_export.remove(request_id);
    }

    /// The decode worker has the K/V (or gave up on it): free it. False, and counted, if no
    /// export of `request_id` is held (already expired or released, or never made here).
    pub fn release(&mut self, request_id: &str) -> bool {
        match self.held.remove(request_id) {
            Some(held) => {
                self.unreserve(held.tokens);
                self.releases += 1;
                true
            }
            None => {
                self.unmatched_releases += 1;
                false
            }
        }
    }

    /// Ends the exports whose time is up (they linger for [`EXPIRED_EXPORT_GRACE`], outside
    /// the budget) and unregisters those whose grace is over; returns the newly expired ids.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        self.lingering.retain(|(until, _, _)| *until > now);
        let expired: Vec<String> = self
            .held
            .iter()
            .filter(|(_, held)| held.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            if let Some(held) = self.held.remove(id) {
                self.unreserve(held.tokens);
                self.expirations += 1;
                self.lingering
                    .push((now + EXPIRED_EXPORT_GRACE, held.exported, held.blocks));
            }
        }
        expired
    }

    /// Frees every export, held or lingering (the worker is leaving: nobody will release
    /// them, and a reader still reading finds their seals cleared); returns how many were
    /// held.
    pub fn free_all(&mut self) -> usize {
        let held = self.held.len();
        for (_, export) in self.held.drain() {
            self.tokens = self.tokens.saturating_sub(export.tokens);
        }
        self.lingering.clear();
        held
    }

    /// Whether no export is held (lingering ones aside).
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The heartbeat's `kv_transfer`: `pinned_blocks` counts the blocks of every export still
    /// alive, lingering ones too (an export read in place pins them in the cache until then).
    pub fn stats(&self) -> KvTransferStats {
        let lingering: usize = self.lingering.iter().map(|&(_, _, blocks)| blocks).sum();
        KvTransferStats {
            pinned_blocks: self
                .held
                .values()
                .map(|held| held.blocks as u32)
                .sum::<u32>()
                + lingering as u32,
            pinned_tokens: self.held.values().map(|held| held.tokens as u32).sum(),
            expirations: self.expirations,
            releases: self.releases,
            unmatched_releases: self.unmatched_releases,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets its flag when dropped (the export's memory given back).
    struct DropFlag(std::sync::Arc<std::sync::atomic::AtomicBool>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn an_expired_export_stays_registered_for_the_grace_period_outside_the_budget() {
        let timeout = Duration::from_millis(50);
        let mut ledger = ExportLedger::new(100, timeout);
        let (released, expired) = (Default::default(), Default::default());
        let flagged = |flag: &std::sync::Arc<std::sync::atomic::AtomicBool>| Exported {
            keepalive: Box::new(DropFlag(flag.clone())),
            ..Exported::fixture()
        };
        let is_set = |flag: &std::sync::Arc<std::sync::atomic::AtomicBool>| {
            flag.load(std::sync::atomic::Ordering::SeqCst)
        };
        assert!(ledger.try_reserve(50) && ledger.try_reserve(50));
        assert!(
            ledger
                .hold("released".into(), flagged(&released), 50, 4)
                .is_ok()
        );
        assert!(
            ledger
                .hold("expired".into(), flagged(&expired), 50, 4)
                .is_ok()
        );
        assert!(ledger.release("released"));
        assert!(is_set(&released), "a release unregisters at once");
        let at = Instant::now() + timeout * 2;
        assert_eq!(ledger.expire(at), vec!["expired".to_string()]);
        assert!(
            !is_set(&expired),
            "still registered during the grace period"
        );
        assert!(ledger.try_reserve(100), "but no longer in the budget");
        assert!(ledger.is_empty());
        assert_eq!(
            ledger.stats().pinned_blocks,
            4,
            "its blocks stay pinned while it lingers"
        );
        ledger.expire(at + EXPIRED_EXPORT_GRACE / 2);
        assert!(!is_set(&expired));
        ledger.expire(at + EXPIRED_EXPORT_GRACE);
        assert!(is_set(&expired), "unregistered once the grace is over");
        assert_eq!(ledger.stats().pinned_blocks, 0);
    }

    #[test]
    fn leaving_frees_every_export_held_or_lingering() {
        let timeout = Duration::from_millis(50);
        let mut ledger = ExportLedger::new(100, timeout);
        let flags: Vec<std::sync::Arc<std::sync::atomic::AtomicBool>> =
            (0..2).map(|_| Default::default()).collect();
        for (i, flag) in flags.iter().enumerate() {
            assert!(ledger.try_reserve(10));
            let exported = Exported {
                keepalive: Box::new(DropFlag(flag.clone())),
                ..Exported::fixture()
            };
            assert!(ledger.hold(format!("r{i}"), exported, 10, 1).is_ok());
            if i == 0 {
                ledger.expire(Instant::now() + timeout * 2);
            }
        }
        assert_eq!(ledger.free_all(), 1, "one held, one lingering");
        assert!(
            flags
                .iter()
                .all(|f| f.load(std::sync::atomic::Ordering::SeqCst)),
            "both freed"
        );
        assert!(ledger.is_empty() && ledger.try_reserve(100));
    }

    #[test]
    fn the_budget_bounds_reservations_and_release_or_expiry_frees_them() {
        let mut ledger = ExportLedger::new(100, Duration::from_millis(50));
        assert!(ledger.try_reserve(60));
        assert!(!ledger.try_reserve(50), "60 + 50 > 100");
        assert!(ledger.try_reserve(40));
        assert!(ledger.hold("a".into(), Exported::fixture(), 60, 3).is_ok());
        assert!(ledger.hold("b".into(), Exported::fixture(), 40, 2).is_ok());
        assert_eq!(ledger.stats().pinned_blocks, 5);
        assert!(ledger.release("a"));
        assert!(!ledger.release("a"), "released twice");
        assert!(!ledger.release("never-held"), "a foreign release");
        assert!(ledger.try_reserve(50));
        ledger.unreserve(50);
        let later = Instant::now() + Duration::from_millis(60);
        assert_eq!(ledger.expire(later), vec!["b".to_string()]);
        let stats = ledger.stats();
        assert_eq!(
            (stats.releases, stats.expirations, stats.pinned_tokens),
            (1, 1, 0)
        );
        assert_eq!(
            stats.unmatched_releases, 2,
            "the repeated and the foreign one"
        );
        assert!(ledger.is_empty());
        // An oversized prompt passes when nothing else is held.
        assert!(ledger.try_reserve(500));
        assert!(!ledger.try_reserve(1));
    }

    #[test]
    fn a_request_cancelled_while_its_export_is_made_is_never_held() {
        let mut ledger = ExportLedger::new(100, Duration::from_secs(30));
        assert!(ledger.try_reserve(60));
        // The cancel comes between the prefill's end and the export's hold.
        assert!(!ledger.cancel("gone", true));
        let back = ledger.hold("gone".into(), Exported::fixture(), 60, 4);
        assert!(back.is_err(), "a cancelled request's export comes back");
        assert!(ledger.is_empty());
        assert_eq!(ledger.stats().pinned_blocks, 0);
        assert!(ledger.try_reserve(100), "its tokens left the budget");
        ledger.unreserve(100);
        // Cancelled once held: released as before; not in flight: a release of nothing.
        assert!(ledger.try_reserve(10));
        assert!(
            ledger
                .hold("held".into(), Exported::fixture(), 10, 1)
                .is_ok()
        );
        assert!(ledger.cancel("held", true));
        assert!(!ledger.cancel("elsewhere", false));
        assert_eq!(ledger.stats().unmatched_releases, 1);
        // A remembered cancel whose prefill ended without an export is dropped.
        assert!(!ledger.cancel("answered", true));
        ledger.prefill_over("answered");
        assert!(ledger.try_reserve(10));
        assert!(
            ledger
                .hold("answered".into(), Exported::fixture(), 10, 1)
                .is_ok()
        );
    }
}
