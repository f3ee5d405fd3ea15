//! What each worker holds in its prefix cache, as this api-server knows it from the workers'
//! KV events, for KV-aware routing.
//!
//! A worker that caches prompts says in its heartbeat how it names blocks (block size and
//! namespace, [`PrefixCacheInfo`]) and how far its events went (epoch and batch number). Its
//! batches are applied in order; a gap, a batch of another epoch (the worker restarted), or a
//! heartbeat ahead of the batches seen twice in a row (a lost last batch) puts the worker in
//! need of a snapshot, which the registry's owner fetches ([`super::WorkerRegistry::kv_events`]).
//! While the snapshot is on its way, batches are kept, and those after the snapshot's number
//! are applied on top of it, so that a busy worker's view converges instead of looping.
//! Until a worker's view is synced, what it holds is taken to be what this api-server sent
//! there recently ([`Source::Sent`]), never assumed empty in silence: /metrics says which.

use std::collections::{HashMap, HashSet, VecDeque};

use tandem_protocol::block_hash::{BlockHash, BlockHashes};
use tandem_protocol::messages::{KvEvent, KvEvents, KvSnapshot, PrefixCacheInfo};

/// Block names remembered per worker from the prompts sent there, while its events are not
/// followed: about what a small cache holds.
const SENT_BLOCKS_REMEMBERED: usize = 16_384;

/// Where a worker's view comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Its KV events, applied whole since a snapshot or its epoch's first batch.
    Events,
    /// The prompts this api-server sent there (its events are not followed yet).
    Sent,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Events => "events",
            Source::Sent => "sent",
        }
    }
}

#[derive(Debug, Default)]
struct WorkerView {
    info: Option<PrefixCacheInfo>,
    /// The epoch and batch number the held set is at, once synced.
    synced: Option<(String, u64)>,
    held: HashSet<u64>,
    /// Batches received while a snapshot is on its way.
    pending: Vec<KvEvents>,
    syncing: bool,
    /// The last heartbeat said the worker was ahead of the batches seen.
    behind_at_last_heartbeat: bool,
    /// Names of the prompts sent there, oldest first (for [`Source::Sent`]).
    sent: VecDeque<u64>,
    sent_set: HashSet<u64>,
}

impl WorkerView {
    fn source(&self) -> Source {
        if self.synced.is_some() {
            Source::Events
        } else {
            Source::Sent
        }
    }

    fn holds(&self, block: u64) -> bool {
        match self.source() {
            Source::Events => self.held.contains(&block),
            Source::Sent => self.sent_set.contains(&block),
        }
    }

    fn apply(&mut self, events: &[KvEvent]) {
        for event in events {
            match event {
                KvEvent::Stored { blocks } => self.held.extend(blocks),
                KvEvent::Removed { blocks } => {
                    for block in blocks {
                        self.held.remove(block);
                    }
                }
                KvEvent::Cleared => self.held.clear(),
            }
        }
    }
}

/// Every worker's view.
#[derive(Debug, Default)]
pub struct PrefixIndex {
    workers: HashMap<String, WorkerView>,
}

impl PrefixIndex {
    /// A heartbeat's prefix-cache part (`None`: the worker caches nothing). Returns whether
    /// the worker's view needs a snapshot now.
    pub fn heartbeat(&mut self, worker_id: &str, info: Option<&PrefixCacheInfo>) -> bool {
        let Some(info) = info else {
            self.workers.remove(worker_id);
            return false;
        };
        let view = self.workers.entry(worker_id.to_owned()).or_default();
        view.info = Some(info.clone());
        if view.syncing {
            return false;
        }
        let behind = match &view.synced {
            Some((epoch, seq)) => *epoch != info.events_epoch || *seq < info.events_seq,
            None => info.events_seq > 0,
        };
        let resync = behind && (view.behind_at_last_heartbeat || view.synced.is_none());
        view.behind_at_last_heartbeat = behind && !resync;
        if resync {
            view.syncing = true;
        }
        resync
    }

