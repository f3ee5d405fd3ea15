//! A scripted bus peer: it speaks the worker side of the protocol (heartbeats, `Accepted`,
//! `Tokens`, `Finished`, and for disaggregation `KvReady` / `KvPulled`) with canned answers,
//! using the protocol crate. It is NOT a worker and generates nothing; it exists to test the
//! api-server's own protocol handling (SSE framing, usage, timeouts, cancellation, routing and
//! the prefill → decode hand-over) before and apart from the real engine.
//!
//! A peer plays one worker of one role ([`ScriptedBusPeer::start_as`]): a `both` or `decode`
//! peer answers generation jobs, a `context` peer answers prefill jobs with a fake KV handle
//! ([`fake_handle`]) that a decode peer checks it received unchanged. The script is chosen by
//! the job's `max_tokens`, so each test picks a behaviour through the HTTP request alone;
//! besides, a peer can be told to refuse every job (`rejected`, a full queue:
//! [`ScriptedBusPeer::refuse_jobs`]) and what queue its heartbeats report
//! ([`ScriptedBusPeer::report_queue`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tandem_protocol::messages::{
    CancelRequest, FinishReason, GenerateJob, Heartbeat, KvHandle, KvLayoutSpec, KvPeer, KvRegion,
    KvTransferStats, PrefillTiming, PullOutcome, RejectReason, StreamMessage, TokenEvent, Usage,
    WorkerRole, decode, encode,
};
use tandem_protocol::subjects::Subjects;

/// `max_tokens` of a job whose answer is: `Accepted`, then the tokens of [`SCRIPTED_TEXT`] in two
/// messages, then `Finished(stop)`. A context peer answers `Accepted` + `KvReady` (so does it
/// for every script not listed below).
pub const SCRIPT_ANSWER: u32 = 10;
/// Never answers (not even `Accepted`); a context peer neither.
pub const SCRIPT_SILENT: u32 = 11;
/// `Accepted`, one token, then silence.
pub const SCRIPT_STALL: u32 = 12;
/// `Accepted`, then one token every 50 ms until cancelled. A context peer: `Accepted`, then
/// nothing (a prefill that takes long).
pub const SCRIPT_ENDLESS: u32 = 13;
/// `Accepted`, then an `Error` message (a context peer too: the request itself is bad).
pub const SCRIPT_ERROR: u32 = 14;
/// The context peer never answers; a generation peer answers as [`SCRIPT_ANSWER`].
pub const SCRIPT_CONTEXT_SILENT: u32 = 20;
/// The context peer accepts, then stops heartbeating and answers nothing more (it died); a
/// generation peer answers as [`SCRIPT_ANSWER`].
pub const SCRIPT_CONTEXT_VANISHES: u32 = 21;
/// The context peer answers the whole request: `Accepted`, the first token, `Finished(stop)`
/// (a request that ends at its first token).
pub const SCRIPT_CONTEXT_ANSWERS: u32 = 22;
/// The context peer fails with [`CONTEXT_ERROR`]; a generation peer answers as
/// [`SCRIPT_ANSWER`].
pub const SCRIPT_CONTEXT_ERROR: u32 = 23;
/// The context peer answers `KvReady`; a decode peer reports a failed pull (`kv_pulled` with a
/// fallback), then answers as [`SCRIPT_ANSWER`].
pub const SCRIPT_PULL_FAILS: u32 = 24;
/// The context peer answers `KvReady`; the decode peer never answers the decode job.
pub const SCRIPT_DECODE_SILENT: u32 = 25;
/// The context peer answers `KvReady`; the decode peer accepts, reports the pull, sends the
/// first token, then stops heartbeating and answers nothing more (it died mid-stream).
pub const SCRIPT_DECODE_VANISHES: u32 = 26;
/// The context peer answers `KvReady`; a decode peer reports the handle refused (`kv_pulled`
/// with a fallback and `handle_refused`), then answers as [`SCRIPT_ANSWER`].
pub const SCRIPT_HANDLE_REFUSED: u32 = 27;
/// The context peer answers `KvReady`; a decode peer reports the export gone after its read
/// (`kv_pulled` with a fallback and `export_gone`), then answers as [`SCRIPT_ANSWER`].
pub const SCRIPT_EXPORT_GONE: u32 = 28;

