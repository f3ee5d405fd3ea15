#!/usr/bin/env python3
"""The workloads of `gpu_bench bench` run with Hugging Face transformers (torch, bf16, eager),
for the side-by-side table in docs/benchmarks.md. Run on the device machine:

    python3 scripts/device/torch_bench.py --model DIR [--batches 1,8,32,128] [--context 1024]
        [--prefill 512,2048,8192] [--iters 10] [--compile] [--attention-only]

DIR is a model directory (only config.json is read: weights are random, shapes are what
matter for speed). Decode: a cache of `context` tokens per sequence (filled by a prefill), then
timed single-token steps with greedy argmax; prefill: one sequence, logits of the last position
only. Times are CUDA-event medians. --compile adds torch.compile with a static cache for decode.
"""

import argparse
import json
import statistics

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, StaticCache


def timed(fn, iters):
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", default="512,2048,8192")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--attention-only", action="store_true",
                    help="only the prefill attention rows (SDPA), without loading the model")
    args = ap.parse_args()

    config = AutoConfig.from_pretrained(args.model)
    torch.manual_seed(0)
    model = None
    if not args.attention_only:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
        model.eval()
    vocab = config.vocab_size
    rows = []
    with torch.inference_mode():
        for b in [int(x) for x in args.batches.split(",")] if model is not None else []:
            prompt = torch.randint(0, vocab, (b, args.context), device="cuda")
            cache = DynamicCache()
            out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            base_len = cache.get_seq_length()

            def step():
                o = model(nxt, past_key_values=cache, use_cache=True)
                o.logits[:, -1].argmax(-1)
                cache.crop(base_len)

            timed(step, 3)
            ms = timed(step, args.iters)
            rows.append({"workload": f"decode batch {b}, context {args.context}", "mode": "eager",
                         "median_ms": ms, "tokens_per_s": b / ms * 1e3})
            print(rows[-1], flush=True)
            del cache, out
            torch.cuda.empty_cache()
            if args.compile and b in (1, 32):
                static = StaticCache(config=config, max_batch_size=b,
                                     max_cache_len=args.context + 8, device="cuda",
                                     dtype=torch.bfloat16)
                model(prompt, past_key_values=static, use_cache=True, logits_to_keep=1,
                      cache_position=torch.arange(args.context, device="cuda"))
                fwd = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
                pos = torch.tensor([args.context], device="cuda")

                def cstep():
                    o = fwd(nxt, past_key_values=static, use_cache=True, cache_position=pos)
                    o.logits[:, -1].argmax(-1)

                timed(cstep, 5)
                ms = timed(cstep, args.iters)
                rows.append({"workload": f"decode batch {b}, context {args.context}",
                             "mode": "compile+static", "median_ms": ms,
                             "tokens_per_s": b / ms * 1e3})
                print(rows[-1], flush=True)
                del static
                torch.cuda.empty_cache()
        for n in [int(x) for x in args.prefill.split(",")] if model is not None else []:
            prompt = torch.randint(0, vocab, (1, n), device="cuda")

            def pre():
                o = model(prompt, use_cache=False, logits_to_keep=1)
                o.logits[:, -1].argmax(-1)

            timed(pre, 2)
            ms = timed(pre, max(3, args.iters // 2))
            rows.append({"workload": f"prefill {n} tokens", "mode": "eager", "median_ms": ms,
                         "tokens_per_s": n / ms * 1e3})
            print(rows[-1], flush=True)
        # Attention alone, as gpu_bench times its prefill kernel: one layer's causal
        # attention of one sequence through SDPA (the kernel transformers calls above).
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", heads)
        dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        for n in [int(x) for x in args.prefill.split(",")]:
            q = torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, kv_heads, n, dim, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(1, kv_heads, n, dim, device="cuda", dtype=torch.bfloat16)

            def attn():
                torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=kv_heads != heads)

            timed(attn, 3)
            ms = timed(attn, max(5, args.iters))
            flops = 4 * n * (n + 1) / 2 * dim * heads
            rows.append({"workload": f"prefill attention {n} tokens", "mode": "sdpa",
                         "median_ms": ms, "tokens_per_s": n / ms * 1e3,
                         "tflops": flops / ms / 1e9})
            print(rows[-1], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"{'workload':<34} {'mode':<15} {'ms':>10} {'tok/s':>10}")
    for r in rows:
        print(f"{r['workload']:<34} {r['mode']:<15} {r['median_ms']:>10.3f} {r['tokens_per_s']:>10.0f}")


if __name__ == "__main__":
    main()
