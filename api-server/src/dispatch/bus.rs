//! The bus handle a request is dispatched through: the NATS connection and this model's
//! subjects, with the two operations every phase of a request uses (subscribing to a job's
//! token stream, publishing a job to one worker).

use async_nats::{Client, Subscriber};
use tandem_protocol::messages::{GenerateJob, encode};
use tandem_protocol::subjects::Subjects;

use crate::error::ApiError;

/// The bus connection and this model's subjects.
#[derive(Clone)]
pub struct Bus {
    pub client: Client,
    pub subjects: Subjects,
}

impl Bus {
    /// Subscribes to the token stream of the job `job_id`; returns the stream's subject (the
    /// job's `stream_subject`) and the subscription.
    pub(super) async fn subscribe_stream(
        &self,
        job_id: &str,
    ) -> Result<(String, Subscriber), ApiError> {
        let subject = self.subjects.stream(job_id);
        let subscriber = self
            .client
            .subscribe(subject.clone())
            .await
            .map_err(|err| ApiError::bus("subscribing to the token stream", err))?;
        Ok((subject, subscriber))
    }

    /// Publishes `job` on `subject` (a worker's direct `prefill` or `generate` subject);
    /// `action` names the step in the error.
    pub(super) async fn publish_job(
        &self,
        subject: String,
        job: &GenerateJob,
        action: &'static str,
    ) -> Result<(), ApiError> {
        self.client
            .publish(subject, encode(job).into())
            .await
            .map_err(|err| ApiError::bus(action, err))
    }
}
