//! The fault suite: real processes (nats-server, CPU workers, the api-server), real
//! faults, and what the client saw.
//!
//! - A decode worker killed (-9) mid-stream with several streams in flight: every stream it
//!   served moves to the other decode worker and completes with exactly the text of an
//!   undisturbed run (greedy and seeded), usage counted once.
//! - A context worker killed (-9) during a prefill, or between its `kv_ready` and the decode
//!   worker's pull: the request is prefilled by its decode worker instead and completes with
//!   the undisturbed text.
//! - A decode worker killed (-9) between the context worker's `kv_ready` and its pull: the
//!   export's blocks, pinned in the context worker's KV cache, are free again within the
//!   export's expiry and grace, and the request completes on another decode worker.
//! - Overload past the admission bounds (two api-servers with small `--max-pending-requests`
//!   in front of one worker with a small `--max-queued-requests`): the requests that do not
//!   fit get 429 with `Retry-After` (refused by an api-server's bound, by its router, or by the
//!   worker itself), every accepted one completes with the undisturbed text, and the
//!   deployment serves normally after.
//! - A worker that holds 2 requests, sent 10 short ones one after another between two of its
//!   heartbeats: all are served (the api-server counts each ended request off its queue).
//! - Clients that half-close (FIN) or reset (RST) their connection, streaming or not, before
//!   or after their first token: the worker's running sequences and KV blocks are back to
//!   idle within 2 s.
//! - The nats-server killed and restarted mid-stream: the deployment serves again within 5 s;
//!   the stream in flight resumes after the tokens lost in the outage (the api-server sees a
//!   gap in the numbered token messages, or a stall, and migrates it) with the undisturbed
//!   text, and through an api-server that may not migrate it ends with the documented error.
//! - A worker whose every forward pass fails: its engine gives up after 3 in a row, the worker
//!   leaves the rotation and exits (for the launcher to restart it), and every request it
//!   failed completes on the other worker with the text the healthy worker gives it.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{collect_stream, start_api_server};
use tandem_test_kit::prometheus::{metric, sample};
use tandem_test_kit::{ApiServer, Http, Nats, Proc, WorkerSpec, model_dir};

const MODEL: &str = "smollm2-bf16";

