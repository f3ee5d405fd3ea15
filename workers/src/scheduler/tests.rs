use super::*;

fn config(budget: usize, seqs: usize, block_size: usize, blocks: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_batched_tokens: budget,
        max_num_seqs: seqs,
        block_size,
        num_blocks: blocks,
        max_model_len: 4096,
        growth_reserve_tokens: None,
        prefix_caching: false,
    }
}

/// Runs a step and plays the engine: every sequence that got logits samples a token.
fn step_and_append(s: &mut Scheduler) -> SchedulerStep {
    let step = s.schedule();
    for item in &step.scheduled {
        if item.wants_logits {
            s.append_token(item.id).unwrap();
        }
    }
    step
}

#[test]
fn rejects_bad_configs_and_prompts() {
    assert!(
        Scheduler::new(config(2, 4, 16, 8)).is_err(),
        "budget < max_num_seqs"
    );
    assert!(Scheduler::new(config(8, 4, 0, 8)).is_err());
    let mut s = Scheduler::new(config(64, 4, 4, 8)).unwrap();
    assert_eq!(
        s.max_context_len(),
        32,
        "capped by the cache: 8 blocks of 4"
    );
    assert_eq!(s.add(1, 0), Err(SchedulerError::EmptyPrompt));
    assert_eq!(
        s.add(1, 32),
        Err(SchedulerError::PromptTooLong {
            prompt_tokens: 32,
            max_context_len: 32
        })
    );
    s.add(1, 31).unwrap();
    assert_eq!(s.add(1, 3), Err(SchedulerError::DuplicateSequence(1)));
}

#[test]
fn chunks_a_long_prompt_and_asks_logits_only_at_its_end() {
    let mut s = Scheduler::new(config(8, 4, 4, 16)).unwrap();
    s.add(7, 20).unwrap();
    let mut chunks = vec![];
    loop {
        let step = step_and_append(&mut s);
        let item = &step.scheduled[0];
        chunks.push((item.cached_len, item.token_count, item.wants_logits));
        assert!(item.block_table.len() * 4 >= item.cached_len + item.token_count);
        if item.wants_logits {
            break;
        }
    }
    assert_eq!(chunks, vec![(0, 8, false), (8, 8, false), (16, 4, true)]);
    let step = step_and_append(&mut s);
    assert_eq!(
        (step.scheduled[0].cached_len, step.scheduled[0].token_count),
        (20, 1)
    );
    assert_eq!(
        step.scheduled[0].block_table.len(),
        6,
        "grew by one block at token 21"
    );
}

#[test]
fn decodes_first_then_prefill_fills_the_budget() {
    let mut s = Scheduler::new(config(6, 4, 4, 64)).unwrap();
    s.add(1, 3).unwrap();
    s.add(2, 3).unwrap();
    step_and_append(&mut s); // both prompts in one step (3 + 3 = 6)
    s.add(3, 10).unwrap();
    let step = step_and_append(&mut s);
    let order: Vec<_> = step
        .scheduled
        .iter()
        .map(|x| (x.id, x.token_count))
        .collect();
    assert_eq!(order, vec![(1, 1), (2, 1), (3, 4)]);
    assert_eq!(step.num_tokens(), 6);
}

#[test]
fn budget_and_seq_cap_are_respected() {
    let mut s = Scheduler::new(config(10, 3, 4, 64)).unwrap();
    for id in 0..6 {
        s.add(id, 7).unwrap();
    }
    for _ in 0..30 {
        let step = step_and_append(&mut s);
        assert!(step.num_tokens() <= 10);
        assert!(s.num_running() <= 3);
        let ids: HashSet<_> = step.scheduled.iter().map(|x| x.id).collect();
        assert_eq!(
            ids.len(),
            step.scheduled.len(),
            "a sequence twice in one step"
        );
    }
}

#[test]
fn admission_is_fifo_and_a_blocked_head_is_not_overtaken() {
    // 6 blocks of 4: the first request takes 5 blocks, the second (needs 3) must wait, and
    // the third (needs 1, would fit) must not overtake it.
    let mut s = Scheduler::new(config(64, 8, 4, 6)).unwrap();
    s.add(1, 20).unwrap();
    s.add(2, 12).unwrap();
    s.add(3, 2).unwrap();
    let step = step_and_append(&mut s);
    let ids: Vec<_> = step.scheduled.iter().map(|x| x.id).collect();
    assert_eq!(ids, vec![1]);
    assert_eq!(s.num_waiting(), 2);
    s.finish(1).unwrap();
    let step = step_and_append(&mut s);
    let ids: Vec<_> = step.scheduled.iter().map(|x| x.id).collect();
    assert_eq!(ids, vec![2, 3], "admitted in arrival order");
}

#[test]
fn preempts_the_newest_and_resumes_it_with_its_generated_tokens() {
    // 4 blocks of 2 tokens; two sequences of 3-token prompts each take 2 blocks. The first
    // decode that crosses a block boundary finds the pool empty and preempts the newer.
    let mut s = Scheduler::new(config(16, 4, 2, 4)).unwrap();
    s.add(1, 3).unwrap();
    s.add(2, 3).unwrap();
    step_and_append(&mut s); // prefill both: 4 tokens each now known, 3 computed
    assert_eq!(s.free_blocks(), 0);
    let step = step_and_append(&mut s); // both decode position 3 within their 2nd block
    assert!(step.preempted.is_empty());
    // Now each has 5 tokens known, 4 computed: position 4 needs a third block.
    let step = step_and_append(&mut s);
    assert_eq!(step.preempted, vec![2]);
    assert_eq!(step.scheduled.len(), 1);
    assert_eq!(step.scheduled[0].id, 1);
    assert_eq!(s.status(2), Some(SeqStatus::Waiting));
    assert_eq!(s.num_preemptions(2), Some(1));
    assert_eq!(s.num_computed(2), Some(0));
    // Let 1 finish; 2 is re-admitted and recomputes prompt plus its 2 generated tokens.
    s.finish(1).unwrap();
    let step = step_and_append(&mut s);
    assert_eq!(step.scheduled.len(), 1);
    let item = &step.scheduled[0];
    assert_eq!((item.id, item.cached_len, item.token_count), (2, 0, 5));
    assert!(
        item.wants_logits,
        "recompute ends with the logits of the next token"
    );
    s.finish(2).unwrap();
    assert_eq!(s.free_blocks(), 4);
}

