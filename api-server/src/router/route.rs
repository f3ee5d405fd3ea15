//! A request's route: the generation worker that produces its tokens, and where its prompt is
//! prefilled.
//!
//! Every request gets a generation worker (`decode` or `both`), and a context worker for its
//! prefill when disaggregation pays off ([`WorkerRegistry::route`]): at least one live
//! context worker with room and a prompt of at least `max_local_prefill_length` tokens. When
//! every generation worker is full a request gets 429 ([`NoRoute::AllFull`]); when every
//! context worker is, it is prefilled by its generation worker ([`LocalPrefill::ContextFull`]).
//! Routing takes the prompt's token ids, not only their number, so that a policy can weigh
//! what each worker already holds of them.

use std::time::Instant;

use tandem_protocol::messages::{KvPeer, WorkerRole};

use tandem_protocol::config::RouterPolicy;

use super::prefix_index::PromptBlocks;
use super::registry::{Inner, Pick, WorkerRegistry};
use super::worker::Pool;

/// Where a request's prompt is prefilled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prefill {
    /// On this context worker, which then hands the KV cache to the generation worker.
    Remote { context_id: String },
    /// By the generation worker itself.
    Local(LocalPrefill),
}

/// Why a request is prefilled by its generation worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalPrefill {
    /// Shorter than `max_local_prefill_length`: a transfer would cost more than it saves.
    ShortPrompt,
    /// No live, non-draining context worker.
    NoContextWorker,
    /// Every live context worker's queue is full.
    ContextFull,
    /// The generation worker holds the prompt cached but for fewer than
    /// `max_local_prefill_length` tokens (`kv_aware` policy).
    MostlyCached,
    /// A request with `n` > 1: its choices run on one generation worker, which prefills the
    /// prompt once for all of them ([`WorkerRegistry::route_samples`]).
    Samples,
    /// A request for its prompt's logprobs (`echo` with `logprobs`): they are computed where
    /// the prompt is prefilled, and a context worker's prefill hands over K/V, not logprobs
    /// ([`WorkerRegistry::route_local`]; docs/protocol.md, "Prompt logprobs").
    PromptLogprobs,
}

/// Why a request has no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoute {
    /// No live, non-draining worker takes generation jobs.
    NoLiveWorker,
    /// Every one that does has a full queue.
    AllFull,
}

/// The workers chosen for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The `decode` or `both` worker that generates the tokens.
    pub generate_id: String,
    pub generate_role: WorkerRole,
    /// How that worker reads K/V (its last heartbeat's), for the context worker's export.
    pub generate_kv_peer: Option<KvPeer>,
    pub prefill: Prefill,
    /// The prompt's KV blocks counted against the generation worker's load until the request
    /// ends ([`super::GenerationJob`]).
    pub generate_blocks: u64,
}

impl WorkerRegistry {
    /// Chooses the workers of a request whose prompt is `prompt_ids` and counts the jobs
    /// against them; [`NoRoute`] when no live worker with room in its queue takes generation
    /// jobs.
    pub fn route(&self, prompt_ids: &[u32], now: Instant) -> Result<Route, NoRoute> {
        self.route_salted(prompt_ids, None, None, now)
    }

