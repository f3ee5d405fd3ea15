//! The Llama-family model, written once against [`crate::backend::Backend`].

pub mod batch;

pub use batch::{ForwardBatch, SequenceSlice};