#[test]
fn a_decode_that_is_the_newest_preempts_itself() {
    // 6 blocks of 2. Sequence 1 (prompt 9) takes 5 blocks over two chunks; sequence 2
    // (prompt 2) takes the last one. Then 2 needs a second block while 1 does not: 2 is
    // the most recently admitted, so it preempts itself and 1 keeps running.
    let mut s = Scheduler::new(config(6, 4, 2, 6)).unwrap();
    s.add(1, 9).unwrap();
    s.add(2, 2).unwrap();
    let step = step_and_append(&mut s);
    assert_eq!(
        step.scheduled.iter().map(|x| x.id).collect::<Vec<_>>(),
        vec![1]
    );
    let step = step_and_append(&mut s);
    assert_eq!(
        step.scheduled.iter().map(|x| x.id).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(s.free_blocks(), 0);
    let step = step_and_append(&mut s);
    assert_eq!(step.preempted, vec![2]);
    assert_eq!(
        step.scheduled.iter().map(|x| x.id).collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(s.free_blocks(), 1);
    // 2 (3 tokens now: needs 2 blocks) waits until 1 is gone.
    let step = step_and_append(&mut s);
    assert_eq!(
        step.scheduled.iter().map(|x| x.id).collect::<Vec<_>>(),
        vec![1]
    );
    s.finish(1).unwrap();
    let step = step_and_append(&mut s);
    let item = &step.scheduled[0];
    assert_eq!((item.id, item.cached_len, item.token_count), (2, 0, 3));
}

#[test]
fn a_decode_preempts_a_newer_partial_prefill() {
    // 4 blocks of 2, budget 4. 1 (prompt 7) and 2 (prompt 3) both start prefilling and
    // take turns; 2 then decodes into a full pool and preempts 3, newer and mid-prefill.
    let mut s = Scheduler::new(config(4, 4, 2, 4)).unwrap();
    s.add(1, 7).unwrap();
    s.add(2, 3).unwrap();
    let step = step_and_append(&mut s); // 1: 4 tokens (2 blocks)
    assert_eq!(step.scheduled.len(), 1);
    s.finish(1).unwrap();
    s.add(3, 7).unwrap();
    let step = step_and_append(&mut s); // 2 admitted: 3 tokens (2 blocks); 3: 1 token
    assert_eq!(
        step.scheduled.iter().map(|x| x.id).collect::<Vec<_>>(),
        vec![2, 3]
    );
    // 2 decodes (needs no block: 4th token in 2nd block); 3 has 1 computed, 1 block,
    // 1 free block: its chunk shrinks to fit (3 tokens up to 4 computed).
    let step = step_and_append(&mut s);
    let chunks: Vec<_> = step
        .scheduled
        .iter()
        .map(|x| (x.id, x.token_count))
        .collect();
    assert_eq!(chunks, vec![(2, 1), (3, 3)]);
    assert_eq!(s.free_blocks(), 0);
    // 2 needs a 3rd block for its 5th token: newest is 3, which is preempted.
    let step = step_and_append(&mut s);
    assert_eq!(step.preempted, vec![3]);
    assert_eq!(
        step.scheduled.iter().map(|x| x.id).collect::<Vec<_>>(),
        vec![2]
    );
    s.finish(2).unwrap();
    assert_eq!(s.free_blocks(), 4);
    let step = step_and_append(&mut s);
    assert_eq!((step.scheduled[0].id, step.scheduled[0].cached_len), (3, 0));
}

#[test]
fn finish_frees_blocks_in_every_state() {
    let mut s = Scheduler::new(config(4, 4, 2, 16)).unwrap();
    s.add(1, 10).unwrap(); // mid-prefill after one step
    s.add(2, 2).unwrap(); // waiting
    step_and_append(&mut s);
    assert_eq!(s.status(1), Some(SeqStatus::Running));
    assert_eq!(s.status(2), Some(SeqStatus::Waiting));
    s.finish(1).unwrap();
    s.finish(2).unwrap();
    assert_eq!(s.free_blocks(), 16);
    assert!(!s.has_work());
    assert_eq!(s.finish(1), Err(SchedulerError::UnknownSequence(1)));
}

#[test]
fn a_reservation_holds_blocks_and_a_slot_and_is_never_scheduled_or_preempted() {
    // 2 slots, 8 blocks of 4 tokens.
    let mut s = Scheduler::new(config(16, 2, 4, 8)).unwrap();
    assert!(s.can_add_computed(12, 4096));
    s.reserve(1, 12, 4096, None).unwrap();
    assert_eq!(s.status(1), Some(SeqStatus::Reserved));
    assert_eq!((s.free_blocks(), s.num_reserved()), (5, 1));
    assert!(!s.has_work(), "a reservation alone is no work");
    assert!(s.schedule().is_empty());
    // The reservation's slot counts: one running sequence fills the other, and nothing
    // more is admitted or reserved.
    s.add(2, 4).unwrap();
    s.add(3, 4).unwrap();
    let step = step_and_append(&mut s);
    assert_eq!(step.scheduled.len(), 1, "{step:?}");
    assert_eq!(s.status(3), Some(SeqStatus::Waiting));
    assert!(!s.can_add_computed(4, 4096));
    assert_eq!(s.reserve(4, 4, 4096, None), Err(SchedulerError::NoRoom(4)));
    // Sequence 2 decodes until the pool runs dry: it preempts itself, never the
    // reservation.
    let mut preempted = false;
    for _ in 0..30 {
        let step = step_and_append(&mut s);
        assert!(step.preempted.iter().all(|&id| id != 1), "{step:?}");
        assert!(step.scheduled.iter().all(|item| item.id != 1));
        if !step.preempted.is_empty() {
            preempted = true;
            break;
        }
    }
    assert!(preempted, "sequence 2 outgrew the free blocks");
    assert_eq!(s.status(1), Some(SeqStatus::Reserved));
    assert_eq!(s.blocks(1).map(|b| b.len()), Some(3));
    assert_eq!(
        s.start_reserved(9, true),
        Err(SchedulerError::NotReserved(9))
    );
    // Its K/V written: it runs, fully computed, its first token to append.
    let blocks = s.start_reserved(1, true).unwrap();
    assert_eq!(blocks.len(), 3);
    assert_eq!(s.num_computed(1), Some(12));
    assert_eq!(s.num_reserved(), 0);
    assert_eq!(
        s.start_reserved(1, true),
        Err(SchedulerError::NotReserved(1))
    );
    s.append_token(1).unwrap();
    for id in [1, 2, 3] {
        s.finish(id).unwrap();
    }
    assert_eq!(s.free_blocks(), 8);
}

#[test]
fn a_reservation_can_prefill_in_its_blocks_or_be_given_back() {
    let mut s = Scheduler::new(config(8, 4, 4, 8)).unwrap();
    s.reserve(1, 10, 4096, None).unwrap();
    s.reserve(2, 6, 4096, None).unwrap();
    assert_eq!(s.free_blocks(), 3);
    // A failed pull: the prompt is computed here, in chunks, in the blocks it holds.
    s.start_reserved(1, false).unwrap();
    assert_eq!(s.num_computed(1), Some(0));
    let step = step_and_append(&mut s);
    assert_eq!(
        (step.scheduled[0].id, step.scheduled[0].token_count),
        (1, 8)
    );
    let step = step_and_append(&mut s);
    assert!(step.scheduled[0].wants_logits);
    assert_eq!(s.free_blocks(), 3, "no block beyond the reserved ones");
    // A cancelled one gives its blocks and slot back.
    s.finish(2).unwrap();
    assert_eq!((s.free_blocks(), s.num_reserved()), (5, 0));
}

#[test]
fn pinned_sequences_keep_blocks_until_released() {
    let mut s = Scheduler::new(config(16, 4, 4, 8)).unwrap();
    s.add(1, 9).unwrap();
    let step = step_and_append(&mut s);
    assert!(step.scheduled[0].wants_logits);
    let blocks = s.pin(1).unwrap();
    assert_eq!(blocks.len(), 3);
    assert_eq!(s.free_blocks(), 5);
    assert!(!s.has_work());
    assert!(s.schedule().is_empty());
    s.release_pinned(1).unwrap();
    assert_eq!(s.free_blocks(), 8);
}

#[test]
fn enforces_the_context_limit() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_model_len: 6,
        ..config(16, 4, 4, 8)
    })
    .unwrap();
    s.add(1, 4).unwrap();
    step_and_append(&mut s); // 5 tokens
    step_and_append(&mut s); // 6 tokens
    s.schedule();
    assert_eq!(
        s.append_token(1),
        Err(SchedulerError::ContextFull {
            id: 1,
            max_context_len: 6
        })
    );
}

