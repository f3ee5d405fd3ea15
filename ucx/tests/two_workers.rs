//! Two UCP workers in one process (each with its own context, as two transfer threads would
//! have): registration, rkey packing and unpacking, concurrent gets, range checks and the
//! endpoint cache, over shm and over tcp.

mod common;

use std::time::Duration;

use common::{assert_pattern, pull_region, run_local};
use tandem_ucx::{Context, EndpointCache, MemoryRegion, RegionHandle, RemoteKey, UcxError, Worker};

const REGION_BYTES: usize = 3 << 20;
const TIMEOUT: Duration = Duration::from_secs(20);

fn two_workers(tls: &str) {
    run_local(async {
        let server_context = Context::with_config(&[("TLS", tls)]).expect("ucp_init (server)");
        let server = Worker::new(&server_context).expect("server worker");
        let client_context = Context::with_config(&[("TLS", tls)]).expect("ucp_init (client)");
        let client = Worker::new(&client_context).expect("client worker");
        for worker in [&server, &client] {
            let worker = worker.clone();
            tokio::task::spawn_local(async move { worker.progress_loop().await });
        }

        let seed = 42;
        let mut bytes = vec![0u8; REGION_BYTES];
        tandem_ucx::pattern::fill(&mut bytes, seed, 0);
        let region = MemoryRegion::from_vec(&server_context, bytes).expect("ucp_mem_map");
        let handle = RegionHandle {
            worker_address: server.address().expect("worker address"),
            region_address: region.address(),
            region_length: region.len(),
            rkey: region.pack_rkey().expect("ucp_rkey_pack"),
        };
        assert!(!handle.worker_address.is_empty() && !handle.rkey.is_empty());

        let endpoints = EndpointCache::new(&client);
        let endpoint = endpoints
            .get(&handle.worker_address)
            .expect("ucp_ep_create");
        for block_bytes in [64 << 10, 1 << 20, 100_000] {
            let pulled = pull_region(&endpoint, &handle, block_bytes, TIMEOUT)
                .await
                .unwrap_or_else(|e| panic!("pull over {tls} in {block_bytes}-byte gets: {e}"));
            assert_pattern(&pulled, seed);
        }

        // A get past the advertised region is refused before UCX sees it.
        let rkey = RemoteKey::unpack(
            &endpoint,
            &handle.rkey,
            handle.region_address,
            handle.region_length,
        )
        .expect("ucp_ep_rkey_unpack");
        let mut local = vec![0u8; 16];
        // SAFETY: the future is awaited at once.
        let past_end = unsafe {
            endpoint.get(
                &mut local,
                handle.region_address + REGION_BYTES as u64 - 8,
                &rkey,
            )
        };
        assert!(matches!(past_end, Err(UcxError::OutOfRange { .. })));
        drop(past_end);

        // A single get lands at the right offset.
        let offset = 12_345u64;
        // SAFETY: the future is awaited at once.
        unsafe { endpoint.get(&mut local, handle.region_address + offset, &rkey) }
            .expect("get issued")
            .await
            .expect("get completed");
        assert_eq!(
            tandem_ucx::pattern::first_mismatch(&local, seed, offset),
            None
        );

        // The cache hands out the same endpoint; after an abort it connects a new one that works.
        assert_eq!(endpoints.len(), 1);
        endpoint.abort("test");
        assert!(!endpoint.is_usable());
        // SAFETY: not awaited: the call fails before issuing anything.
        let closed = unsafe { endpoint.get(&mut local, handle.region_address, &rkey) };
        assert!(matches!(closed, Err(UcxError::EndpointClosed { .. })));
        drop(closed);
        drop(rkey);
        let fresh = endpoints.get(&handle.worker_address).expect("reconnect");
        assert!(fresh.is_usable());
        let pulled = pull_region(&fresh, &handle, 256 << 10, TIMEOUT)
            .await
            .expect("pull on the new endpoint");
        assert_pattern(&pulled, seed);
        assert_eq!(endpoints.len(), 1);
        assert_eq!(client.outstanding_requests(), 0);
    });
}

#[test]
fn two_workers_over_shm() {
    two_workers("shm");
}

#[test]
fn two_workers_over_tcp() {
    two_workers("tcp");
}
