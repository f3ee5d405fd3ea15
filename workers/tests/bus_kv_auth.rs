//! KV handles bound to their export and their request, with real processes: a
//! nats-server, a `worker --role context` and `worker --role decode` workers on SmolLM2
//! (bf16), the test publishing jobs straight to the workers' subjects as anyone on the bus
//! could.
//!
//! Shows: a decode worker that holds the deployment's KV secret refuses, before reading
//! anything, every handle that is not exactly what the context worker signed for the job's
//! request (forged, altered, moved to another request, unsigned, signed with a guessed
//! secret, or taken before), serves that request from a local prefill with its own text, counts
//! and logs the refusal, and serves on; a live export of request A cannot be read into request
//! B's sequence through any such handle, while a decode worker without the secret is fooled by
//! the same job (B's output continues A's prompt): the check is what protects A.
//!
//! And A's own, genuine handle never reads memory that A's export no longer holds: a forged
//! release or cancel that frees A's export early (unpins its blocks in the context worker's
//! cache, which decode workers read in place), with another request's K/V computed in those
//! blocks and exported under its seal slot, or a replay of A's handle to another decode worker
//! after A's pull, each finds the export's seal changed after the read, and A is served from a
//! local prefill with its own text.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tandem_protocol::messages::{
    self, CancelRequest, GenerateJob, Heartbeat, KvHandle, KvPeer, KvRegion, KvRelease,
    PullOutcome, SamplingSpec, StopSpec, StreamMessage,
};
use tandem_protocol::subjects::Subjects;
use tandem_test_kit::{Nats, Proc, WorkerSpec, bin};
use tandem_workers::serve::kv_auth::{HandleBinding, KV_SECRET_VAR, KvSecret};

const SERVED: &str = "kv-auth-test";
/// The deployment's secret (a test's: known to the test only).
const SECRET: &str = "5f1d0c3a9e7b4a61c2d8e0f3a6b9c4d7";
/// Request A's prompt and request B's: the same number of tokens, so that A's export is
/// exactly the size of B's prompt and a handle naming it passes every check but the MAC.
const PROMPT_A: &str = "What is the capital of France?";
const PROMPT_B: &str = "What is the capital of Spain?";
const TOKENS: u32 = 12;

fn model_dir() -> PathBuf {
    tandem_test_kit::model_dir("smollm2-bf16")
}

/// A worker of this test's deployment; `secret`: the KV secret in its environment.
fn start_worker(nats: &str, role: &str, id: &str, secret: Option<&str>, extra: &[&str]) -> Proc {
    start_worker_with_env(nats, role, id, secret, extra, &[])
}

/// [`start_worker`], with `env` set in its environment too.
fn start_worker_with_env(
    nats: &str,
    role: &str,
    id: &str,
    secret: Option<&str>,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let spec = WorkerSpec {
        role,
        worker_id: id,
        served_model_name: SERVED,
        threads: 1,
        heartbeat_ms: 200,
        extra,
    };
    let mut command = spec.command(nats, &model_dir());
    command.env_remove(KV_SECRET_VAR);
    command.env_remove("TANDEM_KV_SECRET_FILE");
    if let Some(secret) = secret {
        command.env(KV_SECRET_VAR, secret);
    }
    command.envs(env.iter().copied());
    let mut proc = Proc::spawn(id, command);
    proc.wait_for_line("joined the deployment", Duration::from_secs(120));
    proc
}

/// `worker generate --chat --json` for `prompt`, greedy: the undisturbed tokens.
fn reference(prompt: &str) -> (Vec<u32>, Vec<u32>) {
    let output = Command::new(bin("worker"))
        .arg("generate")
        .arg("--model")
        .arg(model_dir())
        .args(["--chat", "--json", "--prompt", prompt])
        .args(["--max-tokens", &TOKENS.to_string()])
        .output()
        .unwrap();
    assert!(output.status.success());
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let ids = |key: &str| serde_json::from_value(json[key].clone()).unwrap();
    (ids("prompt_ids"), ids("output_ids"))
}

