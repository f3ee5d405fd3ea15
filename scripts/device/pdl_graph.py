"""Programmatic dependent launch (PDL) inside a captured CUDA graph, on a batch-1 decode step's
projections (Llama-3.1-8B shapes, FP8 weights, bf16 lm_head; the production GEMVs, one launch
a projection, as persistent_step.py builds them).

The question: a captured decode step keeps a programmatic edge only between two kernels that
follow each other directly, and the stream-ordered allocator puts an allocation or a free
between most pairs. How much does a chain of programmatic edges gain in a replayed graph, and
does it survive memory nodes when each allocation is captured off the chain (no dependencies:
the graph's start) and each free is left as a leaf (nothing depends on it)?

Variants (with each block's trigger right after its wait, as the kernels are, or at exit), each captured from the same launches and checked bitwise against eager launches:
  plain          ordinary launches (what a captured step is today without memory nodes)
  pdl            every launch programmatic, no memory nodes
  plain+mem      ordinary launches, an allocation before and a free after every kernel
  pdl+mem        programmatic launches with the memory nodes in the chain (today's capture)
  pdl+mem-off    programmatic launches, allocations at the graph's start, frees as leaves

Runs on the device machine (python3 with CuPy; NVRTC from the CUDA toolkit there):
    NVRTC_DIR=/usr/local/cuda python3 scripts/device/pdl_graph.py [--layers 32] [--iters 50]
"""
import argparse
import ctypes
import os
import sys
import tempfile

import cupy as cp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from persistent_step import PHASE_FP8, PHASE_FP8_SILU, Step, copy_rate, time_steps  # noqa: E402
import nvrtc_check  # noqa: E402  (on the path persistent_step gives)

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
TRIGGER = 'asm volatile("griddepcontrol.launch_dependents;" ::: "memory");'

cuda = ctypes.CDLL("libcuda.so.1")
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1
CU_STREAM_SET_CAPTURE_DEPENDENCIES = 1
CU_STREAM_ADD_CAPTURE_DEPENDENCIES = 0


class LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("value", ctypes.c_uint8 * 64)]


class LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("gridDimX", ctypes.c_uint32), ("gridDimY", ctypes.c_uint32), ("gridDimZ", ctypes.c_uint32),
        ("blockDimX", ctypes.c_uint32), ("blockDimY", ctypes.c_uint32), ("blockDimZ", ctypes.c_uint32),
        ("sharedMemBytes", ctypes.c_uint32), ("hStream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(LaunchAttribute)), ("numAttrs", ctypes.c_uint32),
    ]


class EdgeData(ctypes.Structure):
    _fields_ = [("from_port", ctypes.c_uint8), ("to_port", ctypes.c_uint8), ("type", ctypes.c_uint8),
                ("reserved", ctypes.c_uint8 * 5)]


def check(rc, what):
    if rc != 0:
        name = ctypes.c_char_p()
        cuda.cuGetErrorName(rc, ctypes.byref(name))
        raise RuntimeError(f"{what}: {name.value.decode() if name.value else rc}")


def launch(func, grid, args, stream, programmatic):
    """cuLaunchKernelEx of `func` with `args` (ctypes values), marked programmatic or not."""
    attr = LaunchAttribute()
    attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value[0] = 1
    cfg = LaunchConfig(grid, 1, 1, 256, 1, 1, 0, ctypes.c_void_p(stream.ptr),
                       ctypes.pointer(attr) if programmatic else None, 1 if programmatic else 0)
    params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
    check(cuda.cuLaunchKernelEx(ctypes.byref(cfg), ctypes.c_void_p(func.kernel.ptr), params, None), "cuLaunchKernelEx")


def capture_deps(stream):
    """The capture's current dependencies: (nodes, edge data or None)."""
    status, cid, graph = ctypes.c_int(), ctypes.c_uint64(), ctypes.c_void_p()
    deps, edges, count = ctypes.POINTER(ctypes.c_void_p)(), ctypes.POINTER(EdgeData)(), ctypes.c_size_t()
    check(cuda.cuStreamGetCaptureInfo_v3(ctypes.c_void_p(stream.ptr), ctypes.byref(status), ctypes.byref(cid),
                                         ctypes.byref(graph), ctypes.byref(deps), ctypes.byref(edges),
                                         ctypes.byref(count)), "cuStreamGetCaptureInfo_v3")
    nodes = [deps[i] for i in range(count.value)]
    data = [EdgeData.from_buffer_copy(edges[i]) for i in range(count.value)] if edges else None
    return nodes, data


