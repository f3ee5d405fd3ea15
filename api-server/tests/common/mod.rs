//! The api-server tests' set-up, on top of the test kit (`tandem-test-kit`: real nats-server
//! and api-server processes on free ports, reaped on drop, and the HTTP/SSE client): the
//! served name, the model directory the server reads its tokenizer and limits from, and the
//! short timeouts that make failure paths quick to test. `bus_peer` plays the workers.

#![allow(dead_code)] // each test file uses a different part of the harness

pub mod bus_peer;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tandem_test_kit::{ApiServer, Nats};

use bus_peer::ScriptedBusPeer;

pub const SERVED_NAME: &str = "test-model";

/// The model directory for tests: the `tiny` test model (config.json and tokenizer files are
/// all the api-server reads).
pub fn test_model_dir() -> PathBuf {
    let dir = tandem_test_kit::model_dir("tiny");
    assert!(
        dir.join("tokenizer.json").exists(),
        "test model {} has no tokenizer.json: run scripts/test-models (model-prep random \
         --preset tiny --seed 0 -o {})",
        dir.display(),
        dir.display()
    );
    dir
}

/// Starts the api-server with short timeouts (so failure paths are quick to test), plus
/// `extra` flags (a flag given there replaces the default of the same name), and waits until
/// it serves HTTP. Its client gives up on a read after 30 s, so a hang fails the test.
pub fn start_api_server(nats: &Nats, extra: &[&str]) -> ApiServer {
    let mut flags: Vec<(String, String)> = [
        ("--accept-timeout-ms", "500"),
        ("--first-token-timeout-ms", "1500"),
        ("--stall-timeout-ms", "700"),
        ("--worker-timeout-ms", "1000"),
        ("--http-workers", "2"),
    ]
    .iter()
    .map(|(flag, value)| (flag.to_string(), value.to_string()))
    .collect();
    let mut rest = Vec::new();
    let mut extra = extra.iter();
    while let Some(arg) = extra.next() {
        match flags.iter_mut().find(|(flag, _)| flag == arg) {
            Some((_, value)) => {
                *value = extra
                    .next()
                    .unwrap_or_else(|| panic!("{arg} needs a value"))
                    .to_string();
            }
            None => rest.push(arg.to_string()),
        }
    }
    let args: Vec<String> = flags
        .into_iter()
        .flat_map(|(flag, value)| [flag, value])
        .chain(rest)
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = ApiServer::start(nats, &test_model_dir(), SERVED_NAME, &args);
    server.http = server.http.with_read_timeout(Duration::from_secs(30));
    server
}

/// A nats-server, a [`ScriptedBusPeer`] on it and an api-server ([`start_api_server`] with
/// `flags`) that has seen the peer's first heartbeat (its /health is ready).
pub fn start_with_peer(flags: &[&str]) -> (Nats, ScriptedBusPeer, ApiServer) {
    let nats = Nats::start();
    let peer = ScriptedBusPeer::start(&nats.url, SERVED_NAME);
    let server = start_api_server(&nats, flags);
    let start = Instant::now();
    while server.http.get("/health").status != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the peer's heartbeats never made /health ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (nats, peer, server)
}
