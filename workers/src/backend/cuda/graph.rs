//! CUDA graphs for decode steps. A decode step of a small batch is a few hundred short kernels
//! whose launch gaps add up to a large share of the step; replaying a captured graph launches
//! them all at once.
//!
//! A graph is captured per [`GraphShape`]: the batch rounded up to one of [`GRAPH_BATCHES`]
//! (dummy sequences fill the rest and write into the cache's scratch block), and the context
//! rounded up to a power of two (which fixes the attention kernel's split). Its metadata lives in
//! buffers of fixed address, refilled before each replay; activations are allocated inside the
//! graph (freed inside it too), and the logits are copied to a buffer of the slot before the
//! graph ends. The first step of a shape runs eagerly (learning the output size), the second
//! captures, later ones replay.

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice};

use super::CudaBackend;
use super::batch::{CudaBatch, GraphShape};
use super::tensor::{CudaKvCache, CudaTensor, DeviceData};
use crate::backend::{BackendError, BatchPlan, ForwardLayers};

/// Batch sizes graphs are captured for (a step is padded to the next one: past 128, by at most
/// a quarter of its sequences); a decode step of more sequences than the last runs eagerly.
pub(super) const GRAPH_BATCHES: &[usize] = &[
    1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512,
];
/// Graphs kept at most: 19 batch sizes times the context buckets a workload reaches. Each
/// holds its metadata buffers (at most batch x context / block_size block-table entries); its
/// activations are graph allocations, whose memory the driver shares between graphs launched
/// on one stream.
const MAX_GRAPHS: usize = 128;
/// Smallest context bucket.
const MIN_CONTEXT: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct GraphKey {
    shape: GraphShape,
    /// The cache the graph reads and writes (its address is baked into the kernels).
    kv_address: u64,
    /// Captured with the LoRA adapters' stacked products ([`BatchPlan::lora`]).
    lora: bool,
}

struct GraphSlot {
    meta: CudaBatch,
    graph: Option<CudaGraph>,
    /// Logits of every (real and dummy) sequence, `[batch, cols]`.
    out: Option<(CudaSlice<f32>, usize)>,
}

/// Captured decode graphs of one backend.
#[derive(Default)]
pub(super) struct DecodeGraphs {
    slots: Mutex<HashMap<GraphKey, GraphSlot>>,
    disabled: std::sync::atomic::AtomicBool,
}

// SAFETY: graphs and buffers are only touched under the mutex, by the thread running the
// forward; CUDA objects may be used from any thread with the context bound.
unsafe impl Send for GraphSlot {}

impl DecodeGraphs {
    pub(super) fn set_enabled(&self, enabled: bool) {
        self.disabled
            .store(!enabled, std::sync::atomic::Ordering::Relaxed);
    }

