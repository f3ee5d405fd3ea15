//! Captured decode steps as chains of kernels: the graph a decode step's capture makes has a
//! memory node between most pairs of kernels (each activation is allocated and freed inside
//! the graph), and an edge through such a node is an ordinary one, so a programmatic launch
//! ([`launch`](super::launch)) only stays programmatic where two kernels follow each other
//! directly: 64 of ~290 edges of a Llama-3.1-8B step. [`chain_kernels`] rewires the captured
//! graph before it is instantiated:
//!
//! - every node but an allocation keeps, as direct dependencies, the kernels and other nodes it
//!   depended on through allocations and frees, and the allocations on those paths;
//! - a kernel of ours ([`StepGraph`]'s module) that so depended on a kernel does so through a
//!   programmatic edge: it may start while that kernel ends, and waits in `pdl_wait` for it
//!   before it touches memory (every kernel of `workers/kernels/` does);
//! - allocations become roots and frees leaves: no allocation is ordered after a free any more,
//!   so the driver maps no two activations of the step to the same memory. The step's
//!   activations then take the sum of their sizes, which is why only small batches are
//!   rewired ([`CHAIN_MAX_BATCH`]).
//!
//! Kernels of cuBLAS keep ordinary edges in: they do not wait for a programmatic predecessor.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use cudarc::driver::sys::{self, CUgraph, CUgraphEdgeData, CUgraphNode, CUgraphNodeType};
use cudarc::driver::{CudaStream, DriverError};

/// Batches up to this many sequences have their captured steps rewired.
pub(super) const CHAIN_MAX_BATCH: usize = 16;

/// A captured and instantiated decode step, owned here (cudarc's `CudaGraph` instantiates at
/// the end of its capture, before the graph could be rewired).
pub(super) struct StepGraph {
    graph: CUgraph,
    exec: sys::CUgraphExec,
    stream: Arc<CudaStream>,
}

impl StepGraph {
    /// Ends the capture on `stream`; with `ours`, rewires the graph ([`chain_kernels`]) for the
    /// kernels of that module before instantiating it. `None`: nothing was captured.
    pub(super) fn end_capture(
        stream: &Arc<CudaStream>,
        ours: Option<sys::CUmodule>,
    ) -> Result<Option<(StepGraph, ChainSummary)>, DriverError> {
        stream.context().bind_to_thread()?;
        let mut graph: CUgraph = std::ptr::null_mut();
        // SAFETY: the stream is capturing (the caller began it); the graph returned is ours.
        unsafe { sys::cuStreamEndCapture(stream.cu_stream(), &mut graph) }.result()?;
        if graph.is_null() {
            return Ok(None);
        }
        let destroy = |graph| {
            // SAFETY: `graph` came from the capture and is not used after.
            let _ = unsafe { sys::cuGraphDestroy(graph) };
        };
        // SAFETY: `graph` is a live graph that nothing has instantiated yet.
        let summary = match ours.map(|module| unsafe { chain_kernels(graph, module) }) {
            Some(Err(e)) => {
                destroy(graph);
                return Err(e);
            }
            Some(Ok(summary)) => summary,
            // SAFETY: as above.
            None => match unsafe { ChainSummary::of(graph) } {
                Ok(summary) => summary,
                Err(e) => {
                    destroy(graph);
                    return Err(e);
                }
            },
        };
        let mut exec: sys::CUgraphExec = std::ptr::null_mut();
        // SAFETY: as above; the exec returned is ours.
        if let Err(e) = unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) }.result() {
            destroy(graph);
            return Err(e);
        }
        Ok(Some((
            StepGraph {
                graph,
                exec,
                stream: stream.clone(),
            },
            summary,
        )))
    }

    pub(super) fn launch(&self) -> Result<(), DriverError> {
        self.stream.context().bind_to_thread()?;
        // SAFETY: the exec is alive and was made on this stream's context.
        unsafe { sys::cuGraphLaunch(self.exec, self.stream.cu_stream()) }.result()
    }
}

impl Drop for StepGraph {
    fn drop(&mut self) {
        let _ = self.stream.context().bind_to_thread();
        // SAFETY: both are ours and dropped once; the stream's queued launches keep what they
        // need (the driver defers the release of an exec still running).
        unsafe {
            let _ = sys::cuGraphExecDestroy(self.exec);
            let _ = sys::cuGraphDestroy(self.graph);
        }
    }
}

