//! Prefix caching end to end, with real processes: `tandem serve` with one context and one
//! decode worker on the CPU, API keys and `cache_salt_by_api_key`. A prompt sent again is
//! served from the context worker's cache (`usage.prompt_tokens_details.cached_tokens`, the
//! prompt's full blocks but the last token); the same prompt under another key, or under
//! another `cache_salt`, computes everything again; every prompt is handed over. A
//! conversation's next turn, handed over too, has its decode worker pull only the blocks it
//! does not hold, and gives the tokens of a pull of them all.
//!
//! Needs `$TANDEM_TEST_MODELS/tiny` and the workspace binaries.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::tandem;
use tandem_test_kit::prometheus::sample;
use tandem_test_kit::{HandOvers, Http, Proc, free_port, model_dir, temp_dir};

const KEY_A: &str = "sk-tenant-a-5d1e";
const KEY_B: &str = "sk-tenant-b-90c2";
/// The CPU workers' KV block size.
const BLOCK_TOKENS: usize = 16;

/// The cached prompt tokens of a completion of `prompt` sent with `key` (and `salt`).
fn cached_tokens(base: &str, key: &str, prompt: &[u32], salt: Option<&str>) -> u64 {
    // Two tokens, the second from the decode worker: a first token that ends the request
    // (end of sequence, which the tiny model's random weights can sample) would leave the
    // context worker's answer the whole request and nothing to hand over.
    let mut body =
        json!({"model": "cached", "prompt": prompt, "max_tokens": 2, "ignore_eos": true});
    if let Some(salt) = salt {
        body["cache_salt"] = json!(salt);
    }
    let reply = Http::new(base)
        .with_bearer(key)
        .post("/v1/completions", &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let usage: Value = reply.json()["usage"].clone();
    assert_eq!(usage["prompt_tokens"], prompt.len(), "{usage}");
    usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("usage without prompt_tokens_details.cached_tokens: {usage}"))
}

#[test]
fn a_prompt_sent_again_is_served_from_the_cache_of_its_own_key_and_salt_only() {
    let port = free_port();
    let dir = temp_dir("prefix-cache");
    let config = dir.join("deploy.yaml");
    std::fs::write(
        &config,
        format!(
            "model: {model}\nport: {port}\nserved_model_name: cached\n\
             api_keys: [\"{KEY_A}\", \"{KEY_B}\"]\ncache_salt_by_api_key: true\n\
             context_servers: {{ num_instances: 1, device: cpu }}\n\
             generation_servers: {{ num_instances: 1, device: cpu }}\n\
             router: {{ max_local_prefill_length: 8 }}\n",
            model = model_dir("tiny").display(),
        ),
    )
    .unwrap();
    let mut command = tandem();
    command
        .args(["serve", "--shutdown-grace-s", "20", "-c"])
        .arg(&config);
    let _launcher = {
        let mut launcher = Proc::spawn("tandem", command);
        launcher.wait_for_line("tandem: serving", Duration::from_secs(120));
        launcher
    };
    let base = format!("http://127.0.0.1:{port}");
    let metrics = Http::new(&base);
    // Serving, as the launcher says, once the workers joined; the api-server routes to the
    // context worker from its first heartbeat there.
    metrics.wait_for_role("context", 1, Duration::from_secs(30));
    metrics.wait_for_role("decode", 1, Duration::from_secs(30));
    let before = HandOvers::read(&metrics);

    // 100 tokens: 6 full blocks. A hit takes them all; the last prompt token is always
    // computed (its logits give the first token), and it lies past them.
    let prompt: Vec<u32> = (0..100).map(|i| 3 + (i * 7) % 500).collect();
    let full_blocks = (prompt.len() / BLOCK_TOKENS * BLOCK_TOKENS) as u64;
    assert_eq!(
        cached_tokens(&base, KEY_A, &prompt, None),
        0,
        "a cold cache"
    );
    assert_eq!(
        cached_tokens(&base, KEY_A, &prompt, None),
        full_blocks,
        "the same prompt with the same key"
    );
    assert_eq!(
        cached_tokens(&base, KEY_B, &prompt, None),
        0,
        "another key never finds the first key's blocks"
    );
    assert_eq!(
        cached_tokens(&base, KEY_B, &prompt, None),
        full_blocks,
        "and has its own"
    );
    assert_eq!(
        cached_tokens(&base, KEY_A, &prompt, Some("conversation-1")),
        0,
        "a cache_salt isolates a key's requests from each other"
    );
    assert_eq!(
        cached_tokens(&base, KEY_A, &prompt, Some("conversation-1")),
        full_blocks
    );
    // A longer prompt sharing the first 64 tokens finds those 4 blocks.
    let mut longer = prompt[..64].to_vec();
    longer.extend((0..40).map(|i| 5 + (i * 11) % 500));
    assert_eq!(cached_tokens(&base, KEY_A, &longer, None), 64);

    HandOvers::read(&metrics).assert_handed_over_since(
        &before,
        7,
        "ucx",
        "seven prompts past max_local_prefill_length to one context worker",
    );
}