    /// Drops every captured graph: their kernels are those of the settings they were captured
    /// under, and a replay after a switch would run the old ones.
    pub(super) fn clear(&self) {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    pub(super) fn enabled(&self) -> bool {
        !self.disabled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The graph shape of `plan` if it is a decode step graphs cover.
    pub(super) fn key(
        &self,
        plan: &BatchPlan,
        kv: &CudaKvCache,
        backend: &CudaBackend,
    ) -> Option<GraphKey> {
        if self.disabled.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let seqs = &plan.sequences;
        if seqs.is_empty()
            || plan.row_logprobs
            || plan.logits_rows.len() != seqs.len()
            || seqs.iter().any(|s| s.token_count != 1)
        {
            return None;
        }
        let batch = *GRAPH_BATCHES.iter().find(|&&b| b >= seqs.len())?;
        let context = seqs
            .iter()
            .map(|s| s.context_len())
            .max()?
            .next_power_of_two()
            .max(MIN_CONTEXT);
        Some(GraphKey {
            shape: GraphShape {
                batch,
                blocks_per_seq: context.div_ceil(plan.block_size),
                context,
                scratch_block: kv.scratch_block(),
            },
            kv_address: kv.block_address(backend.stream(), 0),
            lora: plan.lora,
        })
    }
}

impl CudaBackend {
    /// Runs the decode step `plan` through the graph of `key` (eagerly the first time,
    /// capturing the second, replaying after).
    pub(super) fn run_graph(
        &self,
        key: GraphKey,
        plan: &BatchPlan,
        kv: &mut CudaKvCache,
        layers: &mut ForwardLayers<'_, CudaBackend>,
    ) -> Result<Option<CudaTensor>, BackendError> {
        let mut slots = self
            .graphs
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !slots.contains_key(&key) {
            if slots.len() >= MAX_GRAPHS {
                drop(slots);
                let meta = CudaBatch::upload(&self.meta_upload(), plan)?;
                super::sample::chain_tokens(self, *meta.tokens(), &plan.chained)?;
                return layers(&meta, kv);
            }
            let meta = CudaBatch::for_graph(&self.meta_upload(), plan, &key.shape)?;
            slots.insert(
                key,
                GraphSlot {
                    meta,
                    graph: None,
                    out: None,
                },
            );
        }
        let slot = slots.get_mut(&key).expect("inserted above");
        slot.meta.refill(&self.meta_upload(), plan, &key.shape)?;
        // Outside the graph: the chained tokens' rows differ from step to step.
        super::sample::chain_tokens(self, *slot.meta.tokens(), &plan.chained)?;
        let real_rows = plan.sequences.len();

        if slot.out.is_none() {
            // First step of this shape: run it eagerly on the slot's buffers, keep the output
            // size for the capture.
            let Some(logits) = layers(&slot.meta, kv)? else {
                return Ok(None);
            };
            let cols = logits.cols;
            let buffer = dev!(
                "graph output",
                self.stream.alloc_zeros::<f32>(logits.rows * cols)
            )?;
            slot.out = Some((buffer, cols));
            return self.first_rows(&logits, real_rows).map(Some);
        }
        let cols = slot.out.as_ref().map(|o| o.1).unwrap_or_default();
        if slot.graph.is_none() {
            dev!(
                "graph capture",
                self.stream
                    .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            )?;
            let captured = layers(&slot.meta, kv).and_then(|logits| match logits {
                Some(t) => {
                    let DeviceData::F32(src) = &t.data else {
                        return Err(BackendError::Device {
                            op: "graph capture",
                            detail: "logits are not f32".into(),
                        });
                    };
                    let (out_buf, _) = slot.out.as_mut().expect("checked above");
                    dev!("graph capture", self.stream.memcpy_dtod(src, out_buf))
                }
                None => Err(BackendError::Device {
                    op: "graph capture",
                    detail: "the step returned no logits".into(),
                }),
            });
            // End the capture whatever happened, so the stream is usable again.
            let graph = dev!(
                "graph capture",
                self.stream.end_capture(CUgraphInstantiate_flags(0))
            );
            captured?;
            let graph = graph?.ok_or_else(|| BackendError::Device {
                op: "graph capture",
                detail: "nothing was captured".into(),
            })?;
            let summary = GraphSummary::of(&graph);
            tracing::debug!(
                batch = key.shape.batch,
                context = key.shape.context,
                kernels = summary.kernels,
                other_nodes = summary.other_nodes,
                edges = summary.edges,
                programmatic_edges = summary.programmatic_edges,
                "decode step captured"
            );
            slot.graph = Some(graph);
        }
        let graph = slot.graph.as_ref().expect("captured above");
        dev!("graph launch", graph.launch())?;
        let (out, _) = slot.out.as_ref().expect("checked above");
        let mut result = self.alloc_f32(real_rows * cols)?;
        dev!(
            "graph output",
            self.stream
                .memcpy_dtod(&out.slice(0..real_rows * cols), &mut result)
        )?;
        Ok(Some(CudaTensor::from_f32(real_rows, cols, result)))
    }

    /// The first `rows` rows of `t` (f32) in a new tensor.
    fn first_rows(&self, t: &CudaTensor, rows: usize) -> Result<CudaTensor, BackendError> {
        let src = t.as_f32("graph output")?;
        let mut result = self.alloc_f32(rows * t.cols)?;
        dev!(
            "graph output",
            self.stream
                .memcpy_dtod(&src.slice(0..rows * t.cols), &mut result)
        )?;
        Ok(CudaTensor::from_f32(rows, t.cols, result))
    }
}

/// What a captured step holds: its kernels, its other nodes (the activations' allocations and
/// frees, copies), and of its edges those that are programmatic. A programmatic launch
/// ([`launch`](super::launch)) stays programmatic in the graph only where two kernels follow
/// each other directly; an allocation or a free between them makes the edge an ordinary one
/// (64 of a Llama-3.1-8B step's ~880 edges), and the driver refuses to rewire a graph that
/// holds memory nodes (`CUDA_ERROR_NOT_SUPPORTED`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct GraphSummary {
    kernels: usize,
    other_nodes: usize,
    edges: usize,
    programmatic_edges: usize,
}

impl GraphSummary {
    /// The summary of `graph`; zeros where the driver does not answer.
    fn of(graph: &CudaGraph) -> Self {
        use cudarc::driver::sys;
        let mut summary = GraphSummary::default();
        let cu_graph = graph.cu_graph();
        // SAFETY: the graph is alive (owned by `graph`); each query asks for the count first,
        // then fills arrays of that length.
        unsafe {
            let mut count = 0usize;
            if sys::cuGraphGetNodes(cu_graph, std::ptr::null_mut(), &mut count)
                .result()
                .is_ok()
            {
                let mut nodes = vec![std::ptr::null_mut(); count];
                if sys::cuGraphGetNodes(cu_graph, nodes.as_mut_ptr(), &mut count)
                    .result()
                    .is_ok()
                {
                    for &node in nodes.iter().take(count) {
                        let mut kind = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
                        if sys::cuGraphNodeGetType(node, &mut kind).result().is_ok()
                            && kind == sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL
                        {
                            summary.kernels += 1;
                        } else {
                            summary.other_nodes += 1;
                        }
                    }
                }
            }
            let mut edges = 0usize;
            let (no_nodes, no_data) = (std::ptr::null_mut(), std::ptr::null_mut());
            if sys::cuGraphGetEdges_v2(cu_graph, no_nodes, no_nodes, no_data, &mut edges)
                .result()
                .is_ok()
            {
                let mut from = vec![std::ptr::null_mut(); edges];
                let mut to = vec![std::ptr::null_mut(); edges];
                let mut data: Vec<sys::CUgraphEdgeData> = vec![std::mem::zeroed(); edges];
                if sys::cuGraphGetEdges_v2(
                    cu_graph,
                    from.as_mut_ptr(),
                    to.as_mut_ptr(),
                    data.as_mut_ptr(),
                    &mut edges,
                )
                .result()
                .is_ok()
                {
                    summary.edges = edges;
                    summary.programmatic_edges = data
                        .iter()
                        .take(edges)
                        .filter(|d| {
                            u32::from(d.type_)
                                == sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC
                                    as u32
                        })
                        .count();
                }
            }
        }
        summary
    }
}