    /// [`Self::route`] for a prompt cached under `cache_salt` (the job's): the `kv_aware`
    /// policy names its blocks as the workers do, and then measures a prompt against
    /// `max_local_prefill_length` by the tokens the generation worker does not hold cached
    /// (TensorRT-LLM's rule for conditional disaggregation). With `adapter` (a LoRA adapter's
    /// name), only workers that serve it are chosen, and its blocks are named under its
    /// fingerprint, as those workers name them.
    pub fn route_salted(
        &self,
        prompt_ids: &[u32],
        cache_salt: Option<&str>,
        adapter: Option<&str>,
        now: Instant,
    ) -> Result<Route, NoRoute> {
        let mut inner = self.lock();
        let namespace = adapter.and_then(|a| WorkerRegistry::adapter_fingerprint(&inner, a));
        let mut prompt = PromptBlocks::new(prompt_ids, cache_salt).with_namespace(namespace);
        let generate_id = match self.pick_for(
            &mut inner,
            Pool::Generate,
            &[],
            adapter,
            now,
            Some(&mut prompt),
        ) {
            Pick::Chosen(id) => id,
            Pick::AllFull => return Err(NoRoute::AllFull),
            Pick::NoneLive => return Err(NoRoute::NoLiveWorker),
        };
        let generate_role = inner.workers[&generate_id].heartbeat.role;
        let generate_kv_peer = inner.workers[&generate_id].heartbeat.kv_peer.clone();
        let uncached = if WorkerRegistry::policy_kind_of(&inner) == RouterPolicy::KvAware {
            prompt_ids.len()
                - self
                    .cached_tokens(&inner, &generate_id, &mut prompt)
                    .min(prompt_ids.len())
        } else {
            prompt_ids.len()
        };
        let prefill = if prompt_ids.len() < self.settings.max_local_prefill_length {
            Prefill::Local(LocalPrefill::ShortPrompt)
        } else if uncached < self.settings.max_local_prefill_length {
            Prefill::Local(LocalPrefill::MostlyCached)
        } else {
            match self.pick_for(
                &mut inner,
                Pool::Context,
                &[],
                adapter,
                now,
                Some(&mut prompt),
            ) {
                Pick::Chosen(context_id) => Prefill::Remote { context_id },
                Pick::AllFull => Prefill::Local(LocalPrefill::ContextFull),
                Pick::NoneLive => Prefill::Local(LocalPrefill::NoContextWorker),
            }
        };
        let generate_blocks = inner.prefix.info(&generate_id).map_or(0, |info| {
            prompt_ids.len().div_ceil(info.block_size.max(1) as usize) as u64
        });
        Ok(Route {
            generate_id,
            generate_role,
            generate_kv_peer,
            prefill,
            generate_blocks,
        })
    }

    /// Chooses the generation worker of the `n` choices of one request (`n` > 1) and counts
    /// `n` jobs against it. The choices go to one worker so that they share the prompt's KV
    /// blocks there, and it prefills the prompt itself (no context worker): computed once
    /// for all choices, the prompt costs what one local prefill costs, where a context worker
    /// would add a transfer per choice (docs/protocol.md, "Requests with n > 1").
    pub fn route_samples(
        &self,
        n: u32,
        adapter: Option<&str>,
        now: Instant,
    ) -> Result<Route, NoRoute> {
        self.route_local(n, LocalPrefill::Samples, adapter, now)
    }

    /// Chooses a generation worker for `n` jobs that it prefills itself (`why`: the choices
    /// of one request, or prompt logprobs) and counts them against it.
    pub fn route_local(
        &self,
        n: u32,
        why: LocalPrefill,
        adapter: Option<&str>,
        now: Instant,
    ) -> Result<Route, NoRoute> {
        let mut inner = self.lock();
        let generate_id = self.pick_generation(&mut inner, adapter, now)?;
        let entry = inner
            .workers
            .get_mut(&generate_id)
            .expect("the chosen worker is known");
        entry.count_assigned(n.saturating_sub(1));
        Ok(Route {
            generate_id,
            generate_role: entry.heartbeat.role,
            generate_kv_peer: entry.heartbeat.kv_peer.clone(),
            prefill: Prefill::Local(why),
            generate_blocks: 0,
        })
    }

    /// Chooses a live worker with room for a generation job and counts the job against it;
    /// `None` when there is none.
    pub fn pick_generate(&self, now: Instant) -> Option<String> {
        self.pick_generate_excluding(&[], None, now)
    }

    /// [`Self::pick_generate`] among the workers other than `failed` (a request migrating
    /// off it: it may still heartbeat, e.g. when its engine failed the request).
    pub fn pick_generate_other_than(
        &self,
        failed: &str,
        adapter: Option<&str>,
        now: Instant,
    ) -> Option<String> {
        self.pick_generate_excluding(&[failed.to_owned()], adapter, now)
    }

    /// [`Self::pick_generate`] among the workers not in `excluded` (those that refused the
    /// request's job) that serve `adapter`.
    pub fn pick_generate_excluding(
        &self,
        excluded: &[String],
        adapter: Option<&str>,
        now: Instant,
    ) -> Option<String> {
        let mut inner = self.lock();
        self.pick(&mut inner, Pool::Generate, excluded, adapter, now)
            .chosen()
    }

    /// A context worker not in `excluded` with room for the prefill of `prompt_ids`, counted
    /// against it.
    pub fn pick_context_excluding(
        &self,
        prompt_ids: &[u32],
        excluded: &[String],
        adapter: Option<&str>,
        now: Instant,
    ) -> Option<String> {
        let mut inner = self.lock();
        self.pick_context(&mut inner, prompt_ids, excluded, adapter, now)
            .chosen()
    }

