//! The worker's KV events on the bus: which blocks its prefix cache holds, for routers.
//!
//! The engine reports the blocks it names and evicts after each step
//! ([`crate::engine::EngineHandle::take_kv_events`]); this module numbers them in batches on
//! `tandem.{model}.kv_events.{worker_id}` and keeps its own copy of the set they describe, from
//! which it answers snapshot requests (`… .kv_snapshot.{worker_id}`, paged). A router that
//! starts late, or sees a gap in the numbers, or a new epoch (a restarted worker), rebuilds
//! its view from a snapshot; the heartbeat carries the epoch and the last number, so a lost
//! last batch is noticed too ([`PrefixCacheInfo`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tandem_protocol::messages::{
    self, KvEvent as WireKvEvent, KvEvents, KvSnapshot, KvSnapshotRequest, PrefixCacheInfo,
};

use super::worker::{Worker, locked, publish_bounded};
use crate::engine::KvEventReceiver;
use crate::kv_cache::manager::KvEvent;

/// Block names in one event message at most: 16,384 names of up to 20 digits stay well under
/// NATS' default 1 MiB payload. A larger step is published as several batches.
const MAX_BLOCKS_PER_BATCH: usize = 16_384;
/// Names in one snapshot page at most (the same bound).
const MAX_BLOCKS_PER_PAGE: usize = 16_384;

/// What the published events describe: the blocks held, as of batch `seq` of `epoch`.
#[derive(Debug)]
struct EventLog {
    epoch: String,
    seq: u64,
    held: HashSet<u64>,
    /// The listing snapshot pages are cut from, made at the first page of a `seq` and kept
    /// while it stays current, so that the pages of one listing agree.
    listing: Option<(u64, Arc<Vec<u64>>)>,
}

impl EventLog {
    /// Applies one batch and numbers it.
    fn apply(&mut self, events: &[WireKvEvent]) -> u64 {
        for event in events {
            match event {
                WireKvEvent::Stored { blocks } => self.held.extend(blocks),
                WireKvEvent::Removed { blocks } => {
                    for block in blocks {
                        self.held.remove(block);
                    }
                }
                WireKvEvent::Cleared => self.held.clear(),
            }
        }
        self.seq += 1;
        self.seq
    }

    fn page(&mut self, worker_id: &str, offset: usize) -> KvSnapshot {
        let listing = match &self.listing {
            Some((seq, listing)) if *seq == self.seq => Arc::clone(listing),
            _ => {
                let mut listing: Vec<u64> = self.held.iter().copied().collect();
                listing.sort_unstable();
                let listing = Arc::new(listing);
                self.listing = Some((self.seq, Arc::clone(&listing)));
                listing
            }
        };
        let start = offset.min(listing.len());
        let end = (start + MAX_BLOCKS_PER_PAGE).min(listing.len());
        KvSnapshot {
            worker_id: worker_id.to_owned(),
            epoch: self.epoch.clone(),
            seq: self.seq,
            blocks: listing[start..end].to_vec(),
            next_offset: (end < listing.len()).then_some(end as u64),
        }
    }
}

/// The worker's prefix cache as the bus sees it: its events' log and what the heartbeat says.
#[derive(Clone)]
pub(super) struct PrefixCacheBus {
    block_size: usize,
    namespace: String,
    log: Arc<Mutex<EventLog>>,
    /// A batch numbered but not published, as if the bus lost it (tests only:
    /// [`super::test_hooks::DROP_KV_EVENTS_VAR`]).
    dropped_batch: Option<u64>,
}

impl PrefixCacheBus {
    /// A fresh epoch (one per start) for a cache of `block_size`-token blocks named under
    /// `namespace`; `dropped_batch` is a test's lost message (`None` in production).
    pub fn new(block_size: usize, namespace: String, dropped_batch: Option<u64>) -> Self {
        PrefixCacheBus {
            block_size,
            namespace,
            dropped_batch,
            log: Arc::new(Mutex::new(EventLog {
                epoch: fresh_epoch(),
                seq: 0,
                held: HashSet::new(),
                listing: None,
            })),
        }
    }

    /// What the heartbeat says of the cache.
    pub fn info(&self, worker: &Worker) -> PrefixCacheInfo {
        let stats = worker.engine.prefix_cache_stats();
        let log = locked(&self.log);
        PrefixCacheInfo {
            block_size: self.block_size as u32,
            namespace: self.namespace.clone(),
            events_epoch: log.epoch.clone(),
            events_seq: log.seq,
            queried_tokens: stats.queried_tokens,
            hit_tokens: stats.hit_tokens,
            evicted_blocks: stats.evicted_blocks,
        }
    }

    /// Publishes the engine's events until it stops, starting the epoch with `cleared`.
    pub async fn publish_events(self, worker: Arc<Worker>, mut events: KvEventReceiver) {
        let subject = worker.subjects.kv_events(&worker.identity.worker_id);
        self.publish(&worker, &subject, vec![WireKvEvent::Cleared])
            .await;
        while let Some(first) = events.recv().await {
            let mut batch: Vec<WireKvEvent> = first.iter().map(wire_event).collect();
            while let Ok(more) = events.try_recv() {
                batch.extend(more.iter().map(wire_event));
            }
            for chunk in split_batch(batch) {
                self.publish(&worker, &subject, chunk).await;
            }
        }
    }

    async fn publish(&self, worker: &Worker, subject: &str, events: Vec<WireKvEvent>) {
        let message = {
            let mut log = locked(&self.log);
            let seq = log.apply(&events);
            KvEvents {
                worker_id: worker.identity.worker_id.clone(),
                epoch: log.epoch.clone(),
                seq,
                events,
            }
        };
        if self.dropped_batch == Some(message.seq) {
            tracing::warn!(
                seq = message.seq,
                "KV event batch not published (test hook)"
            );
            return;
        }
        publish_bounded(
            &worker.client,
            subject.to_owned(),
            messages::encode(&message),
            "KV events",
        )
        .await;
    }

