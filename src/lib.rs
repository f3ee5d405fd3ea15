//! The parts of the `tandem` package other programs reuse: the OpenAI client ([`openai_client`],
//! also used by `examples/disagg_client.rs`) and the load generator behind `tandem bench`
//! ([`bench`](mod@bench)), and the planner behind `tandem plan` ([`planner`]), which measures
//! deployments through both. The launcher itself (`tandem serve`) lives in the binary
//! (`src/main.rs`).

pub mod bench;
pub mod openai_client;
pub mod planner;