// SAFETY: the graph and its exec are only used by the thread running the forward, under the
// graphs' mutex; CUDA objects may be used from any thread with the context bound.
unsafe impl Send for StepGraph {}

/// What a step's graph holds once instantiated.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct ChainSummary {
    pub(super) kernels: usize,
    pub(super) other_nodes: usize,
    pub(super) edges: usize,
    pub(super) programmatic_edges: usize,
}

impl ChainSummary {
    /// # Safety
    /// `graph` must be a live graph.
    unsafe fn of(graph: CUgraph) -> Result<Self, DriverError> {
        let nodes = unsafe { graph_nodes(graph) }?;
        let mut summary = ChainSummary::default();
        for &node in &nodes {
            if unsafe { node_kind(node) }? == CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL {
                summary.kernels += 1;
            } else {
                summary.other_nodes += 1;
            }
        }
        let (_, _, data) = unsafe { graph_edges(graph) }?;
        summary.edges = data.len();
        summary.programmatic_edges = data.iter().filter(|d| is_programmatic(d)).count();
        Ok(summary)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Alloc,
    Free,
    Kernel { ours: bool },
    Other,
}

impl Kind {
    fn is_memory(self) -> bool {
        matches!(self, Kind::Alloc | Kind::Free)
    }
}

fn is_programmatic(data: &CUgraphEdgeData) -> bool {
    u32::from(data.type_)
        == sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u32
}

fn default_edge() -> CUgraphEdgeData {
    CUgraphEdgeData {
        from_port: 0,
        to_port: 0,
        type_: 0,
        reserved: [0; 5],
    }
}

/// Rewires `graph` as the module documentation says; the kernels of module `ours` get the
/// programmatic edges.
///
/// # Safety
/// `graph` must be a live graph not yet instantiated, every kernel of `ours` in it captured
/// from a programmatic launch of a kernel that waits (`pdl_wait`) before touching memory.
pub(super) unsafe fn chain_kernels(
    graph: CUgraph,
    ours: sys::CUmodule,
) -> Result<ChainSummary, DriverError> {
    let nodes = unsafe { graph_nodes(graph) }?;
    let index: HashMap<usize, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, &node)| (node as usize, i))
        .collect();
    let mut kinds = Vec::with_capacity(nodes.len());
    for &node in &nodes {
        kinds.push(match unsafe { node_kind(node) }? {
            CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_ALLOC => Kind::Alloc,
            CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_FREE => Kind::Free,
            CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL => Kind::Kernel {
                ours: unsafe { kernel_module(node) }? == Some(ours),
            },
            _ => Kind::Other,
        });
    }
    let (from, to, data) = unsafe { graph_edges(graph) }?;
    // The programmatic edge as capture writes it, else the documented one.
    let programmatic = data
        .iter()
        .copied()
        .find(is_programmatic)
        .unwrap_or(CUgraphEdgeData {
            from_port: sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8,
            to_port: 0,
            type_: sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8,
            reserved: [0; 5],
        });
    let mut deps: Vec<Vec<(usize, CUgraphEdgeData)>> = vec![Vec::new(); nodes.len()];
    for ((&f, &t), &d) in from.iter().zip(&to).zip(&data) {
        deps[index[&(t as usize)]].push((index[&(f as usize)], d));
    }

    let mut rewired: Vec<Vec<(usize, CUgraphEdgeData)>> = vec![Vec::new(); nodes.len()];
    for node in 0..nodes.len() {
        if kinds[node] == Kind::Alloc {
            continue;
        }
        let mut kept: HashMap<usize, CUgraphEdgeData> = HashMap::new();
        // An ordinary edge wins over a programmatic one to the same node.
        let mut keep = |from: usize, edge: CUgraphEdgeData| {
            kept.entry(from)
                .and_modify(|e| {
                    if !is_programmatic(&edge) {
                        *e = edge;
                    }
                })
                .or_insert(edge);
        };
        let mut seen = HashSet::new();
        let mut walk = Vec::new();
        for &(d, edge) in &deps[node] {
            if kinds[d].is_memory() {
                walk.push(d);
            } else {
                keep(d, edge);
            }
        }
        while let Some(m) = walk.pop() {
            if !seen.insert(m) {
                continue;
            }
            if kinds[m] == Kind::Alloc {
                keep(m, default_edge());
            }
            for &(d, _) in &deps[m] {
                if kinds[d].is_memory() {
                    walk.push(d);
                } else {
                    let edge = match (kinds[node], kinds[d]) {
                        (Kind::Kernel { ours: true }, Kind::Kernel { .. }) => programmatic,
                        _ => default_edge(),
                    };
                    keep(d, edge);
                }
            }
        }
        rewired[node] = kept.into_iter().collect();
    }

    if !from.is_empty() {
        unsafe {
            sys::cuGraphRemoveDependencies_v2(
                graph,
                from.as_ptr(),
                to.as_ptr(),
                data.as_ptr(),
                from.len(),
            )
        }
        .result()?;
    }
    let (mut new_from, mut new_to, mut new_data) = (Vec::new(), Vec::new(), Vec::new());
    for (node, list) in rewired.iter().enumerate() {
        for &(d, edge) in list {
            new_from.push(nodes[d]);
            new_to.push(nodes[node]);
            new_data.push(edge);
        }
    }
    if !new_from.is_empty() {
        unsafe {
            sys::cuGraphAddDependencies_v2(
                graph,
                new_from.as_ptr(),
                new_to.as_ptr(),
                new_data.as_ptr(),
                new_from.len(),
            )
        }
        .result()?;
    }
    unsafe { ChainSummary::of(graph) }
}

