//! KV-aware routing end to end, with real processes: two `both` workers on the CPU, each
//! publishing the blocks its prefix cache holds, and an api-server with `--router-policy
//! kv-aware`. Each turn of a conversation resends the history: it goes to the worker that
//! holds it (the usage's cached tokens say so), while conversations spread over both workers.
//! A restarted api-server rebuilds its view from the workers' snapshots and routes the next
//! turns as well; so does one that lost an event batch (a worker told to drop one).
//!
//! Needs `$TANDEM_TEST_MODELS/tiny` and the workspace binaries.

use std::time::Duration;

use serde_json::{Value, json};
use tandem_test_kit::prometheus::sample;
use tandem_test_kit::{ApiServer, Http, Nats, Proc, WorkerSpec, model_dir, start_worker};

const SERVED: &str = "kv-routed";
/// The CPU workers' KV block size.
const BLOCK: usize = 16;

/// A completion of `prompt` (token ids): the tokens its usage says were cached.
fn cached_tokens(http: &Http, prompt: &[u32]) -> u64 {
    let reply = http.post(
        "/v1/completions",
        &json!({"model": SERVED, "prompt": prompt, "max_tokens": 1}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let usage: Value = reply.json()["usage"].clone();
    usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens: {usage}"))
}

/// Turn `turn` of conversation `c`: its history (every earlier turn's text) and a new part,
/// 48 tokens a turn.
fn turn(c: u32, turn: u32) -> Vec<u32> {
    (0..=turn)
        .flat_map(|t| (0..48u32).map(move |i| 3 + (c * 131 + t * 17 + i * 7) % 500))
        .collect()
}

/// Prompt tokens `worker` looked up in its prefix cache, as /metrics has it from its
/// heartbeats (after one more heartbeat).
fn served_by(http: &Http, worker: &str) -> f64 {
    std::thread::sleep(Duration::from_millis(400));
    let metrics = http.get("/metrics").body;
    sample(
        &metrics,
        &format!("tandem_prefix_cache_queried_tokens_total{{worker_id=\"{worker}\"}}"),
    )
    .unwrap_or(0.0)
}

#[test]
fn turns_go_to_the_worker_holding_their_conversation_also_after_a_router_restart() {
    let nats = Nats::start();
    let model = model_dir("tiny");
    let worker = |id| WorkerSpec {
        role: "both",
        worker_id: id,
        served_model_name: SERVED,
        threads: 1,
        heartbeat_ms: 200,
        extra: &[],
    };
    let _a = start_worker(&nats.url, &model, &worker("w-a"));
    let _b = start_worker(&nats.url, &model, &worker("w-b"));
    let flags = ["--router-policy", "kv-aware", "--worker-timeout-ms", "3000"];
    let api = ApiServer::start(&nats, &model, SERVED, &flags);
    api.http.wait_for_workers(2, Duration::from_secs(30));

    // Six conversations, first turns: nothing cached anywhere yet.
    for c in 0..6 {
        assert_eq!(cached_tokens(&api.http, &turn(c, 0)), 0, "conversation {c}");
    }
    // Both workers got some.
    let (a, b) = (served_by(&api.http, "w-a"), served_by(&api.http, "w-b"));
    assert!(
        a > 0.0 && b > 0.0,
        "one worker took every conversation: {a} / {b} tokens"
    );

    // Each next turn finds its whole history cached (its full blocks) on the worker it goes to.
    for t in 1..3 {
        for c in 0..6 {
            let prompt = turn(c, t);
            let history = turn(c, t - 1).len();
            let expected = (history / BLOCK * BLOCK) as u64;
            let cached = cached_tokens(&api.http, &prompt);
            assert!(
                cached >= expected,
                "conversation {c} turn {t}: {cached} tokens cached, its history has {expected} \
                 in full blocks: routed away from the worker holding it"
            );
        }
    }

    // A new api-server knows nothing yet: it asks each worker for a snapshot (their
    // heartbeats say their events went further than it has seen), and routes by it.
    drop(api);
    let api = ApiServer::start(&nats, &model, SERVED, &flags);
    api.http.wait_for_workers(2, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1500));
    let history = (turn(0, 2).len() / BLOCK * BLOCK) as u64;
    let after_restart: Vec<u64> = (0..6)
        .map(|c| cached_tokens(&api.http, &turn(c, 3)))
        .collect();
    assert!(
        after_restart.iter().all(|&cached| cached >= history),
        "after the restart, tokens cached by conversation: {after_restart:?}; each history \
         has {history} in full blocks"
    );
    let metrics = api.http.get("/metrics").body;
    for w in ["w-a", "w-b"] {
        let batches = sample(
            &metrics,
            &format!("tandem_prefix_cache_event_batches{{worker_id=\"{w}\"}}"),
        )
        .unwrap_or(0.0);
        assert!(batches > 0.0, "{w} published no KV events");
    }
}

/// `name`'s sample in the api-server's /metrics (0 when absent).
fn metric(http: &Http, name: &str) -> f64 {
    sample(&http.get("/metrics").body, name).unwrap_or(0.0)
}

#[test]
fn a_lost_event_batch_is_noticed_and_the_view_rebuilt_from_a_snapshot() {
    let nats = Nats::start();
    let model = model_dir("tiny");
    let flags = ["--router-policy", "kv-aware", "--worker-timeout-ms", "3000"];
    let api = ApiServer::start(&nats, &model, SERVED, &flags);
    let spec = |id| WorkerSpec {
        role: "both",
        worker_id: id,
        served_model_name: SERVED,
        threads: 1,
        heartbeat_ms: 200,
        extra: &[],
    };
    // Batch 1 of the lossy worker's epoch is its `cleared`; batch 2, the blocks of the first
    // prompt it caches, never reaches the bus.
    let mut command = spec("w-lossy").command(&nats.url, &model);
    command.env("TANDEM_TEST_DROP_KV_EVENT_BATCH", "2");
    let mut lossy = Proc::spawn("w-lossy", command);
    lossy.wait_for_line("joined the deployment", Duration::from_secs(120));
    api.http.wait_for_workers(1, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1000));
    let resyncs = "tandem_prefix_view_resyncs_total{worker_id=\"w-lossy\"}";
    let before = metric(&api.http, resyncs);
    assert_eq!(
        metric(
            &api.http,
            "tandem_prefix_view_synced{worker_id=\"w-lossy\"}"
        ),
        1.0,
        "the view follows the worker's events before the loss"
    );

    assert_eq!(cached_tokens(&api.http, &turn(0, 0)), 0);
    lossy.wait_for_line("KV event batch not published", Duration::from_secs(10));
    // No batch follows the lost one: the heartbeats, ahead of the batches seen, tell.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(&api.http, resyncs) <= before
        || metric(
            &api.http,
            "tandem_prefix_view_lag_batches{worker_id=\"w-lossy\"}",
        ) > 0.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the lost batch went unnoticed:\n{}",
            api.http.get("/metrics").body
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A second worker joins, idle: the conversation's next turns still go to the worker
    // holding it, which only the snapshot told the router.
    let _other = start_worker(&nats.url, &model, &spec("w-other"));
    api.http.wait_for_workers(2, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(600));
    for t in 1..4 {
        let history = (turn(0, t - 1).len() / BLOCK * BLOCK) as u64;
        let cached = cached_tokens(&api.http, &turn(0, t));
        assert!(
            cached >= history,
            "turn {t}: {cached} tokens cached, its history has {history} in full blocks"
        );
    }
    assert_eq!(
        served_by(&api.http, "w-other"),
        0.0,
        "the idle worker got a turn of the conversation"
    );
}
