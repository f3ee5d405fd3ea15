//! UCX transfer foundation for tandem's KV cache pulls: a UCP context, single-threaded workers
//! progressed from tokio, endpoints from packed worker addresses (cached per peer), memory
//! registration with rkey packing, and RMA gets that complete when the data has landed.
//!
//! # FFI approach: a C shim, not Rust copies of UCX's structs
//! UCX's parameter structs (`ucp_params_t`, `ucp_worker_params_t`, `ucp_ep_params_t`,
//! `ucp_mem_map_params_t`, `ucp_request_param_t`) have field masks, unions and padding that
//! change between releases; a hand-written Rust copy can be wrong without any compiler noticing.
//! So `csrc/shim.c`, compiled by `build.rs` with the `cc` crate against the headers pkg-config
//! finds (Debian `libucx-dev`, UCX 1.13), fills those structs in C and exposes functions taking
//! only pointers, integers and sizes ([`ffi`]). The C compiler owns every layout; the only ABI
//! contract left is those scalar signatures. It also reaches `ucp_init`, a static inline around
//! `ucp_init_version`. Only the calls used are exposed.
//!
//! # Threading: `!Send` types on one thread, reached through a command channel
//! A UCP worker created in `UCS_THREAD_MODE_SINGLE` must only ever be touched by one thread, and
//! so must its endpoints, rkeys and requests. Every type here is reference counted with `Rc`, so
//! the compiler refuses to move any of them to another thread: the rule is enforced, not
//! documented. The intended shape in a tokio worker process (what `workers/src/transfer/ucx.rs`
//! does): one dedicated OS thread runs a current-thread runtime with a `tokio::task::LocalSet`,
//! owns the [`Context`], [`Worker`], [`EndpointCache`] and exported [`MemoryRegion`]s, spawns
//! [`Worker::progress_loop`] with `spawn_local`, and serves export / pull / release commands
//! from an mpsc channel, answering on oneshot channels. Why that rather than a `Mutex` around a
//! multi-thread-mode worker: the hot path takes no lock, UCX's own locking stays off, a pull
//! (many gets in flight) is one local task, and the multi-threaded runtime that runs the
//! model and the bus never blocks on UCX. Tests and tools may instead run everything on one
//! current-thread runtime inside a `LocalSet`, as `tests/` and the binaries do.
//!
//! # Progress without spinning
//! [`Worker::progress_loop`] progresses until idle, arms the worker (`ucp_worker_arm`) and sleeps
//! on its event descriptor (`ucp_worker_get_efd`) through `tokio::io::unix::AsyncFd`, with a 5 ms
//! tick as a safety net and an immediate wake-up when a get is issued (see [`worker`]). A process
//! that only serves memory must run it too: over tcp, and for registered user memory over shm,
//! UCX emulates RMA with messages the serving side handles.
//!
//! # Lifetimes and drop order
//! Reference counts encode UCX's required order: an in-flight get holds its remote key and
//! endpoint; a remote key holds its endpoint; an endpoint holds its worker; a worker and a memory
//! region hold the context. So requests finish (or are aborted) before their rkey is destroyed,
//! rkeys before endpoints close, endpoints before the worker is destroyed, and all before
//! `ucp_cleanup`.
//!
//! # Failures
//! Endpoints use peer error handling where the transports support it (tcp), so a peer that dies
//! fails its transfers at once instead of hanging them; UCX 1.13's shared-memory transports do not,
//! and endpoints then fall back to no error handling ([`Endpoint::detects_peer_failure`]).
//! [`Endpoint::get_all`] always has a deadline, so a dead or stuck peer ends a pull with an error
//! in bounded time either way. Remote ranges are checked against the advertised region before UCX
//! is called. Errors name the UCX call and UCX's status text ([`UcxError`]).
//!
//! # Exporting memory: prefer [`MemoryRegion::allocate`]
//! UCX 1.13 reads registered user memory ([`MemoryRegion::register`],
//! [`MemoryRegion::from_vec`]) over shm by active-message emulation that needs the serving
//! process; memory UCX allocated lives in a shared segment the puller maps and copies from
//! directly, 15-25x faster here (docs/benchmarks.md, "KV pull over UCX"). Over tcp they are alike.
//!
//! # Wire data
//! No serde here: worker addresses ([`Worker::address`]) and packed rkeys
//! ([`MemoryRegion::pack_rkey`]) are plain bytes for the protocol crate to carry (base64/hex in
//! JSON); [`RegionHandle`] is a one-line text form for the tests and tools.

pub mod context;
pub mod endpoint;
pub mod error;
pub mod ffi;
pub mod get;
pub mod handle;
pub mod memory;
pub mod pattern;
pub mod worker;

pub use context::Context;
pub use endpoint::{Endpoint, EndpointCache};
pub use error::{Result, UcxError};
pub use get::{GetFuture, GetOp};
pub use handle::RegionHandle;
pub use memory::{MemoryRegion, RemoteKey};
pub use worker::Worker;