#[test]
fn samples_share_the_full_prompt_blocks_of_a_sibling_and_compute_the_rest() {
    let mut s = Scheduler::new(config(64, 8, 4, 16)).unwrap();
    // 10 tokens: blocks of 4, 4, 2; the first two are shareable.
    for id in [1, 2, 3] {
        s.add_to_group(id, 10, 7).unwrap();
    }
    // The first computes the prompt; the others wait for it (nothing overtakes them).
    s.add(4, 3).unwrap();
    let step = step_and_append(&mut s);
    let ids: Vec<_> = step.scheduled.iter().map(|i| i.id).collect();
    assert_eq!(ids, vec![1], "siblings wait while the prompt is prefilled");
    assert_eq!(s.free_blocks(), 13);
    // Next step: 1 decodes, 2 and 3 take its two full blocks and compute 2 tokens each.
    let step = step_and_append(&mut s);
    let by_id = |id| step.scheduled.iter().find(|i| i.id == id).unwrap().clone();
    let (a, b, c) = (by_id(1), by_id(2), by_id(3));
    assert_eq!((a.cached_len, a.token_count), (10, 1));
    for sample in [&b, &c] {
        assert_eq!((sample.cached_len, sample.token_count), (8, 2));
        assert!(sample.wants_logits);
        assert_eq!(sample.block_table[..2], a.block_table[..2]);
        assert_ne!(sample.block_table[2], a.block_table[2]);
    }
    assert_ne!(b.block_table[2], c.block_table[2]);
    assert_eq!(s.kv.ref_count(a.block_table[0]), 3);
    // 2 shared + 3 partial blocks for the group, 1 for sequence 4.
    assert_eq!(s.free_blocks(), 16 - 6);
    // The shared blocks outlive whoever computed them.
    s.finish(1).unwrap();
    assert_eq!(s.kv.ref_count(a.block_table[0]), 2);
    assert_eq!(s.free_blocks(), 16 - 5);
    s.finish(2).unwrap();
    s.finish(3).unwrap();
    s.finish(4).unwrap();
    assert_eq!(s.free_blocks(), 16);
    assert!(s.groups.is_empty());
}

#[test]
fn a_prompt_of_whole_blocks_leaves_its_last_block_to_each_sample() {
    let mut s = Scheduler::new(config(64, 8, 4, 16)).unwrap();
    s.add_to_group(1, 8, 1).unwrap();
    s.add_to_group(2, 8, 1).unwrap();
    step_and_append(&mut s);
    let step = step_and_append(&mut s);
    let b = step.scheduled.iter().find(|i| i.id == 2).unwrap();
    assert_eq!((b.cached_len, b.token_count), (4, 4));
    // A prompt within one block shares nothing, and its samples do not wait.
    s.add_to_group(3, 3, 2).unwrap();
    s.add_to_group(4, 3, 2).unwrap();
    let step = step_and_append(&mut s);
    assert!(
        step.scheduled
            .iter()
            .any(|i| i.id == 3 && i.cached_len == 0)
    );
    assert!(
        step.scheduled
            .iter()
            .any(|i| i.id == 4 && i.cached_len == 0)
    );
}

#[test]
fn a_sample_with_no_running_sibling_computes_the_prompt_and_shares_it_after() {
    let mut s = Scheduler::new(config(64, 8, 4, 16)).unwrap();
    s.add_to_group(1, 9, 3).unwrap();
    step_and_append(&mut s);
    // The prompt's computer leaves before its sibling arrives: the sibling computes all.
    s.finish(1).unwrap();
    s.add_to_group(2, 9, 3).unwrap();
    s.add_to_group(3, 9, 3).unwrap();
    let step = step_and_append(&mut s);
    assert_eq!(step.scheduled.len(), 1);
    assert_eq!((step.scheduled[0].id, step.scheduled[0].cached_len), (2, 0));
    let step = step_and_append(&mut s);
    let c = step.scheduled.iter().find(|i| i.id == 3).unwrap();
    assert_eq!(c.cached_len, 8);
}