fn job(request_id: &str, prompt_ids: &[u32]) -> GenerateJob {
    GenerateJob {
        lora: None,
        request_id: request_id.into(),
        prompt_ids: prompt_ids.to_vec(),
        sampling: SamplingSpec {
            temperature: 0.0,
            ..SamplingSpec::default()
        },
        stop: StopSpec {
            max_tokens: TOKENS,
            ..StopSpec::default()
        },
        stream_subject: Subjects::new(SERVED).stream(request_id),
        deadline_unix_ms: None,
        kv: None,
        // A decode worker reads regions of several blocks: one region for the export.
        kv_reader: Some(KvPeer {
            host_id: "kv-auth-test".into(),
            cuda_ipc: false,
            coalesced_regions: true,
            cuda_ipc_ranks: false,
            cuda_ipc_cache: Vec::new(),
            cuda_ipc_mapped: Vec::new(),
        }),
        resume_ids: Vec::new(),
        samples: None,
        cache_salt: None,
        priority: 0,
        prediction_ids: Vec::new(),
        embedding: false,
    }
}

/// Publishes `job` on `subject` and reads its stream until `done` (60 s at most).
async fn run(
    client: &async_nats::Client,
    subject: String,
    job: &GenerateJob,
    done: impl Fn(&StreamMessage) -> bool,
) -> Vec<StreamMessage> {
    let mut stream = client.subscribe(job.stream_subject.clone()).await.unwrap();
    client
        .publish(subject, messages::encode(job).into())
        .await
        .unwrap();
    let mut out = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .unwrap_or_else(|_| panic!("{}: no stream message within 60 s", job.request_id))
            .expect("the subscription is open");
        let message: StreamMessage = messages::decode("stream", &message.payload).unwrap();
        let finished = done(&message);
        out.push(message);
        if finished {
            return out;
        }
    }
}

/// Prefills `job` on the context worker `ctx` and returns its handle (the export is held
/// until a decode worker releases it or it expires).
async fn prefill(client: &async_nats::Client, job: &GenerateJob) -> KvHandle {
    let subject = Subjects::new(SERVED).prefill_direct("ctx");
    let answer = run(client, subject, job, |m| {
        matches!(
            m,
            StreamMessage::KvReady { .. } | StreamMessage::Error { .. }
        )
    })
    .await;
    match answer.last() {
        Some(StreamMessage::KvReady { handle, .. }) => *handle.clone(),
        _ => panic!("no kv_ready: {answer:?}"),
    }
}

/// What a decode job got: how the K/V came (`kv_pulled`'s outcome) and the tokens.
struct Decoded {
    outcome: PullOutcome,
    ids: Vec<u32>,
}

/// Sends `job` as a decode job to the generation worker `worker`, to its end.
async fn decode(client: &async_nats::Client, worker: &str, job: &GenerateJob) -> Decoded {
    let subject = Subjects::new(SERVED).generate_direct(worker);
    let messages = run(client, subject, job, |m| {
        matches!(
            m,
            StreamMessage::Finished { .. } | StreamMessage::Error { .. }
        )
    })
    .await;
    let mut outcome = None;
    let mut ids = Vec::new();
    for message in messages {
        match message {
            StreamMessage::KvPulled { outcome: o, .. } => outcome = Some(o),
            StreamMessage::Tokens { tokens, .. } => ids.extend(tokens.iter().map(|t| t.id)),
            StreamMessage::Error { message, .. } => {
                panic!("{}: the request failed: {message}", job.request_id)
            }
            _ => {}
        }
    }
    Decoded {
        outcome: outcome.expect("the decode worker reports how the K/V came"),
        ids,
    }
}

/// `job` carrying `handle`.
fn with_handle(job: &GenerateJob, handle: KvHandle) -> GenerateJob {
    GenerateJob {
        kv: Some(handle),
        kv_reader: None,
        ..job.clone()
    }
}

/// Waits (10 s at most) for a heartbeat of `worker` whose count `what` (read by `count`) is
/// `want`.
async fn wait_for_count(
    heartbeats: &mut async_nats::Subscriber,
    worker: &str,
    what: &str,
    count: impl Fn(&Heartbeat) -> Option<u64>,
    want: u64,
) {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < Duration::from_secs(10) {
        let message = tokio::time::timeout(Duration::from_secs(5), heartbeats.next())
            .await
            .expect("a heartbeat within 5 s")
            .expect("the subscription is open");
        let beat: Heartbeat = messages::decode("heartbeat", &message.payload).unwrap();
        if beat.worker_id == worker {
            last = count(&beat);
            if last == Some(want) {
                return;
            }
        }
    }
    panic!("{worker}'s heartbeats count {last:?} {what}, not {want}");
}

