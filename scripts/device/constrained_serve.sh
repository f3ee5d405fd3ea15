#!/usr/bin/env bash
# Runs on the device machine: `tandem serve -c examples/configs/gpu-1.yaml` (context and decode
# worker on one GPU, SmolLM2-135M shapes, random weights) and 64 concurrent chat requests, half
# of them under a JSON schema, so decode batches mix constrained and free rows (masks applied
# on the device, and the first token's grammar step on the context worker). Every constrained
# reply must parse and match its schema; prints a summary line. Binaries from .kit/bin.
#   source .kit/env.sh; scripts/device/constrained_serve.sh
set -uo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
model-prep random --preset smollm2-135m -o /tmp/m --seed 0 >/dev/null 2>&1 || { echo "model-prep failed"; exit 1; }
tandem serve -c examples/configs/gpu-1.yaml --model /tmp/m --port 8100 --ready-timeout-s 300 >"$out/constrained-serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 1500); do grep -q "tandem: serving" "$out/constrained-serve.log" && break; sleep 0.2; done
grep "tandem: serving" "$out/constrained-serve.log" || { echo "NOT READY"; tail -30 "$out/constrained-serve.log"; kill "$pid"; exit 1; }
python3 - <<'PY'
import concurrent.futures, json, urllib.request
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
          "sure": {"type": "boolean"}}, "required": ["answer", "sure"], "additionalProperties": False}
def ask(i):
    body = {"model": "m", "messages": [{"role": "user", "content": f"Question number {i}: is it?"}],
            "max_tokens": 48, "temperature": 0 if i % 4 < 2 else 0.8, "seed": i}
    if i % 2 == 0:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    request = urllib.request.Request("http://127.0.0.1:8100/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return i, json.load(reply)
with concurrent.futures.ThreadPoolExecutor(64) as pool:
    results = list(pool.map(ask, range(64)))
valid, free, bad = 0, 0, []
for i, r in results:
    choice = r["choices"][0]
    if i % 2:
        free += choice["finish_reason"] in ("stop", "length")
        continue
    try:
        v = json.loads(choice["message"]["content"])
        assert set(v) == {"answer", "sure"} and v["answer"] in ("yes", "no") and isinstance(v["sure"], bool)
        assert choice["finish_reason"] == "stop"
        valid += 1
    except Exception as e:
        bad.append((i, choice["message"]["content"], choice["finish_reason"], repr(e)))
print(f"constrained replies valid: {valid} of 32; free replies finished: {free} of 32")
for b in bad[:5]:
    print("BAD", b)
print("example:", results[0][1]["choices"][0]["message"]["content"])
PY
curl -sS http://127.0.0.1:8100/metrics | grep -E "^tandem_kv_transfers_total|^tandem_kv_transfer_fallbacks_total\{reason=\"(pull_failed|export_gone)\"\}"
kill -INT "$pid"; wait "$pid"; echo "launcher exit: $?"
