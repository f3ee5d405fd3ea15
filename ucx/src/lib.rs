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
//! # Threading
//! See [`worker`]: all objects of one worker live on one thread (they are `!Send`), and the
//! worker is progressed by [`Worker::progress_loop`] (or [`Worker::progress_until`]), which
//! sleeps on the worker's event descriptor instead of spinning.
//!
//! # Lifetimes and drop order
//! Reference counts encode UCX's required order: an in-flight get holds its remote key and
//! endpoint; a remote key holds its endpoint; an endpoint holds its worker; a worker and a memory
//! region hold the context. So requests finish (or are aborted) before their rkey is destroyed,
//! rkeys before endpoints close, endpoints before the worker is destroyed, and all before
//! `ucp_cleanup`.
//!
//! # Failures
//! Endpoints use peer error handling, so a peer that dies fails its transfers instead of hanging
//! them; [`Endpoint::get_all`] adds a deadline for peers that are alive but stuck. Remote ranges
//! are checked against the advertised region before UCX is called.

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