/// Waits for a heartbeat of `worker` counting `refused` refused handles.
async fn wait_for_refusals(heartbeats: &mut async_nats::Subscriber, worker: &str, refused: u64) {
    let count = |beat: &Heartbeat| beat.kv_pull.map(|p| p.refused_handles);
    wait_for_count(heartbeats, worker, "refused handles", count, refused).await;
}

/// Waits for a heartbeat of `worker` counting `gone` pulls whose export's seal had changed.
async fn wait_for_exports_gone(heartbeats: &mut async_nats::Subscriber, worker: &str, gone: u64) {
    let count = |beat: &Heartbeat| beat.kv_pull.map(|p| p.exports_gone);
    wait_for_count(heartbeats, worker, "exports gone", count, gone).await;
}

/// Waits for a heartbeat of the context worker `worker` counting `released` releases (a
/// cancel that frees an export counts as one).
async fn wait_for_releases(heartbeats: &mut async_nats::Subscriber, worker: &str, released: u64) {
    let count = |beat: &Heartbeat| beat.kv_transfer.map(|t| t.releases);
    wait_for_count(heartbeats, worker, "releases", count, released).await;
}

/// `outcome` is a pull that found its export gone after the read, for a reason containing
/// `needle`.
fn assert_export_gone(outcome: &PullOutcome, needle: &str) {
    match outcome {
        PullOutcome::ExportGone { reason } => assert!(reason.contains(needle), "{reason}"),
        other => panic!("the pull did not find the export gone ({needle}): {other:?}"),
    }
}

/// `outcome` is a refused handle whose reason contains `needle`.
fn assert_refused(outcome: &PullOutcome, needle: &str) {
    match outcome {
        PullOutcome::Refused { reason } => assert!(reason.contains(needle), "{reason}"),
        other => panic!("the handle was not refused ({needle}): {other:?}"),
    }
}

/// Request A's export is held on the context worker while forged decode jobs for request B
/// name it: A's handle as it is (A's MAC, B's id), without its MAC, with a MAC under a guessed
/// secret, and B's own signed handle with its regions moved onto A's. Each is refused, and B's
/// output is B's own undisturbed text. A decode worker without the secret, given the unsigned
/// one, reads A's K/V: B's output is A's (so the forged job does name A's K/V, and the MAC is
/// what keeps it out). A then gets its own K/V, pulled, and a replay of A's decode job after
/// that reads nothing.
#[tokio::test]
async fn a_forged_handle_never_reads_another_requests_kv() {
    let nats = Nats::start();
    let url = &nats.url;
    let _context = start_worker(
        url,
        "context",
        "ctx",
        Some(SECRET),
        &["--kv-transfer-timeout-ms", "120000"],
    );
    let decode_worker = start_worker(url, "decode", "dec", Some(SECRET), &[]);
    let _unchecked = start_worker(url, "decode", "open", None, &[]);
    assert_eq!(
        decode_worker.count_lines("KV handles are authenticated with the deployment's KV secret"),
        1
    );
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let mut heartbeats = client
        .subscribe(Subjects::new(SERVED).heartbeat_all())
        .await
        .unwrap();
    let (prompt_a, output_a) = reference(PROMPT_A);
    let (prompt_b, output_b) = reference(PROMPT_B);
    assert_eq!(
        prompt_a.len(),
        prompt_b.len(),
        "the prompts differ in length"
    );
    assert_ne!(output_a, output_b, "the two answers must tell A from B");

    // A's export, held: nobody pulls it until the end.
    let job_a = job("request-a", &prompt_a);
    let handle_a = prefill(&client, &job_a).await;
    assert_eq!(
        handle_a.mac.len(),
        64,
        "the context worker signs: {handle_a:?}"
    );
    assert_eq!(handle_a.blocks.len(), 1, "{handle_a:?}");
    let job_b = job("request-b", &prompt_b);
    // B's own export, whose signed handle is then moved onto A's regions.
    let handle_b = prefill(&client, &job_b).await;
    assert_eq!(
        (handle_b.address.as_str(), handle_b.rkey.as_str()),
        (handle_a.address.as_str(), handle_a.rkey.as_str()),
        "one context worker, one registered cache: A's address and remote key are B's"
    );
    assert_ne!(handle_b.blocks, handle_a.blocks);

    let unsigned = KvHandle {
        mac: String::new(),
        ..handle_a.clone()
    };
    let mut guessed = handle_a.clone();
    KvSecret::load(None, |_| Some("guessed-".repeat(4)))
        .unwrap()
        .unwrap()
        .sign(&mut guessed, &HandleBinding::of(&job_b));
    let onto_a = KvHandle {
        blocks: handle_a.blocks.clone(),
        ..handle_b.clone()
    };
    // Each in B's own decode job: B's request id, stream and prompt.
    let forgeries = [
        (
            "A's handle with its MAC",
            handle_a.clone(),
            "does not verify for request request-b",
        ),
        (
            "A's handle without a MAC",
            unsigned.clone(),
            "carries no MAC",
        ),
        (
            "A's handle signed with a guessed secret",
            guessed,
            "does not verify",
        ),
        (
            "B's signed handle on A's regions",
            onto_a,
            "does not verify",
        ),
    ];
    for (i, (what, handle, why)) in forgeries.iter().enumerate() {
        let forged = with_handle(&job_b, handle.clone());
        let got = decode(&client, "dec", &forged).await;
        assert_refused(&got.outcome, why);
        assert_eq!(got.ids, output_b, "{what}: B's output is B's own");
        wait_for_refusals(&mut heartbeats, "dec", i as u64 + 1).await;
    }
    assert_eq!(
        decode_worker.count_lines("KV handle refused, prefilling locally"),
        forgeries.len(),
        "each refusal is logged"
    );

    // The control: a decode worker that does not check believes the unsigned handle and
    // continues A's prompt in B's request.
    let fooled = GenerateJob {
        request_id: "request-b-fooled".into(),
        stream_subject: Subjects::new(SERVED).stream("request-b-fooled"),
        ..with_handle(&job_b, unsigned)
    };
    let got = decode(&client, "open", &fooled).await;
    assert!(
        matches!(got.outcome, PullOutcome::Pulled { .. }),
        "{:?}",
        got.outcome
    );
    assert_eq!(got.ids, output_a, "without the secret, B's output is A's");

    // A's export was never harmed: A gets its K/V, pulled.
    let decode_a = with_handle(&job_a, handle_a);
    let got = decode(&client, "dec", &decode_a).await;
    assert!(
        matches!(got.outcome, PullOutcome::Pulled { .. }),
        "{:?}",
        got.outcome
    );
    assert_eq!(got.ids, output_a);
    // The same decode job again (its MAC verifies for A): the export was released after the
    // pull, its memory free for other requests' K/V, so it is refused; A is prefilled here.
    let got = decode(&client, "dec", &decode_a).await;
    assert_refused(&got.outcome, "a replay");
    assert_eq!(got.ids, output_a);
    wait_for_refusals(&mut heartbeats, "dec", forgeries.len() as u64 + 1).await;
}

