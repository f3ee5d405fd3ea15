#!/usr/bin/env python3
"""/v1/embeddings against a running server: checks, then throughput.

    python3 scripts/bench/embeddings.py http://127.0.0.1:8000 [--inputs 512] [--words 200]
        [--batch 16] [--concurrency 4] [--json OUT]

Checks first (any failure exits 1): every vector has the model's length and unit norm, an
input embedded alone is the same input embedded in a batch (within --max-batch-distance), and
`dimensions` cuts and normalizes again. Then sends `--inputs` distinct inputs of about `--words` words, `--batch`
to a request, `--concurrency` requests at a time, and prints inputs/s, prompt tokens/s and the
requests' latency. Standard library only.
"""

import argparse
import json
import math
import random
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

WORDS = (
    "the of and to in is was for on that with as by at from his her an which or be are this "
    "river stone light market winter garden engine letter island teacher harbour machine "
    "forest window summer travel number silver morning animal country water paper music"
).split()


def post(base, body):
    request = urllib.request.Request(
        base + "/v1/embeddings",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.load(response)
    return answer, time.perf_counter() - start


def text(rng, words):
    return " ".join(rng.choice(WORDS) for _ in range(words))


def distance(a, b):
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b))) / math.sqrt(sum(y * y for y in b))


def check(base, rng, words, max_batch_distance):
    inputs = [text(rng, words) for _ in range(4)]
    batch, _ = post(base, {"input": inputs})
    vectors = [d["embedding"] for d in batch["data"]]
    dims = len(vectors[0])
    failures = []
    for i, v in enumerate(vectors):
        norm = math.sqrt(sum(x * x for x in v))
        if len(v) != dims or abs(norm - 1) > 1e-3:
            failures.append(f"input {i}: {len(v)} components, norm {norm}")
    alone, _ = post(base, {"input": inputs[2]})
    alone = alone["data"][0]["embedding"]
    gap = distance(alone, vectors[2])
    if gap > max_batch_distance:
        failures.append(f"alone against in a batch: relative L2 {gap}")
    # The same input again, cut: computed as `alone` was (its prompt cached by then).
    short, _ = post(base, {"input": inputs[2], "dimensions": 32})
    v = short["data"][0]["embedding"]
    head = alone[:32]
    head_norm = math.sqrt(sum(x * x for x in head))
    cut_gap = distance(v, [x / head_norm for x in head])
    if len(v) != 32 or cut_gap > 1e-3:
        failures.append(f"dimensions 32: {len(v)} components, relative L2 {cut_gap}")
    print(f"checks: {dims} dimensions, unit norms, alone vs batch relative L2 {gap:.2e}, "
          f"dimensions 32 relative L2 {cut_gap:.2e}: {'FAILED' if failures else 'passed'}")
    for failure in failures:
        print("  " + failure)
    return dims, not failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url")
    parser.add_argument("--inputs", type=int, default=512)
    parser.add_argument("--words", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch-distance", type=float, default=5e-2,
                        help="relative L2 allowed between an input embedded alone and in a "
                             "batch (0 on the CPU; a GPU's bf16 GEMMs round by batch shape)")
    parser.add_argument("--json")
    args = parser.parse_args()
    base = args.base_url.rstrip("/").removesuffix("/v1")
    rng = random.Random(args.seed)
    dims, passed = check(base, rng, args.words, args.max_batch_distance)
    inputs = [text(rng, args.words) for _ in range(args.inputs)]
    batches = [inputs[i:i + args.batch] for i in range(0, len(inputs), args.batch)]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda b: post(base, {"input": b}), batches))
    elapsed = time.perf_counter() - start
    tokens = sum(r["usage"]["prompt_tokens"] for r, _ in results)
    latencies = sorted(latency for _, latency in results)
    summary = {
        "inputs": len(inputs),
        "prompt_tokens": tokens,
        "batch": args.batch,
        "concurrency": args.concurrency,
        "dimensions": dims,
        "seconds": round(elapsed, 3),
        "inputs_per_s": round(len(inputs) / elapsed, 1),
        "prompt_tokens_per_s": round(tokens / elapsed, 1),
        "request_latency_p50_ms": round(statistics.median(latencies) * 1e3, 1),
        "request_latency_max_ms": round(latencies[-1] * 1e3, 1),
        "checks_passed": passed,
    }
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
