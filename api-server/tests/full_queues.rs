//! Workers whose queues are full, against scripted bus peers (`common/bus_peer.rs`):
//! a worker that refuses a job (`rejected`) has it sent to another worker of its kind under
//! the same request id; a context worker's refusal ends, when no other context worker can take
//! it, in a local prefill; when no generation worker can, the client gets 429 with
//! `Retry-After` and code `overloaded`. A worker whose heartbeat says its queue is full gets no
//! job at all. Every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::bus_peer::{SCRIPT_ANSWER, SCRIPTED_TEXT, ScriptedBusPeer};
use common::{SERVED_NAME, start_api_server};
use serde_json::{Value, json};
use tandem_protocol::messages::WorkerRole;
use tandem_test_kit::prometheus::sample;
use tandem_test_kit::{ApiServer, Nats};

/// Peers of `roles` (id, role) and the api-server, once /health shows them all.
fn deploy(peers: &[(&str, WorkerRole)]) -> (Nats, Vec<ScriptedBusPeer>, ApiServer) {
    let nats = Nats::start();
    let peers: Vec<ScriptedBusPeer> = peers
        .iter()
        .map(|(id, role)| ScriptedBusPeer::start_as(&nats.url, SERVED_NAME, *role, id, None))
        .collect();
    let server = start_api_server(&nats, &[]);
    let start = Instant::now();
    loop {
        let health = server.http.get("/health");
        let workers = &health.json()["workers"];
        let live = ["context", "decode", "both"]
            .iter()
            .map(|role| workers[role].as_u64().unwrap_or(0))
            .sum::<u64>();
        if health.status == 200 && live == peers.len() as u64 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the peers never reached /health: {}",
            health.body
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (nats, peers, server)
}

fn chat(stream: bool) -> Value {
    json!({"model": SERVED_NAME, "messages": [{"role": "user", "content": "Hi"}],
           "max_tokens": SCRIPT_ANSWER, "stream": stream})
}

fn metric(server: &ApiServer, series: &str) -> f64 {
    let body = server.http.get("/metrics").body;
    sample(&body, series).unwrap_or_else(|| panic!("{series} missing from\n{body}"))
}

/// A non-streamed chat's text, which must have succeeded.
fn answered(server: &ApiServer) -> String {
    let reply = server.http.post("/v1/chat/completions", &chat(false));
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Checks an answer is the 429 of full queues.
fn assert_overloaded(status: u16, retry_after: Option<&str>, body: &str) {
    assert_eq!(status, 429, "{body}");
    assert_eq!(retry_after, Some("1"), "{body}");
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("full queue"),
        "{body}"
    );
}

#[test]
fn a_job_a_generation_worker_refuses_goes_to_another_and_with_none_left_the_client_gets_429() {
    let (_nats, peers, server) =
        deploy(&[("gen-a", WorkerRole::Both), ("gen-b", WorkerRole::Both)]);
    let [a, b] = &peers[..] else { unreachable!() };
    a.refuse_jobs(true);
    // Least-loaded with equal loads alternates: gen-a gets some of these first, refuses each,
    // and gen-b answers them under the same request id.
    for _ in 0..4 {
        assert_eq!(answered(&server), SCRIPTED_TEXT);
    }
    let refused: Vec<String> = a.jobs().iter().map(|j| j.request_id.clone()).collect();
    assert!(!refused.is_empty(), "gen-a was never tried");
    let answered_by_b: Vec<String> = b.jobs().iter().map(|j| j.request_id.clone()).collect();
    assert_eq!(answered_by_b.len(), 4);
    assert!(refused.iter().all(|id| answered_by_b.contains(id)));
    assert_eq!(
        metric(&server, "tandem_jobs_rejected_total{pool=\"generation\"}"),
        refused.len() as f64
    );

    // Both refuse: 429, streamed or not (no byte of the response went out before).
    b.refuse_jobs(true);
    let reply = server.http.post("/v1/chat/completions", &chat(false));
    assert_overloaded(reply.status, reply.header("retry-after"), &reply.body);
    let reply = server.http.post("/v1/chat/completions", &chat(true));
    assert_overloaded(reply.status, reply.header("retry-after"), &reply.body);
    assert_eq!(
        metric(
            &server,
            "tandem_requests_total{endpoint=\"chat\",outcome=\"overloaded\"}"
        ),
        2.0
    );
    // Room again: served.
    a.refuse_jobs(false);
    b.refuse_jobs(false);
    let start = Instant::now();
    loop {
        let reply = server.http.post("/v1/chat/completions", &chat(false));
        if reply.status == 200 {
            break;
        }
        assert_eq!(reply.status, 429, "{}", reply.body);
        assert!(start.elapsed() < Duration::from_secs(3), "not served again");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_worker_whose_heartbeat_says_its_queue_is_full_gets_no_job() {
    let (_nats, peers, server) = deploy(&[("gen", WorkerRole::Decode)]);
    let gen_peer = &peers[0];
    gen_peer.report_queue(4, Some(4));
    let start = Instant::now();
    loop {
        let reply = server.http.post("/v1/chat/completions", &chat(false));
        if reply.status == 429 {
            assert_overloaded(reply.status, reply.header("retry-after"), &reply.body);
            break;
        }
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(start.elapsed() < Duration::from_secs(3), "never full");
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = gen_peer.jobs().len();
    for _ in 0..3 {
        let reply = server.http.post("/v1/chat/completions", &chat(false));
        assert_eq!(reply.status, 429, "{}", reply.body);
    }
    assert_eq!(gen_peer.jobs().len(), sent, "refused without a job sent");
    assert_eq!(
        metric(&server, "tandem_jobs_rejected_total{pool=\"generation\"}"),
        0.0
    );
    let health = server.http.get("/health").json();
    assert_eq!(health["engines"][0]["full"], true, "{health}");
    gen_peer.report_queue(0, Some(4));
    let start = Instant::now();
    while server
        .http
        .post("/v1/chat/completions", &chat(false))
        .status
        != 200
    {
        assert!(start.elapsed() < Duration::from_secs(3), "not served again");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_prefill_job_a_context_worker_refuses_goes_to_another_or_becomes_a_local_prefill() {
    let (_nats, peers, server) = deploy(&[
        ("ctx-a", WorkerRole::Context),
        ("ctx-b", WorkerRole::Context),
        ("dec", WorkerRole::Decode),
    ]);
    let [ctx_a, ctx_b, dec] = &peers[..] else {
        unreachable!()
    };
    ctx_a.refuse_jobs(true);
    for _ in 0..4 {
        assert_eq!(answered(&server), SCRIPTED_TEXT);
    }
    assert!(!ctx_a.jobs().is_empty(), "ctx-a was never tried");
    assert_eq!(ctx_b.jobs().len(), 4, "ctx-b prefilled every request");
    // Each decode job carried ctx-b's handle: disaggregated, no fallback.
    assert!(
        dec.jobs()
            .iter()
            .all(|job| job.kv.as_ref().is_some_and(|kv| kv.worker_id == "ctx-b"))
    );
    assert_eq!(metric(&server, "tandem_requests_disaggregated_total"), 4.0);
    let rejected_context = metric(&server, "tandem_jobs_rejected_total{pool=\"context\"}");
    assert_eq!(rejected_context, ctx_a.jobs().len() as f64);

    // Both refuse: the decode worker prefills the prompt itself.
    ctx_b.refuse_jobs(true);
    assert_eq!(answered(&server), SCRIPTED_TEXT);
    let last = dec.jobs().last().cloned().unwrap();
    assert!(last.kv.is_none(), "a local prefill");
    assert!(last.request_id.ends_with("-local"), "{}", last.request_id);
    assert_eq!(
        metric(
            &server,
            "tandem_kv_transfer_fallbacks_total{reason=\"context_full\"}"
        ),
        1.0
    );
}
