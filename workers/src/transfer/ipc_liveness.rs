//! Whether a CUDA IPC exporter still runs, as the workers that map its KV cache see it.
//!
//! A decode worker maps a context worker's whole KV cache allocation once
//! ([`super::cuda_ipc`]); on a GPU whose cache fills most of its memory that takes a large part
//! of a second (about 5.7 ms a GB on an H200), so a mapping must not be closed while the
//! exporter runs, or the next request after the close pays for mapping it again. But a mapping
//! keeps the exporter's memory allocated after the exporter exits, so it must be closed soon
//! after that, or a context worker restarted on the same GPU finds its memory taken.
//!
//! So the exporter keeps a liveness word in its cache allocation (a slot of the export slab,
//! where readers reach it like a seal) and rewrites it with a new count every
//! [`LIVENESS_PERIOD`] ([`LivenessWriter`]); the KV handle says where it is
//! ([`tandem_protocol::messages::CudaIpcSource::liveness_offset`]). Each reader looks at the
//! words of the allocations it has mapped as often, and closes a mapping whose word has not
//! moved for [`EXPORTER_GONE_AFTER`] ([`MappingWatch`]). Exporters of older builds have no
//! word: their mappings close after [`IDLE_MAPPING_CLOSE`] without a pull, as before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often an exporter rewrites its liveness word, and how often readers look at theirs.
pub const LIVENESS_PERIOD: Duration = Duration::from_secs(1);
/// A reader closes its mapping of an allocation whose liveness word has not moved for this
/// long: its exporter has exited (or stalled so long that mapping it again later costs little
/// beside the stall).
pub const EXPORTER_GONE_AFTER: Duration = Duration::from_secs(10);
/// A mapping of an allocation without a liveness word is closed after this long without a
/// pull: a context worker that left must not keep its memory alive through it.
pub const IDLE_MAPPING_CLOSE: Duration = Duration::from_secs(60);

/// Bytes of the liveness word: one slot of the export slab.
pub const WORD_BYTES: usize = 16;

/// A liveness word's contents.
pub type Word = [u8; WORD_BYTES];

/// The word of the `count`-th write: the count, then a fixed tag, so that it is never all
/// zeros (what unwritten or freed slab memory reads) and never repeats while the exporter runs.
pub fn word(count: u64) -> Word {
    let mut word = [0u8; WORD_BYTES];
    word[..8].copy_from_slice(&count.to_le_bytes());
    word[8..].copy_from_slice(b"liveness");
    word
}

