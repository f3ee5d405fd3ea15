//! Disaggregated serving end to end: context and decode CPU workers, the KV cache
//! pulled over UCX, behind the api-server.
//!
//! - `tandem serve -c` with 2 context + 1 decode workers: 32 concurrent requests of mixed
//!   prompt lengths, greedy and seeded, each equal to `worker generate`; /metrics shows each
//!   handed over (a KV transfer, no fallback to a local prefill, which would give the same
//!   text) and the bytes UCX moved.
//! - A decode worker whose KV cache holds one long prompt at a time, and several long requests
//!   at once: each decode job waits for room before its pull (which their split times to
//!   first token show), every text equals `worker generate`'s, and the pulled K/V held outside
//!   the cache never exceeded it.
//! - Faults, each bounded in time: a decode worker killed mid-stream (the client gets an error,
//!   the context worker's exports are freed); a client that disconnects before its first token
//!   (its prefill stops, so a later request is not held up behind it; the undisturbed run
//!   before it has its time to first token split into parts in /metrics).
//!   (Context workers killed before the pull and transfers that never come are covered at the
//!   bus level in workers/tests/bus_disaggregated.rs.)
//! - Conditional disaggregation: a context worker bounded to one prompt and one queued, with
//!   heartbeats seconds apart. Requests one after another all cross (its answers count its
//!   jobs off between heartbeats); a burst past its bound is partly prefilled by the decode
//!   worker (`context_full`), every request still answered in full.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{collect_stream, start_api_server};
use tandem_test_kit::prometheus::{metric, sample};
use tandem_test_kit::{
    ApiServer, HandOvers, Http, Nats, Proc, WorkerSpec, bin, clear_tandem_env, free_port,
    model_dir, start_worker, temp_file,
};

const MODEL: &str = "smollm2-bf16";

/// Prompt `i`: lengths from a few tokens to a few hundred.
fn prompt(i: usize) -> String {
    let base = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Explain photosynthesis to a child.",
        "List three uses of copper.",
    ][i % 4];
    let context =
        "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(i % 5 * 6);
    format!("{context}{base} ({i})")
}

fn seed(i: usize) -> Option<u64> {
    (i % 2 == 1).then_some(100 + i as u64)
}

fn reference(i: usize, max_tokens: u32) -> Value {
    let mut command = Command::new(bin("worker"));
    clear_tandem_env(&mut command)
        .arg("generate")
        .arg("--model")
        .arg(model_dir(MODEL))
        .args(["--chat", "--json", "--threads", "1", "--prompt", &prompt(i)])
        .args(["--max-tokens", &max_tokens.to_string()]);
    if let Some(seed) = seed(i) {
        command.args(["--temperature", "0.8", "--seed", &seed.to_string()]);
    }
    let output = command.output().expect("worker generate runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON")
}

