//! Seals: how a decode worker knows that the export it read was still the export its handle
//! names when the read ended. A seqlock across processes.
//!
//! An export's memory is reused once the context worker frees it (a release, a cancel, its
//! expiry, the worker leaving): an export read in place ([`super::cache`]) is the prompt's
//! blocks in the KV cache, which the engine hands to other requests once they are unpinned; a
//! copied export's memory goes back to its transport's pool, which hands it to the next export.
//! A release or cancel can come before the pull (forged on the bus, or simply early), and a
//! handle can be replayed to another decode worker after its pull: either way the reader would
//! read whatever now lies in that memory, another request's K/V, and nothing in the bytes says
//! so. The handle's MAC cannot help: it is the right handle, for the right request.
//!
//! So each export carries a *seal*: [`SEAL_BYTES`] that hold a fresh random [`Nonce`] while
//! the export is live, in memory the reader reaches like the K/V (host memory for UCX, device
//! memory for CUDA IPC): for an export read in place, a slot of the cache's *export slab*, after
//! the blocks in the cache's own allocation (one slot per live export, so one registration, one
//! key or IPC handle, covers blocks and seals); for a copied export, the bytes after its K/V in
//! the same slice. The handle names the seal (where it lies and the nonce;
//! [`tandem_protocol::messages::KvSeal`], covered by the MAC).
//!
//! - **Sealing** ([`super::ExportBuffer::finish`], [`super::cache::ExposedCache::export`]): the
//!   nonce is written only once the K/V is complete (a copied export: the engine's copy has
//!   returned, device copies synchronized; blocks read in place: the prefill's forward pass
//!   wrote them before the engine sampled the first token from its logits, and the engine
//!   retained them, pinned, before it said the prefill was done), and the handle goes out only
//!   after that.
//! - **Freeing** ([`SealGuard`], the keepalive of every sealed export): the seal is overwritten
//!   with zeros, and only once that write is complete (a full fence for host memory; the
//!   stream synchronized for device memory) is the memory let go of: the blocks unpinned (a
//!   release to the engine, which may then write them for another request) and the slab slot
//!   given back, or the copied export's slice handed back to the pool. If the zeros cannot be
//!   written, the memory is never let go of.
//! - **Reading** (each transport's pull): the reader reads the K/V regions; only once those
//!   reads are complete does it read the seal (a second read, issued after the first has
//!   completed, behind a full fence on the reader's side for host memory), and it uses the
//!   K/V only if the seal still holds the handle's nonce.
//!
//! Why a matching seal proves the K/V read was the export's: the export's memory (its blocks
//! or its slice, and its seal slot) is written by exactly three kinds of writes: the export's
//! own K/V and nonce (complete before the handle exists), the zeros of its free, and writes
//! of whoever gets the memory next (the engine's forward passes into the unpinned blocks; a
//! later export's K/V or nonce), which all come after the zeros are complete (the engine or
//! the pool has the memory back only then). Suppose some byte the reader read came from a
//! later owner's write W. W came after the zeros Z were complete; the reader's read of that
//! byte came after W; the seal read was issued after the K/V read had completed. So the seal
//! read comes after Z, and sees Z's zeros or a later write: zeros, or the next export's own
//! fresh nonce (a slot, or a slice's seal bytes, reused); the handle's nonce only by guessing
//! 128 random bits (a nonce is never all zeros). Contrapositively, reading the nonce proves no
//! byte read came from a later owner. The "after"s hold because:
//!
//! - **UCX, host memory**: the zeros are plain stores followed by a full fence before the
//!   blocks are released to the engine (a channel to the engine thread: release/acquire) or the
//!   slice goes back to the pool (likewise), and so before the next owner's writes; x86's total
//!   store order (and the fences, on weaker CPUs) makes them visible to every observer in that
//!   order. Whatever moves the bytes (the reader's own copy out of a shared-memory mapping,
//!   `process_vm_readv`, the exporter's progress thread answering over TCP, an RDMA NIC) reads
//!   the exporter's memory through the same coherent memory system, and the reader issues the
//!   seal's get only after the K/V gets have completed, behind a full fence.
//! - **CUDA IPC, device memory**: the zeros are a copy on the exporter's stream that is
//!   synchronized before the blocks are released to the engine (whose later kernels, on its
//!   own stream, are only issued after that) or the slice goes back to the pool, so it is
//!   complete in the exporter's GPU memory before any later owner's write is even issued. The
//!   reader's copies read that memory through the exporter's GPU (its L2 is the point of
//!   coherence for peer reads), and the reader synchronizes its stream after the K/V copies
//!   before it issues the seal's.
//!
//! A seal does not stop the read (the memory is not the reader's to lock); it makes a read
//! that overlapped a reuse detectable, and the reader drops what it read
//! ([`super::TransferError::ExportGone`]).

