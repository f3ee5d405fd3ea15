"""A batch-1 decode step's projections (Llama-3.1-8B shapes, FP8 weights, bf16 lm_head) as one
launch per projection in a CUDA graph (the production GEMVs), against one resident grid with a
grid-wide barrier between projections (persistent_step.cu), with and without the next
projection's first weights loaded before each barrier. Checks that both give the same bits,
then times each (median of CUDA-event timed steps) against the bytes floor at the copy rate.

Runs on the device machine (python3 with CuPy; NVRTC from the CUDA toolkit there):
    NVRTC_DIR=/usr/local/cuda python3 scripts/device/persistent_step.py [--layers 32] [--iters 30]
"""
import argparse
import ctypes
import os
import sys
import tempfile

import cupy as cp
import numpy as np

here = os.path.dirname(os.path.abspath(__file__))
repo = os.path.join(here, "..", "..")
sys.path.insert(0, os.path.join(repo, "scripts", "dev"))
import nvrtc_check  # noqa: E402

HIDDEN, QKV, INTER, VOCAB = 4096, 6144, 14336, 128256
PHASE_FP8, PHASE_FP8_SILU, PHASE_BF16 = 0, 1, 2
PHASE_DTYPE = np.dtype(
    [("w", "u8"), ("ws", "u8"), ("x", "u8"), ("out", "u8"), ("n", "i4"), ("k", "i4"), ("kind", "i4"), ("pad", "i4")]
)
# The persistent kernel's builds: (name, -D definitions, blocks a multiprocessor to try).
BUILDS = [
    ("w8", ["PS_WARPS=8", "PS_MIN_BLOCKS=4"], [1, 2, 3, 4]),
    ("w16", ["PS_WARPS=16", "PS_MIN_BLOCKS=2"], [2]),
    ("w32", ["PS_WARPS=32", "PS_MIN_BLOCKS=1"], [1]),
]


def compile_module(defines, arch):
    lib = ctypes.CDLL(nvrtc_check.find(["libnvrtc.so.1[0-9]", "libnvrtc.so"], "libnvrtc"))
    files = ["common.cuh", "elementwise.cu", "gemv.cu", "fp8.cu"]
    src = "".join(open(os.path.join(repo, "workers", "kernels", f)).read() + "\n" for f in files)
    src += open(os.path.join(here, "persistent_step.cu")).read()
    rc, log, cubin = nvrtc_check.compile_program(lib, src, arch, defines)
    for line in log.splitlines():
        if "step_persistent" in line or "error" in line or ("Used" in line and rc != 0):
            print("   ", line.strip())
    if rc != 0:
        sys.exit(f"NVRTC failed:\n{log}")
    report = [l.strip() for l in log.splitlines()]
    regs = [l for i, l in enumerate(report) if "Used" in l]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    return cp.RawModule(path=f.name), regs


