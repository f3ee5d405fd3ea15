#!/usr/bin/env python3
"""llama.cpp's CPU speed on a GGUF, for the side-by-side in scripts/bench-cpu.

Measures what tandem's cpu_bench measures: prefill of an N-token prompt (tokens/s) and
decode at batch 1 (tokens/s), with a fixed thread count. Prints one JSON object.

Needs llama-cpp-python (pip install llama-cpp-python; it builds llama.cpp from source).
Usage: llamacpp_cpu.py GGUF [--threads 2] [--prompt-tokens 512] [--decode-tokens 64] [--repeats 3]
"""
import argparse
import json
import time

from llama_cpp import Llama


def main():
    p = argparse.ArgumentParser()
    p.add_argument("gguf")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    llm = Llama(
        model_path=a.gguf,
        n_ctx=a.prompt_tokens + a.decode_tokens + 16,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        # scores has n_batch rows when logits_all is off; keep room for every position.
        n_batch=a.prompt_tokens + a.decode_tokens + 16,
        verbose=False,
    )
    vocab = llm.n_vocab()
    # A fixed pseudo-random prompt of ordinary tokens (ids 100..vocab-100), the same every run.
    prompt = [100 + (i * 7919) % (vocab - 200) for i in range(a.prompt_tokens)]

    prefill_s, decode_s = [], []
    for _ in range(a.repeats + 1):  # first round is warm-up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        token = prompt[-1]
        t2 = time.perf_counter()
        for _ in range(a.decode_tokens):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
        t3 = time.perf_counter()
        prefill_s.append(t1 - t0)
        decode_s.append(t3 - t2)
    # Best of the timed rounds, as tandem's cpu_bench reports.
    prefill = min(prefill_s[1:])
    decode = min(decode_s[1:])
    print(json.dumps({
        "engine": "llama.cpp (llama-cpp-python)",
        "threads": a.threads,
        "prompt_tokens": a.prompt_tokens,
        "decode_tokens": a.decode_tokens,
        "prefill_tok_s": a.prompt_tokens / prefill,
        "decode_tok_s": a.decode_tokens / decode,
    }))


if __name__ == "__main__":
    main()