/// Handles no context worker made, published in decode jobs to a decode worker that holds the
/// secret — huge lengths, a truncated address, a non-hex remote key, regions outside the
/// export, another model's fingerprint: each is refused before anything is read, counted, and
/// the request is served from a local prefill; the worker serves a normal disaggregated
/// request after. A decode worker without the secret refuses the malformed ones by their
/// shape, and serves on too.
#[tokio::test]
async fn malformed_and_foreign_handles_leave_the_decode_worker_serving() {
    let nats = Nats::start();
    let url = &nats.url;
    let _context = start_worker(url, "context", "ctx", Some(SECRET), &[]);
    let _decode = start_worker(url, "decode", "dec", Some(SECRET), &[]);
    let _unchecked = start_worker(url, "decode", "open", None, &[]);
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let mut heartbeats = client
        .subscribe(Subjects::new(SERVED).heartbeat_all())
        .await
        .unwrap();
    let (prompt, output) = reference(PROMPT_A);
    let genuine = prefill(&client, &job("genuine", &prompt)).await;

    let alter = |change: &dyn Fn(&mut KvHandle)| {
        let mut handle = genuine.clone();
        change(&mut handle);
        handle
    };
    let huge = alter(&|h| {
        h.blocks = vec![KvRegion {
            addr: 0,
            len: u64::MAX,
        }];
        h.num_tokens = u32::MAX;
    });
    // Cut to an odd number of hex digits.
    let truncated = alter(&|h| h.address.truncate((h.address.len() / 2) | 1));
    let non_hex = alter(&|h| h.rkey = "zz".repeat(h.rkey.len() / 2));
    let outside = alter(&|h| h.blocks[0].addr += 1 << 30);
    let other_model = alter(&|h| h.model_fingerprint = "00".repeat(16));
    // Malformed by shape: refused by a worker without the secret too.
    let malformed = [
        ("huge", huge),
        ("truncated", truncated),
        ("non-hex", non_hex),
    ];
    // Well-formed lies: only the MAC tells them (a worker without the secret is not given
    // them: it would read where they point, or refuse the model with an error).
    let lies = [("outside", outside), ("other-model", other_model)];

    let mut refused = 0;
    for (what, handle) in malformed.iter().chain(&lies) {
        let forged = with_handle(&job(&format!("forged-{what}"), &prompt), handle.clone());
        let got = decode(&client, "dec", &forged).await;
        assert_refused(&got.outcome, "does not verify for request");
        assert_eq!(got.ids, output, "{what}: served from a local prefill");
        refused += 1;
    }
    wait_for_refusals(&mut heartbeats, "dec", refused).await;
    for (what, handle) in &malformed {
        let forged = with_handle(&job(&format!("open-{what}"), &prompt), handle.clone());
        let got = decode(&client, "open", &forged).await;
        assert_refused(&got.outcome, "invalid KV handle");
        assert_eq!(got.ids, output, "{what}: served from a local prefill");
    }
    wait_for_refusals(&mut heartbeats, "open", malformed.len() as u64).await;

    // Both serve a normal disaggregated request after.
    for worker in ["dec", "open"] {
        let normal = job(&format!("normal-{worker}"), &prompt);
        let handle = prefill(&client, &normal).await;
        let got = decode(&client, worker, &with_handle(&normal, handle)).await;
        assert!(
            matches!(got.outcome, PullOutcome::Pulled { .. }),
            "{worker}: {:?}",
            got.outcome
        );
        assert_eq!(got.ids, output, "{worker}");
    }
}