fn chat(i: usize, max_tokens: u32) -> Value {
    let mut request = json!({
        "messages": [{"role": "user", "content": prompt(i)}],
        "max_tokens": max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    match seed(i) {
        Some(seed) => {
            // All of `worker generate`'s settings: top_p 1 too, where the model's default
            // (its generation_config.json) is 0.9.
            request["temperature"] = json!(0.8);
            request["top_p"] = json!(1.0);
            request["seed"] = json!(seed);
        }
        None => request["temperature"] = json!(0),
    }
    request
}

/// The streamed chat requests `requests` (by [`chat`]'s index), all at once: each one's
/// text and its usage, in order; every one must answer 200.
fn chats_at_once(
    http: &Http,
    requests: impl IntoIterator<Item = usize>,
    max_tokens: u32,
) -> Vec<(support::Streamed, Value)> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = requests
            .into_iter()
            .map(|i| {
                scope.spawn(move || {
                    let mut usage = Value::Null;
                    let (status, events) =
                        http.post_stream("/v1/chat/completions", &chat(i, max_tokens), |e| {
                            if !e["usage"].is_null() {
                                usage = e["usage"].clone();
                            }
                        });
                    assert_eq!(status, 200, "request {i}");
                    (collect_stream(&events), usage)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn tandem_serve_with_two_context_and_one_decode_worker_equals_worker_generate() {
    const REQUESTS: usize = 32;
    const MAX_TOKENS: u32 = 12;
    let port = free_port();
    let config = temp_file(
        "disagg.yaml",
        &format!(
            "hostname: 127.0.0.1\nport: {port}\nmodel: {}\nserved_model_name: disagg\n\
             context_servers:\n  num_instances: 2\n  max_num_tokens: 512\n\
             generation_servers:\n  num_instances: 1\n  max_batch_size: 32\n\
             router:\n  policy: round_robin\n",
            model_dir(MODEL).display()
        ),
    );
    let mut command = Command::new(bin("tandem"));
    command.arg("serve").arg("-c").arg(&config);
    let mut tandem = Proc::spawn("tandem", command);
    let http = Http::new(&format!("http://127.0.0.1:{port}"));
    let start = Instant::now();
    while !(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        && http.get("/health").json()["workers"]["context"] == 2)
    {
        assert!(
            tandem.try_wait().is_none(),
            "tandem exited:\n{}",
            tandem.output()
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "not ready:\n{}",
            tandem.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    http.wait_for_role("decode", 1, Duration::from_secs(30));

    // The references, two at a time, while nothing else runs.
    let references: Vec<Value> = std::thread::scope(|scope| {
        (0..REQUESTS)
            .collect::<Vec<_>>()
            .chunks(2)
            .flat_map(|pair| {
                let handles: Vec<_> = pair
                    .iter()
                    .map(|&i| scope.spawn(move || reference(i, MAX_TOKENS)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    });

    let before = HandOvers::read(&http);
    let results = chats_at_once(&http, 0..REQUESTS, MAX_TOKENS);
    for (i, ((streamed, usage), reference)) in results.iter().zip(&references).enumerate() {
        assert_eq!(
            streamed.text,
            reference["text"],
            "request {i}: {}",
            prompt(i)
        );
        assert_eq!(
            usage["completion_tokens"],
            reference["output_ids"].as_array().unwrap().len(),
            "request {i}"
        );
        assert_eq!(
            usage["prompt_tokens"],
            reference["prompt_ids"].as_array().unwrap().len(),
            "request {i}"
        );
    }

    HandOvers::read(&http).assert_handed_over_since(
        &before,
        REQUESTS as u64,
        "ucx",
        "the requests compared with worker generate",
    );
    let metrics = http.get("/metrics").body;
    let bytes = metric(&metrics, "tandem_kv_transfer_bytes_total", "").unwrap_or(0.0);
    // bf16 SmolLM2 moves 368640 bytes per 16-token block: at least one block per request.
    assert!(
        bytes >= (REQUESTS * 368_640) as f64,
        "UCX moved {bytes} bytes\n{metrics}"
    );

    tandem.signal(libc::SIGTERM);
    assert!(tandem.wait_exit(Duration::from_secs(60)).success());
}

/// The hand-over without copies: a CPU context worker's exports are its KV cache's
/// blocks, read in place by the decode worker, so no transfer pool bounds them. With a 1 MiB
/// pool (what used to hold exports: not even three SmolLM2 blocks) and requests whose prompts
/// take some 8 MB of K/V each all at once, every request is pulled over UCX, none falls back,
/// every text equals `worker generate`'s, and the context worker's cache is all free after.
#[test]
fn hand_overs_far_past_the_old_transfer_pool_all_go_through_without_a_fallback() {
    const REQUESTS: usize = 8;
    const MAX_TOKENS: u32 = 6;
    // Prompts 4, 9, 14, ...: some 350 tokens each (22 blocks of 368,640 bytes).
    let requests: Vec<usize> = (0..REQUESTS).map(|i| 4 + 5 * i).collect();
    let d = deployment(&[
        "--kv-transfer-pool-mb",
        "1",
        "--max-tokens-in-buffer",
        "8192",
    ]);
    let http = &d.api.http;
    let references: Vec<Value> = requests.iter().map(|&i| reference(i, MAX_TOKENS)).collect();
    let before = HandOvers::read(http);
    let results = chats_at_once(http, requests.iter().copied(), MAX_TOKENS);
    for ((i, (streamed, _)), reference) in requests.iter().zip(&results).zip(&references) {
        assert_eq!(streamed.text, reference["text"], "request {i}");
    }
    HandOvers::read(http).assert_handed_over_since(
        &before,
        REQUESTS as u64,
        "ucx",
        "every request pulled its K/V past the old pool",
    );
    let metrics = http.get("/metrics").body;
    let bytes = metric(&metrics, "tandem_kv_transfer_bytes_total", "").unwrap_or(0.0);
    // The prompts share long stretches: the decode worker pulls the blocks it holds once
    // (its prefix cache), so the first pull alone (22 blocks) is what surely moves.
    assert!(
        bytes > (22 * 368_640) as f64,
        "far more than the 1 MiB pool moved: {bytes}"
    );
    // Released after each pull: the context worker's cache is all free, nothing pinned.
    let start = Instant::now();
    loop {
        let metrics = http.get("/metrics").body;
        let pinned = metric(&metrics, "tandem_kv_pinned_blocks", "\"ctx\"");
        let free = metric(&metrics, "tandem_worker_free_kv_blocks", "\"ctx\"");
        let total = metric(&metrics, "tandem_worker_total_kv_blocks", "\"ctx\"");
        if pinned == Some(0.0) && free.is_some() && free == total {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "context KV not freed:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A hand-started disaggregated deployment: one context and one decode worker.
struct Deployment {
    _nats: Nats,
    api: ApiServer,
    context: Proc,
    decode: Proc,
}

fn deployment(context_extra: &[&str]) -> Deployment {
    let nats = Nats::start();
    let api = start_api_server(&nats, &model_dir(MODEL));
    let context =
        support::start_worker_as(&nats, &model_dir(MODEL), "context", "ctx", context_extra);
    let decode = support::start_worker_as(&nats, &model_dir(MODEL), "decode", "dec", &[]);
    let http = &api.http;
    http.wait_for_role("context", 1, Duration::from_secs(30));
    http.wait_for_role("decode", 1, Duration::from_secs(30));
    Deployment {
        _nats: nats,
        api,
        context,
        decode,
    }
}

#[test]
fn a_decode_worker_killed_mid_stream_fails_its_request_quickly_and_frees_the_export() {
    let mut d = deployment(&[]);
    let http = &d.api.http;
    let request = json!({
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 400, "temperature": 0, "ignore_eos": true, "stream": true,
    });
    let mut tokens = 0;
    let mut killed_at = None;
    let decode = &mut d.decode;
    let (status, events) = http.post_stream("/v1/chat/completions", &request, |event| {
        if event["choices"][0]["delta"]["content"].is_string() {
            tokens += 1;
            if tokens == 5 {
                decode.signal(libc::SIGKILL);
                killed_at = Some(Instant::now());
            }
        }
    });
    assert_eq!(status, 200);
    let killed_at = killed_at.expect("the stream started");
    let error = events.iter().find(|e| e.get("error").is_some());
    assert!(
        error.is_some(),
        "the client sees an error event: {events:?}"
    );
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "the error came {:?} after the kill",
        killed_at.elapsed()
    );
    // The context worker holds nothing for it (released after the pull, or expired).
    let start = Instant::now();
    loop {
        let metrics = http.get("/metrics").body;
        let pinned = metric(&metrics, "tandem_kv_pinned_blocks", "\"ctx\"");
        let free = metric(&metrics, "tandem_worker_free_kv_blocks", "\"ctx\"");
        let total = metric(&metrics, "tandem_worker_total_kv_blocks", "\"ctx\"");
        if pinned == Some(0.0) && free.is_some() && free == total {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "context KV not freed:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        d.context.try_wait().is_none(),
        "the context worker is unaffected"
    );
}

/// The api-server's /metrics after one disaggregated request, whose client saw its first text
/// `first_text` after sending it: its time to first token split into one sample of each part,
/// the parts the workers measured within it, the prefill's and the pull's above zero, and
/// `other` the rest, so the parts add up to it.
fn assert_ttft_split_once(metrics: &str, first_text: Duration) {
    let part = |part: &str, what: &str| {
        sample(
            metrics,
            &format!("tandem_ttft_part_seconds_{what}{{part=\"{part}\"}}"),
        )
        .unwrap_or_else(|| panic!("no {what} of part {part}:\n{metrics}"))
    };
    let ttft = sample(
        metrics,
        "tandem_time_to_first_token_seconds_sum{endpoint=\"chat\"}",
    )
    .expect("the request's time to first token");
    assert!(
        ttft > 0.0 && ttft <= first_text.as_secs_f64(),
        "the api-server's TTFT ({ttft} s) is within the client's ({first_text:?})"
    );
    let measured = [
        "context_queue",
        "prefill",
        "decode_room_wait",
        "kv_transfer",
    ];
    for name in measured.iter().chain(&["other"]) {
        assert_eq!(part(name, "count"), 1.0, "{name}:\n{metrics}");
        assert!(part(name, "sum") >= 0.0, "{name}:\n{metrics}");
        eprintln!("TTFT {ttft:.4} s: {name} {:.4} s", part(name, "sum"));
    }
    assert!(part("prefill", "sum") > 0.0, "{metrics}");
    assert!(part("kv_transfer", "sum") > 0.0, "{metrics}");
    let workers: f64 = measured.iter().map(|name| part(name, "sum")).sum();
    assert!(
        workers <= ttft,
        "the workers' parts ({workers} s) fit in the TTFT ({ttft} s):\n{metrics}"
    );
    assert!(
        (workers + part("other", "sum") - ttft).abs() < 1e-6,
        "`other` is the rest of the TTFT:\n{metrics}"
    );
}

#[test]
fn a_client_gone_before_its_first_token_stops_its_prefill() {
    // Small prefill chunks make a long prompt's prefill take many steps.
    let d = deployment(&["--max-num-batched-tokens", "64", "--max-num-seqs", "8"]);
    let http = &d.api.http;
    let long_prompt = "Describe the history of the printing press in detail. ".repeat(150);
    let long = json!({
        "messages": [{"role": "user", "content": long_prompt}],
        "max_tokens": 4, "temperature": 0, "stream": true,
    });
    // How long the long prefill takes when nobody leaves.
    let start = Instant::now();
    let mut first_text = None;
    let (status, _) = http.post_stream("/v1/chat/completions", &long, |event| {
        // The first chunk (the role) has empty content, before any token.
        let content = event["choices"][0]["delta"]["content"].as_str();
        if content.is_some_and(|text| !text.is_empty()) {
            first_text.get_or_insert_with(|| start.elapsed());
        }
    });
    assert_eq!(status, 200);
    let full_prefill = start.elapsed();
    let first_text = first_text.expect("the stream had text");
    assert_ttft_split_once(&http.get("/metrics").body, first_text);

    // The same request, abandoned after 200 ms (before its first token). Under another
    // cache_salt it finds nothing of the first one's prompt cached: its prefill is as long.
    let base = d.api.http.base.trim_start_matches("http://").to_owned();
    let abandon = |request: &Value| {
        let mut socket = std::net::TcpStream::connect(&base).unwrap();
        let body = request.to_string();
        use std::io::Write;
        write!(
            socket,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {base}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        drop(socket);
    };
    let mut abandoned = long.clone();
    abandoned["cache_salt"] = json!("abandoned");
    abandon(&abandoned);

    // A short request right after is not held up behind the abandoned prefill.
    let start = Instant::now();
    let reply = http.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    );
    let short = start.elapsed();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        short < full_prefill.mul_f32(0.7),
        "the short request took {short:?}; the long prefill takes {full_prefill:?}"
    );
    assert!(
        d.context.count_lines("cancelled by the api-server") >= 1,
        "the context worker saw the cancel:\n{}",
        d.context.output()
    );
    // The first request again, its prompt cached on the context worker: the prefill is over
    // at once, and the cancel may come while its export is being made. Nothing stays pinned.
    abandon(&long);
    // And every block is free again.
    let start = Instant::now();
    loop {
        let metrics = http.get("/metrics").body;
        let free = metric(&metrics, "tandem_worker_free_kv_blocks", "\"ctx\"");
        let total = metric(&metrics, "tandem_worker_total_kv_blocks", "\"ctx\"");
        let running = metric(&metrics, "tandem_worker_running", "\"ctx\"");
        if free.is_some() && free == total && running == Some(0.0) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "context KV not freed:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Four long disaggregated requests at once on a decode worker whose KV cache (512 tokens, 32
/// blocks) holds one of their prompts (about 370 tokens, 24 blocks) at a time: each decode job
/// waits for room in the cache before its pull (none falls back to a local prefill), every
/// request has the text and usage `worker generate` gives it, and the most K/V the decode
/// worker held pulled but not yet in its cache stayed within its cache (pulling every hand-over
/// at once would have held 4 prompts, 96 blocks).
#[test]
fn a_decode_worker_with_a_small_kv_cache_pulls_each_prompt_only_into_room_it_has() {
    // The longest prompts of `prompt`, greedy and seeded.
    const REQUESTS: [usize; 4] = [4, 9, 14, 19];
    const MAX_TOKENS: u32 = 24;
    const BLOCK_TOKENS: u64 = 16;
    let nats = Nats::start();
    let api = start_api_server(&nats, &model_dir(MODEL));
    let _context = support::start_worker_as(&nats, &model_dir(MODEL), "context", "ctx", &[]);
    let _decode = support::start_worker_as(
        &nats,
        &model_dir(MODEL),
        "decode",
        "dec",
        &["--kv-cache-tokens", "512"],
    );
    let http = &api.http;
    http.wait_for_role("context", 1, Duration::from_secs(30));
    http.wait_for_role("decode", 1, Duration::from_secs(30));
    let references: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = REQUESTS
            .iter()
            .map(|&i| scope.spawn(move || reference(i, MAX_TOKENS)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let before = HandOvers::read(http);
    let results = chats_at_once(http, REQUESTS, MAX_TOKENS);
    let mut smallest_prompt_blocks = u64::MAX;
    for (((streamed, usage), reference), i) in results.iter().zip(&references).zip(REQUESTS) {
        assert_eq!(streamed.text, reference["text"], "request {i}");
        let prompt_tokens = reference["prompt_ids"].as_array().unwrap().len();
        assert_eq!(usage["prompt_tokens"], prompt_tokens, "request {i}");
        assert_eq!(
            usage["completion_tokens"],
            reference["output_ids"].as_array().unwrap().len(),
            "request {i}"
        );
        smallest_prompt_blocks =
            smallest_prompt_blocks.min((prompt_tokens as u64).div_ceil(BLOCK_TOKENS));
    }

    // The decode worker's heartbeat after the run: idle, with its pull counts.
    let dec = "\"dec\"";
    let start = Instant::now();
    let metrics = loop {
        let metrics = http.get("/metrics").body;
        let free = metric(&metrics, "tandem_worker_free_kv_blocks", dec);
        let total = metric(&metrics, "tandem_worker_total_kv_blocks", dec);
        if free.is_some()
            && free == total
            && metric(&metrics, "tandem_worker_running", dec) == Some(0.0)
        {
            break metrics;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "decode worker not idle:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let total = metric(&metrics, "tandem_worker_total_kv_blocks", dec).unwrap();
    assert_eq!(total, 32.0);
    assert!(
        2 * smallest_prompt_blocks > total as u64,
        "two prompts ({smallest_prompt_blocks} blocks each) must not fit at once"
    );
    let peak = metric(&metrics, "tandem_kv_pull_peak_held_blocks", dec).expect("pull stats");
    assert!(
        peak >= smallest_prompt_blocks as f64 && peak <= total,
        "the most pulled K/V held outside the cache: {peak} blocks, cache {total}\n{metrics}"
    );
    let waited = metric(&metrics, "tandem_kv_pulls_waited_total", dec).unwrap_or(0.0);
    assert!(
        waited >= 1.0,
        "decode jobs waited for room: {waited}\n{metrics}"
    );
    assert_eq!(metric(&metrics, "tandem_kv_pulls_waiting", dec), Some(0.0));
    HandOvers::parse(&metrics).assert_handed_over_since(
        &before,
        REQUESTS.len() as u64,
        "ucx",
        "every prompt pulled into room the decode worker had",
    );
    // Every request's time to first token is split, the waits for room in it.
    let room_wait = |what: &str| {
        sample(
            &metrics,
            &format!("tandem_ttft_part_seconds_{what}{{part=\"decode_room_wait\"}}"),
        )
    };
    assert_eq!(room_wait("count"), Some(REQUESTS.len() as f64), "{metrics}");
    assert!(room_wait("sum").is_some_and(|s| s > 0.0), "{metrics}");
    eprintln!("{waited} decode jobs waited for room; at most {peak} of {total} blocks held pulled");
}

#[test]
fn a_bounded_context_worker_takes_every_prompt_it_has_room_for_and_overflows_the_rest() {
    let nats = Nats::start();
    // Heartbeats 3 s apart: what the api-server knows between them is what it counts itself.
    let api = ApiServer::start(
        &nats,
        &model_dir(MODEL),
        support::SERVED_NAME,
        &["--worker-timeout-ms", "10000"],
    );
    let worker = |role, worker_id, extra| WorkerSpec {
        role,
        worker_id,
        served_model_name: support::SERVED_NAME,
        threads: 1,
        heartbeat_ms: 3000,
        extra,
    };
    let bound = ["--max-num-seqs", "1", "--max-queued-requests", "1"];
    let _context = start_worker(
        &nats.url,
        &model_dir(MODEL),
        &worker("context", "ctx", &bound),
    );
    let _decode = start_worker(&nats.url, &model_dir(MODEL), &worker("decode", "dec", &[]));
    let http = &api.http;
    http.wait_for_role("context", 1, Duration::from_secs(30));
    http.wait_for_role("decode", 1, Duration::from_secs(30));

    // One after another, well within one heartbeat interval: the context worker, holding at
    // most 2, takes all 6, because each answer counts its job off.
    let before = HandOvers::read(http);
    let started = Instant::now();
    // Short prompts (no repeated context: indices that are multiples of 5), so that each
    // takes a fraction of a second.
    for i in (0..6).map(|k| 5 * k) {
        let (streamed, _) = chats_at_once(http, [i], 4).pop().unwrap();
        assert_eq!(
            streamed.finish_reason.as_deref(),
            Some("length"),
            "request {i}"
        );
    }
    HandOvers::read(http).assert_handed_over_since(
        &before,
        6,
        "ucx",
        "six requests one after another to a context worker bounded to 1 + 1",
    );
    eprintln!("six sequential requests in {:?}", started.elapsed());

    // Eight at once: past its bound, the decode worker prefills the rest itself.
    let before = HandOvers::read(http);
    let answered = chats_at_once(http, 0..8, 4);
    for (i, (streamed, usage)) in answered.iter().enumerate() {
        assert_eq!(
            streamed.finish_reason.as_deref(),
            Some("length"),
            "request {i}"
        );
        assert_eq!(usage["completion_tokens"], 4, "request {i}");
    }
    let after = HandOvers::read(http);
    let crossed = after.disaggregated - before.disaggregated;
    let overflowed = after.fallbacks.get("context_full").copied().unwrap_or(0.0)
        - before.fallbacks.get("context_full").copied().unwrap_or(0.0);
    assert!(
        crossed >= 1.0 && overflowed >= 1.0 && crossed + overflowed == 8.0,
        "8 requests at once: {crossed} handed over and {overflowed} prefilled by the decode \
         worker (context_full); before {before:?}, after {after:?}"
    );
}