def set_deps(stream, nodes, data, flags=CU_STREAM_SET_CAPTURE_DEPENDENCIES):
    arr = (ctypes.c_void_p * max(len(nodes), 1))(*nodes)
    edata = (EdgeData * max(len(nodes), 1))(*data) if data else None
    check(cuda.cuStreamUpdateCaptureDependencies_v2(ctypes.c_void_p(stream.ptr), arr, edata, len(nodes), flags),
          "cuStreamUpdateCaptureDependencies_v2")


class Memory:
    """Allocations and frees between kernels, in the chain or off it."""

    def __init__(self, stream, off_chain):
        self.stream, self.off_chain, self.leaves = stream, off_chain, []

    def alloc(self, size):
        ptr = ctypes.c_uint64()
        if not self.off_chain:
            check(cuda.cuMemAllocAsync(ctypes.byref(ptr), ctypes.c_size_t(size), ctypes.c_void_p(self.stream.ptr)),
                  "cuMemAllocAsync")
            return ptr.value
        nodes, data = capture_deps(self.stream)
        set_deps(self.stream, [], None)
        check(cuda.cuMemAllocAsync(ctypes.byref(ptr), ctypes.c_size_t(size), ctypes.c_void_p(self.stream.ptr)),
              "cuMemAllocAsync")
        alloc_node, _ = capture_deps(self.stream)
        set_deps(self.stream, nodes + alloc_node, (data + [EdgeData()] * len(alloc_node)) if data else None)
        return ptr.value

    def free(self, ptr):
        if not self.off_chain:
            check(cuda.cuMemFreeAsync(ctypes.c_uint64(ptr), ctypes.c_void_p(self.stream.ptr)), "cuMemFreeAsync")
            return
        nodes, data = capture_deps(self.stream)
        check(cuda.cuMemFreeAsync(ctypes.c_uint64(ptr), ctypes.c_void_p(self.stream.ptr)), "cuMemFreeAsync")
        free_node, _ = capture_deps(self.stream)
        self.leaves += free_node
        set_deps(self.stream, nodes, data)


def launch_step(mod, step, stream, programmatic, memory):
    fp8 = mod.get_function("step_gemv_fp8_bf16")
    silu = mod.get_function("gemv_fp8_silu_m1")
    bf16 = mod.get_function("gemv_bf16_m1")
    held = None
    for w, ws, x, out, n, k, kind in step.phases:
        scratch = memory.alloc(4 * n) if memory else None
        ptr = lambda a: ctypes.c_uint64(a.data.ptr)  # noqa: E731
        if kind == PHASE_FP8:
            launch(fp8, (n + 7) // 8, [ptr(x), ptr(w), ptr(ws), ptr(out), ctypes.c_int32(n), ctypes.c_int32(k)],
                   stream, programmatic)
        elif kind == PHASE_FP8_SILU:
            f = n // 2
            launch(silu, (f + 3) // 4, [ptr(x), ptr(w), ptr(ws), ptr(out), ctypes.c_int32(f), ctypes.c_int32(k),
                                        ctypes.c_uint64(0), ctypes.c_int64(0)], stream, programmatic)
        else:
            launch(bf16, (n + 7) // 8, [ptr(x), ptr(w), ptr(out), ctypes.c_int32(n), ctypes.c_int32(k)],
                   stream, programmatic)
        if memory:
            if held is not None:
                memory.free(held)
            held = scratch
    if memory and held is not None:
        memory.free(held)


def compile_module(arch, trigger):
    """The production GEMVs (and persistent_step.cu's FP8 one); `trigger`: "early" as they are
    (each block lets the next kernel launch right after its wait), or "exit" (no explicit
    trigger: the next kernel launches once every block has exited)."""
    lib = ctypes.CDLL(nvrtc_check.find(["libnvrtc.so.1[0-9]", "libnvrtc.so"], "libnvrtc"))
    files = ["workers/kernels/common.cuh", "workers/kernels/elementwise.cu", "workers/kernels/gemv.cu",
             "workers/kernels/fp8.cu", "scripts/device/persistent_step.cu"]
    src = "".join(open(os.path.join(REPO, f)).read() + "\n" for f in files)
    assert TRIGGER in src
    if trigger == "exit":
        src = src.replace(TRIGGER, "")
    rc, log, cubin = nvrtc_check.compile_program(lib, src, arch, [])
    if rc != 0:
        sys.exit(f"NVRTC failed:\n{log}")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    return cp.RawModule(path=f.name)