/// # Safety
/// `graph` must be a live graph.
unsafe fn graph_nodes(graph: CUgraph) -> Result<Vec<CUgraphNode>, DriverError> {
    let mut count = 0usize;
    unsafe { sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut count) }.result()?;
    let mut nodes = vec![std::ptr::null_mut(); count];
    unsafe { sys::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut count) }.result()?;
    nodes.truncate(count);
    Ok(nodes)
}

/// Every edge of `graph`: (from, to, data).
///
/// # Safety
/// `graph` must be a live graph.
#[allow(clippy::type_complexity)]
unsafe fn graph_edges(
    graph: CUgraph,
) -> Result<(Vec<CUgraphNode>, Vec<CUgraphNode>, Vec<CUgraphEdgeData>), DriverError> {
    let mut count = 0usize;
    let (no_nodes, no_data) = (std::ptr::null_mut(), std::ptr::null_mut());
    unsafe { sys::cuGraphGetEdges_v2(graph, no_nodes, no_nodes, no_data, &mut count) }.result()?;
    let mut from = vec![std::ptr::null_mut(); count];
    let mut to = vec![std::ptr::null_mut(); count];
    let mut data = vec![default_edge(); count];
    unsafe {
        sys::cuGraphGetEdges_v2(
            graph,
            from.as_mut_ptr(),
            to.as_mut_ptr(),
            data.as_mut_ptr(),
            &mut count,
        )
    }
    .result()?;
    from.truncate(count);
    to.truncate(count);
    data.truncate(count);
    Ok((from, to, data))
}

/// # Safety
/// `node` must be a node of a live graph.
unsafe fn node_kind(node: CUgraphNode) -> Result<CUgraphNodeType, DriverError> {
    let mut kind = CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
    unsafe { sys::cuGraphNodeGetType(node, &mut kind) }.result()?;
    Ok(kind)
}

/// The module of a kernel node's function; `None` for a kernel given as a library kernel
/// (cuBLAS' may be).
///
/// # Safety
/// `node` must be a kernel node of a live graph.
unsafe fn kernel_module(node: CUgraphNode) -> Result<Option<sys::CUmodule>, DriverError> {
    // SAFETY: an all-zero parameter struct is valid; the driver fills it.
    let mut params: sys::CUDA_KERNEL_NODE_PARAMS = unsafe { std::mem::zeroed() };
    unsafe { sys::cuGraphKernelNodeGetParams_v2(node, &mut params) }.result()?;
    if params.func.is_null() {
        return Ok(None);
    }
    let mut module: sys::CUmodule = std::ptr::null_mut();
    match unsafe { sys::cuFuncGetModule(&mut module, params.func) }.result() {
        Ok(()) => Ok(Some(module)),
        Err(_) => Ok(None),
    }
}