#[test]
fn a_preempted_sample_frees_only_its_own_blocks_and_shares_again_on_readmission() {
    // 7 blocks of 2: a prompt of 5 (3 blocks, 2 shareable) and two samples.
    let mut s = Scheduler::new(config(16, 4, 2, 7)).unwrap();
    s.add_to_group(1, 5, 9).unwrap();
    s.add_to_group(2, 5, 9).unwrap();
    step_and_append(&mut s);
    step_and_append(&mut s);
    // 1: 3 blocks, 2: 2 shared + 1 = 4 distinct blocks in use.
    assert_eq!(s.free_blocks(), 3);
    let shared = s.blocks(1).unwrap()[..2].to_vec();
    // Decode until the pool runs dry and 2 (the newest) is preempted.
    let mut preempted = false;
    for _ in 0..8 {
        let step = step_and_append(&mut s);
        if step.preempted.contains(&2) {
            preempted = true;
            break;
        }
    }
    assert!(preempted, "the newest sample must be preempted");
    assert_eq!(s.status(2), Some(SeqStatus::Waiting));
    for b in &shared {
        assert_eq!(s.kv.ref_count(*b), 1, "sequence 1 still holds the prompt");
    }
    // Once 1 finishes, 2 has no running sibling and recomputes everything itself.
    s.finish(1).unwrap();
    let step = step_and_append(&mut s);
    let b = step.scheduled.iter().find(|i| i.id == 2).unwrap();
    assert_eq!(b.cached_len, 0);
    s.finish(2).unwrap();
    assert_eq!(s.free_blocks(), 7);
}

/// A random workload of sample groups under memory pressure: a block's reference count is
/// the number of sequences holding it, nobody writes a block another sequence holds, and
/// every block comes back.
#[test]
fn random_sample_groups_never_write_a_shared_block_and_return_every_block() {
    for seed in 0..20u64 {
        let mut rng = Lcg(seed ^ 0x5eed);
        let cfg = config(16, 6, 4, 20);
        let mut s = Scheduler::new(cfg).unwrap();
        let mut to_generate: HashMap<SeqId, usize> = HashMap::new();
        let mut next_id = 0;
        let mut shared_admissions = 0;
        let mut preemptions = 0;
        for round in 0..300 {
            if next_id < 60 && rng.next(3) == 0 {
                let prompt = 1 + rng.next(24) as usize;
                let n = 1 + rng.next(4);
                for _ in 0..n {
                    s.add_to_group(next_id, prompt, round).unwrap();
                    to_generate.insert(next_id, 1 + rng.next(12) as usize);
                    next_id += 1;
                }
            }
            if rng.next(30) == 0 && !to_generate.is_empty() {
                let mut ids: Vec<_> = to_generate.keys().copied().collect();
                ids.sort();
                let id = ids[rng.next(ids.len() as u64) as usize];
                s.finish(id).unwrap();
                to_generate.remove(&id);
            }
            let step = s.schedule();
            preemptions += step.preempted.len();
            for item in &step.scheduled {
                if item.cached_len > 0 && item.cached_len % 4 == 0 && item.token_count > 1 {
                    shared_admissions += 1;
                }
                let first = item.cached_len / 4;
                let last = (item.cached_len + item.token_count - 1) / 4;
                for b in &item.block_table[first..=last] {
                    assert_eq!(s.kv.ref_count(*b), 1, "seed {seed}: a shared block written");
                }
            }
            let mut holders: HashMap<BlockId, u32> = HashMap::new();
            for id in s.seqs.keys() {
                for b in s.kv.blocks(*id) {
                    *holders.entry(*b).or_default() += 1;
                }
            }
            for (b, n) in &holders {
                assert_eq!(s.kv.ref_count(*b), *n, "seed {seed}: block {b}");
            }
            assert_eq!(
                holders.len() + s.free_blocks(),
                cfg.num_blocks,
                "blocks leaked"
            );
            count_down(&mut s, &step, &mut to_generate);
        }
        drain(&mut s, &mut to_generate, seed);
        assert_eq!(s.free_blocks(), cfg.num_blocks, "seed {seed}");
        assert!(s.groups.is_empty());
        if seed == 0 {
            assert!(preemptions > 0, "the workload must exercise preemption");
            assert!(shared_admissions > 0, "the workload must share blocks");
        }
    }
}

/// What the engine does after a step of a random workload: each sequence that got logits
/// has one token fewer to generate, and ends when it has none left (or no room for its
/// token).
fn count_down(s: &mut Scheduler, step: &SchedulerStep, to_generate: &mut HashMap<SeqId, usize>) {
    for item in step.scheduled.iter().filter(|item| item.wants_logits) {
        let left = to_generate.get_mut(&item.id).unwrap();
        *left -= 1;
        if *left == 0 || s.append_token(item.id).is_err() {
            s.finish(item.id).unwrap();
            to_generate.remove(&item.id);
        }
    }
}

/// Runs a random workload's steps until the scheduler has no work left.
fn drain(s: &mut Scheduler, to_generate: &mut HashMap<SeqId, usize>, seed: u64) {
    let mut guard = 0;
    while s.has_work() {
        let step = s.schedule();
        count_down(s, &step, to_generate);
        guard += 1;
        assert!(guard < 10_000, "no progress (seed {seed})");
    }
}