fn chat(i: usize, max_tokens: u32) -> Value {
    let topics = ["the sea", "copper", "a lighthouse", "winter", "bread"];
    let mut request = json!({
        "messages": [{"role": "user", "content": format!("Write a long story about {}.", topics[i % topics.len()])}],
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if i % 2 == 1 {
        request["temperature"] = json!(0.8);
        request["seed"] = json!(40 + i);
    } else {
        request["temperature"] = json!(0);
    }
    request
}

/// The streamed text and usage of `request`, counting content chunks into `progress`.
fn stream(http: &Http, request: &Value, progress: &AtomicUsize) -> (String, Value) {
    let (status, events) = http.post_stream("/v1/chat/completions", request, |event| {
        if event["choices"][0]["delta"]["content"].is_string() {
            progress.fetch_add(1, Ordering::SeqCst);
        }
    });
    assert_eq!(status, 200);
    let usage = events
        .iter()
        .rev()
        .find_map(|e| e.get("usage").filter(|u| !u.is_null()).cloned())
        .unwrap_or(Value::Null);
    (collect_stream(&events).text, usage)
}

/// Polls `/metrics` until `done` holds (`limit` at most); returns how long it took.
fn wait_metrics(http: &Http, limit: Duration, what: &str, done: impl Fn(&str) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let body = http.get("/metrics").body;
        if done(&body) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{what} not within {limit:?}:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A CPU worker of `role` as `support::start_worker_as` starts one, with a fault test's hook
/// set in its environment (`env`: name and value); returns once it has joined.
fn start_worker_with_env(nats: &Nats, role: &str, worker_id: &str, env: (&str, &str)) -> Proc {
    let spec = WorkerSpec {
        role,
        worker_id,
        served_model_name: support::SERVED_NAME,
        threads: 2,
        heartbeat_ms: 250,
        extra: &[],
    };
    let mut command = spec.command(&nats.url, &model_dir(MODEL));
    command.env(env.0, env.1);
    let mut worker = Proc::spawn(worker_id, command);
    worker.wait_for_line("joined the deployment", Duration::from_secs(60));
    worker
}

/// Waits (60 s at most) until decode worker `decode`, started with
/// `TANDEM_TEST_DELAY_PULL_MS`, has had room for `pulls` pulls (each then waits its delay).
fn wait_for_delayed_pulls(decode: &Proc, pulls: usize) {
    let start = Instant::now();
    while decode.count_lines("TANDEM_TEST_DELAY_PULL_MS: pulling in") < pulls {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the decode job never got room:\n{}",
            decode.output()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether worker `id` reports no running and no queued request and all its KV blocks free
/// (a request still queued holds no blocks, so the queue counts too).
fn idle(body: &str, id: &str) -> bool {
    let label = format!("\"{id}\"");
    let running = metric(body, "tandem_worker_running", &label);
    let queued = metric(body, "tandem_worker_queue_depth", &label);
    let free = metric(body, "tandem_worker_free_kv_blocks", &label);
    let total = metric(body, "tandem_worker_total_kv_blocks", &label);
    running == Some(0.0) && queued == Some(0.0) && free.is_some() && free == total
}

#[test]
fn a_decode_worker_killed_mid_stream_loses_no_stream() {
    let nats = Nats::start();
    let api = start_api_server(&nats, &model_dir(MODEL));
    let _context = support::start_worker_as(&nats, &model_dir(MODEL), "context", "ctx", &[]);
    let mut victim = support::start_worker_as(&nats, &model_dir(MODEL), "decode", "dec-a", &[]);
    let _survivor = support::start_worker_as(&nats, &model_dir(MODEL), "decode", "dec-b", &[]);
    let http = &api.http;
    http.wait_for_role("context", 1, Duration::from_secs(30));
    http.wait_for_role("decode", 2, Duration::from_secs(30));

    const STREAMS: usize = 4;
    const MAX_TOKENS: u32 = 48;
    let run_all = |kill: Option<&mut Proc>| {
        let progress: Arc<Vec<AtomicUsize>> =
            Arc::new((0..STREAMS).map(|_| AtomicUsize::new(0)).collect());
        let threads: Vec<_> = (0..STREAMS)
            .map(|i| {
                let http = http.clone();
                let progress = Arc::clone(&progress);
                std::thread::spawn(move || stream(&http, &chat(i, MAX_TOKENS), &progress[i]))
            })
            .collect();
        if let Some(victim) = kill {
            // Every stream under way (a few tokens each), then the kill.
            let start = Instant::now();
            while progress.iter().any(|p| p.load(Ordering::SeqCst) < 4) {
                assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "streams did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            victim.signal(libc::SIGKILL);
        }
        threads
            .into_iter()
            .map(|t| t.join().expect("stream thread"))
            .collect::<Vec<_>>()
    };
    let undisturbed = run_all(None);
    let disturbed = run_all(Some(&mut victim));
    for (i, ((text, usage), (reference, reference_usage))) in
        disturbed.iter().zip(&undisturbed).enumerate()
    {
        assert_eq!(
            text, reference,
            "stream {i}: the text of an undisturbed run"
        );
        // The prompt tokens served from a prefix cache depend on which worker ran which
        // stream before; the counts do not.
        assert_eq!(
            without_cached(usage),
            without_cached(reference_usage),
            "stream {i}: usage counted once"
        );
        assert_eq!(usage["completion_tokens"], MAX_TOKENS);
    }
    let metrics = http.get("/metrics").body;
    let migrated = sample(
        &metrics,
        "tandem_request_migrations_total{reason=\"worker_gone\"}",
    )
    .unwrap_or(0.0);
    assert!(
        migrated >= 1.0,
        "the killed worker's streams migrated:\n{metrics}"
    );
    // The deployment still serves.
    let (text, _) = stream(http, &chat(0, 8), &AtomicUsize::new(0));
    assert!(!text.is_empty());
}

#[test]
fn a_context_worker_killed_during_its_prefill_costs_a_retry_not_an_error() {
    let nats = Nats::start();
    let api = start_api_server(&nats, &model_dir(MODEL));
    // Small prefill chunks: a long prompt's prefill takes many steps.
    let chunks = ["--max-num-batched-tokens", "32", "--max-num-seqs", "4"];
    let mut context = support::start_worker_as(&nats, &model_dir(MODEL), "context", "ctx", &chunks);
    let _decode = support::start_worker_as(&nats, &model_dir(MODEL), "decode", "dec", &[]);
    let http = &api.http;
    http.wait_for_role("context", 1, Duration::from_secs(30));
    http.wait_for_role("decode", 1, Duration::from_secs(30));
    let request = json!({
        "messages": [{"role": "user", "content": "Summarise this. ".repeat(120)}],
        "max_tokens": 12, "temperature": 0, "ignore_eos": true, "stream": true,
    });
    let reference = {
        let (status, events) = http.post_stream("/v1/chat/completions", &request, |_| {});
        assert_eq!(status, 200);
        collect_stream(&events).text
    };
    let killer = {
        let pid = context.pid();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: signalling a child process of this test.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        })
    };
    // Under its own cache_salt the prompt is not cached from the reference run: its prefill
    // is long enough for the kill to land in it.
    let mut salted = request.clone();
    salted["cache_salt"] = json!("killed-prefill");
    let (status, events) = http.post_stream("/v1/chat/completions", &salted, |_| {});
    killer.join().unwrap();
    assert_eq!(status, 200);
    assert_eq!(collect_stream(&events).text, reference);
    assert!(context.try_wait().is_some(), "the context worker is dead");
    let metrics = http.get("/metrics").body;
    assert_eq!(
        sample(
            &metrics,
            "tandem_kv_transfer_fallbacks_total{reason=\"context_gone\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[test]
fn a_context_worker_killed_between_kv_ready_and_the_pull_costs_a_retry_not_an_error() {
    let nats = Nats::start();
    let api = start_api_server(&nats, &model_dir(MODEL));
    // Its exports expire in 5 s: a pull from it once it is dead fails within that.
    let mut context = support::start_worker_as(
        &nats,
        &model_dir(MODEL),
        "context",
        "ctx",
        &["--kv-transfer-timeout-ms", "5000"],
    );
    // Each pull starts 1.5 s after the decode worker has room for it: the window to kill in.
    let decode = start_worker_with_env(
        &nats,
        "decode",
        "dec",
        ("TANDEM_TEST_DELAY_PULL_MS", "1500"),
    );
    let http = &api.http;
    http.wait_for_role("context", 1, Duration::from_secs(30));
    http.wait_for_role("decode", 1, Duration::from_secs(30));
    let request = chat(1, 16);
    let (reference, reference_usage) = stream(http, &request, &AtomicUsize::new(0));
    let metrics = http.get("/metrics").body;
    assert_eq!(
        sample(&metrics, "tandem_kv_transfers_total{transport=\"ucx\"}"),
        Some(1.0),
        "the undisturbed run pulled its K/V\n{metrics}"
    );

    let in_flight = {
        let http = http.clone();
        std::thread::spawn(move || stream(&http, &request, &AtomicUsize::new(0)))
    };
    // The context worker has answered kv_ready and the decode worker has room: kill now.
    wait_for_delayed_pulls(&decode, 2);
    context.signal(libc::SIGKILL);
    let killed = Instant::now();
    let (text, usage) = in_flight.join().expect("stream thread");
    let took = killed.elapsed();
    assert_eq!(text, reference, "the undisturbed text");
    // The retry reads the prompt's first blocks from a cache the reference filled: only
    // the cached tokens may differ.
    assert_eq!(
        without_cached(&usage),
        without_cached(&reference_usage),
        "usage counted once"
    );
    assert!(context.try_wait().is_some(), "the context worker is dead");
    let metrics = http.get("/metrics").body;
    assert_eq!(
        sample(
            &metrics,
            "tandem_kv_transfer_fallbacks_total{reason=\"pull_failed\"}"
        ),
        Some(1.0),
        "the failed pull became a local prefill\n{metrics}"
    );
    assert_eq!(
        metric(&metrics, "tandem_requests_total", "outcome=\"success\""),
        Some(2.0),
        "{metrics}"
    );
    eprintln!("the request completed {took:?} after the context worker was killed");
}

/// A decode worker killed (-9) between the context worker's `kv_ready` and its pull. The
/// export it never released is the prompt's blocks, pinned in the context worker's own KV
/// cache (the hand-over without copies): nothing the dead worker held keeps them
/// there past the export's expiry (3 s here) and its grace (5 s), after which the context
/// worker holds nothing and every block of its cache is free. The request itself moves to the
/// other decode worker and completes with the undisturbed text.
#[test]
fn a_decode_worker_killed_between_kv_ready_and_the_pull_leaves_nothing_pinned_past_the_expiry() {
    let nats = Nats::start();
    let api = start_api_server(&nats, &model_dir(MODEL));
    let _context = support::start_worker_as(
        &nats,
        &model_dir(MODEL),
        "context",
        "ctx",
        &["--kv-transfer-timeout-ms", "3000"],
    );
    // The victim pulls a minute after it has room: it is killed before that.
    let victim = start_worker_with_env(
        &nats,
        "decode",
        "slow",
        ("TANDEM_TEST_DELAY_PULL_MS", "60000"),
    );
    let http = &api.http;
    http.wait_for_role("context", 1, Duration::from_secs(30));
    http.wait_for_role("decode", 1, Duration::from_secs(30));

    let request = chat(2, 12);
    let in_flight = {
        let (http, request) = (http.clone(), request.clone());
        std::thread::spawn(move || stream(&http, &request, &AtomicUsize::new(0)))
    };
    wait_for_delayed_pulls(&victim, 1);
    // The export is held: its blocks pinned in the context worker's cache.
    wait_metrics(http, Duration::from_secs(5), "the export pinned", |body| {
        metric(body, "tandem_kv_pinned_blocks", "\"ctx\"").is_some_and(|pinned| pinned > 0.0)
    });
    // Somewhere for the request to go, then the kill.
    let _survivor = support::start_worker_as(&nats, &model_dir(MODEL), "decode", "dec-b", &[]);
    http.wait_for_role("decode", 2, Duration::from_secs(30));
    victim.signal(libc::SIGKILL);
    let killed = Instant::now();
    let (text, usage) = in_flight.join().expect("stream thread");
    assert_eq!(usage["completion_tokens"], 12);
    let took = wait_metrics(
        http,
        Duration::from_secs(12),
        "the context worker's export unpinned and every block free",
        |body| {
            let free = metric(body, "tandem_worker_free_kv_blocks", "\"ctx\"");
            let total = metric(body, "tandem_worker_total_kv_blocks", "\"ctx\"");
            metric(body, "tandem_kv_pinned_blocks", "\"ctx\"") == Some(0.0)
                && free.is_some()
                && free == total
        },
    );
    eprintln!(
        "the context worker's blocks were all free {:?} after the kill",
        killed.elapsed().max(took)
    );
    // The undisturbed run, now on the survivor.
    let (reference, _) = stream(http, &request, &AtomicUsize::new(0));
    assert_eq!(text, reference, "the undisturbed text");
}

/// A streamed or not streamed chat's outcome: 200 and its text, or another status, its
/// `Retry-After` and its body.
#[derive(Debug)]
enum Answer {
    Text(String),
    Refused {
        status: u16,
        retry_after: Option<String>,
        body: String,
    },
}

fn answer(http: &Http, request: &Value) -> Answer {
    let reply = http.post("/v1/chat/completions", request);
    if reply.status != 200 {
        return Answer::Refused {
            status: reply.status,
            retry_after: reply.header("retry-after").map(str::to_owned),
            body: reply.body,
        };
    }
    if request["stream"] == true {
        let events: Vec<Value> = reply
            .body
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .filter(|data| *data != "[DONE]")
            .map(|data| serde_json::from_str(data).unwrap())
            .collect();
        Answer::Text(collect_stream(&events).text)
    } else {
        Answer::Text(
            reply.json()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned(),
        )
    }
}

#[test]
fn overload_past_the_admission_bounds_gets_429_and_every_accepted_request_completes() {
    let nats = Nats::start();
    // Two api-servers, each holding 5 requests at most, in front of one worker that runs 2 and
    // queues 2: each api-server's router sends it 4 at most, so together they send it up to 8,
    // and the worker refuses what does not fit.
    let bounded = |nats: &Nats| {
        ApiServer::start(
            nats,
            &model_dir(MODEL),
            support::SERVED_NAME,
            &["--worker-timeout-ms", "1500", "--max-pending-requests", "5"],
        )
    };
    let apis = [bounded(&nats), bounded(&nats)];
    let worker = support::start_worker(
        &nats,
        &model_dir(MODEL),
        "w",
        &["--max-num-seqs", "2", "--max-queued-requests", "2"],
    );
    for api in &apis {
        api.http.wait_for_workers(1, Duration::from_secs(30));
    }
    let request = |i: usize| {
        json!({
            "messages": [{"role": "user", "content": format!("Write a story about {}.", ["ships", "owls"][i % 2])}],
            "max_tokens": 16, "ignore_eos": true, "temperature": 0, "stream": i % 4 < 2,
        })
    };
    let references: Vec<String> = (0..2)
        .map(|i| match answer(&apis[0].http, &request(i)) {
            Answer::Text(text) => text,
            refused => panic!("{refused:?}"),
        })
        .collect();

    const PER_SERVER: usize = 7;
    let barrier = std::sync::Barrier::new(2 * PER_SERVER);
    let answers: Vec<(usize, Answer)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2 * PER_SERVER)
            .map(|i| {
                let (http, barrier, request) = (&apis[i % 2].http, &barrier, request(i / 2));
                scope.spawn(move || {
                    barrier.wait();
                    (i / 2, answer(http, &request))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut served = 0;
    let mut refused = 0;
    for (i, answer) in &answers {
        match answer {
            Answer::Text(text) => {
                assert_eq!(text, &references[i % 2], "request {i}");
                served += 1;
            }
            Answer::Refused {
                status,
                retry_after,
                body,
            } => {
                assert_eq!(*status, 429, "{body}");
                assert_eq!(retry_after.as_deref(), Some("1"), "{body}");
                let body: Value = serde_json::from_str(body).unwrap();
                assert_eq!(body["error"]["code"], "overloaded", "{body}");
                refused += 1;
            }
        }
    }
    // The worker holds 4 at once: the others were refused, by an api-server's bound (2 of each
    // one's 7), its router (its count of the worker's queue) or the worker.
    assert!(
        (2..=4).contains(&served),
        "{served} served, {refused} refused: {answers:?}"
    );
    let mut overloaded = 0.0;
    let mut rejected = 0.0;
    for api in &apis {
        let metrics = api.http.get("/metrics").body;
        overloaded +=
            metric(&metrics, "tandem_requests_total", "outcome=\"overloaded\"").unwrap_or(0.0);
        rejected +=
            sample(&metrics, "tandem_jobs_rejected_total{pool=\"generation\"}").unwrap_or(0.0);
    }
    assert_eq!(overloaded, refused as f64, "every 429 counted");
    // The worker took at most what it holds, and refused what reached it past that. How many
    // reached it depends on the routers' view of its queue: a heartbeat that lands during the
    // burst (its running and queued sequences) can have a router refuse the rest itself, so
    // some runs send the worker no more than it holds.
    let queued_in_burst = worker.count_lines("job queued") - references.len();
    assert!(
        queued_in_burst <= 4,
        "the worker queued {queued_in_burst} jobs of the burst, past the 4 it holds\n{}",
        worker.output()
    );
    if rejected >= 1.0 {
        assert!(
            worker.count_lines("queue full: refusing jobs") >= 1,
            "{rejected} refusals counted, none in the worker's log\n{}",
            worker.output()
        );
    } else {
        eprintln!(
            "the routers refused every job past the worker's {queued_in_burst}: none reached it \
             to be refused"
        );
    }
    // And both serve normally after.
    for api in &apis {
        let start = Instant::now();
        loop {
            match answer(&api.http, &request(1)) {
                Answer::Text(text) => {
                    assert_eq!(text, references[1]);
                    break;
                }
                Answer::Refused { status, body, .. } => {
                    assert_eq!(status, 429, "{body}");
                    assert!(
                        start.elapsed() < Duration::from_secs(10),
                        "still refused: {body}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
    eprintln!("{served} served, {refused} refused (429), {rejected} by the worker itself");
}

#[test]
fn a_bounded_worker_takes_requests_one_after_another_however_many_fall_between_heartbeats() {
    let nats = Nats::start();
    // Heartbeats 5 s apart: between them the api-server knows the worker's queue only by
    // what it counts itself, the jobs it sent and those that ended.
    let api = ApiServer::start(
        &nats,
        &model_dir(MODEL),
        support::SERVED_NAME,
        &["--worker-timeout-ms", "15000"],
    );
    let spec = WorkerSpec {
        role: "both",
        worker_id: "w",
        served_model_name: support::SERVED_NAME,
        threads: 2,
        heartbeat_ms: 5000,
        extra: &["--max-num-seqs", "1", "--max-queued-requests", "1"],
    };
    let mut worker = Proc::spawn("w", spec.command(&nats.url, &model_dir(MODEL)));
    worker.wait_for_line("joined the deployment", Duration::from_secs(60));
    api.http.wait_for_workers(1, Duration::from_secs(30));
    // The worker holds 2 at once. Ten short requests one after another, most of them within
    // one heartbeat interval: every one is served, since each that ended counted its job off.
    let started = Instant::now();
    for i in 0..10 {
        let request = json!({
            "messages": [{"role": "user", "content": format!("Say {i}.")}],
            "max_tokens": 2, "temperature": 0, "stream": i % 2 == 0,
        });
        match answer(&api.http, &request) {
            Answer::Text(_) => {}
            refused => panic!(
                "request {i} of 10, one after another to an idle worker, {:?} after the first: \
                 {refused:?}\n{}",
                started.elapsed(),
                api.proc.output()
            ),
        }
    }
    eprintln!("ten requests one after another in {:?}", started.elapsed());
    assert_eq!(
        api.proc
            .count_lines("every generation worker's queue is full"),
        0,
        "{}",
        api.proc.output()
    );
}

/// How a test client leaves.
#[derive(Debug, Clone, Copy)]
enum Leave {
    /// Half-close: FIN, the socket still open for reading.
    Fin,
    /// Reset: close with a zero linger, RST.
    Rst,
}

/// Sends `body` to `path` on a raw connection and returns it unread.
fn send_raw(api: &ApiServer, path: &str, body: &Value) -> TcpStream {
    let address = format!("127.0.0.1:{}", api.port);
    let mut socket = TcpStream::connect(&address).unwrap();
    let body = body.to_string();
    write!(
        socket,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    socket
}

fn leave(socket: TcpStream, how: Leave) {
    match how {
        Leave::Fin => {
            socket.shutdown(std::net::Shutdown::Write).unwrap();
            // Keep the read side open a while, as a half-closed client does.
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(5));
                drop(socket);
            });
        }
        Leave::Rst => {
            use std::os::fd::AsRawFd;
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: a valid socket and a `struct linger` of the size passed.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0);
            drop(socket);
        }
    }
}

/// Reads the response until its body has `needle` (a streamed token), 60 s at most.
fn read_until(socket: &mut TcpStream, needle: &str) {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no {needle:?} in {}",
            String::from_utf8_lossy(&seen)
        );
        match socket.read(&mut buffer) {
            Ok(0) => panic!("closed early: {}", String::from_utf8_lossy(&seen)),
            Ok(n) => seen.extend(&buffer[..n]),
            Err(_) => {}
        }
    }
}

#[test]
fn clients_that_leave_free_the_worker_within_two_seconds() {
    let nats = Nats::start();
    let api = start_api_server(&nats, &model_dir(MODEL));
    // Small prefill chunks, so "before the first token" lasts long enough to leave in.
    let worker = support::start_worker(
        &nats,
        &model_dir(MODEL),
        "w",
        &["--max-num-batched-tokens", "32", "--max-num-seqs", "4"],
    );
    let http = &api.http;
    http.wait_for_workers(1, Duration::from_secs(30));
    let long_prompt = "Describe the history of the printing press in detail. ".repeat(40);
    let mut cancels = 0;
    for stream in [true, false] {
        for how in [Leave::Fin, Leave::Rst] {
            for after_first_token in [false, true] {
                let case =
                    format!("stream {stream}, {how:?}, after first token {after_first_token}");
                let request = json!({
                    "messages": [{"role": "user", "content": long_prompt}],
                    "max_tokens": 2000, "ignore_eos": true, "temperature": 0, "stream": stream,
                });
                let mut socket = send_raw(&api, "/v1/chat/completions", &request);
                // The worker has the job (its heartbeat says so)...
                wait_metrics(
                    http,
                    Duration::from_secs(30),
                    "the job on the worker",
                    |body| {
                        metric(body, "tandem_worker_running", "\"w\"") == Some(1.0)
                            || metric(body, "tandem_worker_queue_depth", "\"w\"") == Some(1.0)
                    },
                );
                // ...and, after the first token, is decoding it.
                if after_first_token && stream {
                    read_until(&mut socket, "\"content\":\"");
                } else if after_first_token {
                    // Nothing to read before the end: wait past the prefill.
                    std::thread::sleep(Duration::from_secs(4));
                }
                leave(socket, how);
                let took =
                    wait_metrics(http, Duration::from_secs(10), &case, |body| idle(body, "w"));
                assert!(
                    took < Duration::from_secs(2),
                    "{case}: the worker was idle after {took:?}"
                );
                cancels += 1;
                let start = Instant::now();
                while worker.count_lines("cancelled by the api-server") < cancels {
                    assert!(
                        start.elapsed() < Duration::from_secs(2),
                        "{case}: the worker saw no cancel:\n{}",
                        worker.output()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
    let metrics = http.get("/metrics").body;
    assert!(
        metric(&metrics, "tandem_requests_total", "client_disconnected").unwrap_or(0.0) >= 8.0,
        "{metrics}"
    );
    // And it serves.
    let reply = http.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[test]
fn a_worker_whose_every_step_fails_leaves_rotation_and_its_requests_migrate() {
    let nats = Nats::start();
    let api = start_api_server(&nats, &model_dir(MODEL));
    let _good = support::start_worker(&nats, &model_dir(MODEL), "good", &[]);
    // Its engine's third forward pass and every later one fail (not as a lost device).
    let mut bad = start_worker_with_env(
        &nats,
        "both",
        "bad",
        ("TANDEM_TEST_FAIL_FORWARD_AFTER", "2"),
    );
    let http = &api.http;
    http.wait_for_workers(2, Duration::from_secs(30));

    const STREAMS: usize = 4;
    let run_all = || {
        let threads: Vec<_> = (0..STREAMS)
            .map(|i| {
                let http = http.clone();
                std::thread::spawn(move || stream(&http, &chat(i, 16), &AtomicUsize::new(0)))
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("stream thread"))
            .collect::<Vec<_>>()
    };
    // Waves of requests until the bad worker gives up: each wave it takes fails in one
    // forward pass (its requests migrate), and the third failure in a row stops its engine.
    let start = Instant::now();
    let mut waves = Vec::new();
    while bad.try_wait().is_none() {
        assert!(
            waves.len() < 8,
            "the bad worker is still in rotation after {} waves:\n{}",
            waves.len(),
            bad.output()
        );
        waves.push(run_all());
    }
    assert!(
        bad.count_lines("forward passes in a row failed") >= 1,
        "the bad worker gave up on its engine:\n{}",
        bad.output()
    );
    let status = bad.wait_exit(Duration::from_secs(5));
    assert!(!status.success(), "exits with an error status: {status}");
    assert!(start.elapsed() < Duration::from_secs(60));
    let health = http.get("/health").json();
    let engines = health["engines"].as_array().expect("engines listed");
    // Out of rotation: gone, or still heartbeating as draining until its heartbeat expires.
    assert!(
        engines
            .iter()
            .all(|e| e["worker_id"] != "bad" || e["draining"] == true),
        "out of rotation: {health}"
    );
    assert_eq!(health["workers"]["accepting_generate"], 1, "{health}");
    assert!(
        engines
            .iter()
            .any(|e| e["worker_id"] == "good" && e["engine_steps"].as_u64() > Some(0))
    );
    let metrics = http.get("/metrics").body;
    assert!(
        sample(
            &metrics,
            "tandem_request_migrations_total{reason=\"worker_error\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{metrics}"
    );
    // Every request of every wave completed, as the healthy worker alone answers it (the
    // tokens served from a prefix cache aside, which depend on what ran before).
    let counts = |wave: &[(String, Value)]| -> Vec<(String, Value)> {
        wave.iter()
            .map(|(text, usage)| (text.clone(), without_cached(usage)))
            .collect()
    };
    let reference = counts(&run_all());
    for (i, wave) in waves.iter().enumerate() {
        assert_eq!(counts(wave), reference, "wave {i}");
    }
}

/// Linux's stop and continue signals (a stopped process keeps its sockets and state).
const SIGSTOP: i32 = 19;
const SIGCONT: i32 = 18;

/// The SSE error events a client may be given when tokens of its stream are lost and no
/// migration is left (docs/protocol.md, "Request migration" and "Timeouts and failures"): the
/// gap, or a stall when the last message was lost.
const LOST_TOKENS_ERRORS: [(&str, &str); 2] = [
    (
        "worker_error",
        "Tokens of this response were lost between the worker and the server.",
    ),
    ("timeout", "stalled"),
];

#[test]
fn after_a_nats_server_restart_the_deployment_serves_again_within_five_seconds() {
    let mut nats = Nats::start();
    // Timeouts a short outage outlives: heartbeats and tokens pause while clients reconnect.
    let timeouts = ["--worker-timeout-ms", "4000", "--stall-timeout-ms", "4000"];
    let api = ApiServer::start(&nats, &model_dir(MODEL), support::SERVED_NAME, &timeouts);
    // The same deployment behind an api-server that may not migrate: what its client sees of
    // the same outage is the documented error.
    let no_migration = ApiServer::start(
        &nats,
        &model_dir(MODEL),
        support::SERVED_NAME,
        &[&timeouts[..], &["--migration-limit", "0"]].concat(),
    );
    let _worker = support::start_worker(&nats, &model_dir(MODEL), "w", &[]);
    let http = &api.http;
    http.wait_for_workers(1, Duration::from_secs(30));
    no_migration
        .http
        .wait_for_workers(1, Duration::from_secs(30));
    let request = chat(0, 48);
    let (reference, _) = stream(http, &request, &AtomicUsize::new(0));

    // A stream in flight across the restart through each api-server.
    let in_flight = |http: &Http| {
        let progress = Arc::new(AtomicUsize::new(0));
        let handle = {
            let (http, progress, request) = (http.clone(), Arc::clone(&progress), request.clone());
            std::thread::spawn(move || {
                http.post_stream("/v1/chat/completions", &request, |event| {
                    if event["choices"][0]["delta"]["content"].is_string() {
                        progress.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
        };
        (progress, handle)
    };
    let (resumed_progress, resumed) = in_flight(http);
    let (failed_progress, failed) = in_flight(&no_migration.http);
    let start = Instant::now();
    while resumed_progress.load(Ordering::SeqCst) < 4 || failed_progress.load(Ordering::SeqCst) < 4
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the streams did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Which client reconnects first is up to their backoffs: a worker back before the
    // api-servers would hand its buffered tokens to a server with no subscriber (lost), one
    // back after them would deliver them all. The api-servers are held (SIGSTOP) across the
    // outage and a second past it, so the worker is back first and the tokens it generates
    // meanwhile are lost every time: the outage this test is about, not a lucky one.
    for server in [&api, &no_migration] {
        server.proc.signal(SIGSTOP);
    }
    nats.restart(Duration::from_millis(300));
    let restarted = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    for server in [&api, &no_migration] {
        server.proc.signal(SIGCONT);
    }
    loop {
        let reply = http.post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        );
        if reply.status == 200 {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "not serving 5 s after the restart: {} {}",
            reply.status,
            reply.body
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let serving_after = restarted.elapsed();

    // The worker generated through the outage and its tokens of that time were lost. With a
    // migration allowed the stream resumes after the tokens the client has: the api-server
    // noticed the loss (a gap in the numbered tokens, or a stall) and moved the request, and
    // the client gets exactly the undisturbed text.
    let (status, events) = resumed.join().expect("stream thread");
    assert_eq!(status, 200);
    assert!(
        events.iter().all(|e| e.get("error").is_none()),
        "the stream with migrations allowed ended with an error: {events:?}"
    );
    assert_eq!(collect_stream(&events).text, reference);
    let metrics = http.get("/metrics").body;
    let resumes: f64 = ["stream_gap", "stalled"]
        .iter()
        .map(|reason| {
            metric(
                &metrics,
                "tandem_request_migrations_total",
                &format!("reason=\"{reason}\""),
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert!(
        resumes >= 1.0,
        "the stream completed, but not through the resume path (no stream_gap or stalled \
         migration): {metrics}"
    );

    // Without migrations the same loss ends the stream with the documented error event,
    // never a 200 stream with text missing, never a hang.
    let (status, events) = failed.join().expect("stream thread");
    assert_eq!(status, 200, "the stream had started");
    let error = events
        .iter()
        .find_map(|e| e.get("error"))
        .unwrap_or_else(|| panic!("tokens were lost, yet no error event: {events:?}"));
    let (code, message) = (
        error["code"].as_str().unwrap_or_default(),
        error["message"].as_str().unwrap_or_default(),
    );
    assert!(
        LOST_TOKENS_ERRORS
            .iter()
            .any(|&(documented, text)| code == documented && message.contains(text)),
        "an undocumented error for lost tokens: {error}"
    );
    let partial: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(
        reference.starts_with(&partial) && partial.len() < reference.len(),
        "the failed stream stops where its tokens were lost, without a wrong token: \
         {partial:?} of {reference:?}"
    );
    eprintln!(
        "serving again {serving_after:?} after the restart; resumed {resumes} time(s); without migrations: {error}"
    );
}

/// `usage` without `prompt_tokens_details` (its cached tokens).
fn without_cached(usage: &Value) -> Value {
    let mut usage = usage.clone();
    if let Some(fields) = usage.as_object_mut() {
        fields.remove("prompt_tokens_details");
    }
    usage
}