/// The exporter's side: a thread that writes a new [`word`] every `period` until this is
/// dropped. Dropping it stops the thread and waits for a write in progress, so nothing is
/// written once the owner goes on to free the memory.
pub struct LivenessWriter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LivenessWriter {
    /// Starts writing: the first word before this returns (a reader that maps the memory
    /// right after finds it written), then one every `period` from a thread of its own. A
    /// failed write is logged and the next one tried.
    pub fn spawn<F>(period: Duration, mut write: F) -> std::io::Result<Self>
    where
        F: FnMut(&Word) -> Result<(), String> + Send + 'static,
    {
        let failed = |e: String| tracing::debug!("writing the KV cache's liveness word: {e}");
        let mut count = 1u64;
        write(&word(count)).unwrap_or_else(failed);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("kv-liveness".into())
            .spawn(move || {
                loop {
                    std::thread::park_timeout(period);
                    if stopped.load(Ordering::Acquire) {
                        return;
                    }
                    count += 1;
                    write(&word(count)).unwrap_or_else(failed);
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for LivenessWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// A reader's knowledge of one mapped allocation: its last pull and, where the exporter keeps
/// one, where its liveness word is and when the word last moved.
#[derive(Debug, Clone)]
pub struct MappingWatch {
    used: Instant,
    word: Option<WordSeen>,
}

#[derive(Debug, Clone)]
struct WordSeen {
    offset: u64,
    seen: Option<Word>,
    moved: Instant,
}

/// Why a mapping is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The exporter's liveness word stopped moving.
    ExporterGone,
    /// No liveness word, and no pull for [`IDLE_MAPPING_CLOSE`].
    Idle,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::ExporterGone => write!(
                f,
                "its exporter stopped: its liveness word did not move for {} s",
                EXPORTER_GONE_AFTER.as_secs()
            ),
            CloseReason::Idle => write!(
                f,
                "no pull for {} s (an exporter without a liveness word)",
                IDLE_MAPPING_CLOSE.as_secs()
            ),
        }
    }
}

impl MappingWatch {
    /// A mapping opened at `now` for a pull, its exporter's word at `word_offset` if it keeps
    /// one (counted as moving from now: the exporter was there to make the handle).
    pub fn new(now: Instant, word_offset: Option<u64>) -> Self {
        Self {
            used: now,
            word: word_offset.map(|offset| WordSeen {
                offset,
                seen: None,
                moved: now,
            }),
        }
    }

    /// Another pull through the mapping at `now`.
    pub fn used(&mut self, now: Instant, word_offset: Option<u64>) {
        self.used = now;
        if self.word.is_none() {
            *self = Self {
                used: now,
                ..Self::new(now, word_offset)
            };
        }
    }

    /// Where the exporter's liveness word is, if it keeps one.
    pub fn word_offset(&self) -> Option<u64> {
        self.word.as_ref().map(|w| w.offset)
    }

    /// The word as read at `now`.
    pub fn saw(&mut self, word: Word, now: Instant) {
        if let Some(seen) = &mut self.word
            && seen.seen != Some(word)
        {
            seen.seen = Some(word);
            seen.moved = now;
        }
    }

    /// Why the mapping should be closed at `now`, or `None` to keep it.
    pub fn close_reason(&self, now: Instant) -> Option<CloseReason> {
        match &self.word {
            Some(seen) if now.duration_since(seen.moved) >= EXPORTER_GONE_AFTER => {
                Some(CloseReason::ExporterGone)
            }
            Some(_) => None,
            None if now.duration_since(self.used) >= IDLE_MAPPING_CLOSE => Some(CloseReason::Idle),
            None => None,
        }
    }
}

/// Calls `check` on `owner` every [`LIVENESS_PERIOD`] from a thread of its own, for as long as
/// `owner` lives (the thread holds it only during a check).
pub fn spawn_watcher<T, F>(owner: Weak<T>, check: F) -> std::io::Result<()>
where
    T: Send + Sync + 'static,
    F: Fn(&T) + Send + 'static,
{
    std::thread::Builder::new()
        .name("kv-ipc-mappings".into())
        .spawn(move || {
            loop {
                std::thread::sleep(LIVENESS_PERIOD);
                let Some(owner) = owner.upgrade() else {
                    return;
                };
                check(&owner);
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn a_mapping_with_a_moving_word_stays_open_however_long_it_is_unused() {
        let start = Instant::now();
        let mut watch = MappingWatch::new(start, Some(4096));
        assert_eq!(watch.word_offset(), Some(4096));
        let later = |s: u64| start + Duration::from_secs(s);
        for s in (1..=3 * IDLE_MAPPING_CLOSE.as_secs()).step_by(5) {
            watch.saw(word(s), later(s));
            assert_eq!(
                watch.close_reason(later(s)),
                None,
                "{s} s after the last pull"
            );
        }
        // The word stops: closed once it has been still for EXPORTER_GONE_AFTER, even
        // though a pull came in meanwhile (an in-flight pull holds the mapping itself).
        let last = 3 * IDLE_MAPPING_CLOSE.as_secs();
        let stopped = word(u64::MAX);
        watch.saw(stopped, later(last));
        watch.used(later(last + 2), Some(4096));
        let gone = last + EXPORTER_GONE_AFTER.as_secs();
        for s in last..gone {
            watch.saw(stopped, later(s));
            assert_eq!(watch.close_reason(later(s)), None);
        }
        assert_eq!(
            watch.close_reason(later(gone)),
            Some(CloseReason::ExporterGone)
        );
    }

    #[test]
    fn a_mapping_without_a_word_closes_after_a_minute_without_a_pull() {
        let start = Instant::now();
        let mut watch = MappingWatch::new(start, None);
        assert_eq!(watch.word_offset(), None);
        watch.saw(word(1), start + Duration::from_secs(1)); // nothing to watch: ignored
        let idle = start + IDLE_MAPPING_CLOSE;
        assert_eq!(watch.close_reason(idle), Some(CloseReason::Idle));
        watch.used(idle, None);
        assert_eq!(watch.close_reason(idle + Duration::from_secs(59)), None);
        // A later handle names the word: watched from then on.
        watch.used(idle + Duration::from_secs(30), Some(64));
        assert_eq!(watch.word_offset(), Some(64));
        let much_later = idle + 2 * IDLE_MAPPING_CLOSE;
        watch.saw(word(7), much_later);
        assert_eq!(watch.close_reason(much_later), None);
    }

    #[test]
    fn words_never_read_as_zeros_and_never_repeat() {
        assert_ne!(word(0), [0; WORD_BYTES]);
        assert_ne!(word(1), word(2));
        assert_ne!(word(u64::MAX), word(1));
    }

    #[test]
    fn the_writer_writes_new_words_until_dropped_and_not_after() {
        let written = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&written);
        let writer = LivenessWriter::spawn(Duration::from_millis(5), move |w| {
            log.lock().unwrap().push(*w);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            *written.lock().unwrap(),
            [word(1)],
            "the first word before spawn returns"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while written.lock().unwrap().len() < 3 {
            assert!(Instant::now() < deadline, "no three writes in 30 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(writer);
        let after_drop = written.lock().unwrap().clone();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            *written.lock().unwrap(),
            after_drop,
            "nothing written once dropped"
        );
        assert_eq!(after_drop[0], word(1), "the first word at once");
        assert!(
            after_drop.windows(2).all(|p| p[0] != p[1]),
            "each write new"
        );
    }

    #[test]
    fn a_failed_write_is_not_the_end_of_the_writer() {
        let tries = Arc::new(Mutex::new(0u32));
        let count = Arc::clone(&tries);
        let writer = LivenessWriter::spawn(Duration::from_millis(2), move |_| {
            *count.lock().unwrap() += 1;
            Err("the device is busy".into())
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while *tries.lock().unwrap() < 3 {
            assert!(Instant::now() < deadline, "stopped after a failed write");
            std::thread::sleep(Duration::from_millis(2));
        }
        drop(writer);
    }
}