def capture(mod, step, stream, programmatic, mem):
    check(cuda.cuStreamBeginCapture_v2(ctypes.c_void_p(stream.ptr), CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
          "cuStreamBeginCapture_v2")
    memory = None if mem is None else Memory(stream, mem == "off")
    launch_step(mod, step, stream, programmatic, memory)
    graph, execd = ctypes.c_void_p(), ctypes.c_void_p()
    check(cuda.cuStreamEndCapture(ctypes.c_void_p(stream.ptr), ctypes.byref(graph)), "cuStreamEndCapture")
    check(cuda.cuGraphInstantiateWithFlags(ctypes.byref(execd), graph, ctypes.c_uint64(0)),
          "cuGraphInstantiateWithFlags")
    count = ctypes.c_size_t()
    check(cuda.cuGraphGetNodes(graph, None, ctypes.byref(count)), "cuGraphGetNodes")
    edges = ctypes.c_size_t()
    check(cuda.cuGraphGetEdges_v2(graph, None, None, None, ctypes.byref(edges)), "cuGraphGetEdges_v2")
    frm = (ctypes.c_void_p * edges.value)()
    to = (ctypes.c_void_p * edges.value)()
    data = (EdgeData * edges.value)()
    check(cuda.cuGraphGetEdges_v2(graph, frm, to, data, ctypes.byref(edges)), "cuGraphGetEdges_v2")
    programmatic_edges = sum(1 for d in data if d.type != 0)
    return execd, f"{count.value} nodes, {edges.value} edges, {programmatic_edges} programmatic"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--arch", default="sm_90a")
    args = ap.parse_args()
    check(cuda.cuInit(0), "cuInit")
    dev = cp.cuda.Device(0)
    print(f"device: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, "
          f"{dev.attributes['MultiProcessorCount']} multiprocessors")
    stream = cp.cuda.Stream(non_blocking=True)
    cp.random.seed(7)
    step = Step(args.layers)
    rate = copy_rate(stream)
    floor_ms = step.bytes / rate * 1e3
    print(f"weights {step.bytes / 1e9:.3f} GB; copy rate {rate / 1e12:.2f} TB/s; floor {floor_ms:.3f} ms")
    mods = {t: compile_module(args.arch, t) for t in ("early", "exit")}

    step.poison()
    launch_step(mods["early"], step, stream, False, None)
    stream.synchronize()
    reference = step.snapshot()

    variants = [("plain", False, None, "early"), ("pdl", True, None, "early"),
                ("pdl, trigger at exit", True, None, "exit"), ("plain+mem", False, "chain", "early"),
                ("pdl+mem", True, "chain", "early"), ("pdl+mem-off", True, "off", "early"),
                ("pdl+mem-off, trigger at exit", True, "off", "exit")]
    graphs = []
    for name, programmatic, mem, trigger in variants:
        mod = mods[trigger]
        execd, shape = capture(mod, step, stream, programmatic, mem)
        step.poison()
        check(cuda.cuGraphLaunch(execd, ctypes.c_void_p(stream.ptr)), "cuGraphLaunch")
        stream.synchronize()
        diff = sum(int((g != r).sum()) for g, r in zip(step.snapshot(), reference))
        graphs.append((name, execd, shape, diff))
        print(f"  {name}: {shape}; {diff} bytes differ from eager", flush=True)

    times = {name: [] for name, *_ in graphs}
    for _ in range(3):  # rounds, variants alternating
        for name, execd, _, _ in graphs:
            med, _ = time_steps(lambda e=execd: check(cuda.cuGraphLaunch(e, ctypes.c_void_p(stream.ptr)), "launch"),
                                args.iters, stream)
            times[name].append(med)
    print()
    print(f"| {args.layers} layers' projections + lm_head, batch 1 | graph | ms (median of {args.iters}, "
          f"three rounds) | / floor | check |")
    print("|---|---|---|---:|---|")
    for name, _, shape, diff in graphs:
        t = times[name]
        print(f"| {name} | {shape} | {' / '.join(f'{x:.3f}' for x in t)} | {min(t) / floor_ms:.2f} | "
              f"{diff} bytes differ |")
    print(f"| floor: {step.bytes / 1e9:.3f} GB at {rate / 1e12:.2f} TB/s | | {floor_ms:.3f} | 1.00 | |")


if __name__ == "__main__":
    main()
