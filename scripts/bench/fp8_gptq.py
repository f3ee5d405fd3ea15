#!/usr/bin/env python3
# Experiment (not a feature: docs/benchmarks.md, "GPTQ rounding of the FP8 weights"): whether
# choosing FP8 (e4m3, per-channel) weight codes by GPTQ's error feedback instead of rounding
# each weight to its nearest code brings SmolLM2's perplexity with FP8 weights closer to bf16.
# 1. A numpy forward of the bf16 model (Llama layers) over calibration text that is not among
#    the scored texts, summing X^T X of every projection's input (qkv, o, gate_up, down);
# 2. for every FP8 projection of a `model-prep quantize` directory (its scales kept), codes
#    chosen column by column with the error fed forward (optionally in the order of the
#    Hessian's diagonal), written in place of the round-to-nearest codes in a copy.
# Needs numpy and the `tokenizers` wheel (pip install tokenizers).
# Usage: scripts/bench/fp8_gptq.py BF16_DIR FP8_DIR OUT_DIR [--tokens N] [--act-order] [--damp D]
import json, struct, sys, os, shutil, argparse
import numpy as np
from tokenizers import Tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("bf16"); ap.add_argument("fp8"); ap.add_argument("out")
ap.add_argument("--tokens", type=int, default=4096)
ap.add_argument("--seq", type=int, default=1024)
ap.add_argument("--act-order", action="store_true")
ap.add_argument("--damp", type=float, default=0.01)
ap.add_argument("--texts", nargs="*", default=[
    "/usr/share/perl/5.36.0/Locale/Maketext/TPJ13.pod",
    "/usr/share/common-licenses/Artistic",
    "/usr/share/common-licenses/CC0-1.0"])
args = ap.parse_args()

def read_st(path):
    f = open(path, "rb"); n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n)); base = 8 + n
    return header, base

def load_tensors(path):
    header, base = read_st(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for k, v in header.items():
        if k == "__metadata__": continue
        a, b = v["data_offsets"]; raw = np.array(data[base + a: base + b])
        if v["dtype"] == "BF16":
            x = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif v["dtype"] == "F32":
            x = raw.view(np.float32)
        elif v["dtype"] == "F8_E4M3":
            x = raw
        else:
            raise SystemExit(v["dtype"])
        out[k] = x.reshape(v["shape"])
    return out

cfg = json.load(open(os.path.join(args.bf16, "config.json")))
W = load_tensors(os.path.join(args.bf16, "model.safetensors"))
H_, L = cfg["hidden_size"], cfg["num_hidden_layers"]
nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]

tok = Tokenizer.from_file(os.path.join(args.bf16, "tokenizer.json"))
ids = []
for t in args.texts:
    ids += tok.encode(open(t, errors="replace").read()).ids
ids = ids[: args.tokens]
print(f"calibration: {len(ids)} tokens from {len(args.texts)} texts", flush=True)

