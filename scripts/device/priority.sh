#!/usr/bin/env bash
# Runs on a one-GPU device machine: vLLM's request `priority` through `tandem serve` with
# workers on cuda:0 that hold one sequence each (max_batch_size 1), SmolLM2-135M shapes,
# random weights, as tests/priority.rs checks it on the CPU. For each deployment (one
# aggregated worker; gpu-1.yaml's context and decode workers): a long greedy request of
# priority 1 runs, a second of priority 1 waits, then one of priority -5 arrives; it must
# finish first, the long one next, the waiting one last, every one with its full length, and
# the worker must report a preemption. The long request's text against its text alone is
# reported, not checked: a preempted request recomputes its tokens in a prefill, whose kernels
# sum in another order than the decode steps' (docs/benchmarks.md, "Correctness on the
# device"), and random weights leave near ties that such differences can flip.
# Prints one line a check and a last line `priority: N of M checks passed`.
# Binaries from .kit/bin.
#   source .kit/env.sh; scripts/device/priority.sh
set -uo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
dir=$(random_model "${PRESET:-smollm2-135m}")
passed=0
total=0
for deployment in aggregated disaggregated; do
  config="$out/priority-$deployment.yaml"
  case $deployment in
  aggregated)
    printf '%s\n' 'context_servers: { num_instances: 0 }' \
      'generation_servers: { num_instances: 1, device: "cuda:0", max_batch_size: 1, kv_cache_config: { free_gpu_memory_fraction: 0.5 } }' \
      >"$config"
    ;;
  disaggregated)
    sed 's/^  max_batch_size: 64$/  max_batch_size: 1/' examples/configs/gpu-1.yaml >"$config"
    grep -q "max_batch_size: 1$" "$config" || {
      echo "FAIL could not set the decode worker's max_batch_size"
      exit 1
    }
    ;;
  esac
  log="$out/priority-$deployment-serve.log"
  if ! serve_and_wait "$config" "$dir" 8102 "$log"; then
    echo "FAIL $deployment: not serving"
    tail -30 "$log"
    total=$((total + 1))
    continue
  fi
  python3 - "$deployment" <<'PY' | tee -a "$out/priority.txt"
import json, sys, threading, time, urllib.request

BASE = "http://127.0.0.1:8102"
deployment = sys.argv[1]
LONG = 3000

def stream(body, first=None, times=None):
    request = urllib.request.Request(BASE + "/v1/completions", json.dumps(dict(body, stream=True)).encode(),
                                     {"Content-Type": "application/json"})
    pieces, generated = [], None
    with urllib.request.urlopen(request, timeout=300) as reply:
        for line in reply:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                generated = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    pieces.append(choice["text"])
                    if times is not None:
                        times.append((time.time(), sum(map(len, pieces))))
                    if first:
                        first.set()
    return "".join(pieces), generated

def completion(prompt, max_tokens, priority):
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "priority": priority, "stream_options": {"include_usage": True}}

def preemptions():
    with urllib.request.urlopen(BASE + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tandem_worker_preemptions_total"))

long_body = completion("Write a long story about a lighthouse keeper.", LONG, 1)
started = time.time()
alone, _ = stream(long_body)
alone_s = time.time() - started
before = preemptions()
finished, texts = [], {}
first = threading.Event()
long_times = []
def run(name, body, first=None, times=None):
    texts[name] = stream(body, first, times)
    finished.append(name)
threads = [threading.Thread(target=run, args=("long", long_body, first, long_times))]
threads[0].start()
first.wait(120)
threads.append(threading.Thread(target=run, args=("waiting", completion("The weather today", 64, 1))))
threads[1].start()
time.sleep(0.3)
threads.append(threading.Thread(target=run, args=("urgent", completion("One, two, three,", 64, -5))))
threads[2].start()
for thread in threads:
    thread.join()
time.sleep(2)  # a heartbeat carries the worker's preemptions
preempted = preemptions() - before
ok = finished == ["urgent", "long", "waiting"]
print(("ok   " if ok else "FAIL ") + f"{deployment}: finished in order {finished} "
      f"(the long request alone took {alone_s:.1f} s)")
lengths = {name: count for name, (_, count) in texts.items()}
ok_len = lengths == {"long": LONG, "waiting": 64, "urgent": 64}
print(("ok   " if ok_len else "FAIL ") + f"{deployment}: token counts {lengths}")
print(("ok   " if preempted >= 1 else "FAIL ") + f"{deployment}: {preempted:.0f} preemption(s) reported")
same = texts["long"][0] == alone
prefix = next((i for i, (a, b) in enumerate(zip(texts["long"][0], alone)) if a != b), min(len(alone), len(texts["long"][0])))
# Where the long request was preempted: the longest pause in its stream (the urgent request
# ran meanwhile), as the characters streamed before it.
gaps = [(later[0] - earlier[0], earlier[1]) for earlier, later in zip(long_times, long_times[1:])]
pause_s, paused_at = max(gaps) if gaps else (0.0, 0)
print(f"info {deployment}: the long request paused {pause_s * 1000:.0f} ms after {paused_at} characters; its text "
      + ("is identical to its text alone" if same else f"differs from its text alone from character {prefix} of {len(alone)}"))
print(f"COUNTS {int(ok) + int(ok_len) + int(preempted >= 1)} 3")
PY
  kill "$served_pid"
  wait "$served_pid" 2>/dev/null
  counts=$(grep COUNTS "$out/priority.txt" | tail -1)
  passed=$((passed + $(echo "$counts" | cut -d' ' -f2)))
  total=$((total + $(echo "$counts" | cut -d' ' -f3)))
done
echo "priority: $passed of $total checks passed"