/// `tandem serve` with one context and one decode worker of the tiny model (prompts of more
/// than 8 tokens handed over), and its address, once both serve.
fn serve_disaggregated(name: &str, extra_config: &str) -> (Proc, String) {
    let port = free_port();
    let dir = temp_dir(name);
    let config = dir.join("deploy.yaml");
    std::fs::write(
        &config,
        format!(
            "model: {model}\nport: {port}\nserved_model_name: cached\n\
             context_servers: {{ num_instances: 1, device: cpu }}\n\
             generation_servers: {{ num_instances: 1, device: cpu }}\n\
             router: {{ max_local_prefill_length: 8 }}\n{extra_config}",
            model = model_dir("tiny").display(),
        ),
    )
    .unwrap();
    let mut command = tandem();
    command
        .args(["serve", "--shutdown-grace-s", "20", "-c"])
        .arg(&config);
    let mut launcher = Proc::spawn("tandem", command);
    launcher.wait_for_line("tandem: serving", Duration::from_secs(120));
    let base = format!("http://127.0.0.1:{port}");
    let http = Http::new(&base);
    http.wait_for_role("context", 1, Duration::from_secs(30));
    http.wait_for_role("decode", 1, Duration::from_secs(30));
    (launcher, base)
}

/// A greedy completion of `prompt` (under `salt`): its tokens' text, and the K/V bytes the
/// decode worker pulled for it (from /metrics).
fn handed_over(base: &str, prompt: &[u32], salt: &str) -> (String, f64) {
    let http = Http::new(base);
    let pulled =
        || sample(&http.get("/metrics").body, "tandem_kv_transfer_bytes_total").unwrap_or(0.0);
    let before = pulled();
    let reply = http.post(
        "/v1/completions",
        &json!({"model": "cached", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                "cache_salt": salt}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let text = reply.json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    (text, pulled() - before)
}

#[test]
fn a_next_turn_pulls_only_the_blocks_its_decode_worker_does_not_hold() {
    let (_launcher, base) = serve_disaggregated("prefix-pull", "");
    // 100 tokens: 7 blocks, 6 of them full.
    let first_turn: Vec<u32> = (0..100).map(|i| 3 + (i * 7) % 500).collect();
    let mut second_turn = first_turn.clone();
    second_turn.extend((0..60).map(|i| 4 + (i * 13) % 500));
    let (_, first_bytes) = handed_over(&base, &first_turn, "conversation");
    assert!(first_bytes > 0.0, "the first turn was pulled");
    let block_bytes = first_bytes / 7.0;
    // 160 tokens in 10 blocks: the decode worker holds the first turn's 6 full blocks.
    let (text, second_bytes) = handed_over(&base, &second_turn, "conversation");
    assert_eq!(
        second_bytes,
        4.0 * block_bytes,
        "the second turn pulled {} blocks, not the 4 the decode worker lacked",
        second_bytes / block_bytes
    );
    // Under another salt nothing is cached: all 10 blocks are pulled, for the same tokens.
    let (fresh_text, fresh_bytes) = handed_over(&base, &second_turn, "another");
    assert_eq!(fresh_bytes, 10.0 * block_bytes);
    assert_eq!(text, fresh_text, "a partial pull changed the output");
}