    /// A batch of a worker's events. Returns whether its view needs a snapshot now.
    pub fn events(&mut self, batch: KvEvents) -> bool {
        let view = self.workers.entry(batch.worker_id.clone()).or_default();
        if view.syncing {
            view.pending.push(batch);
            return false;
        }
        let in_order = match &view.synced {
            Some((epoch, seq)) if *epoch == batch.epoch => batch.seq == seq + 1,
            // An epoch followed from its first batch (a worker that starts, or restarts)
            // needs no snapshot.
            _ => batch.seq == 1,
        };
        if in_order {
            if view
                .synced
                .as_ref()
                .is_some_and(|(epoch, _)| *epoch != batch.epoch)
            {
                view.held.clear();
            }
            view.apply(&batch.events);
            view.synced = Some((batch.epoch, batch.seq));
            false
        } else {
            tracing::info!(worker_id = %batch.worker_id, epoch = %batch.epoch, seq = batch.seq,
                known = ?view.synced, "a gap in a worker's KV events: asking for a snapshot");
            view.syncing = true;
            view.pending.push(batch);
            true
        }
    }

    /// A worker's whole listing, as of batch `seq` of `epoch` (its pages put together).
    pub fn snapshot(&mut self, snapshot: KvSnapshot) {
        let view = self.workers.entry(snapshot.worker_id.clone()).or_default();
        view.syncing = false;
        view.behind_at_last_heartbeat = false;
        view.held = snapshot.blocks.into_iter().collect();
        let mut seq = snapshot.seq;
        let mut pending = std::mem::take(&mut view.pending);
        pending.sort_by_key(|b| b.seq);
        for batch in pending {
            if batch.epoch == snapshot.epoch && batch.seq == seq + 1 {
                view.apply(&batch.events);
                seq = batch.seq;
            }
        }
        view.synced = Some((snapshot.epoch, seq));
    }

    /// A snapshot could not be had: the worker's view stays on what was sent there, and the
    /// next heartbeat that finds it behind asks again.
    pub fn snapshot_failed(&mut self, worker_id: &str) {
        if let Some(view) = self.workers.get_mut(worker_id) {
            view.syncing = false;
            view.pending.clear();
            view.synced = None;
            view.held.clear();
        }
    }

    /// Forgets a worker that left.
    pub fn forget(&mut self, worker_id: &str) {
        self.workers.remove(worker_id);
    }

    /// How `worker_id` names blocks, if it caches them.
    pub fn info(&self, worker_id: &str) -> Option<&PrefixCacheInfo> {
        self.workers.get(worker_id)?.info.as_ref()
    }

    /// Whether `worker_id`'s view follows its events, and the batches its last heartbeat
    /// said it published that the view has not applied (all of them while not synced).
    pub fn lag(&self, worker_id: &str) -> Option<(Source, u64)> {
        let view = self.workers.get(worker_id)?;
        let published = view.info.as_ref()?;
        let lag = match &view.synced {
            Some((epoch, seq)) if *epoch == published.events_epoch => {
                published.events_seq.saturating_sub(*seq)
            }
            _ => published.events_seq,
        };
        Some((view.source(), lag))
    }

    #[cfg(test)]
    pub fn source(&self, worker_id: &str) -> Option<Source> {
        self.workers.get(worker_id).map(WorkerView::source)
    }

    /// How many of `blocks` (a prompt's names in order) `worker_id` holds from the first on.
    pub fn overlap(&self, worker_id: &str, blocks: &[u64]) -> usize {
        self.workers.get(worker_id).map_or(0, |view| {
            blocks.iter().take_while(|b| view.holds(**b)).count()
        })
    }