    /// The context worker not in `excluded` that prefills `prompt_ids` (counted against it).
    fn pick_context(
        &self,
        inner: &mut Inner,
        prompt_ids: &[u32],
        excluded: &[String],
        adapter: Option<&str>,
        now: Instant,
    ) -> Pick {
        // The policies weigh load alone, so any context worker prefills a prompt as well as
        // another; one that weighs the KV blocks a worker already holds reads `prompt_ids`.
        let _ = prompt_ids;
        self.pick(inner, Pool::Context, excluded, adapter, now)
    }

    /// A request's generation worker (counted against it), or why there is none.
    fn pick_generation(
        &self,
        inner: &mut Inner,
        adapter: Option<&str>,
        now: Instant,
    ) -> Result<String, NoRoute> {
        match self.pick(inner, Pool::Generate, &[], adapter, now) {
            Pick::Chosen(id) => Ok(id),
            Pick::AllFull => Err(NoRoute::AllFull),
            Pick::NoneLive => Err(NoRoute::NoLiveWorker),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tandem_protocol::config::RouterPolicy;
    use tandem_protocol::messages::{Heartbeat, KvPeer, WorkerRole};

    use super::*;
    use crate::metrics::Metrics;
    use crate::outcomes::FallbackReason;
    use crate::router::testing::{context_of, heartbeat, prompt, registry, settings};

    #[test]
    fn a_lora_adapters_jobs_go_only_to_workers_that_serve_it() {
        use tandem_protocol::messages::LoraAdapterInfo;
        let now = Instant::now();
        let adapters = crate::lora::ServedAdapters::default();
        let registry = registry(RouterPolicy::LeastLoaded).with_adapters(adapters.clone());
        let serving = |hb: Heartbeat| Heartbeat {
            lora_adapters: vec![LoraAdapterInfo {
                name: "sql".into(),
                fingerprint: "f".repeat(32),
            }],
            ..hb
        };
        // The plain workers are idle, the adapter's busy: least-loaded still skips them.
        registry.observe(heartbeat("plain-dec", WorkerRole::Decode, 0, 0), now);
        registry.observe(heartbeat("plain-ctx", WorkerRole::Context, 0, 0), now);
        assert!(!adapters.contains("sql"));
        assert_eq!(
            registry.route_salted(&prompt(40), None, Some("sql"), now),
            Err(NoRoute::NoLiveWorker),
            "no worker serves the adapter"
        );
        registry.observe(
            serving(heartbeat("lora-dec", WorkerRole::Decode, 5, 0)),
            now,
        );
        registry.observe(
            serving(heartbeat("lora-ctx", WorkerRole::Context, 5, 0)),
            now,
        );
        assert!(adapters.contains("sql"));
        for _ in 0..4 {
            let route = registry
                .route_salted(&prompt(40), None, Some("sql"), now)
                .unwrap();
            assert_eq!(route.generate_id, "lora-dec");
            assert_eq!(context_of(&route), Some("lora-ctx"));
            let local = registry.route_samples(2, Some("sql"), now).unwrap();
            assert_eq!(local.generate_id, "lora-dec");
            assert_eq!(
                registry
                    .pick_generate_other_than("x", Some("sql"), now)
                    .as_deref(),
                Some("lora-dec")
            );
            assert_eq!(
                registry
                    .pick_context_excluding(&prompt(40), &[], Some("sql"), now)
                    .as_deref(),
                Some("lora-ctx")
            );
        }
        // The base model's jobs go anywhere (here: the idle plain workers).
        let route = registry.route_salted(&prompt(40), None, None, now).unwrap();
        assert_eq!(route.generate_id, "plain-dec");
        // The adapter's workers leave: so does the adapter.
        registry.expire(now + Duration::from_secs(5));
        assert!(!adapters.contains("sql"));
    }

    #[test]
    fn a_migration_never_goes_back_to_the_worker_it_leaves() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::LeastLoaded);
        registry.observe(heartbeat("sick", WorkerRole::Both, 0, 0), now);
        assert_eq!(registry.pick_generate_other_than("sick", None, now), None);
        registry.observe(heartbeat("busy", WorkerRole::Decode, 9, 0), now);
        for _ in 0..3 {
            assert_eq!(
                registry
                    .pick_generate_other_than("sick", None, now)
                    .as_deref(),
                Some("busy"),
                "the failed worker is skipped even when it is the least loaded"
            );
        }
    }

