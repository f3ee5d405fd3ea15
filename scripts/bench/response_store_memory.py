#!/usr/bin/env python3
"""The Responses API's response store under a bound: how much memory the api-server takes for
what it stores, and that it stays bounded once the store is full.

Sends REQUESTS responses (`store: true`, each with an input of about INPUT_BYTES of text and
one output token) to a running deployment, CONCURRENCY at a time, and samples the api-server's
resident memory (its /proc status) and the store's metrics (`tandem_response_store_responses`,
`_bytes`, `_evictions_total`) before, every STEP responses and at the end. Prints one JSON line
a sample, with the `store` values the responses said (`[true]` while the store is on, `[false]`
with `--response-store-mib 0`, the control).

usage: response_store_memory.py BASE_URL API_SERVER_PID [REQUESTS] [INPUT_BYTES] [CONCURRENCY] [STEP]
"""

import concurrent.futures
import json
import sys
import urllib.request


def post(base, body):
    request = urllib.request.Request(base + "/responses", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.load(reply)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def store_metrics(base):
    root = base.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(root + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("tandem_response_store_responses", "tandem_response_store_bytes",
                     "tandem_response_store_evictions_total"):
            if line.startswith(name + " "):
                values[name.removeprefix("tandem_response_store_")] = float(line.split()[1])
    return values


def main():
    base, pid = sys.argv[1].rstrip("/"), int(sys.argv[2])
    requests = int(sys.argv[3]) if len(sys.argv) > 3 else 4000
    input_bytes = int(sys.argv[4]) if len(sys.argv) > 4 else 2000
    concurrency = int(sys.argv[5]) if len(sys.argv) > 5 else 8
    step = int(sys.argv[6]) if len(sys.argv) > 6 else 500
    words = "the quick brown fox jumps over the lazy dog ".split()

    def one(i):
        text = " ".join(words[(i + k) % len(words)] for k in range(input_bytes // 5))[:input_bytes]
        response = post(base, {"input": f"{i}: {text}", "max_output_tokens": 1, "temperature": 0})
        return response["store"]

    stored = set()

    def sample(sent):
        print(json.dumps({"sent": sent, "stored": sorted(stored), "rss_kib": rss_kib(pid),
                          **store_metrics(base)}), flush=True)

    sample(0)
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for start in range(0, requests, step):
            stored.update(pool.map(one, range(start, min(start + step, requests))))
            sample(min(start + step, requests))


main()
