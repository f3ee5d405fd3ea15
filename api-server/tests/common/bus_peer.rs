//! A scripted bus peer: it speaks the worker side of the protocol (heartbeats, `Accepted`,
//! `Tokens`, `Finished`) with canned answers, using the protocol crate. It is NOT a worker and
//! generates nothing; it exists to test the api-server's own protocol handling (SSE framing,
//! usage, timeouts, cancellation) before and apart from the real engine.
//!
//! The script is chosen by the job's `max_tokens`, so each test picks a behaviour through the
//! HTTP request alone.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tandem_protocol::messages::{
    CancelRequest, FinishReason, GenerateJob, Heartbeat, StreamMessage, TokenEvent, Usage,
    WorkerRole, decode, encode,
};
use tandem_protocol::subjects::Subjects;

/// `max_tokens` of a job whose answer is: `Accepted`, then the tokens of [`SCRIPTED_TEXT`] in two
/// messages, then `Finished(stop)`.
pub const SCRIPT_ANSWER: u32 = 10;
/// Never answers (not even `Accepted`).
pub const SCRIPT_SILENT: u32 = 11;
/// `Accepted`, one token, then silence.
pub const SCRIPT_STALL: u32 = 12;
/// `Accepted`, then one token every 50 ms until cancelled.
pub const SCRIPT_ENDLESS: u32 = 13;
/// `Accepted`, then an `Error` message.
pub const SCRIPT_ERROR: u32 = 14;

/// The scripted tokens: (id, text, logprob, alternatives). The second token's text is empty, as
/// a worker sends while a multi-byte character or a possible stop string is pending.
pub fn scripted_tokens() -> Vec<TokenEvent> {
    vec![
        TokenEvent {
            id: 65,
            text: "Hel".into(),
            logprob: Some(-0.25),
            top_logprobs: vec![(65, -0.25), (66, -1.5)],
        },
        TokenEvent {
            id: 66,
            text: String::new(),
            logprob: Some(-0.5),
            top_logprobs: vec![(66, -0.5)],
        },
        TokenEvent {
            id: 67,
            text: "lo wörld".into(),
            logprob: Some(-1.0),
            top_logprobs: vec![(67, -1.0)],
        },
    ]
}

pub const SCRIPTED_TEXT: &str = "Hello wörld";

pub const PEER_ID: &str = "scripted-peer";

/// What the peer saw.
#[derive(Default)]
pub struct Observed {
    pub jobs: Vec<GenerateJob>,
    pub cancels: Vec<String>,
}

pub struct ScriptedBusPeer {
    pub observed: Arc<Mutex<Observed>>,
    runtime: tokio::runtime::Runtime,
}

impl ScriptedBusPeer {
    /// Connects, starts heartbeating as a `both` worker of `model` and answers jobs sent to
    /// its direct subject.
    pub fn start(nats_url: &str, model: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("test runtime");
        let observed = Arc::new(Mutex::new(Observed::default()));
        let subjects = Subjects::new(model);
        let client = runtime
            .block_on(async_nats::connect(nats_url))
            .expect("the scripted peer connects to NATS");
        // Subscriptions are made before start() returns, so no job or cancel is missed.
        let (jobs, cancels) = runtime.block_on(async {
            let jobs = client
                .subscribe(subjects.generate_direct(PEER_ID))
                .await
                .expect("subscribe jobs");
            let cancels = client
                .subscribe(subjects.cancel())
                .await
                .expect("subscribe cancels");
            client.flush().await.expect("flush");
            (jobs, cancels)
        });
        let heartbeat_client = client.clone();
        let heartbeat_subject = subjects.heartbeat(WorkerRole::Both, PEER_ID);
        let model_name = model.to_string();
        runtime.spawn(async move {
            loop {
                let heartbeat = Heartbeat {
                    worker_id: PEER_ID.into(),
                    role: WorkerRole::Both,
                    model: model_name.clone(),
                    device: "cpu".into(),
                    running: 0,
                    queued: 0,
                    free_kv_blocks: 100,
                    total_kv_blocks: 128,
                    draining: false,
                    interval_ms: 100,
                    kv_transfer: None,
                };
                let _ = heartbeat_client
                    .publish(heartbeat_subject.clone(), encode(&heartbeat).into())
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let cancel_log = Arc::clone(&observed);
        runtime.spawn(async move {
            let mut cancels = cancels;
            while let Some(message) = cancels.next().await {
                if let Ok(cancel) = decode::<CancelRequest>("cancel", &message.payload) {
                    cancel_log
                        .lock()
                        .expect("observed lock")
                        .cancels
                        .push(cancel.request_id);
                }
            }
        });
        let job_log = Arc::clone(&observed);
        runtime.spawn(async move {
            let mut jobs = jobs;
            while let Some(message) = jobs.next().await {
                let job: GenerateJob = decode("generate job", &message.payload)
                    .expect("the api-server sends valid jobs");
                job_log
                    .lock()
                    .expect("observed lock")
                    .jobs
                    .push(job.clone());
                tokio::spawn(answer(client.clone(), job, Arc::clone(&job_log)));
            }
        });
        ScriptedBusPeer { observed, runtime }
    }

    pub fn cancels(&self) -> Vec<String> {
        self.observed.lock().expect("observed lock").cancels.clone()
    }

    pub fn jobs(&self) -> Vec<GenerateJob> {
        self.observed.lock().expect("observed lock").jobs.clone()
    }

    /// Waits up to `timeout` for a cancel of `request_id`.
    pub fn wait_for_cancel(&self, request_id: &str, timeout: Duration) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if self.cancels().iter().any(|id| id == request_id) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

async fn answer(client: async_nats::Client, job: GenerateJob, observed: Arc<Mutex<Observed>>) {
    let send = |message: StreamMessage| {
        let client = client.clone();
        let subject = job.stream_subject.clone();
        async move {
            client
                .publish(subject, encode(&message).into())
                .await
                .expect("publish stream message")
        }
    };
    let accepted = || StreamMessage::Accepted {
        worker_id: PEER_ID.into(),
    };
    let prompt_tokens = job.prompt_ids.len() as u32;
    match job.stop.max_tokens {
        SCRIPT_SILENT => {}
        SCRIPT_STALL => {
            send(accepted()).await;
            send(StreamMessage::Tokens {
                tokens: scripted_tokens()[..1].to_vec(),
            })
            .await;
        }
        SCRIPT_ERROR => {
            send(accepted()).await;
            send(StreamMessage::Error {
                message: "scripted failure".into(),
            })
            .await;
        }
        SCRIPT_ENDLESS => {
            send(accepted()).await;
            loop {
                let cancelled = observed
                    .lock()
                    .expect("observed lock")
                    .cancels
                    .contains(&job.request_id);
                if cancelled {
                    break;
                }
                send(StreamMessage::Tokens {
                    tokens: scripted_tokens()[..1].to_vec(),
                })
                .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        _ => {
            let tokens = scripted_tokens();
            send(accepted()).await;
            send(StreamMessage::Tokens {
                tokens: tokens[..2].to_vec(),
            })
            .await;
            send(StreamMessage::Tokens {
                tokens: tokens[2..].to_vec(),
            })
            .await;
            send(StreamMessage::Finished {
                reason: FinishReason::Stop,
                usage: Usage {
                    prompt_tokens,
                    completion_tokens: tokens.len() as u32,
                },
            })
            .await;
        }
    }
}