def rms(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

def rope(x, pos):  # x [T, heads, hd], half rotation (Llama)
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.outer(pos, inv); cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

def silu(x):
    return x / (1 + np.exp(-x))

hess = {}  # (layer, name) -> X^T X (f64)
def acc(key, x):
    x = x.astype(np.float64)
    hess[key] = hess.get(key, 0) + x.T @ x

emb = W["model.embed_tokens.weight"]
for start in range(0, len(ids), args.seq):
    seq = np.array(ids[start: start + args.seq]); T = len(seq); pos = np.arange(T)
    h = emb[seq].astype(np.float32)
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
    for l in range(L):
        p = f"model.layers.{l}."
        x = rms(h, W[p + "input_layernorm.weight"]); acc((l, "qkv"), x)
        q = (x @ W[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd)
        k = (x @ W[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd)
        v = (x @ W[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd)
        q, k = rope(q, pos), rope(k, pos)
        g = nh // nkv
        att = np.empty((T, nh, hd), np.float32)
        for hh in range(nh):
            s = q[:, hh] @ k[:, hh // g].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True)); s /= s.sum(-1, keepdims=True)
            att[:, hh] = s @ v[:, hh // g]
        a = att.reshape(T, nh * hd); acc((l, "o"), a)
        h = h + a @ W[p + "self_attn.o_proj.weight"].T
        x = rms(h, W[p + "post_attention_layernorm.weight"]); acc((l, "gate_up"), x)
        m = silu(x @ W[p + "mlp.gate_proj.weight"].T) * (x @ W[p + "mlp.up_proj.weight"].T)
        acc((l, "down"), m)
        h = h + m @ W[p + "mlp.down_proj.weight"].T
    print(f"forward: tokens {start}..{start + T}", flush=True)

# e4m3 codes: value of each byte; rounding by nearest finite value (ties to the even code).
def e4m3_value(b):
    s = -1.0 if b & 0x80 else 1.0; e = (b >> 3) & 0xF; m = b & 7
    if e == 15 and m == 7: return np.nan
    if e == 0: return s * m / 8 * 2.0 ** -6
    return s * (1 + m / 8) * 2.0 ** (e - 7)
vals = np.array([e4m3_value(b) for b in range(256)])
pos_codes = np.array([b for b in range(0x7F) if not np.isnan(vals[b])])  # 0x00..0x7E
pos_vals = vals[pos_codes]  # increasing

def quant_codes(x):  # x: values already divided by the scale -> codes (uint8)
    a = np.minimum(np.abs(x), 448.0)
    i = np.clip(np.searchsorted(pos_vals, a), 1, len(pos_vals) - 1)
    lo, hi = pos_vals[i - 1], pos_vals[i]
    pick_hi = (a - lo > hi - a) | ((a - lo == hi - a) & (pos_codes[i] % 2 == 0))
    c = np.where(pick_hi, pos_codes[i], pos_codes[i - 1]).astype(np.uint8)
    neg = (x < 0) & (c != 0)
    return np.where(neg, c | 0x80, c).astype(np.uint8)

def gptq(Wm, scale, Hm, block=128):
    Wm = Wm.astype(np.float64).copy(); n = Wm.shape[1]
    Hm = Hm.copy()
    dead = np.diag(Hm) == 0
    Hm[dead, dead] = 1; Wm[:, dead] = 0
    perm = np.argsort(-np.diag(Hm)) if args.act_order else np.arange(n)
    Wm, Hm = Wm[:, perm], Hm[perm][:, perm]
    Hm += args.damp * np.mean(np.diag(Hm)) * np.eye(n)
    Hinv = np.linalg.cholesky(np.linalg.inv(Hm)).T  # upper
    codes = np.zeros(Wm.shape, np.uint8)
    s = scale[:, None]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = Wm[:, i1:i2].copy(); E1 = np.zeros_like(W1); Hi = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            c = quant_codes(w / scale)
            qv = vals[c] * scale
            codes[:, i1 + i] = c
            err = (w - qv) / Hi[i, i]
            W1[:, i:] -= np.outer(err, Hi[i, i:])
            E1[:, i] = err
        Wm[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    out = np.zeros_like(codes); out[:, perm] = codes
    return out

shutil.copytree(args.fp8, args.out, dirs_exist_ok=True)
st = os.path.join(args.out, "model.safetensors")
header, base = read_st(st)
F = load_tensors(os.path.join(args.fp8, "model.safetensors"))
mm = np.memmap(st, dtype=np.uint8, mode="r+")
groups = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv",
          "self_attn.o_proj": "o", "mlp.gate_proj": "gate_up", "mlp.up_proj": "gate_up",
          "mlp.down_proj": "down"}
changed = total = 0
errs = []
for l in range(L):
    for name, g in groups.items():
        key = f"model.layers.{l}.{name}.weight"
        if header[key]["dtype"] != "F8_E4M3": continue
        scale = F[key + "_scale"].reshape(-1).astype(np.float64)
        Wb = W[key]
        codes = gptq(Wb, scale, hess[(l, g)])
        rtn = F[key]
        changed += int((codes != rtn).sum()); total += codes.size
        # output error on the calibration Hessian, relative: tr(dW H dW^T) / tr(W H W^T)
        Hm = hess[(l, g)]
        def out_err(c):
            d = vals[c] * scale[:, None] - Wb
            return np.einsum("ij,jk,ik->", d, Hm, d) / np.einsum("ij,jk,ik->", Wb, Hm, Wb)
        errs.append((key, out_err(rtn), out_err(codes)))
        a, b = header[key]["data_offsets"]
        mm[base + a: base + b] = codes.reshape(-1)
    print(f"layer {l}: done", flush=True)
mm.flush()
r = np.array([e[1] for e in errs]); q = np.array([e[2] for e in errs])
print(f"codes changed: {changed}/{total} ({100 * changed / total:.2f}%)")
print(f"relative output error on the calibration text, mean over projections: RTN {r.mean():.3e}, GPTQ {q.mean():.3e} ({q.mean() / r.mean():.2f}x)")
