//! Token masks of constrained sequences (structured outputs), computed on a thread of their
//! own while the forward pass runs.
//!
//! A sequence's mask for its next token depends only on the tokens it has already generated,
//! all known before the step starts; so the engine hands the step's constrained sequences'
//! grammar states to this thread before the forward pass and takes them back, with their
//! masks, after it (before sampling). On a GPU the forward pass leaves the host idle, so the
//! masks cost nothing while they take less time than it; on the CPU backend the mask thread
//! shares the cores with the forward's. Several sequences' masks are computed in parallel
//! (rayon) when a step has more than one.

use std::sync::mpsc;

use rayon::prelude::*;
use tandem_text::grammar::{Constraint, TokenMask};

use super::RequestId;

/// One sequence's grammar state handed to the thread, and what comes back.
pub(super) struct MaskJob {
    pub id: RequestId,
    pub constraint: Constraint,
    /// Filled by the thread.
    pub mask: Option<Result<TokenMask, String>>,
}

/// The two ends the engine holds: jobs to the thread, jobs with their masks back.
type Channels = (mpsc::Sender<Vec<MaskJob>>, mpsc::Receiver<Vec<MaskJob>>);

/// The mask thread, started with the first constrained sequence.
#[derive(Default)]
pub(super) struct MaskWorker {
    channels: Option<Channels>,
    /// Jobs handed over and not collected (the ids, for a thread that died).
    in_flight: Vec<RequestId>,
    /// Jobs to compute when collected, when no thread could take them.
    inline: Option<Vec<MaskJob>>,
}

impl MaskWorker {
    /// Starts computing the masks of `jobs` (nothing in flight). Without a thread they are
    /// computed when collected.
    pub fn submit(&mut self, jobs: Vec<MaskJob>) {
        debug_assert!(self.in_flight.is_empty(), "one step's masks at a time");
        if jobs.is_empty() {
            return;
        }
        self.in_flight = jobs.iter().map(|j| j.id).collect();
        if self.channels.is_none() {
            self.channels = spawn();
        }
        let Some((jobs_tx, _)) = &self.channels else {
            // No thread: computed when collected.
            self.inline = Some(jobs);
            return;
        };
        if let Err(mpsc::SendError(jobs)) = jobs_tx.send(jobs) {
            self.channels = None;
            self.inline = Some(jobs);
        }
    }

    /// The jobs of the last [`Self::submit`] with their masks (waiting for the thread), or
    /// the ids whose grammar states were lost with a thread that died.
    pub fn collect(&mut self) -> Result<Vec<MaskJob>, Vec<RequestId>> {
        if self.in_flight.is_empty() {
            return Ok(Vec::new());
        }
        let ids = std::mem::take(&mut self.in_flight);
        if let Some(mut jobs) = self.inline.take() {
            compute(&mut jobs);
            return Ok(jobs);
        }
        match self.channels.as_ref().map(|(_, done)| done.recv()) {
            Some(Ok(jobs)) => Ok(jobs),
            _ => {
                self.channels = None;
                Err(ids)
            }
        }
    }
}

fn compute(jobs: &mut [MaskJob]) {
    let one = |job: &mut MaskJob| {
        job.mask = Some(job.constraint.compute_mask().map_err(|e| e.to_string()));
    };
    if jobs.len() > 1 {
        jobs.par_iter_mut().for_each(one);
    } else {
        jobs.iter_mut().for_each(one);
    }
}

/// The thread: computes each batch of jobs it receives and sends it back.
fn spawn() -> Option<Channels> {
    let (jobs_tx, jobs_rx) = mpsc::channel::<Vec<MaskJob>>();
    let (done_tx, done_rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("grammar-masks".into())
        .spawn(move || {
            while let Ok(mut jobs) = jobs_rx.recv() {
                compute(&mut jobs);
                if done_tx.send(jobs).is_err() {
                    return;
                }
            }
        });
    match spawned {
        Ok(_) => Some((jobs_tx, done_rx)),
        Err(e) => {
            tracing::warn!(
                "cannot start the grammar mask thread ({e}); masks are computed after the forward pass"
            );
            None
        }
    }
}