/// A generation peer answers with [`tool_call_tokens`] (a Hermes tool call, its markup split
/// across tokens and messages), then `Finished(stop)`.
pub const SCRIPT_TOOL_CALL: u32 = 30;
/// A generation peer answers with [`reasoning_tokens`] (a think block, then an answer), then
/// `Finished(stop)`.
pub const SCRIPT_REASONING: u32 = 31;
/// A generation peer answers with [`reasoning_tokens`]'s think block followed by
/// [`tool_call_tokens`], then `Finished(stop)`.
pub const SCRIPT_REASONING_TOOL_CALL: u32 = 32;

/// What a context peer says for [`SCRIPT_CONTEXT_ERROR`].
pub const CONTEXT_ERROR: &str = "the context worker could not export the KV cache: scripted";

/// Bytes of one fake KV block; a decode peer reports `blocks × this` as pulled.
pub const FAKE_BLOCK_BYTES: u64 = 4096;
/// Tokens per fake KV block.
pub const FAKE_BLOCK_TOKENS: u32 = 16;
/// Micros a decode peer reports for a pull.
pub const FAKE_PULL_MICROS: u64 = 2500;
/// Micros a decode peer reports its decode job waited for room before the pull.
pub const FAKE_ROOM_WAIT_MICROS: u64 = 1500;
/// What a context peer reports of its prefill (`kv_ready.prefill_timing`).
/// The prompt tokens a fake context worker says it took from its prefix cache (at most the
/// prompt's).
pub const FAKE_CONTEXT_CACHED_TOKENS: u32 = 2;

pub const FAKE_PREFILL_TIMING: PrefillTiming = PrefillTiming {
    queued_us: 1000,
    prefill_us: 4000,
};

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

/// The tokens of [`SCRIPT_TOOL_CALL`]: a sentence, then [`TOOL_CALL_ARGUMENTS`] called as
/// `get_weather` in Hermes markup, cut mid-marker and mid-key.
pub fn tool_call_tokens() -> Vec<TokenEvent> {
    [
        "Checking.\n<tool",
        "_call>\n{\"na",
        "me\": \"get_weather\", \"arguments\": {\"ci",
        "ty\": \"Paris\"}",
        "}\n</tool_",
        "call>",
    ]
    .iter()
    .enumerate()
    .map(|(i, text)| TokenEvent {
        id: 100 + i as u32,
        text: text.to_string(),
        logprob: None,
        top_logprobs: Vec::new(),
    })
    .collect()
}

/// The tokens of [`SCRIPT_REASONING`]: a think block, its markers cut across tokens, then the
/// answer [`REASONING_ANSWER`]; its first [`REASONING_TOKEN_COUNT`] tokens are the thinking.
pub fn reasoning_tokens() -> Vec<TokenEvent> {
    [
        "<th",
        "ink>\nThe user",
        " asks <b>why</b>.",
        "\nThink",
        " twice.\n</th",
        "ink>\n\nBecause",
        " it is.",
    ]
    .iter()
    .enumerate()
    .map(|(i, text)| TokenEvent {
        id: 200 + i as u32,
        text: text.to_string(),
        logprob: None,
        top_logprobs: Vec::new(),
    })
    .collect()
}

/// The thinking of [`reasoning_tokens`], as a reply's `reasoning`.
pub const REASONING_TEXT: &str = "The user asks <b>why</b>.\nThink twice.";
/// The answer of [`reasoning_tokens`].
pub const REASONING_ANSWER: &str = "Because it is.";
/// The tokens of [`reasoning_tokens`] up to the one that closes the think block.
pub const REASONING_TOKEN_COUNT: u32 = 6;

/// The arguments of the call in [`tool_call_tokens`], as written.
pub const TOOL_CALL_ARGUMENTS: &str = "{\"city\": \"Paris\"}";

pub const PEER_ID: &str = "scripted-peer";