/// Tiny deterministic generator so the simulation needs no RNG crate.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// A random workload under memory pressure: arrivals, cancellations, finishes. Checks
/// the invariants every step and that every block comes back.
#[test]
fn random_workload_keeps_invariants_and_returns_every_block() {
    for seed in 0..20u64 {
        let mut rng = Lcg(seed);
        let cfg = config(12, 5, 4, 14);
        let mut s = Scheduler::new(cfg).unwrap();
        // Per sequence: tokens still to generate before it finishes.
        let mut to_generate: HashMap<SeqId, usize> = HashMap::new();
        // Per sequence: generated count, to check that recompute never loses tokens.
        let mut generated: HashMap<SeqId, usize> = HashMap::new();
        let mut next_id = 0;
        let mut preemptions = 0;
        for _ in 0..400 {
            if next_id < 40 && rng.next(3) == 0 {
                let prompt = 1 + rng.next(30) as usize;
                s.add(next_id, prompt).unwrap();
                to_generate.insert(next_id, 1 + rng.next(20) as usize);
                generated.insert(next_id, 0);
                next_id += 1;
            }
            if rng.next(25) == 0 && !to_generate.is_empty() {
                let ids: Vec<_> = to_generate.keys().copied().collect();
                let id = ids[rng.next(ids.len() as u64) as usize];
                s.finish(id).unwrap();
                to_generate.remove(&id);
            }
            let step = s.schedule();
            preemptions += step.preempted.len();
            assert!(step.num_tokens() <= cfg.max_num_batched_tokens);
            assert!(s.num_running() <= cfg.max_num_seqs);
            let mut held: HashSet<BlockId> = HashSet::new();
            for item in &step.scheduled {
                assert!(item.token_count > 0);
                assert!(item.block_table.len() * 4 >= item.cached_len + item.token_count);
                for b in &item.block_table {
                    assert!(held.insert(*b), "block {b} shared by two sequences");
                }
            }
            for item in &step.scheduled {
                if !item.wants_logits {
                    continue;
                }
                let left = to_generate.get_mut(&item.id).unwrap();
                *left -= 1;
                *generated.get_mut(&item.id).unwrap() += 1;
                if *left == 0 || s.append_token(item.id).is_err() {
                    s.finish(item.id).unwrap();
                    to_generate.remove(&item.id);
                }
            }
            let held_total: usize = s.seqs.keys().map(|id| s.kv.num_held(*id)).sum();
            assert_eq!(
                held_total + s.free_blocks(),
                cfg.num_blocks,
                "blocks leaked"
            );
        }
        // Drain.
        drain(&mut s, &mut to_generate, seed);
        assert!(to_generate.is_empty());
        assert_eq!(s.free_blocks(), cfg.num_blocks, "seed {seed}");
        if seed == 0 {
            assert!(preemptions > 0, "the workload must exercise preemption");
        }
    }
}

#[test]
fn admission_keeps_room_for_the_admitted_to_reach_their_ends() {
    // 12 blocks of 4 tokens; prompts of 16 tokens (4 blocks) that may grow by 8 (2 blocks).
    let reserve = SchedulerConfig {
        growth_reserve_tokens: Some(8),
        ..config(64, 4, 4, 12)
    };
    let mut s = Scheduler::new(reserve).unwrap();
    for id in 1..=3 {
        s.add(id, 16).unwrap();
        s.set_max_len(id, 24).unwrap();
    }
    // Two sequences need 12 blocks to reach their ends: the third waits, though its
    // prompt's 4 blocks are free.
    let step = step_and_append(&mut s);
    assert_eq!(step.scheduled.len(), 2, "{step:?}");
    assert_eq!(s.free_blocks(), 4);
    assert_eq!(s.status(3), Some(SeqStatus::Waiting));
    // Both run to their ends without preempting anyone; the third starts as one finishes.
    let mut preempted = Vec::new();
    let mut generated: HashMap<SeqId, usize> = HashMap::new();
    while s.has_work() {
        let step = s.schedule();
        preempted.extend(step.preempted.iter().copied());
        for item in step.scheduled.iter().filter(|i| i.wants_logits) {
            let count = generated.entry(item.id).or_default();
            *count += 1;
            if *count == 8 {
                s.finish(item.id).unwrap();
            } else {
                s.append_token(item.id).unwrap();
            }
        }
    }
    assert!(preempted.is_empty(), "{preempted:?}");
    assert_eq!(generated.len(), 3);
    assert_eq!(s.free_blocks(), 12);

    // Without the reserve all three start and the pool runs dry: a preemption.
    let mut s = Scheduler::new(config(64, 4, 4, 12)).unwrap();
    for id in 1..=3 {
        s.add(id, 16).unwrap();
    }
    let mut preemptions = 0;
    for _ in 0..8 {
        preemptions += step_and_append(&mut s).preempted.len();
    }
    assert!(preemptions > 0);
}

#[test]
fn a_lone_sequence_starts_even_when_its_growth_cannot_be_kept() {
    // 8 blocks of 4 tokens, growth kept for 100 tokens: more than the pool holds.
    let mut s = Scheduler::new(SchedulerConfig {
        growth_reserve_tokens: Some(100),
        ..config(64, 4, 4, 8)
    })
    .unwrap();
    s.add(1, 12).unwrap();
    s.add(2, 4).unwrap();
    let step = step_and_append(&mut s);
    assert_eq!(step.scheduled.len(), 1, "{step:?}");
    assert_eq!(s.status(2), Some(SeqStatus::Waiting));
    s.finish(1).unwrap();
    assert_eq!(step_and_append(&mut s).scheduled[0].id, 2);
}

#[test]
fn imports_need_their_room_to_grow_and_the_admitted_ones() {
    let mut s = Scheduler::new(SchedulerConfig {
        growth_reserve_tokens: Some(8),
        ..config(64, 4, 4, 12)
    })
    .unwrap();
    // Alone: the prompt's blocks are enough (growth past the pool is not asked).
    assert!(s.can_add_computed(40, 4096));
    s.add_computed(1, 16, 24).unwrap(); // 4 blocks held, 2 to grow
    // 8 free: a 16-token prompt that may grow by 8 needs 6, plus 2 for sequence 1.
    assert!(s.can_add_computed(16, 24));
    assert!(!s.can_add_computed(20, 28), "7 blocks to its end, plus 2");
    assert!(s.can_add_computed(20, 24), "its end within the 6 blocks");
    s.reserve(2, 16, 24, None).unwrap();
    assert!(
        !s.can_add_computed(1, 2),
        "2 free blocks, 4 kept for growth"
    );
}

