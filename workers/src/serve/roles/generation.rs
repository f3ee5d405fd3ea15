//! The generation role: `both` and `decode` workers.
//!
//! They take generation jobs (queue group `decode`, and their direct subject). A job without a
//! KV handle is prefilled and generated here; one with a handle (a disaggregated request)
//! waits for room in the engine and is then pulled from its context worker into that room
//! ([`super::pull`]). The api-server routes a
//! disaggregated request to either role, so both pull. They differ in what they advertise: a
//! decode worker's heartbeat carries `kv_peer` (its host, whether it reads CUDA IPC), so a
//! context worker on its host can export into GPU memory for it; a `both` worker's does not,
//! and gets host-memory exports.

use std::convert::Infallible;
use std::sync::Arc;

use tandem_protocol::messages::{GenerateJob, KvPeer, KvPullStats, KvTransferStats, WorkerRole};
use tandem_protocol::subjects::DECODE_QUEUE_GROUP;

use super::pull::KvPuller;
use super::{JobSubjects, Role};
use crate::serve::connection::{BusError, BusSettings};
use crate::serve::job::generation_request;
use crate::serve::worker::Worker;

pub(in crate::serve) struct GenerationRole {
    worker: Arc<Worker>,
    puller: Arc<KvPuller>,
    /// Decode workers say how they read K/V (`kv_peer`); `both` workers do not.
    advertises_kv_peer: bool,
}

impl GenerationRole {
    pub fn new(worker: Arc<Worker>, settings: &BusSettings) -> Self {
        Self {
            worker,
            puller: Arc::new(KvPuller::new(settings)),
            advertises_kv_peer: settings.role == WorkerRole::Decode,
        }
    }
}

impl Role for GenerationRole {
    /// Everything arrives as a job or a cancel.
    type Inbox = ();
    type Input = Infallible;

    fn job_subjects(&self) -> JobSubjects {
        let subjects = &self.worker.subjects;
        JobSubjects {
            queue: subjects.generate(),
            queue_group: DECODE_QUEUE_GROUP,
            direct: subjects.generate_direct(&self.worker.identity.worker_id),
        }
    }

    async fn open_inbox(&self) -> Result<(), BusError> {
        Ok(())
    }

    async fn next_input(_: &mut ()) -> Infallible {
        std::future::pending().await
    }

    async fn handle_input(self: &Arc<Self>, input: Infallible) {
        match input {}
    }

    async fn close_inbox(_: ()) {}

    async fn start(self: &Arc<Self>, job: GenerateJob) {
        match job.kv.clone() {
            Some(handle) => self.puller.start(&self.worker, job, handle).await,
            None => {
                let Ok(grammar) = self.worker.job_grammar(&job).await else {
                    return;
                };
                let mut request = generation_request(&job, &self.worker.model_stop_ids);
                request.grammar = grammar;
                self.worker
                    .start_request(&job, |engine, sink| engine.submit_with_sink(request, sink))
                    .await;
            }
        }
    }

    async fn cancel(self: &Arc<Self>, request_id: &str) {
        self.puller.cancel(request_id);
    }

    fn held(&self) -> usize {
        self.puller.in_progress()
    }

    /// Decode jobs waiting for room are in the engine (reservations), counted there.
    fn queued(&self) -> usize {
        0
    }

    fn kv_transfer(&self) -> Option<KvTransferStats> {
        None
    }

    fn kv_peer(&self) -> Option<KvPeer> {
        self.advertises_kv_peer.then(|| self.puller.kv_peer())
    }

    fn kv_pull(&self) -> Option<KvPullStats> {
        Some(self.puller.stats(&self.worker.engine))
    }
}