def random_fp8(rows, cols):
    codes = cp.random.randint(0, 256, size=(rows, cols), dtype=cp.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # the two NaN codes
    return codes


def random_bf16(shape, scale):
    f = (cp.random.standard_normal(shape, dtype=cp.float32) * scale).astype(cp.float32)
    return (f.view(cp.uint32) >> 16).astype(cp.uint16)


class Step:
    """The weights, activations and phase table of one step."""

    def __init__(self, layers):
        self.phases, self.outputs, self.bytes = [], [], 0
        self.keep = []
        x = random_bf16((HIDDEN,), 1.0)
        self.keep.append(x)
        for _ in range(layers):
            for n, k, kind in [(QKV, HIDDEN, PHASE_FP8), (HIDDEN, HIDDEN, PHASE_FP8),
                               (2 * INTER, HIDDEN, PHASE_FP8_SILU), (HIDDEN, INTER, PHASE_FP8)]:
                w = random_fp8(n, k)
                ws = cp.full((n,), 1.0 / (128.0 * np.sqrt(k)), dtype=cp.float32)
                out = cp.empty((n // 2 if kind == PHASE_FP8_SILU else n,), dtype=cp.uint16)
                self.add(w, ws, x, out, n, k, kind)
                self.bytes += n * k + 4 * n
                x = out[:HIDDEN] if n == QKV else out
        w = random_bf16((VOCAB, HIDDEN), 0.02)
        out = cp.empty((VOCAB,), dtype=cp.float32)
        self.add(w, None, x, out, VOCAB, HIDDEN, PHASE_BF16)
        self.bytes += 2 * VOCAB * HIDDEN
        self.table = cp.asarray(np.frombuffer(self.rows(), dtype=np.uint8))

    def add(self, w, ws, x, out, n, k, kind):
        self.keep += [w, ws, out]
        self.phases.append((w, ws, x, out, n, k, kind))
        self.outputs.append(out)

    def rows(self):
        t = np.zeros(len(self.phases), dtype=PHASE_DTYPE)
        for i, (w, ws, x, out, n, k, kind) in enumerate(self.phases):
            t[i] = (w.data.ptr, ws.data.ptr if ws is not None else 0, x.data.ptr, out.data.ptr, n, k, kind, 0)
        return t.tobytes()

    def poison(self):
        for out in self.outputs:
            out.view(cp.uint8).fill(0xFF)
        cp.cuda.Device().synchronize()

    def snapshot(self):
        return [out.view(cp.uint8).copy() for out in self.outputs]


def launch_baseline(mod, step, stream):
    fp8 = mod.get_function("step_gemv_fp8_bf16")
    silu = mod.get_function("gemv_fp8_silu_m1")
    bf16 = mod.get_function("gemv_bf16_m1")
    for w, ws, x, out, n, k, kind in step.phases:
        if kind == PHASE_FP8:
            fp8(((n + 7) // 8,), (256,), (x, w, ws, out, np.int32(n), np.int32(k)), stream=stream)
        elif kind == PHASE_FP8_SILU:
            f = n // 2
            silu(((f + 3) // 4,), (256,), (x, w, ws, out, np.int32(f), np.int32(k), np.uint64(0), np.int64(0)),
                 stream=stream)
        else:
            bf16(((n + 7) // 8,), (256,), (x, w, out, np.int32(n), np.int32(k)), stream=stream)


def time_steps(run, iters, stream):
    for _ in range(5):
        run()
    stream.synchronize()
    times = []
    for _ in range(iters):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(stream)
        run()
        b.record(stream)
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return float(np.median(times)), float(np.min(times))


def copy_rate(stream):
    n = 1 << 31
    src = cp.empty((n,), dtype=cp.uint8)
    src.fill(1)
    dst = cp.empty_like(src)

    def run():
        with stream:
            dst[...] = src

    med, _ = time_steps(run, 20, stream)
    return 2 * n / (med * 1e-3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--arch", default="sm_90a")
    args = ap.parse_args()
    dev = cp.cuda.Device(0)
    sms = dev.attributes["MultiProcessorCount"]
    print(f"device: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, {sms} multiprocessors")
    stream = cp.cuda.Stream(non_blocking=True)
    cp.random.seed(7)
    step = Step(args.layers)
    rate = copy_rate(stream)
    floor_ms = step.bytes / rate * 1e3
    print(f"weights {step.bytes / 1e9:.3f} GB; copy rate {rate / 1e12:.2f} TB/s; floor {floor_ms:.3f} ms")

    results = []
    base_mod, _ = compile_module([], args.arch)
    step.poison()
    launch_baseline(base_mod, step, stream)
    stream.synchronize()
    reference = step.snapshot()
    nan = sum(int((r.view(cp.uint16) == 0xFFFF).sum()) for r in reference[:-1])
    print(f"baseline: {nan} outputs left unwritten (poison)")
    with stream:
        stream.begin_capture()
        launch_baseline(base_mod, step, stream)
        graph = stream.end_capture()
    med, best = time_steps(lambda: graph.launch(stream), args.iters, stream)
    results.append(("graph of one launch per projection", med, best, "-"))

    counter = cp.zeros((1,), dtype=cp.uint32)
    launches = [0]
    count = len(step.phases)
    for name, defines, blocks_list in BUILDS:
        mod, regs = compile_module(defines, args.arch)
        kernel = mod.get_function("step_persistent")
        warps = int([d for d in defines if d.startswith("PS_WARPS=")][0].split("=")[1])
        for blocks in blocks_list:
            grid = sms * blocks
            for prefetch in (0, 1):
                def run(prefetch=prefetch, grid=grid):
                    base = np.uint32((launches[0] * (count - 1) * grid) & 0xFFFFFFFF)
                    kernel((grid,), (warps * 32,), (step.table, np.int32(count), counter, base, np.int32(prefetch)),
                           stream=stream)
                    launches[0] += 1
                # Each build starts its counter at zero (bases count that build's launches).
                counter.fill(0)
                launches[0] = 0
                step.poison()  # (synchronizes the device: the fills ran on the default stream)
                run()
                stream.synchronize()
                got = step.snapshot()
                diff = sum(int((g != r).sum()) for g, r in zip(got, reference))
                med, best = time_steps(run, args.iters, stream)
                label = f"persistent {name}, {blocks} block(s)/SM, prefetch {prefetch}"
                results.append((label, med, best, f"{diff} bytes differ"))
                print(f"  {label}: {med:.3f} ms ({diff} bytes differ)", flush=True)
        # The barriers alone: every phase with no rows and no input.
        empty = np.frombuffer(step.rows(), dtype=PHASE_DTYPE).copy()
        empty["n"] = 0
        empty["k"] = 0
        empty_table = cp.asarray(empty.view(np.uint8))
        grid = sms * blocks_list[-1]
        counter.fill(0)
        cp.cuda.Device().synchronize()
        launches[0] = 0

        def barriers(grid=grid):
            base = np.uint32((launches[0] * (count - 1) * grid) & 0xFFFFFFFF)
            kernel((grid,), (warps * 32,), (empty_table, np.int32(count), counter, base, np.int32(0)), stream=stream)
            launches[0] += 1

        med, best = time_steps(barriers, args.iters, stream)
        results.append((f"barriers only ({count - 1}), {name}, {blocks_list[-1]} block(s)/SM", med, best, "-"))

    print()
    print(f"| step ({args.layers} layers' projections + lm_head) | median ms | best ms | / floor | check |")
    print("|---|---:|---:|---:|---|")
    for label, med, best, check in results:
        print(f"| {label} | {med:.3f} | {best:.3f} | {med / floor_ms:.2f} | {check} |")
    print(f"| floor: {step.bytes / 1e9:.3f} GB at {rate / 1e12:.2f} TB/s | {floor_ms:.3f} | | 1.00 | |")


if __name__ == "__main__":
    main()