    /// Answers snapshot requests until the subscription ends.
    pub async fn answer_snapshots(self, worker: Arc<Worker>) {
        let subject = worker.subjects.kv_snapshot(&worker.identity.worker_id);
        let mut requests = match worker.client.subscribe(subject.clone()).await {
            Ok(requests) => requests,
            Err(e) => {
                tracing::error!(subject, "cannot answer KV snapshot requests: {e}");
                return;
            }
        };
        while let Some(request) = requests.next().await {
            let Some(reply) = request.reply else {
                continue;
            };
            let offset =
                messages::decode::<KvSnapshotRequest>("KV snapshot request", &request.payload)
                    .map_or(0, |r| r.offset as usize);
            let page = locked(&self.log).page(&worker.identity.worker_id, offset);
            publish_bounded(
                &worker.client,
                reply.to_string(),
                messages::encode(&page),
                "a KV snapshot",
            )
            .await;
        }
    }
}

/// An epoch name no earlier start of this worker had: the start time and the process id.
fn fresh_epoch() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{}", std::process::id())
}

fn wire_event(event: &KvEvent) -> WireKvEvent {
    match event {
        KvEvent::Stored { hashes, .. } => WireKvEvent::Stored {
            blocks: hashes.iter().map(|h| h.short()).collect(),
        },
        KvEvent::Removed { hashes } => WireKvEvent::Removed {
            blocks: hashes.iter().map(|h| h.short()).collect(),
        },
    }
}

/// `events` in batches of at most [`MAX_BLOCKS_PER_BATCH`] names, in order.
fn split_batch(events: Vec<WireKvEvent>) -> Vec<Vec<WireKvEvent>> {
    let mut batches = vec![Vec::new()];
    let mut names = 0;
    for event in events {
        let (stored, mut blocks) = match event {
            WireKvEvent::Stored { blocks } => (true, blocks),
            WireKvEvent::Removed { blocks } => (false, blocks),
            WireKvEvent::Cleared => {
                batches
                    .last_mut()
                    .expect("one batch")
                    .push(WireKvEvent::Cleared);
                continue;
            }
        };
        while !blocks.is_empty() {
            if names == MAX_BLOCKS_PER_BATCH {
                batches.push(Vec::new());
                names = 0;
            }
            let rest = blocks.split_off(blocks.len().min(MAX_BLOCKS_PER_BATCH - names));
            names += blocks.len();
            let part = std::mem::replace(&mut blocks, rest);
            batches.last_mut().expect("one batch").push(if stored {
                WireKvEvent::Stored { blocks: part }
            } else {
                WireKvEvent::Removed { blocks: part }
            });
        }
    }
    batches.retain(|b| !b.is_empty());
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> EventLog {
        EventLog {
            epoch: "e".into(),
            seq: 0,
            held: HashSet::new(),
            listing: None,
        }
    }

    #[test]
    fn the_log_numbers_batches_and_holds_what_they_say() {
        let mut log = log();
        assert_eq!(log.apply(&[WireKvEvent::Cleared]), 1);
        assert_eq!(
            log.apply(&[
                WireKvEvent::Stored {
                    blocks: vec![1, 2, 3]
                },
                WireKvEvent::Removed { blocks: vec![2] },
            ]),
            2
        );
        let page = log.page("w", 0);
        assert_eq!(
            (page.seq, page.blocks, page.next_offset),
            (2, vec![1, 3], None)
        );
        log.apply(&[WireKvEvent::Cleared]);
        assert!(log.page("w", 0).blocks.is_empty());
    }

    #[test]
    fn a_large_listing_comes_in_pages_of_one_seq() {
        let mut log = log();
        let many: Vec<u64> = (0..(MAX_BLOCKS_PER_PAGE as u64 * 2 + 5)).collect();
        log.apply(&[WireKvEvent::Stored {
            blocks: many.clone(),
        }]);
        let mut offset = 0;
        let mut listed = Vec::new();
        loop {
            let page = log.page("w", offset);
            assert_eq!(page.seq, 1);
            listed.extend(page.blocks);
            match page.next_offset {
                Some(next) => offset = next as usize,
                None => break,
            }
        }
        assert_eq!(listed, many);
    }

    #[test]
    fn batches_are_split_at_the_bound_keeping_the_order() {
        let big: Vec<u64> = (0..(MAX_BLOCKS_PER_BATCH as u64 + 10)).collect();
        let batches = split_batch(vec![
            WireKvEvent::Cleared,
            WireKvEvent::Stored {
                blocks: big.clone(),
            },
            WireKvEvent::Removed { blocks: vec![7] },
        ]);
        assert_eq!(batches.len(), 2);
        let mut stored: Vec<u64> = Vec::new();
        for batch in &batches {
            let names: usize = batch
                .iter()
                .map(|e| match e {
                    WireKvEvent::Stored { blocks } | WireKvEvent::Removed { blocks } => {
                        blocks.len()
                    }
                    WireKvEvent::Cleared => 0,
                })
                .sum();
            assert!(names <= MAX_BLOCKS_PER_BATCH);
            for event in batch {
                if let WireKvEvent::Stored { blocks } = event {
                    stored.extend(blocks);
                }
            }
        }
        assert_eq!(stored, big);
        assert_eq!(batches[0][0], WireKvEvent::Cleared);
        assert_eq!(
            batches.last().unwrap().last(),
            Some(&WireKvEvent::Removed { blocks: vec![7] })
        );
    }
}
