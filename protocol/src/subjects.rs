//! NATS subjects. All of a deployment's subjects start with `tandem.{model}` so several models
//! can share one NATS server.
//!
//! | subject | who listens | what |
//! |---|---|---|
//! | `tandem.{model}.prefill` (queue group `context`) | context workers | prefill jobs |
//! | `tandem.{model}.generate` (queue group `decode`) | decode / both workers | generation jobs |
//! | `… .prefill.{worker_id}`, `… .generate.{worker_id}` | that worker | routed jobs |
//! | `tandem.{model}.stream.{request_id}` | the api-server | a request's token stream |
//! | `tandem.{model}.cancel` | every worker | cancel a request |
//! | `tandem.{model}.kv.release.{worker_id}` | that context worker | release pinned KV blocks |
//! | `tandem.{model}.heartbeat.{role}.{worker_id}` | api-servers; decode workers (context workers' shared caches) | load and liveness |
//! | `tandem.{model}.kv_events.{worker_id}` | api-servers | blocks a worker cached and evicted |
//! | `tandem.{model}.kv_snapshot.{worker_id}` | that worker (request-reply) | every block it holds |
//! | `tandem.{model}.responses.{instance}` | that api-server (request-reply) | the Responses API responses it stored |

/// Queue group of context (prefill) workers.
pub const CONTEXT_QUEUE_GROUP: &str = "context";
/// Queue group of decode workers (and of `both` workers).
pub const DECODE_QUEUE_GROUP: &str = "decode";

/// Turns any name (a model path, a worker id) into one valid NATS subject token: characters
/// other than ASCII letters, digits, `-` and `_` become `_`, so `.`, `*`, `>` and spaces can
/// never split or wildcard a subject.
pub fn subject_token(name: &str) -> String {
    let token: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if token.is_empty() { "_".into() } else { token }
}

/// The served model name used when none is given: the model directory's last path component
/// (after resolving `.` and links), so an api-server and workers started on the same directory
/// agree without a flag.
pub fn default_served_name(model_dir: &std::path::Path) -> String {
    model_dir
        .canonicalize()
        .unwrap_or_else(|_| model_dir.to_owned())
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_string())
}

/// The subjects of one served model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    base: String,
}

impl Subjects {
    /// `model` is the served model name (as in `/v1/models`); it is sanitized.
    pub fn new(model: &str) -> Self {
        Subjects {
            base: format!("tandem.{}", subject_token(model)),
        }
    }

    pub fn prefill(&self) -> String {
        format!("{}.prefill", self.base)
    }

    pub fn prefill_direct(&self, worker_id: &str) -> String {
        format!("{}.prefill.{}", self.base, subject_token(worker_id))
    }

    pub fn generate(&self) -> String {
        format!("{}.generate", self.base)
    }

    pub fn generate_direct(&self, worker_id: &str) -> String {
        format!("{}.generate.{}", self.base, subject_token(worker_id))
    }

    /// Where worker `worker_id` publishes its [`KvEvents`](crate::messages::KvEvents).
    pub fn kv_events(&self, worker_id: &str) -> String {
        format!("{}.kv_events.{}", self.base, subject_token(worker_id))
    }

    /// Every worker's KV events (what an api-server subscribes to).
    pub fn kv_events_all(&self) -> String {
        format!("{}.kv_events.*", self.base)
    }

    /// Where worker `worker_id` answers [`KvSnapshotRequest`](crate::messages::KvSnapshotRequest)s.
    pub fn kv_snapshot(&self, worker_id: &str) -> String {
        format!("{}.kv_snapshot.{}", self.base, subject_token(worker_id))
    }

    /// Where the api-server `instance` answers
    /// [`StoredResponseRequest`](crate::messages::StoredResponseRequest)s about the responses
    /// it stored.
    pub fn responses(&self, instance: &str) -> String {
        format!("{}.responses.{}", self.base, subject_token(instance))
    }

    pub fn stream(&self, request_id: &str) -> String {
        format!("{}.stream.{}", self.base, subject_token(request_id))
    }

    pub fn cancel(&self) -> String {
        format!("{}.cancel", self.base)
    }

    pub fn kv_release(&self, worker_id: &str) -> String {
        format!("{}.kv.release.{}", self.base, subject_token(worker_id))
    }

    pub fn heartbeat(&self, role: crate::messages::WorkerRole, worker_id: &str) -> String {
        format!(
            "{}.heartbeat.{}.{}",
            self.base,
            role.as_str(),
            subject_token(worker_id)
        )
    }

    /// Wildcard matching the heartbeats of every worker of `role`.
    pub fn heartbeats_of(&self, role: crate::messages::WorkerRole) -> String {
        format!("{}.heartbeat.{}.*", self.base, role.as_str())
    }

    /// Wildcard matching every worker's heartbeat.
    pub fn heartbeat_all(&self) -> String {
        format!("{}.heartbeat.>", self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::WorkerRole;

    #[test]
    fn model_names_never_split_or_wildcard_a_subject() {
        assert_eq!(
            subject_token("HuggingFaceTB/SmolLM2-135M.Instruct"),
            "HuggingFaceTB_SmolLM2-135M_Instruct"
        );
        assert_eq!(subject_token("a b*>"), "a_b__");
        assert_eq!(subject_token(""), "_");
        let s = Subjects::new("org/model.v1");
        assert_eq!(s.prefill(), "tandem.org_model_v1.prefill");
        assert_eq!(s.generate_direct("w.1"), "tandem.org_model_v1.generate.w_1");
        assert_eq!(
            s.heartbeat(WorkerRole::Context, "w1"),
            "tandem.org_model_v1.heartbeat.context.w1"
        );
        assert_eq!(s.heartbeat_all(), "tandem.org_model_v1.heartbeat.>");
        assert_eq!(
            s.responses("0a1b2c3d4e5f6a7b"),
            "tandem.org_model_v1.responses.0a1b2c3d4e5f6a7b"
        );
        assert_eq!(
            s.heartbeats_of(WorkerRole::Context),
            "tandem.org_model_v1.heartbeat.context.*"
        );
    }
}
