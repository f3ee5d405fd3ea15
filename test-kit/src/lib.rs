//! What tandem's integration tests share: the root package's end-to-end tests (`tests/`), the
//! api-server's tests against scripted bus peers (`api-server/tests/`) and the workers' bus
//! tests (`workers/tests/bus_disaggregated.rs`) all start real processes — nats-server,
//! `worker`, `api-server`, `tandem` — and talk HTTP to them. This crate is the one place that
//! does it; each test crate keeps only what is its own (its deployment defaults, scripted
//! peers, assertions).
//!
//! - [`paths`]: the workspace's binaries ([`bin`]), the test models ([`model_dir`]),
//!   nats-server ([`nats_server_path`]), scratch files ([`temp_dir`], [`temp_file`]).
//! - [`ports`]: free ports ([`free_port`]).
//! - [`process`]: [`Proc`], a child with its output captured; the process-tree queries
//!   ([`children_of`], [`descendants`], [`assert_all_gone`]) that "no process left behind"
//!   checks need.
//! - [`servers`]: [`Nats`], [`start_worker`] ([`WorkerSpec`]), [`ApiServer`].
//! - [`http`]: [`Http`], a small HTTP/1.1 client over a plain socket: whole responses, or SSE
//!   events read one by one as they arrive ([`SseStream`]).
//! - [`prometheus`]: samples of a `/metrics` body.
//! - [`handovers`]: an api-server's hand-over counters ([`HandOvers`]), and the check that a
//!   disaggregated run handed its prompts over rather than falling back to local prefills.
//!
//! # Guarantees
//!
//! - Every process the kit starts is killed (SIGKILL) and reaped when its handle ([`Proc`],
//!   [`Nats`], [`ApiServer`]) is dropped, also when a test panics (the handle is dropped while
//!   unwinding). Only a test binary that is itself killed outright leaves its children behind.
//!   Grandchildren (a `tandem` launcher's workers) are the launcher's to stop.
//! - A port from [`free_port`] had no listener when it was picked, and is never handed out twice
//!   in one test binary (tests run in parallel threads). Another process can still take it
//!   before the server binds it, so the servers the kit starts on a free port are started
//!   again on another one if they exit before listening (three tries).
//! - A server is handed to the test only once it serves: nats-server once it sends its `INFO`
//!   greeting, the api-server once it answers HTTP ([`tandem_protocol::ready`]), a worker once
//!   it logs that it joined the deployment. A process that exits first, or a wait that runs out,
//!   fails the test with the process's output.
//! - Missing prerequisites (a binary not built, a test model not prepared, nats-server not
//!   installed) fail the test with the command that provides them; nothing is skipped.
//! - The processes the kit starts ([`Proc`], and so every server) and the Python it runs
//!   ([`python`]) do not inherit the variables that change what tandem's programs do
//!   (`TANDEM_*` but where nats-server is, `RUST_LOG`, `OPENAI_*`, `PYTHONOPTIMIZE`; see
//!   [`clear_tandem_env`]): the environment of whoever runs the tests cannot change what they
//!   check. A test that sets one on purpose sets it on its command, and that one is kept.

pub mod handovers;
pub mod http;
pub mod paths;
pub mod ports;
pub mod process;
pub mod prometheus;
pub mod servers;

pub use handovers::HandOvers;
pub use http::{Http, Response, SseStream};
pub use paths::{
    bin, model_dir, model_with_edited_json, nats_server_path, profile_dir, python, temp_dir,
    temp_file,
};
pub use ports::free_port;
pub use process::{
    Proc, assert_all_gone, assert_no_command_line_shows, children_of, clear_tandem_env, cmdline,
    comm, descendants, is_running,
};
pub use servers::{ApiServer, Nats, WorkerSpec, start_worker};