/// How long the `slow` decode worker of the test below waits between reserving a job's room
/// and pulling (`TANDEM_TEST_DELAY_PULL_MS`): the test frees the export and makes another in
/// its memory meanwhile (a release, a heartbeat and a 12-token prefill; well under a second).
const PULL_DELAY_MS: u64 = 2500;

/// Waits (30 s at most) until `worker` has printed `count` lines containing `needle`, letting
/// the test's other tasks run meanwhile.
async fn wait_for_lines(worker: &Proc, needle: &str, count: usize) {
    let start = Instant::now();
    while worker.count_lines(needle) < count {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no {count} lines with `{needle}` within 30 s:\n{}",
            worker.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A pull never reads an export that was freed, whether or not its memory holds another
/// request's K/V by then, though the handle is request A's own, correctly signed:
///
/// - While A's decode job waits to pull (on `slow`), a forged `kv.release` for A frees A's
///   export (its blocks unpinned in the context worker's cache, its seal slot cleared) and
///   request C is prefilled into A's very blocks and exported with A's seal slot (C's handle
///   names A's regions and seal address). A's pull then reads C's K/V, finds C's nonce in the
///   seal, drops what it read: A's output is A's own text from a local prefill, never C's.
///   C's own pull is intact.
/// - A forged `cancel` for A does the same before A's decode job arrives.
/// - After A's pull, a replay of A's decode job to another decode worker (which has not seen
///   the handle, and verifies its MAC) finds the seal cleared.
///
/// Each such pull is reported as `export_gone`, counted in the decode worker's heartbeat and
/// logged.
#[tokio::test]
async fn a_pull_never_reads_an_export_that_was_freed_and_reused() {
    let nats = Nats::start();
    let url = &nats.url;
    // Without prefix caching a released export's blocks go straight back to the free list,
    // and the next prompt of the same length is exported from the very same memory.
    let _context = start_worker(
        url,
        "context",
        "ctx",
        Some(SECRET),
        &[
            "--kv-transfer-timeout-ms",
            "120000",
            "--prefix-caching",
            "false",
        ],
    );
    let delay = PULL_DELAY_MS.to_string();
    let slow = start_worker_with_env(
        url,
        "decode",
        "slow",
        Some(SECRET),
        &[],
        &[("TANDEM_TEST_DELAY_PULL_MS", &delay)],
    );
    let fast = start_worker(url, "decode", "dec", Some(SECRET), &[]);
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let subjects = Subjects::new(SERVED);
    let mut heartbeats = client.subscribe(subjects.heartbeat_all()).await.unwrap();
    let (prompt_a, output_a) = reference(PROMPT_A);
    let (prompt_c, output_c) = reference(PROMPT_B);
    assert_eq!(
        prompt_a.len(),
        prompt_c.len(),
        "C's export must fit A's memory"
    );
    assert_ne!(output_a, output_c, "the two answers must tell A from C");

    // 1. A forged release while A's decode job is held.
    let job_a = job("request-a", &prompt_a);
    let handle_a = prefill(&client, &job_a).await;
    let seal_a = handle_a
        .seal
        .clone()
        .expect("the context worker seals each export");
    let pending = {
        let (client, job) = (client.clone(), with_handle(&job_a, handle_a.clone()));
        tokio::spawn(async move { decode(&client, "slow", &job).await })
    };
    wait_for_lines(&slow, "pulling in", 1).await;
    let forged = KvRelease {
        request_id: job_a.request_id.clone(),
    };
    client
        .publish(subjects.kv_release("ctx"), messages::encode(&forged).into())
        .await
        .unwrap();
    wait_for_releases(&mut heartbeats, "ctx", 1).await;
    let job_c = job("request-c", &prompt_c);
    let handle_c = prefill(&client, &job_c).await;
    let seal_c = handle_c.seal.clone().expect("sealed");
    assert_eq!(
        handle_c.blocks, handle_a.blocks,
        "C's K/V lies where A's did"
    );
    assert_eq!(seal_c.addr, seal_a.addr, "and so does its seal");
    assert_ne!(seal_c.nonce, seal_a.nonce);
    assert_eq!(
        slow.count_lines("KV pull read an export that was freed meanwhile"),
        0,
        "A's pull waited for C's export (raise PULL_DELAY_MS on a slow machine)"
    );
    let got = pending.await.unwrap();
    assert_export_gone(&got.outcome, "holds another nonce");
    assert_eq!(
        got.ids, output_a,
        "A's own text from a local prefill, not C's"
    );
    wait_for_exports_gone(&mut heartbeats, "slow", 1).await;
    assert_eq!(
        slow.count_lines("KV pull read an export that was freed meanwhile"),
        1,
        "logged"
    );
    // C's export was never disturbed: its own pull reads C's K/V.
    let got = decode(&client, "dec", &with_handle(&job_c, handle_c)).await;
    assert!(
        matches!(got.outcome, PullOutcome::Pulled { .. }),
        "{:?}",
        got.outcome
    );
    assert_eq!(got.ids, output_c);

    // 2. A forged cancel frees A's export before its decode job arrives.
    let job_a2 = job("request-a2", &prompt_a);
    let handle_a2 = prefill(&client, &job_a2).await;
    let forged = CancelRequest {
        request_id: job_a2.request_id.clone(),
    };
    client
        .publish(subjects.cancel(), messages::encode(&forged).into())
        .await
        .unwrap();
    // The forged release, C's release, and now the cancel.
    wait_for_releases(&mut heartbeats, "ctx", 3).await;
    let job_c2 = job("request-c2", &prompt_c);
    let handle_c2 = prefill(&client, &job_c2).await;
    assert_eq!(
        handle_c2.blocks, handle_a2.blocks,
        "C's K/V lies where A's did"
    );
    let got = decode(&client, "dec", &with_handle(&job_a2, handle_a2)).await;
    assert_export_gone(&got.outcome, "holds another nonce");
    assert_eq!(
        got.ids, output_a,
        "A's own text from a local prefill, not C's"
    );
    wait_for_exports_gone(&mut heartbeats, "dec", 1).await;
    let got = decode(&client, "dec", &with_handle(&job_c2, handle_c2)).await;
    assert!(
        matches!(got.outcome, PullOutcome::Pulled { .. }),
        "{:?}",
        got.outcome
    );
    assert_eq!(got.ids, output_c);

    // 3. A replay of A's pulled handle to another decode worker: its export was released
    // after the pull, its seal cleared.
    let job_a3 = job("request-a3", &prompt_a);
    let decode_a3 = with_handle(&job_a3, prefill(&client, &job_a3).await);
    let got = decode(&client, "dec", &decode_a3).await;
    assert!(
        matches!(got.outcome, PullOutcome::Pulled { .. }),
        "{:?}",
        got.outcome
    );
    assert_eq!(got.ids, output_a);
    let got = decode(&client, "slow", &decode_a3).await;
    assert_export_gone(&got.outcome, "seal was cleared");
    assert_eq!(got.ids, output_a);
    wait_for_exports_gone(&mut heartbeats, "slow", 2).await;
    assert_eq!(
        fast.count_lines("KV handle refused"),
        0,
        "every handle here is genuine: none is refused, each is caught by its seal"
    );
}
