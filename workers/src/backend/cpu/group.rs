//! A tensor-parallel group of CPU backends in one process, one thread per rank: the
//! all-reduce the model's sharded layers need ([`crate::model::shard`]).
//!
//! Each rank leaves its partial sum in its slot, and once every rank has, each adds the slots
//! in rank order, so every rank ends with the same bits. A rank that fails (or never comes)
//! does not leave the others waiting forever: a wait gives up after [`GroupOptions::timeout`]
//! and [`CpuGroup::abort`] wakes every waiter with an error.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long a rank waits for the others at one all-reduce before it fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct GroupOptions {
    pub size: usize,
    pub timeout: Duration,
}

struct State {
    /// Each rank's partial sum of the current round.
    slots: Vec<Option<Vec<f32>>>,
    /// Ranks that arrived at the current phase.
    arrived: usize,
    /// Counts phases, so a waiter knows its phase passed.
    generation: u64,
    aborted: Option<String>,
}

/// The shared state of one group.
pub struct CpuGroup {
    options: GroupOptions,
    state: Mutex<State>,
    changed: Condvar,
}

impl std::fmt::Debug for CpuGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuGroup of {}", self.options.size)
    }
}

impl CpuGroup {
    pub fn new(options: GroupOptions) -> Self {
        assert!(options.size > 0, "a group of no ranks");
        CpuGroup {
            options,
            state: Mutex::new(State {
                slots: vec![None; options.size],
                arrived: 0,
                generation: 0,
                aborted: None,
            }),
            changed: Condvar::new(),
        }
    }

    pub fn size(&self) -> usize {
        self.options.size
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Fails every present and later wait of the group with `why` (a rank that cannot go on).
    pub fn abort(&self, why: &str) {
        let mut state = self.lock();
        state.aborted.get_or_insert_with(|| why.to_owned());
        self.changed.notify_all();
    }

    /// Waits until every rank arrived at this phase.
    fn phase<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
    ) -> Result<MutexGuard<'a, State>, String> {
        if let Some(why) = &state.aborted {
            return Err(format!("the tensor-parallel group was aborted: {why}"));
        }
        state.arrived += 1;
        let generation = state.generation;
        if state.arrived == self.options.size {
            state.arrived = 0;
            state.generation += 1;
            self.changed.notify_all();
            return Ok(state);
        }
        let (state, timeout) = self
            .changed
            .wait_timeout_while(state, self.options.timeout, |s| {
                s.generation == generation && s.aborted.is_none()
            })
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(why) = &state.aborted {
            return Err(format!("the tensor-parallel group was aborted: {why}"));
        }
        if timeout.timed_out() {
            return Err(format!(
                "the other tensor-parallel ranks did not arrive within {:?}",
                self.options.timeout
            ));
        }
        Ok(state)
    }

    /// Replaces `data` by the sum over the group's ranks of each one's `data` (all of one
    /// length), added in rank order.
    pub fn all_reduce_sum(&self, rank: usize, data: &mut [f32]) -> Result<(), String> {
        let result = self.round(rank, data);
        if let Err(e) = &result {
            self.abort(e);
        }
        result
    }

    fn round(&self, rank: usize, data: &mut [f32]) -> Result<(), String> {
        let mut state = self.lock();
        state.slots[rank] = Some(data.to_vec());
        let state = self.phase(state)?;
        let mut sum = vec![0.0f32; data.len()];
        for (r, slot) in state.slots.iter().enumerate() {
            let part = slot
                .as_ref()
                .expect("every rank filled its slot before the phase ended");
            if part.len() != data.len() {
                return Err(format!(
                    "rank {r} added {} values, rank {rank} {}",
                    part.len(),
                    data.len()
                ));
            }
            for (s, v) in sum.iter_mut().zip(part) {
                *s += v;
            }
        }
        data.copy_from_slice(&sum);
        // Nobody refills a slot before every rank has read this round's.
        let mut state = self.phase(state)?;
        state.slots[rank] = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn group(size: usize, timeout: Duration) -> Arc<CpuGroup> {
        Arc::new(CpuGroup::new(GroupOptions { size, timeout }))
    }

    #[test]
    fn every_rank_gets_the_same_sum_round_after_round() {
        let g = group(3, DEFAULT_TIMEOUT);
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let g = g.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|round| {
                            let mut data = vec![rank as f32 + round as f32, 1.0];
                            g.all_reduce_sum(rank, &mut data).unwrap();
                            data
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let results: Vec<Vec<Vec<f32>>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for round in 0..50 {
            let expected = vec![3.0 + 3.0 * round as f32, 3.0];
            for rank_results in &results {
                assert_eq!(rank_results[round], expected);
            }
        }
    }

    #[test]
    fn a_missing_rank_fails_the_others_instead_of_hanging() {
        let g = group(2, Duration::from_millis(200));
        let mut data = vec![1.0];
        let err = g.all_reduce_sum(0, &mut data).unwrap_err();
        assert!(err.contains("did not arrive"), "{err}");
        // The group is aborted from then on: a late rank fails at once.
        let err = g.all_reduce_sum(1, &mut data).unwrap_err();
        assert!(err.contains("aborted"), "{err}");
    }

    #[test]
    fn ranks_adding_different_lengths_fail() {
        let g = group(2, DEFAULT_TIMEOUT);
        let other = {
            let g = g.clone();
            std::thread::spawn(move || g.all_reduce_sum(1, &mut [1.0, 2.0]))
        };
        let mine = g.all_reduce_sum(0, &mut [1.0]);
        let theirs = other.join().unwrap();
        assert!(mine.is_err() && theirs.is_err(), "{mine:?} {theirs:?}");
    }
}
