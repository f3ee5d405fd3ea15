#!/usr/bin/env python3
"""Predicted outputs (OpenAI's `prediction`) against the same requests without one: the decode
rate each gets, how many draft tokens the worker kept, and whether the answers are the same.

    python3 scripts/bench/prediction.py http://127.0.0.1:8000 [--text FILE] [--requests 8]

Each request asks the model (greedy, `max_completion_tokens` tokens) to copy out one paragraph
of `--text` (by default the GPL-3 that Debian's base-files installs): the editing workload
predicted outputs are for, where most of the answer is known. Three runs of each paragraph,
one request at a time (latency, not load):
- `plain`: no prediction;
- `paragraph`: the paragraph itself as the prediction (what a client editing it sends);
- `own answer`: the plain run's answer as the prediction (every draft right: the ceiling).
The decode rate is (completion tokens - 1) over the time from the first streamed token to the
last. `--ignore-eos` runs every request to `max_completion_tokens` (models that copy badly,
random weights). Standard library only.
"""

import argparse
import json
import statistics
import sys
import time
import urllib.request


def paragraphs(path: str, count: int, min_words: int) -> list:
    text = open(path, encoding="utf-8").read()
    found = []
    for block in text.split("\n\n"):
        words = block.split()
        if len(words) >= min_words:
            found.append(" ".join(words))
        if len(found) == count:
            break
    return found


def chat(base: str, paragraph: str, max_tokens: int, ignore_eos: bool, prediction):
    body = {
        "messages": [
            {"role": "system", "content": "You copy texts exactly, with nothing before or after."},
            {"role": "user", "content": "Copy this text:\n\n" + paragraph},
        ],
        "max_completion_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if prediction is not None:
        body["prediction"] = {"type": "content", "content": prediction}
    request = urllib.request.Request(base + "/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    text, usage, first, last = "", None, None, None
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text += piece
            usage = event.get("usage") or usage
    tokens = usage["completion_tokens"]
    details = usage.get("completion_tokens_details", {})
    rate = (tokens - 1) / (last - first) if first and last > first else float("nan")
    return {"text": text, "tokens": tokens, "rate": rate,
            "accepted": details.get("accepted_prediction_tokens", 0),
            "rejected": details.get("rejected_prediction_tokens", 0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the api-server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--min-words", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--json", help="write the per-request results here")
    args = parser.parse_args()
    base = args.url.rstrip("/")
    chat(base, "Warm up.", 4, False, None)
    runs = {"plain": [], "paragraph": [], "own answer": []}
    differ = 0
    for paragraph in paragraphs(args.text, args.requests, args.min_words):
        plain = chat(base, paragraph, args.max_tokens, args.ignore_eos, None)
        runs["plain"].append(plain)
        for name, prediction in [("paragraph", paragraph), ("own answer", plain["text"])]:
            run = chat(base, paragraph, args.max_tokens, args.ignore_eos, prediction)
            runs[name].append(run)
            if run["text"] != plain["text"]:
                differ += 1
                print(f"{name}: the answer differs from the plain one", file=sys.stderr)
    base_rate = statistics.mean(r["rate"] for r in runs["plain"])
    print(f"{len(runs['plain'])} paragraphs, {args.max_tokens} tokens at most, greedy")
    print("| prediction | completion tokens (mean) | decode tok/s (mean) | speed-up "
          "| accepted / completion tokens | rejected tokens (mean) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, results in runs.items():
        tokens = statistics.mean(r["tokens"] for r in results)
        rate = statistics.mean(r["rate"] for r in results)
        accepted = sum(r["accepted"] for r in results) / max(1, sum(r["tokens"] for r in results))
        rejected = statistics.mean(r["rejected"] for r in results)
        print(f"| {name} | {tokens:.1f} | {rate:.1f} | {rate / base_rate:.2f}x "
              f"| {accepted:.0%} | {rejected:.1f} |")
    print(f"answers different from the plain run's: {differ}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(runs, out, indent=1)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
