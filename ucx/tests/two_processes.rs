//! Two processes: a `tandem-ucx-peer` child registers a patterned region and prints its handle;
//! this process pulls it with many concurrent gets and checks every byte, over shm and over tcp.
//! Then the peer is killed and a pull must fail within a bounded time instead of hanging.

mod common;

use std::time::{Duration, Instant};

use common::{Peer, assert_pattern, pull_region, run_local};
use tandem_ucx::{Context, EndpointCache, UcxError, Worker};

/// SmolLM2-135M's KV bytes for one 16-token block: 30 layers * 2 (K, V) * 3 heads * 64 * 2 bytes.
const BLOCK_BYTES: usize = 16 * 30 * 2 * 3 * 64 * 2;
/// 12 blocks, about 4.2 MiB, plus a short tail so the last get is smaller than a block.
const REGION_BYTES: usize = 12 * BLOCK_BYTES + 1000;
const PULL_TIMEOUT: Duration = Duration::from_secs(20);
/// Deadline of a pull from a killed peer, and what aborting its gets may add (2 s in the crate).
const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(3);
const ABORT_SLACK: Duration = Duration::from_secs(4);

fn pull_from_peer_then_peer_dies(tls: &str, allocation: &str) {
    let seed = 0x5eed_0000 + tls.len() as u64;
    let mut peer = Peer::spawn(tls, REGION_BYTES, seed, allocation);
    let handle = peer.handle.clone();
    run_local(async {
        let context = Context::with_config(&[("TLS", tls)]).expect("ucp_init");
        let worker = Worker::new(&context).expect("ucp_worker_create");
        let progress = worker.clone();
        tokio::task::spawn_local(async move { progress.progress_loop().await });
        let endpoints = EndpointCache::new(&worker);
        let endpoint = endpoints
            .get(&handle.worker_address)
            .expect("ucp_ep_create");

        let pulled = pull_region(&endpoint, &handle, BLOCK_BYTES, PULL_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("pull over {tls}: {e}"));
        assert_pattern(&pulled, seed);

        // A second pull reuses the cached endpoint.
        let again = endpoints
            .get(&handle.worker_address)
            .expect("cached endpoint");
        let pulled = pull_region(&again, &handle, BLOCK_BYTES / 3, PULL_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("second pull over {tls}: {e}"));
        assert_pattern(&pulled, seed);
        assert_eq!(endpoints.len(), 1);
        again.flush().await.expect("flush to a live peer");

        // One get of the whole region: over shm with user memory the peer answers in many
        // FIFO-sized messages, and must keep progressing when the FIFO frees up.
        let pulled = pull_region(&again, &handle, REGION_BYTES, PULL_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("single-get pull over {tls}: {e}"));
        assert_pattern(&pulled, seed);

        // The peer dies without closing anything: the pull must end with an error, not hang.
        // Over tcp UCX's peer error handling reports the death; over shm (no peer failure
        // detection in UCX 1.13) the pull's deadline ends it.
        peer.kill();
        let detects_peer_failure = again.detects_peer_failure();
        assert_eq!(detects_peer_failure, tls != "shm");
        let started = Instant::now();
        let failed = pull_region(&again, &handle, BLOCK_BYTES, DEAD_PEER_TIMEOUT).await;
        let elapsed = started.elapsed();
        let error = failed.expect_err("a pull from a dead peer cannot succeed");
        eprintln!("UCX_TLS={tls}: pull from the dead peer failed after {elapsed:?}: {error}");
        assert!(
            elapsed < DEAD_PEER_TIMEOUT + ABORT_SLACK,
            "the failure took {elapsed:?}"
        );
        if detects_peer_failure {
            assert!(
                !matches!(error, UcxError::Timeout { .. }),
                "UCX did not report the dead peer: {error}"
            );
        }
        // The failed endpoint is replaced; a pull on the new one fails in bounded time too.
        let started = Instant::now();
        let retry = match endpoints.get(&handle.worker_address) {
            Ok(endpoint) => pull_region(&endpoint, &handle, BLOCK_BYTES, DEAD_PEER_TIMEOUT).await,
            Err(e) => Err(e),
        };
        let elapsed = started.elapsed();
        let error = retry.expect_err("a pull from a dead peer cannot succeed");
        eprintln!("UCX_TLS={tls}: retry failed after {elapsed:?}: {error}");
        assert!(
            elapsed < DEAD_PEER_TIMEOUT + ABORT_SLACK,
            "the retry took {elapsed:?}"
        );
    });
}

#[test]
fn pull_from_another_process_over_shm() {
    pull_from_peer_then_peer_dies("shm", "vec");
}

#[test]
fn pull_from_another_process_over_tcp() {
    pull_from_peer_then_peer_dies("tcp", "vec");
}

#[test]
fn pull_ucx_allocated_memory_from_another_process_over_shm() {
    pull_from_peer_then_peer_dies("shm", "ucx");
}

#[test]
fn pull_ucx_allocated_memory_from_another_process_over_tcp() {
    pull_from_peer_then_peer_dies("tcp", "ucx");
}

#[test]
fn peer_exits_cleanly_when_told() {
    let peer = Peer::spawn("shm", 4096, 1, "vec");
    assert!(peer.finish(), "tandem-ucx-peer exited with an error");
}