    #[test]
    fn full_context_workers_mean_a_local_prefill_and_refusers_are_skipped() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::LeastLoaded);
        registry.observe(heartbeat("dec", WorkerRole::Decode, 0, 0), now);
        let full = Heartbeat {
            numerics: None,
            max_queued: Some(1),
            ..heartbeat("ctx-a", WorkerRole::Context, 0, 1)
        };
        registry.observe(full, now);
        let route = registry.route(&prompt(5), now).unwrap();
        assert_eq!(route.prefill, Prefill::Local(LocalPrefill::ContextFull));
        assert_eq!(
            FallbackReason::of_route(&route),
            Some(FallbackReason::ContextFull)
        );
        registry.observe(heartbeat("ctx-b", WorkerRole::Context, 0, 0), now);
        assert_eq!(
            context_of(&registry.route(&prompt(5), now).unwrap()),
            Some("ctx-b")
        );
        // A job refused by ctx-b has nowhere else to go: ctx-a is full.
        assert_eq!(
            registry.pick_context_excluding(&prompt(5), &["ctx-b".to_owned()], None, now),
            None
        );
        assert_eq!(
            registry.pick_generate_excluding(&["dec".to_owned()], None, now),
            None
        );
        assert_eq!(
            registry.pick_generate_excluding(&[], None, now).as_deref(),
            Some("dec")
        );
    }

    #[test]
    fn disaggregated_routes_pick_both_pools_each_in_turn() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::RoundRobin);
        registry.observe(heartbeat("dec", WorkerRole::Decode, 0, 0), now);
        for id in ["ctx-a", "ctx-b"] {
            registry.observe(heartbeat(id, WorkerRole::Context, 0, 0), now);
        }
        let routes: Vec<Route> = (0..4)
            .map(|_| registry.route(&prompt(5), now).unwrap())
            .collect();
        let contexts: Vec<&str> = routes.iter().filter_map(context_of).collect();
        assert_eq!(contexts, ["ctx-a", "ctx-b", "ctx-a", "ctx-b"]);
        assert!(routes.iter().all(|r| r.generate_id == "dec"));
        assert!(routes.iter().all(|r| FallbackReason::of_route(r).is_none()));
    }

    #[test]
    fn a_route_carries_how_its_generation_worker_reads_kv() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::RoundRobin);
        let peer = KvPeer {
            host_id: "boot-1".into(),
            cuda_ipc: true,
            coalesced_regions: true,
            cuda_ipc_ranks: true,
            cuda_ipc_cache: Vec::new(),
            cuda_ipc_mapped: Vec::new(),
        };
        registry.observe(
            Heartbeat {
                numerics: None,
                kv_peer: Some(peer.clone()),
                ..heartbeat("dec", WorkerRole::Decode, 0, 0)
            },
            now,
        );
        registry.observe(heartbeat("ctx", WorkerRole::Context, 0, 0), now);
        let route = registry.route(&prompt(5), now).unwrap();
        assert_eq!(context_of(&route), Some("ctx"));
        assert_eq!(route.generate_kv_peer, Some(peer));
        // A later heartbeat that withdraws CUDA IPC (its reads failed) is what routes see.
        registry.observe(
            Heartbeat {
                numerics: None,
                kv_peer: Some(KvPeer {
                    host_id: "boot-1".into(),
                    cuda_ipc: false,
                    coalesced_regions: true,
                    cuda_ipc_ranks: false,
                    cuda_ipc_cache: Vec::new(),
                    cuda_ipc_mapped: Vec::new(),
                }),
                ..heartbeat("dec", WorkerRole::Decode, 0, 0)
            },
            now,
        );
        let route = registry.route(&prompt(5), now).unwrap();
        assert_eq!(route.generate_kv_peer.map(|p| p.cuda_ipc), Some(false));
    }

    #[test]
    fn short_prompts_and_missing_context_workers_prefill_locally() {
        let now = Instant::now();
        let registry = WorkerRegistry::new(settings(RouterPolicy::LeastLoaded, 8), Metrics::new());
        registry.observe(heartbeat("dec", WorkerRole::Decode, 0, 0), now);
        let route = registry.route(&prompt(100), now).unwrap();
        assert_eq!(route.prefill, Prefill::Local(LocalPrefill::NoContextWorker));
        assert_eq!(
            FallbackReason::of_route(&route),
            Some(FallbackReason::NoContextWorker)
        );
        registry.observe(heartbeat("ctx", WorkerRole::Context, 0, 0), now);
        let route = registry.route(&prompt(7), now).unwrap();
        assert_eq!(route.prefill, Prefill::Local(LocalPrefill::ShortPrompt));
        assert_eq!(FallbackReason::of_route(&route), None);
        assert_eq!(
            context_of(&registry.route(&prompt(8), now).unwrap()),
            Some("ctx")
        );
        // A stale context worker is not picked, even before expiry.
        let later = now + Duration::from_millis(1500);
        registry.observe(heartbeat("dec", WorkerRole::Decode, 0, 0), later);
        assert_eq!(
            registry.route(&prompt(100), later).unwrap().prefill,
            Prefill::Local(LocalPrefill::NoContextWorker)
        );
    }

    #[test]
    fn aggregated_workers_prefilling_locally_is_no_fallback() {
        let now = Instant::now();
        let registry = registry(RouterPolicy::LeastLoaded);
        registry.observe(heartbeat("agg", WorkerRole::Both, 0, 0), now);
        let route = registry.route(&prompt(100), now).unwrap();
        assert_eq!(route.prefill, Prefill::Local(LocalPrefill::NoContextWorker));
        assert_eq!(FallbackReason::of_route(&route), None);
    }
}

