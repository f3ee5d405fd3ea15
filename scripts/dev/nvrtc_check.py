"""Compile tandem's kernels with NVRTC on a machine without a GPU: ptxas's register and spill
report, and (with --sass) a kernel's machine code and its instruction mix, so that a kernel
change can be weighed (registers, occupancy, instructions a loop) before device time is spent.

usage: nvrtc_check.py [--repo DIR] [--arch sm_90|sm_90a] [--filter TEXT] [--sass KERNEL [--full]]
                      [--extra FILE] [DEFINE ...]

  DEFINE: NAME=VALUE, as TANDEM_KERNEL_DEFINES passes them (e.g. DM_STAGES_FP8=4).
  --filter: the kernels whose report lines are printed (a substring; default: all).
  --sass KERNEL: disassemble that kernel (its exact name, e.g.
    paged_decode_mma_fp8_persistent_d128) with cuobjdump and print its opcodes by count;
    --full prints the listing too.
  --extra FILE: a kernel file compiled after the workers' own (an experiment that calls their
    device functions, e.g. scripts/device/persistent_step.cu).

Libraries, found under $NVRTC_DIR (default /tmp/nvrtc), else installed there, all in one
command into an empty folder (pip --target skips, or with --upgrade replaces, the `nvidia`
folder an earlier install left there):
  python3 -m pip install --target /tmp/nvrtc nvidia-cuda-nvrtc-cu12 nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
(the wheels of NVIDIA's CUDA components; nothing else of CUDA is needed; nvdisasm is what
cuobjdump runs for --sass).
"""
import argparse
import collections
import ctypes
import glob
import os
import re
import subprocess
import sys
import tempfile


def find(pattern_list, what):
    root = os.environ.get("NVRTC_DIR", "/tmp/nvrtc")
    for pattern in pattern_list:
        hits = sorted(glob.glob(os.path.join(root, "**", pattern), recursive=True))
        if hits:
            return hits[-1]
    sys.exit(f"{what} not found under {root}: see this script's usage for the pip command")


def sources(repo):
    """The kernel files in the order the backend compiles them (kernels.rs's SOURCES)."""
    kernels_rs = open(os.path.join(repo, "workers/src/backend/cuda/kernels.rs")).read()
    names = re.findall(r'include_str!\("\.\./\.\./\.\./kernels/([\w.]+)"\)', kernels_rs)
    return "".join(
        f"// ---- {n}\n{open(os.path.join(repo, 'workers/kernels', n)).read()}\n" for n in names
    )


def compile_program(lib, src, arch, defines):
    """(return code, ptxas log, cubin bytes or None)."""
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"tandem.cu", 0, None, None) == 0
    opts = [f"--gpu-architecture={arch}", "--std=c++17", "-default-device", "--ptxas-options=-v"]
    opts += [f"-D{d}" for d in defines]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    cubin = None
    if rc == 0:
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, buf)
        cubin = buf.raw
    return rc, log.value.decode(errors="replace"), cubin


def report(log, rc, want):
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1)
        interesting = "Used" in line or "spill" in line or "error" in line
        if rc != 0 or "arning" in line or (current and want in current and interesting):
            print(current, line.strip())


def sass(cubin, kernel, full):
    cuobjdump = find(["cuobjdump"], "cuobjdump")
    # cuobjdump -sass runs nvdisasm, looked for on PATH or at NVDISASM_PATH.
    env = dict(os.environ)
    env.setdefault("NVDISASM_PATH", os.path.dirname(find(["nvdisasm"], "nvdisasm")))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        run = subprocess.run(
            [cuobjdump, "-sass", "-fun", kernel, f.name], capture_output=True, text=True, env=env
        )
        if run.returncode != 0:
            sys.exit(f"cuobjdump failed ({run.returncode}): {run.stderr.strip()}")
        listing = run.stdout
    # Instruction lines: /*0a10*/  [@P0] OPCODE.MODIFIERS operands ;
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", listing, re.M)
    if not ops:
        sys.exit(f"no machine code for {kernel} (the exact kernel name; --arch sm_90a for wgmma ones)")
    if full:
        print(listing)
    counts = collections.Counter(ops)
    print(f"{kernel}: {len(ops)} instructions")
    for op, n in counts.most_common():
        print(f"  {n:6d} {op}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=os.path.join(os.path.dirname(__file__), "..", ".."))
    parser.add_argument("--arch", default=os.environ.get("ARCH", "sm_90a"))
    parser.add_argument("--filter", default="")
    parser.add_argument("--sass")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--extra")
    parser.add_argument("defines", nargs="*")
    args = parser.parse_args()
    lib = ctypes.CDLL(find(["libnvrtc.so.1[0-9]", "libnvrtc.so"], "libnvrtc"))
    source = sources(args.repo)
    if args.extra:
        source += f"// ---- {args.extra}\n{open(args.extra).read()}\n"
    rc, log, cubin = compile_program(lib, source, args.arch, args.defines)
    report(log, rc, args.filter if not args.sass else args.sass)
    print("rc", rc)
    if rc != 0:
        sys.exit(1)
    if args.sass:
        sass(cubin, args.sass, args.full)


if __name__ == "__main__":
    main()