use std::sync::atomic::{Ordering, fence};

use tandem_protocol::messages::KvSeal;

use super::{TransferError, from_hex, to_hex};

/// Bytes of a seal, after the K/V of each export.
pub const SEAL_BYTES: usize = 16;

/// What a live export's seal holds.
pub type Nonce = [u8; SEAL_BYTES];

/// What a freed export's seal holds.
const ZEROS: Nonce = [0; SEAL_BYTES];

/// A fresh nonce: random, and never all zeros.
pub fn fresh_nonce() -> Nonce {
    loop {
        let nonce: Nonce = rand::random();
        if nonce != ZEROS {
            return nonce;
        }
    }
}

/// An export's seal as its handle names it: where it lies (addressed as the regions are) and
/// what it holds while the export is live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    pub addr: u64,
    pub nonce: Nonce,
}

impl Seal {
    /// The seal a handle names: its nonce 32 hex digits, not all zeros.
    pub fn from_wire(seal: &KvSeal) -> Result<Self, TransferError> {
        let nonce: Nonce = from_hex(&seal.nonce)?.try_into().map_err(|_| {
            TransferError::InvalidHandle(format!(
                "a seal nonce of {} hex digits (expected {})",
                seal.nonce.len(),
                2 * SEAL_BYTES
            ))
        })?;
        if nonce == ZEROS {
            return Err(TransferError::InvalidHandle(
                "a seal nonce of zeros (what a freed export's seal holds)".into(),
            ));
        }
        seal.addr
            .checked_add(SEAL_BYTES as u64)
            .ok_or_else(|| TransferError::InvalidHandle("a seal past the address space".into()))?;
        Ok(Seal {
            addr: seal.addr,
            nonce,
        })
    }

    pub fn to_wire(&self) -> KvSeal {
        KvSeal {
            addr: self.addr,
            nonce: to_hex(&self.nonce),
        }
    }

    /// The seal's bytes as a region (address, length).
    pub fn region(&self) -> (u64, u64) {
        (self.addr, SEAL_BYTES as u64)
    }

    /// Whether `read`, the seal's bytes read after the K/V reads completed, is this seal's
    /// nonce: else the export was freed before or during the read, and what was read must not
    /// be used.
    pub fn check(&self, read: &Nonce) -> Result<(), TransferError> {
        if *read == self.nonce {
            return Ok(());
        }
        Err(TransferError::ExportGone(if *read == ZEROS {
            "its seal was cleared: the context worker freed the export before the read ended \
             (a release or cancel that came early, its expiry, or a handle pulled before)"
                .into()
        } else {
            "its seal holds another nonce: the context worker freed the export and its memory \
             now holds another export"
                .into()
        }))
    }
}

/// The memory of one export's seal, written by the transport that owns the memory.
pub trait SealMemory: Send + Sync {
    /// Writes `bytes` to the seal and returns once the write is complete (visible to any
    /// reader before whatever the caller does next).
    fn write(&self, bytes: &Nonce) -> Result<(), TransferError>;
}

/// Where a reserved export's seal lies: its address as readers address the export, and its
/// memory.
pub struct SealSlot {
    pub addr: u64,
    pub memory: Box<dyn SealMemory>,
}

/// A seal in host memory (UCX exports).
pub struct HostSeal {
    ptr: *mut u8,
}

// SAFETY: the seal's bytes are owned by its export; writes are volatile stores.
unsafe impl Send for HostSeal {}
unsafe impl Sync for HostSeal {}

impl HostSeal {
    /// # Safety
    /// `ptr` must point at [`SEAL_BYTES`] writable bytes that stay valid while this value
    /// lives (the export's memory, which its keepalive holds) and that only it writes.
    pub unsafe fn new(ptr: *mut u8) -> Self {
        Self { ptr }
    }
}

impl SealMemory for HostSeal {
    fn write(&self, bytes: &Nonce) -> Result<(), TransferError> {
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: inside the seal (`new`'s contract). Volatile: another process reads
            // these bytes, which the compiler cannot see.
            unsafe { self.ptr.add(i).write_volatile(b) };
        }
        // Complete before whatever comes next: the handle going out after a nonce, the
        // memory going back to the pool after zeros.
        fence(Ordering::SeqCst);
        Ok(())
    }
}

/// The keepalive of a sealed export: zeroes the seal, and only then lets the memory go (its
/// inner keepalive unpins the blocks and gives the slab slot back, or hands a copied export's
/// memory back to the pool or unmaps it). Memory whose seal could not be zeroed is never let
/// go of: a reader of the old handle could not tell a reuse.
pub struct SealGuard {
    memory: Box<dyn SealMemory>,
    keepalive: Option<Box<dyn Send + Sync>>,
}