    /// Remembers the prompt names just sent to `worker_id` (its view while not synced).
    pub fn sent(&mut self, worker_id: &str, blocks: &[u64]) {
        let Some(view) = self.workers.get_mut(worker_id) else {
            return;
        };
        for &block in blocks {
            if view.sent_set.insert(block) {
                view.sent.push_back(block);
            }
        }
        while view.sent.len() > SENT_BLOCKS_REMEMBERED {
            if let Some(old) = view.sent.pop_front() {
                view.sent_set.remove(&old);
            }
        }
    }
}

/// A prompt's block names under each way of naming the workers use, computed once per
/// (block size, namespace).
pub struct PromptBlocks<'a> {
    prompt_ids: &'a [u32],
    salt: Option<&'a str>,
    /// Names the blocks under this in place of each worker's namespace: a LoRA adapter's
    /// fingerprint, under which the workers serving it name its requests' blocks.
    namespace: Option<String>,
    named: Vec<((u32, String), Vec<u64>)>,
}

impl<'a> PromptBlocks<'a> {
    pub fn new(prompt_ids: &'a [u32], salt: Option<&'a str>) -> Self {
        PromptBlocks {
            prompt_ids,
            salt,
            namespace: None,
            named: Vec::new(),
        }
    }

    /// The same prompt named under `namespace` (a LoRA adapter's fingerprint) where given.
    pub fn with_namespace(mut self, namespace: Option<String>) -> Self {
        self.namespace = namespace;
        self
    }

    pub fn len(&self) -> usize {
        self.prompt_ids.len()
    }