#[test]
fn with_room_to_grow_for_every_output_nothing_is_ever_preempted() {
    for seed in 0..20u64 {
        let mut rng = Lcg(seed);
        let cfg = SchedulerConfig {
            growth_reserve_tokens: Some(20),
            ..config(12, 5, 4, 14)
        };
        let mut s = Scheduler::new(cfg).unwrap();
        let mut to_generate: HashMap<SeqId, usize> = HashMap::new();
        let mut next_id = 0;
        let mut steps = 0;
        while next_id < 40 || s.has_work() {
            steps += 1;
            assert!(steps < 10_000, "no progress (seed {seed})");
            if next_id < 40 && rng.next(3) == 0 {
                let prompt = 1 + rng.next(30) as usize;
                let output = 1 + rng.next(20) as usize;
                s.add(next_id, prompt).unwrap();
                s.set_max_len(next_id, prompt + output).unwrap();
                to_generate.insert(next_id, output);
                next_id += 1;
            }
            let step = s.schedule();
            assert!(step.preempted.is_empty(), "seed {seed}: {step:?}");
            for item in step.scheduled.iter().filter(|i| i.wants_logits) {
                let left = to_generate.get_mut(&item.id).unwrap();
                *left -= 1;
                if *left == 0 {
                    s.finish(item.id).unwrap();
                    to_generate.remove(&item.id);
                } else {
                    s.append_token(item.id).unwrap();
                }
            }
        }
        assert!(to_generate.is_empty(), "seed {seed}");
        assert_eq!(s.free_blocks(), cfg.num_blocks, "seed {seed}");
    }
}

// Cached prefixes.

fn caching(budget: usize, seqs: usize, block_size: usize, blocks: usize) -> SchedulerConfig {
    SchedulerConfig {
        prefix_caching: true,
        ..config(budget, seqs, block_size, blocks)
    }
}

/// Queues `id` with `tokens` as its prompt, named under `root`.
fn add_named(s: &mut Scheduler, id: SeqId, root: BlockHash, tokens: &[u32]) {
    s.add(id, tokens.len()).unwrap();
    s.track(id, root, tokens);
}

/// Runs a step as the engine does with caching on: the forward runs, then the step is
/// committed, then every sequence with logits takes a token (named `id * 1000 + position`).
fn step_commit(s: &mut Scheduler) -> SchedulerStep {
    let step = s.schedule();
    s.commit(&step.scheduled);
    for item in &step.scheduled {
        if item.wants_logits {
            s.append_token(item.id).unwrap();
            let position = s.num_computed(item.id).unwrap() as u32;
            s.name_tokens(item.id, &[item.id as u32 * 1000 + position]);
        }
    }
    step
}

fn chunk_of(step: &SchedulerStep, id: SeqId) -> &ScheduledSeq {
    step.scheduled.iter().find(|i| i.id == id).unwrap()
}

#[test]
fn a_prompt_sharing_a_finished_prompts_prefix_computes_only_its_new_blocks() {
    let root = BlockHash::root("m", None);
    let mut s = Scheduler::new(caching(64, 4, 4, 16)).unwrap();
    let system: Vec<u32> = (0..12).collect();
    let first = [&system[..], &[100, 101]].concat();
    add_named(&mut s, 1, root, &first);
    assert_eq!(chunk_of(&step_commit(&mut s), 1).cached_len, 0);
    step_commit(&mut s);
    s.finish(1).unwrap();
    // Its three full prompt blocks stay cached, and count as free.
    assert_eq!(s.free_blocks(), 16);
    let second = [&system[..], &[200, 201, 202]].concat();
    add_named(&mut s, 2, root, &second);
    let step = step_commit(&mut s);
    let chunk = chunk_of(&step, 2);
    assert_eq!((chunk.cached_len, chunk.token_count), (12, 3));
    assert_eq!(
        s.prefix_cache_stats(),
        PrefixCacheStats {
            queried_tokens: 14 + 15,
            hit_tokens: 12,
            evicted_blocks: 0
        }
    );
    // A prompt of the same whole blocks still computes its last token, for its logits.
    add_named(&mut s, 3, root, &system);
    let chunk = chunk_of(&step_commit(&mut s), 3).clone();
    assert_eq!((chunk.cached_len, chunk.token_count), (8, 4));
}

#[test]
fn blocks_two_running_sequences_share_survive_either_finishing() {
    let root = BlockHash::root("m", None);
    let mut s = Scheduler::new(caching(64, 4, 4, 16)).unwrap();
    let prompt: Vec<u32> = (0..10).collect();
    add_named(&mut s, 1, root, &prompt);
    let a = chunk_of(&step_commit(&mut s), 1).clone();
    add_named(&mut s, 2, root, &prompt);
    let b = chunk_of(&step_commit(&mut s), 2).clone();
    assert_eq!(b.cached_len, 8);
    assert_eq!(b.block_table[..2], a.block_table[..2]);
    assert_eq!(s.kv.ref_count(a.block_table[0]), 2);
    s.finish(1).unwrap();
    assert_eq!(s.kv.ref_count(a.block_table[0]), 1);
    // Room for every free block taken by a newcomer never takes the blocks 2 holds.
    add_named(&mut s, 3, root, &(50..90).collect::<Vec<_>>());
    for _ in 0..4 {
        step_commit(&mut s);
    }
    assert_eq!(s.blocks(2).unwrap()[..2], a.block_table[..2]);
    assert_eq!(s.kv.ref_count(a.block_table[0]), 1);
    s.finish(2).unwrap();
    s.finish(3).unwrap();
    assert_eq!(s.free_blocks(), 16);
}

#[test]
fn eviction_takes_the_least_recently_released_blocks_and_never_a_held_one() {
    let root = BlockHash::root("m", None);
    let mut s = Scheduler::new(caching(64, 4, 4, 8)).unwrap();
    // Two finished prompts of two full blocks each, released 1 then 2.
    for (id, base) in [(1, 0), (2, 100)] {
        add_named(&mut s, id, root, &(base..base + 9).collect::<Vec<_>>());
        step_commit(&mut s);
        s.finish(id).unwrap();
    }
    assert_eq!(s.kv.num_evictable(), 4);
    // A prompt of 6 blocks: the 4 plain free blocks, then the 2 oldest cached ones (1's).
    add_named(&mut s, 3, root, &(500..524).collect::<Vec<_>>());
    step_commit(&mut s);
    assert_eq!(s.prefix_cache_stats().evicted_blocks, 2);
    let events = s.take_kv_events();
    let removed: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            KvEvent::Removed { hashes } => Some(hashes.len()),
            _ => None,
        })
        .collect();
    assert_eq!(removed, vec![2]);
    // 2's prompt is still cached, 1's is gone.
    add_named(&mut s, 4, root, &(100..109).collect::<Vec<_>>());
    add_named(&mut s, 5, root, &(0..9).collect::<Vec<_>>());
    s.finish(3).unwrap();
    let step = step_commit(&mut s);
    assert_eq!(chunk_of(&step, 4).cached_len, 8);
    assert_eq!(chunk_of(&step, 5).cached_len, 0);
}