/// The KV handle a context peer `context_id` answers `job` with: a pure function of both, so a
/// decode peer can recompute it and check the api-server passed it on unchanged.
pub fn fake_handle(context_id: &str, job: &GenerateJob) -> KvHandle {
    let num_tokens = job.prompt_ids.len() as u32;
    let blocks = num_tokens.div_ceil(FAKE_BLOCK_TOKENS) as u64;
    KvHandle {
        model_fingerprint: String::new(),
        worker_id: context_id.into(),
        backend: "scripted".into(),
        address: job.request_id.bytes().map(|b| format!("{b:02x}")).collect(),
        rkey: "c0ffee".into(),
        blocks: (0..blocks)
            .map(|i| KvRegion {
                addr: 0x1000_0000 + i * FAKE_BLOCK_BYTES,
                len: FAKE_BLOCK_BYTES,
            })
            .collect(),
        layout: KvLayoutSpec {
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 16,
            block_size: FAKE_BLOCK_TOKENS,
            dtype: "f32".into(),
            block_bytes: FAKE_BLOCK_BYTES,
        },
        num_tokens,
        first_token: scripted_tokens()[0].clone(),
        seed: job.sampling.seed.unwrap_or(4242),
        expires_unix_ms: 4_102_444_800_000,
        cuda_ipc: None,
        cuda_ipc_ranks: Vec::new(),
        seal: None,
        mac: String::new(),
    }
}

/// What a scripted decode peer's heartbeats say of its K/V reads (context peers say nothing):
/// the api-server must hand it to the context worker with each prefill job.
pub fn scripted_kv_peer(worker_id: &str) -> KvPeer {
    KvPeer {
        host_id: format!("host-of-{worker_id}"),
        cuda_ipc: true,
        coalesced_regions: true,
        cuda_ipc_ranks: true,
        cuda_ipc_cache: Vec::new(),
        cuda_ipc_mapped: Vec::new(),
    }
}

/// The transport a scripted decode peer reports in `kv_pulled`.
pub const SCRIPTED_TRANSPORT: &str = "scripted";

/// What the peer saw.
#[derive(Default)]
pub struct Observed {
    /// Prefill jobs for a context peer, generation jobs otherwise.
    pub jobs: Vec<GenerateJob>,
    pub cancels: Vec<String>,
}

/// The queue a peer's heartbeats report: (`queued`, `max_queued`).
type ReportedQueue = Arc<Mutex<(u32, Option<u32>)>>;

pub struct ScriptedBusPeer {
    pub id: String,
    pub observed: Arc<Mutex<Observed>>,
    heartbeating: Arc<AtomicBool>,
    refusing: Arc<AtomicBool>,
    queue: ReportedQueue,
    /// Runs the peer's tasks; dropping the peer ends them (its heartbeats stop).
    runtime: tokio::runtime::Runtime,
}

/// Everything an answering task needs.
#[derive(Clone)]
struct Answerer {
    client: async_nats::Client,
    id: String,
    observed: Arc<Mutex<Observed>>,
    heartbeating: Arc<AtomicBool>,
    refusing: Arc<AtomicBool>,
}

impl ScriptedBusPeer {
    /// Connects, starts heartbeating as the `both` worker [`PEER_ID`] of `model` and answers
    /// jobs sent to its direct subject.
    pub fn start(nats_url: &str, model: &str) -> Self {
        Self::start_as(nats_url, model, WorkerRole::Both, PEER_ID, None)
    }