#[cfg(test)]
mod kv_aware_tests {
    use std::time::Instant;

    use tandem_protocol::block_hash::{BlockHash, BlockHashes};
    use tandem_protocol::config::RouterPolicy;
    use tandem_protocol::messages::{Heartbeat, KvEvent, KvEvents, PrefixCacheInfo, WorkerRole};

    use super::*;
    use crate::metrics::Metrics;
    use crate::router::RouterSettings;
    use crate::router::testing::{heartbeat, settings};

    const BLOCK: u32 = 16;

    /// A `both` worker caching prompts in 16-token blocks, `used` of its 1,000 blocks in use.
    fn caching(id: &str, used: u32) -> Heartbeat {
        Heartbeat {
            numerics: None,
            free_kv_blocks: 1000 - used,
            total_kv_blocks: 1000,
            prefix_cache: Some(PrefixCacheInfo {
                block_size: BLOCK,
                namespace: "fp".into(),
                events_epoch: "e".into(),
                events_seq: 0,
                queried_tokens: 0,
                hit_tokens: 0,
                evicted_blocks: 0,
            }),
            ..heartbeat(id, WorkerRole::Both, 0, 0)
        }
    }

    /// The worker's events say it stored `prompt`'s full blocks (batch `seq`).
    fn stores(registry: &WorkerRegistry, id: &str, seq: u64, prompt: &[u32]) {
        let names = BlockHashes::new(BlockHash::root("fp", None), BLOCK as usize, prompt)
            .full()
            .iter()
            .map(BlockHash::short)
            .collect();
        let needs_snapshot = registry.kv_events(KvEvents {
            worker_id: id.into(),
            epoch: "e".into(),
            seq,
            events: vec![KvEvent::Stored { blocks: names }],
        });
        assert!(!needs_snapshot);
    }

    fn conversation(seed: u32, tokens: usize) -> Vec<u32> {
        (0..tokens as u32)
            .map(|i| (seed * 7919 + i * 31) % 50_000)
            .collect()
    }