    /// The names of the prompt's full blocks as a worker naming by `info` names them.
    pub fn names(&mut self, info: &PrefixCacheInfo) -> &[u64] {
        let namespace = self.namespace.as_ref().unwrap_or(&info.namespace);
        let key = (info.block_size, namespace.clone());
        let at = match self.named.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                let root = BlockHash::root(namespace, self.salt);
                let block_size = (info.block_size as usize).max(1);
                let names = BlockHashes::new(root, block_size, self.prompt_ids)
                    .full()
                    .iter()
                    .map(BlockHash::short)
                    .collect();
                self.named.push((key, names));
                self.named.len() - 1
            }
        };
        &self.named[at].1
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_adapters_prompt_is_named_under_its_fingerprint() {
        use tandem_protocol::block_hash::{BlockHash, BlockHashes};
        let prompt: Vec<u32> = (0..9).collect();
        let expected = |ns: &str| -> Vec<u64> {
            BlockHashes::new(BlockHash::root(ns, Some("s")), 4, &prompt)
                .full()
                .iter()
                .map(BlockHash::short)
                .collect()
        };
        let mut plain = PromptBlocks::new(&prompt, Some("s"));
        assert_eq!(plain.names(&info("e", 0)), expected("fp"));
        let mut adapted = PromptBlocks::new(&prompt, Some("s")).with_namespace(Some("lora".into()));
        assert_eq!(adapted.names(&info("e", 0)), expected("lora"));
        assert_ne!(expected("lora"), expected("fp"));
    }
    use super::*;

    fn info(epoch: &str, seq: u64) -> PrefixCacheInfo {
        PrefixCacheInfo {
            block_size: 4,
            namespace: "fp".into(),
            events_epoch: epoch.into(),
            events_seq: seq,
            queried_tokens: 0,
            hit_tokens: 0,
            evicted_blocks: 0,
        }
    }

    fn batch(epoch: &str, seq: u64, events: Vec<KvEvent>) -> KvEvents {
        KvEvents {
            worker_id: "w".into(),
            epoch: epoch.into(),
            seq,
            events,
        }
    }

    fn stored(blocks: &[u64]) -> KvEvent {
        KvEvent::Stored {
            blocks: blocks.to_vec(),
        }
    }

    #[test]
    fn events_in_order_build_the_view_and_a_prompt_overlaps_its_longest_held_prefix() {
        let mut index = PrefixIndex::default();
        assert!(!index.heartbeat("w", Some(&info("e", 0))));
        assert!(!index.events(batch("e", 1, vec![KvEvent::Cleared])));
        assert!(!index.events(batch("e", 2, vec![stored(&[10, 11, 12])])));
        assert!(!index.events(batch("e", 3, vec![KvEvent::Removed { blocks: vec![12] }])));
        assert_eq!(index.source("w"), Some(Source::Events));
        assert_eq!(index.overlap("w", &[10, 11, 12, 13]), 2);
        assert_eq!(index.overlap("w", &[11, 10]), 2);
        assert_eq!(index.overlap("w", &[9, 10]), 0, "a prefix, not any block");
        assert_eq!(index.overlap("other", &[10]), 0);
    }

    #[test]
    fn a_gap_asks_for_a_snapshot_and_the_batches_after_it_apply_on_top() {
        let mut index = PrefixIndex::default();
        index.events(batch("e", 1, vec![stored(&[1])]));
        // Batch 2 is lost.
        assert!(index.events(batch("e", 3, vec![stored(&[3])])));
        // While the snapshot is on its way, batches wait.
        assert!(!index.events(batch("e", 4, vec![stored(&[4])])));
        assert!(
            !index.heartbeat("w", Some(&info("e", 4))),
            "one snapshot at a time"
        );
        index.snapshot(KvSnapshot {
            worker_id: "w".into(),
            epoch: "e".into(),
            seq: 3,
            blocks: vec![1, 2, 3],
            next_offset: None,
        });
        assert_eq!(
            index.overlap("w", &[1, 2, 3, 4]),
            4,
            "batch 4 applied on the snapshot"
        );
        assert!(
            !index.events(batch("e", 5, vec![stored(&[5])])),
            "in order again"
        );
        assert!(!index.heartbeat("w", Some(&info("e", 5))));
    }

    #[test]
    fn a_restarted_worker_or_a_router_started_late_rebuilds_from_a_snapshot() {
        let mut index = PrefixIndex::default();
        // Started late: the worker is at batch 7 of its epoch.
        assert!(index.heartbeat("w", Some(&info("e", 7))));
        index.snapshot(KvSnapshot {
            worker_id: "w".into(),
            epoch: "e".into(),
            seq: 7,
            blocks: vec![1, 2],
            next_offset: None,
        });
        assert_eq!(index.overlap("w", &[1, 2]), 2);
        // Restarted: a new epoch begins with its first batch, which needs no snapshot.
        assert!(!index.events(batch("e2", 1, vec![KvEvent::Cleared])));
        assert_eq!(index.overlap("w", &[1]), 0);
        // A lost last batch: the heartbeat is ahead twice in a row before a snapshot is asked.
        assert!(!index.heartbeat("w", Some(&info("e2", 2))));
        assert!(index.heartbeat("w", Some(&info("e2", 2))));
    }

    #[test]
    fn without_events_the_view_is_what_was_sent_there() {
        let mut index = PrefixIndex::default();
        index.heartbeat("w", Some(&info("e", 0)));
        assert_eq!(index.source("w"), Some(Source::Sent));
        index.sent("w", &[1, 2, 3]);
        assert_eq!(index.overlap("w", &[1, 2, 9]), 2);
        // A worker without a prefix cache holds nothing.
        index.heartbeat("w", None);
        assert_eq!(index.overlap("w", &[1]), 0);
    }

    #[test]
    fn prompt_names_match_the_workers_and_depend_on_the_salt() {
        let prompt: Vec<u32> = (0..10).collect();
        let worker_names: Vec<u64> = BlockHashes::new(BlockHash::root("fp", None), 4, &prompt)
            .full()
            .iter()
            .map(BlockHash::short)
            .collect();
        let mut blocks = PromptBlocks::new(&prompt, None);
        assert_eq!(blocks.names(&info("e", 0)), worker_names.as_slice());
        let mut salted = PromptBlocks::new(&prompt, Some("t"));
        assert_ne!(salted.names(&info("e", 0)), worker_names.as_slice());
    }
}
