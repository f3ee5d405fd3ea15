"""Compile tandem's kernels with NVRTC here (no GPU) and print ptxas's register/spill report.
usage: nvrtc_check.py REPO_DIR [DEFINE ...]   (LD path: /tmp/nvrtc/nvidia/cu13/lib)"""
import ctypes, sys, os, re
lib = ctypes.CDLL("/tmp/nvrtc/nvidia/cu13/lib/libnvrtc.so.13")
repo = sys.argv[1]; defines = sys.argv[2:]
# The files in the order the backend compiles them (its SOURCES list in kernels.rs).
kernels_rs = open(os.path.join(repo, "workers/src/backend/cuda/kernels.rs")).read()
names = re.findall(r'include_str!\("\.\./\.\./\.\./kernels/([\w.]+)"\)', kernels_rs)
src = "".join(f"// ---- {n}\n{open(os.path.join(repo,'workers/kernels',n)).read()}\n" for n in names)
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"tandem.cu", 0, None, None) == 0
opts = ["--gpu-architecture=" + os.environ.get("ARCH","sm_90"), "--std=c++17", "-default-device", "--ptxas-options=-v"] + [f"-D{d}" for d in defines]
arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
size = ctypes.c_size_t(); lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value); lib.nvrtcGetProgramLog(prog, log)
text = log.value.decode(errors="replace")
want = os.environ.get("FILTER", "flash")
cur = None
for line in text.splitlines():
    m = re.search(r"Compiling entry function '(\w+)'", line)
    if m: cur = m.group(1)
    if rc != 0 or "arning" in line or (cur and want in cur and ("Used" in line or "spill" in line or "error" in line)):
        print(cur, line.strip())
print("rc", rc)
