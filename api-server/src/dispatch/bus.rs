//! The bus handle a request is dispatched through: the NATS connection and this model's
//! subjects, with the operations every phase of a request uses (subscribing to a job's token
//! stream, sizing a job against the server's `max_payload`, publishing it to one worker).
//!
//! A job is published only as an `EncodedJob`, which only `Bus::encode_job` makes, after
//! checking it against the `max_payload` of the server the client is connected to (read at
//! each check: a reconnect may reach a server with another limit). What a job too large does
//! depends on the job: refused at the edge (the first job), a local prefill (a decode job
//! with its KV handle), the request's end (a migration).

use async_nats::{Client, Subscriber};
use tandem_protocol::messages::GenerateJob;
use tandem_protocol::payload::{self, TooLarge};
use tandem_protocol::subjects::Subjects;

use crate::error::ApiError;

/// The bus connection and this model's subjects.
#[derive(Clone)]
pub struct Bus {
    pub client: Client,
    pub subjects: Subjects,
}

/// A job encoded for the bus, within the server's `max_payload` when it was encoded.
pub(super) struct EncodedJob(Vec<u8>);

impl Bus {
    /// The stream subject of the job `job_id` (the job's `stream_subject`).
    pub(super) fn stream_subject(&self, job_id: &str) -> String {
        self.subjects.stream(job_id)
    }

    /// Subscribes to a job's token stream (`subject`, from [`Self::stream_subject`]).
    pub(super) async fn subscribe(&self, subject: &str) -> Result<Subscriber, ApiError> {
        self.client
            .subscribe(subject.to_owned())
            .await
            .map_err(|err| ApiError::bus("subscribing to the token stream", err))
    }

    /// The NATS server's `max_payload`, from its `INFO` at the last (re)connect (async-nats's
    /// `Client::max_payload`, which `Client::server_info` also reports).
    pub fn max_payload(&self) -> usize {
        self.client.max_payload()
    }

    /// `job` encoded, if it fits in the server's `max_payload`.
    pub(super) fn encode_job(&self, job: &GenerateJob) -> Result<EncodedJob, TooLarge> {
        payload::encode_within(job, self.max_payload()).map(EncodedJob)
    }

    /// Publishes `job` on `subject` (a worker's direct `prefill` or `generate` subject);
    /// `action` names the step in the error.
    pub(super) async fn publish_job(
        &self,
        subject: String,
        job: EncodedJob,
        action: &'static str,
    ) -> Result<(), ApiError> {
        self.client
            .publish(subject, job.0.into())
            .await
            .map_err(|err| ApiError::bus(action, err))
    }
}