impl SealGuard {
    pub fn new(memory: Box<dyn SealMemory>, keepalive: Box<dyn Send + Sync>) -> Self {
        Self {
            memory,
            keepalive: Some(keepalive),
        }
    }

    /// Writes `nonce` into the seal: the export is live from here on.
    pub fn seal(&self, nonce: &Nonce) -> Result<(), TransferError> {
        self.memory.write(nonce)
    }
}

impl Drop for SealGuard {
    fn drop(&mut self) {
        match self.memory.write(&ZEROS) {
            Ok(()) => drop(self.keepalive.take()),
            Err(e) => {
                tracing::error!(
                    "clearing a freed KV export's seal failed ({e}): its memory is kept out of \
                     the transfer pool"
                );
                std::mem::forget(self.keepalive.take());
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A seal that records what was written to it, and the events of its export, in order.
    pub(crate) struct Recorded(pub Arc<Mutex<Vec<String>>>);

    impl SealMemory for Recorded {
        fn write(&self, bytes: &Nonce) -> Result<(), TransferError> {
            let what = if *bytes == ZEROS { "zeroed" } else { "sealed" };
            self.0.lock().unwrap().push(what.into());
            Ok(())
        }
    }

    /// Records when the memory is handed back.
    pub(crate) struct Memory(pub Arc<Mutex<Vec<String>>>);

    impl Drop for Memory {
        fn drop(&mut self) {
            self.0.lock().unwrap().push("memory back".into());
        }
    }

    struct Failing;

    impl SealMemory for Failing {
        fn write(&self, _: &Nonce) -> Result<(), TransferError> {
            Err(TransferError::Backend("device lost".into()))
        }
    }

    #[test]
    fn a_freed_export_is_zeroed_before_its_memory_goes_back_and_kept_if_that_fails() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let guard = SealGuard::new(
            Box::new(Recorded(log.clone())),
            Box::new(Memory(log.clone())),
        );
        guard.seal(&fresh_nonce()).unwrap();
        assert_eq!(*log.lock().unwrap(), ["sealed"]);
        drop(guard);
        assert_eq!(*log.lock().unwrap(), ["sealed", "zeroed", "memory back"]);

        let kept = Arc::new(Mutex::new(Vec::new()));
        drop(SealGuard::new(
            Box::new(Failing),
            Box::new(Memory(kept.clone())),
        ));
        assert!(
            kept.lock().unwrap().is_empty(),
            "memory whose seal stays is never handed back"
        );
    }

    #[test]
    fn host_seals_hold_what_was_written() {
        let mut bytes = [0xeeu8; SEAL_BYTES + 2];
        // SAFETY: 16 bytes inside `bytes`, which outlives the seal.
        let seal = unsafe { HostSeal::new(bytes.as_mut_ptr().add(1)) };
        let nonce = fresh_nonce();
        seal.write(&nonce).unwrap();
        assert_eq!(bytes[1..=SEAL_BYTES], nonce);
        seal.write(&ZEROS).unwrap();
        assert_eq!(bytes[1..=SEAL_BYTES], ZEROS);
        assert_eq!(
            (bytes[0], bytes[SEAL_BYTES + 1]),
            (0xee, 0xee),
            "nothing around it"
        );
    }

    #[test]
    fn a_seal_passes_only_with_its_nonce_and_says_why_not() {
        let nonce = fresh_nonce();
        assert_ne!(nonce, ZEROS);
        assert_ne!(fresh_nonce(), nonce, "fresh every time");
        let seal = Seal { addr: 4096, nonce };
        assert!(seal.check(&nonce).is_ok());
        let cleared = seal.check(&ZEROS).unwrap_err().to_string();
        assert!(cleared.contains("seal was cleared"), "{cleared}");
        let mut other = nonce;
        other[3] ^= 1;
        let reused = seal.check(&other).unwrap_err().to_string();
        assert!(reused.contains("another export"), "{reused}");
        assert!(matches!(
            seal.check(&ZEROS),
            Err(TransferError::ExportGone(_))
        ));
    }

    #[test]
    fn seals_round_trip_the_wire_and_malformed_ones_are_refused() {
        let seal = Seal {
            addr: 77,
            nonce: fresh_nonce(),
        };
        let wire = seal.to_wire();
        assert_eq!(wire.nonce.len(), 2 * SEAL_BYTES);
        assert_eq!(Seal::from_wire(&wire).unwrap(), seal);
        for (addr, nonce, needle) in [
            (0, "ab".repeat(15), "of 30 hex digits"),
            (0, "zz".repeat(16), "bad hex"),
            (0, "00".repeat(16), "of zeros"),
            (u64::MAX - 3, "ab".repeat(16), "past the address space"),
        ] {
            let err = Seal::from_wire(&KvSeal { addr, nonce })
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err} (wanted {needle:?})");
        }
    }
}