#[test]
fn two_salts_never_share_a_block() {
    let mut s = Scheduler::new(caching(64, 4, 4, 16)).unwrap();
    let prompt: Vec<u32> = (0..10).collect();
    add_named(&mut s, 1, BlockHash::root("m", Some("tenant-a")), &prompt);
    step_commit(&mut s);
    s.finish(1).unwrap();
    add_named(&mut s, 2, BlockHash::root("m", Some("tenant-b")), &prompt);
    add_named(&mut s, 3, BlockHash::root("m", None), &prompt);
    let step = step_commit(&mut s);
    assert_eq!(chunk_of(&step, 2).cached_len, 0);
    assert_eq!(chunk_of(&step, 3).cached_len, 0);
    add_named(&mut s, 4, BlockHash::root("m", Some("tenant-a")), &prompt);
    assert_eq!(chunk_of(&step_commit(&mut s), 4).cached_len, 8);
}

#[test]
fn a_preempted_sequence_takes_its_own_computed_blocks_back() {
    let root = BlockHash::root("m", None);
    // 6 blocks of 4: two sequences of 9 tokens fit (3 blocks each), their growth does not.
    let mut s = Scheduler::new(caching(64, 4, 4, 6)).unwrap();
    add_named(&mut s, 1, root, &(0..9).collect::<Vec<_>>());
    add_named(&mut s, 2, root, &(100..109).collect::<Vec<_>>());
    step_commit(&mut s);
    let mut preempted = Vec::new();
    for _ in 0..8 {
        let step = step_commit(&mut s);
        preempted.extend(step.preempted.iter().copied());
        if let Some(item) = step
            .scheduled
            .iter()
            .find(|i| i.id == 2 && i.cached_len > 0)
            && !preempted.is_empty()
            && item.token_count > 1
        {
            // Re-admitted: its two computed prompt blocks were found again.
            assert_eq!(item.cached_len, 8);
            return;
        }
        if s.num_computed(1) >= Some(16) {
            s.finish(1).unwrap();
        }
    }
    panic!("sequence 2 was never preempted and re-admitted: {preempted:?}");
}

#[test]
fn random_shared_prefixes_never_write_a_named_or_shared_block_and_return_every_block() {
    for seed in 0..20u64 {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let cfg = SchedulerConfig {
            growth_reserve_tokens: Some(8),
            ..caching(24, 6, 4, 40)
        };
        let mut s = Scheduler::new(cfg).unwrap();
        let roots = [BlockHash::root("m", None), BlockHash::root("m", Some("s"))];
        let mut to_generate: HashMap<SeqId, usize> = HashMap::new();
        for id in 1..=60u64 {
            if next(3) > 0 {
                let prefix = next(4) as u32;
                let len = 4 + next(30) as usize;
                let tokens: Vec<u32> = (0..len as u32)
                    .map(|i| {
                        if i < 12 {
                            prefix * 100 + i
                        } else {
                            10_000 + i + id as u32
                        }
                    })
                    .collect();
                add_named(&mut s, id, roots[next(2) as usize], &tokens);
                to_generate.insert(id, 1 + next(12) as usize);
            }
            let step = s.schedule();
            for item in &step.scheduled {
                let first = item.cached_len / 4;
                let last = (item.cached_len + item.token_count - 1) / 4;
                for b in &item.block_table[first..=last] {
                    assert_eq!(s.kv.ref_count(*b), 1, "seed {seed}: a shared block written");
                    assert!(
                        s.kv.name_of(*b).is_none(),
                        "seed {seed}: a named block written"
                    );
                }
            }
            s.commit(&step.scheduled);
            for item in &step.scheduled {
                if !item.wants_logits {
                    continue;
                }
                let left = to_generate.get_mut(&item.id).unwrap();
                *left -= 1;
                if *left == 0 || s.append_token(item.id).is_err() {
                    s.finish(item.id).unwrap();
                    to_generate.remove(&item.id);
                } else {
                    s.name_tokens(item.id, &[7]);
                }
            }
            let held: usize = s.seqs.keys().map(|id| s.kv.num_held(*id)).sum();
            let mut holders: HashMap<BlockId, u32> = HashMap::new();
            for id in s.seqs.keys() {
                for b in s.kv.blocks(*id) {
                    *holders.entry(*b).or_default() += 1;
                }
            }
            for (b, n) in &holders {
                assert_eq!(s.kv.ref_count(*b), *n, "seed {seed}: block {b}");
            }
            assert!(held >= holders.len());
            assert_eq!(
                holders.len() + s.free_blocks(),
                40,
                "seed {seed}: blocks leaked"
            );
        }
        while s.has_work() {
            let step = s.schedule();
            s.commit(&step.scheduled);
            for item in &step.scheduled {
                if !item.wants_logits {
                    continue;
                }
                let left = to_generate.get_mut(&item.id).unwrap();
                *left -= 1;
                if *left == 0 || s.append_token(item.id).is_err() {
                    s.finish(item.id).unwrap();
                    to_generate.remove(&item.id);
                }
            }
        }
        assert!(to_generate.is_empty(), "seed {seed}");
        assert_eq!(s.free_blocks(), 40, "seed {seed}");
        let stats = s.prefix_cache_stats();
        assert!(
            stats.hit_tokens > 0,
            "seed {seed}: the workload must hit the cache"
        );
        if seed == 0 {
            assert!(stats.evicted_blocks > 0, "the workload must evict");
        }
    }
}

/// The ids a step schedules, in batch order.
fn scheduled_ids(step: &SchedulerStep) -> Vec<SeqId> {
    step.scheduled.iter().map(|item| item.id).collect()
}