    #[test]
    fn a_follow_up_turn_goes_to_the_worker_that_holds_the_conversation() {
        let now = Instant::now();
        let metrics = Metrics::new();
        let registry = WorkerRegistry::new(settings(RouterPolicy::KvAware, 0), metrics.clone());
        for id in ["a", "b", "c"] {
            registry.observe(caching(id, 100), now);
        }
        let first_turn = conversation(1, 640);
        stores(&registry, "b", 1, &first_turn);
        let mut second_turn = first_turn.clone();
        second_turn.extend(conversation(2, 64));
        let route = registry.route(&second_turn, now).unwrap();
        assert_eq!(route.generate_id, "b");
        // The decision's overlap: 40 of the prompt's 44 blocks, in the (0.9, 0.99] bucket.
        let text = metrics.render();
        for line in [
            "tandem_router_cached_prompt_ratio_bucket{pool=\"generation\",le=\"0.9\"} 0",
            "tandem_router_cached_prompt_ratio_bucket{pool=\"generation\",le=\"0.99\"} 1",
            "tandem_router_cached_prompt_ratio_count{pool=\"generation\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // Unrelated prompts spread over the workers by load (each pick counts its blocks).
        let picks: Vec<String> = (10..20)
            .map(|seed| {
                registry
                    .route(&conversation(seed, 320), now)
                    .unwrap()
                    .generate_id
            })
            .collect();
        for id in ["a", "b", "c"] {
            assert!(picks.iter().any(|p| p == id), "{id} got nothing: {picks:?}");
        }
    }

    #[test]
    fn one_hot_prefix_under_load_still_spreads_over_every_worker() {
        let now = Instant::now();
        let registry = WorkerRegistry::new(settings(RouterPolicy::KvAware, 0), Metrics::new());
        for id in ["a", "b", "c"] {
            registry.observe(caching(id, 0), now);
        }
        let system_prompt = conversation(3, 2048);
        stores(&registry, "a", 1, &system_prompt);
        let mut picks = Vec::new();
        for question in 0..30 {
            let mut prompt = system_prompt.clone();
            prompt.extend(conversation(100 + question, 128));
            picks.push(registry.route(&prompt, now).unwrap().generate_id);
        }
        assert_eq!(picks[0], "a", "the first goes where the prefix is");
        for id in ["a", "b", "c"] {
            assert!(picks.iter().any(|p| p == id), "{id} got nothing: {picks:?}");
        }
        // Workers whose events have not arrived are weighed by what this router sent them:
        // b and c now take the hot prefix too.
        let late = &picks[picks.len() - 6..];
        assert!(late.iter().any(|p| p != "a"), "{picks:?}");
    }

    #[test]
    fn the_overlap_weight_trades_a_held_prefix_against_the_holder_s_load() {
        let now = Instant::now();
        // b holds the conversation's 40 blocks and its running work holds 50; a holds
        // nothing and runs nothing. The next turn has 44 blocks, 4 of them new.
        let route_with = |weight: f64| {
            let registry = WorkerRegistry::new(
                RouterSettings {
                    kv_overlap_weight: weight,
                    ..settings(RouterPolicy::KvAware, 0)
                },
                Metrics::new(),
            );
            registry.observe(caching("a", 0), now);
            registry.observe(caching("b", 50), now);
            let first_turn = conversation(1, 640);
            stores(&registry, "b", 1, &first_turn);
            let mut second_turn = first_turn.clone();
            second_turn.extend(conversation(2, 64));
            registry.route(&second_turn, now).unwrap().generate_id
        };
        // Weight 1: a costs 44, b 4 + 50 = 54.
        assert_eq!(route_with(1.0), "a");
        // Weight 1.5: a 66, b 56.
        assert_eq!(route_with(1.5), "b");
        // Weight 0: held blocks alone.
        assert_eq!(route_with(0.0), "a");
    }

    #[test]
    fn a_mostly_cached_prompt_is_prefilled_by_its_generation_worker() {
        let now = Instant::now();
        let registry = WorkerRegistry::new(settings(RouterPolicy::KvAware, 256), Metrics::new());
        registry.observe(
            Heartbeat {
                numerics: None,
                role: WorkerRole::Decode,
                ..caching("dec", 0)
            },
            now,
        );
        registry.observe(heartbeat("ctx", WorkerRole::Context, 0, 0), now);
        let history = conversation(4, 2000);
        stores(&registry, "dec", 1, &history);
        let mut next_turn = history.clone();
        next_turn.extend(conversation(5, 100));
        let route = registry.route(&next_turn, now).unwrap();
        assert_eq!(route.prefill, Prefill::Local(LocalPrefill::MostlyCached));
        // A new conversation of the same length goes to the context worker.
        let route = registry.route(&conversation(6, 2100), now).unwrap();
        assert_eq!(
            route.prefill,
            Prefill::Remote {
                context_id: "ctx".into()
            }
        );
        // The same turn under another salt finds nothing cached.
        let route = registry
            .route_salted(&next_turn, Some("t"), None, now)
            .unwrap();
        assert!(matches!(route.prefill, Prefill::Remote { .. }));
    }
}
