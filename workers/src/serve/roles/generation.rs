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

use std::sync::Arc;

use async_nats::Subscriber;
use futures::StreamExt;
use tandem_protocol::messages::{
    self, GenerateJob, Heartbeat, KvPeer, KvPullStats, KvTransferStats, WorkerRole,
};
use tandem_protocol::subjects::DECODE_QUEUE_GROUP;

use super::pull::KvPuller;
use super::{JobSubjects, Role};
use crate::serve::connection::{self, BusError, BusSettings};
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
    /// Jobs and cancels; and, for a decode worker that reads CUDA IPC, the heartbeats of
    /// context workers, whose shared caches it maps before their first hand-over.
    type Inbox = Option<Subscriber>;
    type Input = async_nats::Message;

    fn job_subjects(&self) -> JobSubjects {
        let subjects = &self.worker.subjects;
        JobSubjects {
            queue: subjects.generate(),
            queue_group: DECODE_QUEUE_GROUP,
            direct: subjects.generate_direct(&self.worker.identity.worker_id),
        }
    }

    async fn open_inbox(&self) -> Result<Option<Subscriber>, BusError> {
        if !self.advertises_kv_peer || !self.puller.premaps() {
            return Ok(None);
        }
        let subject = self.worker.subjects.heartbeats_of(WorkerRole::Context);
        connection::subscribe(&self.worker.client, subject)
            .await
            .map(Some)
    }

    async fn next_input(inbox: &mut Option<Subscriber>) -> async_nats::Message {
        match inbox {
            Some(heartbeats) => match heartbeats.next().await {
                Some(message) => message,
                // The subscription ended (the connection closed): nothing more comes.
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    async fn handle_input(self: &Arc<Self>, message: async_nats::Message) {
        match messages::decode::<Heartbeat>("heartbeat", &message.payload) {
            Ok(Heartbeat {
                worker_id,
                kv_peer: Some(peer),
                ..
            }) => self.puller.premap(&worker_id, peer),
            Ok(_) => {}
            Err(e) => tracing::debug!("ignoring a malformed context heartbeat: {e}"),
        }
    }

    async fn close_inbox(inbox: Option<Subscriber>) {
        if let Some(heartbeats) = inbox {
            connection::unsubscribe(heartbeats).await;
        }
    }

    async fn start(self: &Arc<Self>, job: GenerateJob) {
        match job.kv.clone() {
            Some(handle) => self.puller.start(&self.worker, job, handle).await,
            None => {
                let Ok(request) = self.worker.job_request(&job).await else {
                    return;
                };
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
