#!/usr/bin/env python3
"""Time to first token through the API, aggregated vs disaggregated, and the KV pull time the
decode workers report (tandem_kv_transfer_seconds in /metrics).

    python3 scripts/bench/transfer_ttft.py http://127.0.0.1:8000 --prompt-tokens 512 --requests 20

Run it once against `tandem serve -c examples/configs/cpu-aggregated.yaml` and once against
`tandem serve` (1 context + 1 decode); requests go one at a time, so the numbers are latency,
not load. Standard library only.
"""

import argparse
import json
import statistics
import time
import urllib.request


def stream_ttft(base: str, prompt: str, max_tokens: int) -> float:
    body = json.dumps({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
    }).encode()
    request = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    with urllib.request.urlopen(request, timeout=300) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            content = event["choices"][0]["delta"].get("content") if event.get("choices") else None
            if content and first is None:
                first = time.perf_counter() - start
    return first


def metric_sum_count(base: str, name: str):
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    values = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(name + suffix + " "):
                values[suffix] = float(line.split()[-1])
    return values.get("_sum", 0.0), values.get("_count", 0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="approximate prompt length")
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    # About 12 tokens per sentence with SmolLM2's tokenizer.
    sentence = "The quick brown fox jumps over the lazy dog near the river. "
    prompt = sentence * max(1, args.prompt_tokens // 12) + "Summarize."
    stream_ttft(args.base, prompt, 2)  # warm-up (connections, caches)
    before = metric_sum_count(args.base, "tandem_kv_transfer_seconds")
    ttfts = [stream_ttft(args.base, prompt + f" ({i})", 2) for i in range(args.requests)]
    after = metric_sum_count(args.base, "tandem_kv_transfer_seconds")
    pulls = after[1] - before[1]
    pull_ms = 1000 * (after[0] - before[0]) / pulls if pulls else float("nan")
    print(json.dumps({
        "prompt_tokens_approx": args.prompt_tokens, "requests": args.requests,
        "ttft_ms_median": round(1000 * statistics.median(ttfts), 1),
        "ttft_ms_mean": round(1000 * statistics.mean(ttfts), 1),
        "kv_pulls": pulls, "kv_pull_ms_mean": round(pull_ms, 2),
    }))


if __name__ == "__main__":
    main()