    /// A peer playing worker `id` of `role`; a context peer's heartbeats carry `kv_transfer`.
    pub fn start_as(
        nats_url: &str,
        model: &str,
        role: WorkerRole,
        id: &str,
        kv_transfer: Option<KvTransferStats>,
    ) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("test runtime");
        let observed = Arc::new(Mutex::new(Observed::default()));
        let heartbeating = Arc::new(AtomicBool::new(true));
        let refusing = Arc::new(AtomicBool::new(false));
        let queue: ReportedQueue = Arc::new(Mutex::new((0, None)));
        let subjects = Subjects::new(model);
        let client = runtime
            .block_on(async_nats::connect(nats_url))
            .expect("the scripted peer connects to NATS");
        let job_subject = match role {
            WorkerRole::Context => subjects.prefill_direct(id),
            WorkerRole::Decode | WorkerRole::Both => subjects.generate_direct(id),
        };
        // Subscriptions are made before start() returns, so no job or cancel is missed.
        let (jobs, cancels) = runtime.block_on(async {
            let jobs = client.subscribe(job_subject).await.expect("subscribe jobs");
            let cancels = client
                .subscribe(subjects.cancel())
                .await
                .expect("subscribe cancels");
            client.flush().await.expect("flush");
            (jobs, cancels)
        });
        let heartbeat_client = client.clone();
        let heartbeat_subject = subjects.heartbeat(role, id);
        let model_name = model.to_string();
        let worker_id = id.to_string();
        let beating = Arc::clone(&heartbeating);
        let reported = Arc::clone(&queue);
        runtime.spawn(async move {
            while beating.load(Ordering::SeqCst) {
                let (queued, max_queued) = *reported.lock().expect("queue lock");
                let heartbeat = Heartbeat {
                    lora_adapters: Vec::new(),
                    numerics: None,
                    worker_id: worker_id.clone(),
                    role,
                    model: model_name.clone(),
                    device: "cpu".into(),
                    running: 0,
                    queued,
                    free_kv_blocks: 100,
                    total_kv_blocks: 128,
                    draining: false,
                    interval_ms: 100,
                    kv_transfer,
                    kv_peer: (role == WorkerRole::Decode).then(|| scripted_kv_peer(&worker_id)),
                    engine: None,
                    max_queued,
                    max_running: None,
                    kv_pull: None,
                    prefix_cache: None,
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
        let answerer = Answerer {
            client,
            id: id.to_string(),
            observed: Arc::clone(&observed),
            heartbeating: Arc::clone(&heartbeating),
            refusing: Arc::clone(&refusing),
        };
        runtime.spawn(async move {
            let mut jobs = jobs;
            while let Some(message) = jobs.next().await {
                let job: GenerateJob = decode("generate job", &message.payload)
                    .expect("the api-server sends valid jobs");
                answerer
                    .observed
                    .lock()
                    .expect("observed lock")
                    .jobs
                    .push(job.clone());
                let answerer = answerer.clone();
                if answerer.refusing.load(Ordering::SeqCst) {
                    answerer
                        .send(
                            &job,
                            StreamMessage::Rejected {
                                worker_id: answerer.id.clone(),
                                reason: RejectReason::QueueFull,
                            },
                        )
                        .await;
                    continue;
                }
                match role {
                    WorkerRole::Context => tokio::spawn(answerer.prefill(job)),
                    WorkerRole::Decode | WorkerRole::Both => tokio::spawn(answerer.generate(job)),
                };
            }
        });
        ScriptedBusPeer {
            id: id.to_string(),
            observed,
            heartbeating,
            refusing,
            queue,
            runtime,
        }
    }

    /// From now on, answers every job with `rejected` (`queue_full`), whatever its script;
    /// its heartbeats say nothing of it (another api-server filled its queue).
    pub fn refuse_jobs(&self, refuse: bool) {
        self.refusing.store(refuse, Ordering::SeqCst);
    }

    /// What its next heartbeats say of its queue: `queued` jobs, at most `max_queued`.
    pub fn report_queue(&self, queued: u32, max_queued: Option<u32>) {
        *self.queue.lock().expect("queue lock") = (queued, max_queued);
    }

    pub fn cancels(&self) -> Vec<String> {
        self.observed.lock().expect("observed lock").cancels.clone()
    }

    pub fn jobs(&self) -> Vec<GenerateJob> {
        self.observed.lock().expect("observed lock").jobs.clone()
    }

    /// Whether the peer still heartbeats (a vanishing script stops it).
    pub fn heartbeating(&self) -> bool {
        self.heartbeating.load(Ordering::SeqCst)
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

impl Answerer {
    async fn send(&self, job: &GenerateJob, message: StreamMessage) {
        self.client
            .publish(job.stream_subject.clone(), encode(&message).into())
            .await
            .expect("publish stream message")
    }

    fn accepted(&self) -> StreamMessage {
        StreamMessage::Accepted {
            worker_id: self.id.clone(),
        }
    }

    fn cancelled(&self, request_id: &str) -> bool {
        self.observed
            .lock()
            .expect("observed lock")
            .cancels
            .iter()
            .any(|id| id == request_id)
    }

    /// A context worker's answer to a prefill job.
    async fn prefill(self, job: GenerateJob) {
        match job.stop.max_tokens {
            SCRIPT_SILENT | SCRIPT_CONTEXT_SILENT => {}
            SCRIPT_ENDLESS => self.send(&job, self.accepted()).await,
            SCRIPT_CONTEXT_VANISHES => {
                self.heartbeating.store(false, Ordering::SeqCst);
                self.send(&job, self.accepted()).await;
            }
            SCRIPT_ERROR => {
                self.send(&job, self.accepted()).await;
                self.send(
                    &job,
                    StreamMessage::Error {
                        message: "scripted failure".into(),
                        param: None,
                    },
                )
                .await;
            }
            SCRIPT_CONTEXT_ERROR => {
                self.send(&job, self.accepted()).await;
                self.send(
                    &job,
                    StreamMessage::Error {
                        message: CONTEXT_ERROR.into(),
                        param: None,
                    },
                )
                .await;
            }
            SCRIPT_CONTEXT_ANSWERS => {
                self.send(&job, self.accepted()).await;
                self.send(
                    &job,
                    StreamMessage::Tokens {
                        tokens: scripted_tokens()[..1].to_vec(),
                        index: Some(0),
                    },
                )
                .await;
                self.send(
                    &job,
                    StreamMessage::Finished {
                        reason: FinishReason::Stop,
                        usage: Usage {
                            prompt_tokens: job.prompt_ids.len() as u32,
                            completion_tokens: 1,
                            cached_tokens: 0,
                            ..Default::default()
                        },
                    },
                )
                .await;
            }
            _ => {
                self.send(&job, self.accepted()).await;
                let handle = fake_handle(&self.id, &job);
                self.send(
                    &job,
                    StreamMessage::KvReady {
                        handle: Box::new(handle),
                        prefill_timing: Some(FAKE_PREFILL_TIMING),
                        cached_tokens: FAKE_CONTEXT_CACHED_TOKENS.min(job.prompt_ids.len() as u32),
                    },
                )
                .await;
            }
        }
    }

    /// A generation (decode or both) worker's answer.
    async fn generate(self, job: GenerateJob) {
        if let Some(handle) = &job.kv {
            let mut plain = job.clone();
            plain.kv = None;
            if *handle != fake_handle(&handle.worker_id, &plain) {
                self.send(&job, self.accepted()).await;
                self.send(
                    &job,
                    StreamMessage::Error {
                        message: format!("the KV handle changed in transit: {handle:?}"),
                        param: None,
                    },
                )
                .await;
                return;
            }
        }
        let prompt_tokens = job.prompt_ids.len() as u32;
        match job.stop.max_tokens {
            SCRIPT_SILENT | SCRIPT_DECODE_SILENT => {}
            SCRIPT_DECODE_VANISHES => {
                self.send(&job, self.accepted()).await;
                self.heartbeating.store(false, Ordering::SeqCst);
                self.send(
                    &job,
                    StreamMessage::Tokens {
                        tokens: scripted_tokens()[..1].to_vec(),
                        index: Some(0),
                    },
                )
                .await;
            }
            SCRIPT_STALL => {
                self.send(&job, self.accepted()).await;
                self.send(
                    &job,
                    StreamMessage::Tokens {
                        tokens: scripted_tokens()[..1].to_vec(),
                        index: Some(0),
                    },
                )
                .await;
            }
            SCRIPT_ERROR => {
                self.send(&job, self.accepted()).await;
                self.send(
                    &job,
                    StreamMessage::Error {
                        message: "scripted failure".into(),
                        param: None,
                    },
                )
                .await;
            }
            SCRIPT_TOOL_CALL | SCRIPT_REASONING | SCRIPT_REASONING_TOOL_CALL => {
                self.send(&job, self.accepted()).await;
                let tokens = match job.stop.max_tokens {
                    SCRIPT_TOOL_CALL => tool_call_tokens(),
                    SCRIPT_REASONING => reasoning_tokens(),
                    _ => {
                        // The think block alone (its answer left out), then the call.
                        let mut tokens = reasoning_tokens();
                        tokens.truncate(REASONING_TOKEN_COUNT as usize);
                        tokens.last_mut().unwrap().text = "ink>\n\n".into();
                        tokens.extend(tool_call_tokens());
                        tokens
                    }
                };
                for (index, batch) in [(0, &tokens[..2]), (2, &tokens[2..4]), (4, &tokens[4..])] {
                    self.send(
                        &job,
                        StreamMessage::Tokens {
                            tokens: batch.to_vec(),
                            index: Some(index),
                        },
                    )
                    .await;
                }
                self.send(
                    &job,
                    StreamMessage::Finished {
                        reason: FinishReason::Stop,
                        usage: Usage {
                            prompt_tokens,
                            completion_tokens: tokens.len() as u32,
                            cached_tokens: 0,
                            ..Default::default()
                        },
                    },
                )
                .await;
            }
            SCRIPT_ENDLESS => {
                self.send(&job, self.accepted()).await;
                while !self.cancelled(&job.request_id) {
                    self.send(
                        &job,
                        // Unnumbered, as from a worker that predates numbering.
                        StreamMessage::Tokens {
                            tokens: scripted_tokens()[..1].to_vec(),
                            index: None,
                        },
                    )
                    .await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            script => {
                let tokens = scripted_tokens();
                self.send(&job, self.accepted()).await;
                if let Some(handle) = &job.kv {
                    let pulled = if script == SCRIPT_PULL_FAILS {
                        StreamMessage::KvPulled {
                            worker_id: self.id.clone(),
                            bytes: 0,
                            micros: 0,
                            room_wait_us: None,
                            outcome: PullOutcome::Fallback {
                                reason: "scripted pull failure".into(),
                            },
                        }
                    } else if script == SCRIPT_HANDLE_REFUSED {
                        StreamMessage::KvPulled {
                            worker_id: self.id.clone(),
                            bytes: 0,
                            micros: 0,
                            room_wait_us: None,
                            outcome: PullOutcome::Refused {
                                reason: "scripted refusal".into(),
                            },
                        }
                    } else if script == SCRIPT_EXPORT_GONE {
                        StreamMessage::KvPulled {
                            worker_id: self.id.clone(),
                            bytes: 0,
                            micros: 0,
                            room_wait_us: None,
                            outcome: PullOutcome::ExportGone {
                                reason: "scripted: the seal changed".into(),
                            },
                        }
                    } else {
                        StreamMessage::KvPulled {
                            worker_id: self.id.clone(),
                            bytes: handle.blocks.len() as u64 * FAKE_BLOCK_BYTES,
                            micros: FAKE_PULL_MICROS,
                            room_wait_us: Some(FAKE_ROOM_WAIT_MICROS),
                            outcome: PullOutcome::Pulled {
                                transport: SCRIPTED_TRANSPORT.into(),
                            },
                        }
                    };
                    self.send(&job, pulled).await;
                }
                // The first token first, as a decode worker streams the handle's token.
                self.send(
                    &job,
                    StreamMessage::Tokens {
                        tokens: tokens[..2].to_vec(),
                        index: Some(0),
                    },
                )
                .await;
                self.send(
                    &job,
                    StreamMessage::Tokens {
                        tokens: tokens[2..].to_vec(),
                        index: Some(2),
                    },
                )
                .await;
                self.send(
                    &job,
                    StreamMessage::Finished {
                        reason: FinishReason::Stop,
                        usage: Usage {
                            prompt_tokens,
                            completion_tokens: tokens.len() as u32,
                            cached_tokens: 0,
                            ..Default::default()
                        },
                    },
                )
                .await;
            }
        }
    }
}