#[test]
fn the_queue_is_ordered_by_priority_then_arrival() {
    // One sequence slot: the order of admission is the order of the queue.
    let mut s = Scheduler::new(config(64, 1, 4, 64)).unwrap();
    for (id, priority) in [(1, 0), (2, 5), (3, -1), (4, 5), (5, 0)] {
        s.add(id, 4).unwrap();
        s.set_priority(id, priority).unwrap();
    }
    let mut admitted = Vec::new();
    while s.has_work() {
        let step = step_and_append(&mut s);
        for item in &step.scheduled {
            if item.cached_len == 0 {
                admitted.push(item.id);
            }
            // Each is done after its first token.
            if item.wants_logits {
                s.finish(item.id).unwrap();
            }
        }
    }
    assert_eq!(admitted, [3, 1, 5, 2, 4]);
    assert_eq!(
        s.set_priority(9, 1),
        Err(SchedulerError::UnknownSequence(9))
    );
}

#[test]
fn a_waiting_sequence_preempts_running_ones_of_a_lower_priority_only() {
    // Two slots, both taken by sequences of priority 1.
    let mut s = Scheduler::new(config(64, 2, 4, 64)).unwrap();
    for id in [1, 2] {
        s.add(id, 4).unwrap();
        s.set_priority(id, 1).unwrap();
    }
    step_and_append(&mut s);
    // Another of the same priority waits: nobody is preempted.
    s.add(3, 4).unwrap();
    s.set_priority(3, 1).unwrap();
    let step = step_and_append(&mut s);
    assert!(step.preempted.is_empty(), "{step:?}");
    assert_eq!(scheduled_ids(&step), [1, 2]);
    // A more urgent one preempts the newest of the least urgent (2) and runs in the same
    // step, decoded first from then on.
    s.add(4, 4).unwrap();
    s.set_priority(4, 0).unwrap();
    let step = step_and_append(&mut s);
    assert_eq!(step.preempted, [2]);
    assert_eq!(step.preempted_for_priority, 1);
    assert_eq!(scheduled_ids(&step), [1, 4]);
    assert_eq!(s.status(2), Some(SeqStatus::Waiting));
    let step = step_and_append(&mut s);
    assert_eq!(scheduled_ids(&step), [4, 1]);
    // The preempted one waits ahead of the later arrival of its priority, and comes back
    // (recomputing) when a slot frees.
    s.finish(4).unwrap();
    let step = step_and_append(&mut s);
    assert_eq!(scheduled_ids(&step), [1, 2]);
    assert_eq!(
        (step.scheduled[1].cached_len, step.scheduled[1].token_count),
        (0, 6),
        "its prompt and its two tokens recomputed"
    );
    assert_eq!(s.num_preemptions(2), Some(1));
    assert_eq!(s.num_waiting(), 1);
}

#[test]
fn a_waiting_sequence_preempts_for_blocks_too() {
    // Room for slots, not blocks: 4 blocks of 4 tokens, two sequences of 8 hold them all.
    let mut s = Scheduler::new(config(64, 4, 4, 4)).unwrap();
    for id in [1, 2] {
        s.add(id, 8).unwrap();
        s.set_priority(id, 3).unwrap();
    }
    step_and_append(&mut s);
    s.add(3, 4).unwrap();
    s.set_priority(3, -3).unwrap();
    let step = step_and_append(&mut s);
    assert_eq!(step.preempted, [2]);
    assert!(scheduled_ids(&step).contains(&3), "{step:?}");
    // An import of a higher priority makes room the same way.
    assert!(!s.can_add_computed(8, 9));
    assert_eq!(s.preempt_below(3), None, "no priority lower than 3 runs");
    assert_eq!(s.preempt_below(0), Some(1));
    assert_eq!(s.status(1), Some(SeqStatus::Waiting));
}

/// A decode carries the draft proposed for it when the budget and the free blocks allow,
/// cut to what the budget leaves (decodes first, then drafts, then prefills), and goes after
/// the plain decodes; only its first token counts as computed until drafts are confirmed.
#[test]
fn a_decode_carries_its_draft_as_the_budget_and_blocks_allow() {
    // Six blocks of 4 tokens: the three sequences fill them by the last step.
    let mut s = Scheduler::new(config(8, 4, 4, 6)).unwrap();
    for id in [1, 2, 3] {
        s.add(id, 3).unwrap();
    }
    step_and_append(&mut s);
    assert!((1..=3).all(|id| s.is_decoding(id)));
    s.propose_draft(1, 4);
    s.propose_draft(2, 6);
    let step = s.schedule();
    // Budget 8: three decodes, then 4 of the first draft and 1 of the second.
    let order: Vec<(SeqId, usize, usize)> = step
        .scheduled
        .iter()
        .map(|i| (i.id, i.token_count, i.draft))
        .collect();
    assert_eq!(order, vec![(3, 1, 0), (1, 5, 4), (2, 2, 1)]);
    assert_eq!(
        chunk_of(&step, 1).block_table.len(),
        2,
        "8 tokens: two blocks"
    );
    assert_eq!(s.num_computed(1), Some(4), "only the decode's own token");
    // Two of the four drafted tokens kept: each appended, then confirmed.
    for _ in 0..2 {
        s.append_token(1).unwrap();
        s.draft_token_computed(1).unwrap();
    }
    s.append_token(1).unwrap();
    assert_eq!(s.num_computed(1), Some(6));
    // The second decode's one draft token, kept; no more to confirm.
    s.append_token(2).unwrap();
    s.draft_token_computed(2).unwrap();
    s.append_token(2).unwrap();
    assert!(
        s.draft_token_computed(2).is_err(),
        "its draft was one token"
    );
    // A draft is forgotten after the step it was proposed for; one that needs a block no
    // one has left is dropped, not paid for by a preemption.
    s.append_token(3).unwrap();
    let step = s.schedule();
    assert!(step.scheduled.iter().all(|i| i.draft == 0));
    for id in [1, 2, 3] {
        s.append_token(id).unwrap();
    }
    s.propose_draft(3, 8);
    let step = s.schedule();
    assert_eq!(chunk_of(&step, 3).draft, 0, "no free block for it");
    assert!(step.preempted.is_empty());
}
