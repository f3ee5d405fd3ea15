#!/usr/bin/env bash
# Runs on a one-GPU device machine: vLLM's `min_p` and `min_tokens` through `tandem serve -c
# examples/configs/gpu-1.yaml` (a context and a decode worker on one GPU, SmolLM2-135M shapes,
# random weights, sampling on the device), as tests/sampling_defaults.rs checks them on the CPU:
# - a stop token forced by `logit_bias` ends a completion at once, and with `min_tokens` 4 is
#   held back on the context worker (the first token) and the decode worker, ending the 5th;
# - every token drawn with `min_p` is at least that share of the top token's probability, on
#   requests batched together (seeded, 16 at once), and without it some are not;
# - vLLM's structured_outputs `choice` and `regex` hold on 16 sampled requests at once;
# - only `allowed_token_ids` are drawn (read back by `return_tokens_as_token_ids`);
# - `prompt_logprobs` equal the logprobs `echo` gives, each with a rank;
# - `bad_words`: a banned word's tokens never drawn on 16 sampled requests at once (one word,
#   and a two-word phrase whose second token is banned only after its first), a greedy
#   completion changed exactly where a banned phrase would have been completed (the rows
#   before it on the device's path), and a ban that leaves nothing allowed a 400 naming it;
# - `request_id`: the response's id and `X-Request-Id` header carry it.
# Prints one line a check and a last line `sampling extensions: N of M checks passed`.
# Binaries from .kit/bin.
#   source .kit/env.sh; scripts/device/sampling_extensions.sh
set -uo pipefail
# shellcheck source=scripts/device/kit-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/kit-env.sh"
dir=$(random_model "${PRESET:-smollm2-135m}")
tandem serve -c examples/configs/gpu-1.yaml --model "$dir" --port 8101 --ready-timeout-s 300 \
  >"$out/sampling-extensions-serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 1500); do grep -q "tandem: serving" "$out/sampling-extensions-serve.log" && break; sleep 0.2; done
grep "tandem: serving" "$out/sampling-extensions-serve.log" || {
  echo "NOT READY"
  tail -30 "$out/sampling-extensions-serve.log"
  kill "$pid"
  exit 1
}
python3 - <<'PY' | tee "$out/sampling-extensions.txt"
import concurrent.futures, json, math, urllib.error, urllib.request

BASE = "http://127.0.0.1:8101"

def post(path, body):
    request = urllib.request.Request(BASE + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.load(reply)

passed, total = 0, 0
def check(ok, what):
    global passed, total
    total += 1
    passed += bool(ok)
    print(("ok   " if ok else "FAIL ") + what)

# A token forced by logit_bias (+100) and made a stop token: without min_tokens the completion
# is that one token (the context worker's); with min_tokens 4 it is held back for 4 tokens
# (one on the context worker, three on the decode worker) and ends the 5th.
FORCED = 1000
for prompt in ["One, two, three,", "the sea and the sky", "Once upon a time there was"]:
    base = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "logit_bias": {str(FORCED): 100},
            "stop_token_ids": [FORCED]}
    stopped = post("/v1/completions", base)
    check((stopped["usage"]["completion_tokens"], stopped["choices"][0]["finish_reason"]) == (1, "stop"),
          f"{prompt!r}: forced stop token first: {stopped['usage']['completion_tokens']} token(s), "
          f"{stopped['choices'][0]['finish_reason']}")
    held = post("/v1/completions", dict(base, min_tokens=4))
    check((held["usage"]["completion_tokens"], held["choices"][0]["finish_reason"]) == (5, "stop"),
          f"{prompt!r}: with min_tokens 4: {held['usage']['completion_tokens']} tokens, "
          f"{held['choices'][0]['finish_reason']}")

def below(seed, min_p):
    body = {"prompt": f"Story {seed}: once upon a time", "max_tokens": 32, "temperature": 1.0,
            "logprobs": 1, "seed": seed}
    if min_p is not None:
        body["min_p"] = min_p
    lp = post("/v1/completions", body)["choices"][0]["logprobs"]
    count = 0
    for drawn, best in zip(lp["token_logprobs"], lp["top_logprobs"]):
        top = next(iter(best.values()))
        count += drawn < top + math.log(min_p or 0.9) - 1e-3
    return count

MIN_P = 0.9
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    held = list(pool.map(lambda s: below(s, MIN_P), range(16)))
    free = list(pool.map(lambda s: below(s, None), range(16)))
check(sum(held) == 0, f"min_p {MIN_P}: draws below it in 16 batched requests: {sum(held)}")
check(sum(free) > 0, f"without min_p: draws below {MIN_P} of the top: {sum(free)}")

# structured_outputs on the GPU's masks: 16 requests at once, sampled, each constraint held.
COLOURS = ["red", "green", "blue"]
def constrained(i):
    body = {"prompt": f"Item {i}:", "max_tokens": 24, "temperature": 0.8, "seed": i}
    body["structured_outputs"] = {"choice": COLOURS} if i % 2 else {"regex": "[a-z]{2,8}-[0-9]{1,3}"}
    return i, post("/v1/completions", body)["choices"][0]["text"]
def holds(i, text):
    if i % 2:
        return text in COLOURS
    word, _, number = text.partition("-")
    return 2 <= len(word) <= 8 and word.isalpha() and word.islower() and 1 <= len(number) <= 3 and number.isdigit()
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    replies = list(pool.map(constrained, range(16)))
bad = [(i, text) for i, text in replies if not holds(i, text)]
check(not bad, f"structured_outputs choice and regex, 16 at once: {16 - len(bad)} of 16 hold {bad[:3]}")
# allowed_token_ids, read back through return_tokens_as_token_ids, on sampled requests at once.
ALLOWED = [1000, 2000, 3000, 4000]
def limited(i):
    body = {"prompt": f"Row {i}:", "max_tokens": 16, "temperature": 1.0, "seed": i, "logprobs": 0,
            "allowed_token_ids": ALLOWED, "return_tokens_as_token_ids": True}
    names = post("/v1/completions", body)["choices"][0]["logprobs"]["tokens"]
    return [int(name.split(":")[1]) for name in names]
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    drawn = [t for ids in pool.map(limited, range(8)) for t in ids]
check(len(drawn) == 128 and set(drawn) <= set(ALLOWED) and len(set(drawn)) > 1,
      f"allowed_token_ids: {len(drawn)} tokens drawn, ids {sorted(set(drawn))}")

# prompt_logprobs from the GPU's rows: the logprobs echo gives, each with a rank.
prompt = "The quick brown fox jumps over the lazy dog and runs into the forest"
shown = post("/v1/completions", {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 3})
shown = shown["choices"][0]["prompt_logprobs"]
echoed = post("/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 3})
echoed = echoed["choices"][0]["logprobs"]["token_logprobs"]
ids = post("/tokenize", {"prompt": prompt})["tokens"]
worst = max(abs(shown[p][str(ids[p])]["logprob"] - echoed[p]) for p in range(1, len(ids)))
ranked = all(shown[p][str(ids[p])]["rank"] >= 1 for p in range(1, len(ids)))
check(shown[0] is None and len(shown) == len(ids) and worst < 1e-3 and ranked,
      f"prompt_logprobs: {len(shown)} positions, largest difference from echo {worst:.2e}, ranks set: {ranked}")

# bad_words. Two words each one token alone and after a space (say "red" and "green"); among
# those four allowed tokens, "red" banned: only the green ones drawn; "red green" banned:
# " green" never right after either red one, which without the ban it is (16 sampled
# requests at once each).
def ids_of(text):
    return post("/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]
# Two words that are one token alone and one after a space, in this model's tokenizer.
WORDS = [w for w in ["red", "green", "blue", "cat", "dog", "sun", "one", "two", "the", "and", "to", "in"]
         if len(ids_of(w)) == 1 and len(ids_of(" " + w)) == 1][:2]
RED, GREEN = WORDS
R, G, r, g = (ids_of(t)[0] for t in (" " + RED, " " + GREEN, RED, GREEN))
def drawn_with(i, extra):
    body = {"prompt": f"Row {i}:", "max_tokens": 16, "temperature": 1.0, "seed": i, "logprobs": 0,
            "allowed_token_ids": [R, G, r, g], "return_tokens_as_token_ids": True, **extra}
    names = post("/v1/completions", body)["choices"][0]["logprobs"]["tokens"]
    return [int(name.split(":")[1]) for name in names]
def pairs(ids):
    # "red green" tokenizes to [red, " green"] alone and [" red", " green"] after a space.
    return sum(a in (R, r) and b == G for a, b in zip(ids, ids[1:]))
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    word = list(pool.map(lambda i: drawn_with(i, {"bad_words": [RED]}), range(16)))
    phrase = list(pool.map(lambda i: drawn_with(i, {"bad_words": [f"{RED} {GREEN}"]}), range(16)))
    free = list(pool.map(lambda i: drawn_with(i, {}), range(16)))
check(all(set(ids) <= {G, g} and len(ids) == 16 for ids in word),
      f"bad_words [{RED!r}]: ids drawn {sorted({t for ids in word for t in ids})}, allowed {[R, G, r, g]}")
check(sum(map(pairs, phrase)) == 0 and sum(map(pairs, free)) > 0,
      f"bad_words [{RED + ' ' + GREEN!r}]: {RED} then {GREEN} {sum(map(pairs, phrase))} times, "
      f"without the ban {sum(map(pairs, free))} times")
# A greedy completion whose tokens k, k+1 spell a phrase that tokenizes back to them: banned,
# the completion keeps its first k+1 tokens and changes the next (random weights rarely write
# text that tokenizes back to their tokens: the prompts are tried until a phrase does).
def greedy_ids(prompt, extra={}):
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 0,
            "return_tokens_as_token_ids": True, **extra}
    names = post("/v1/completions", body)["choices"][0]["logprobs"]["tokens"]
    return [int(name.split(":")[1]) for name in names]
found = None
for n in range(40):
    prompt = f"Note {n}: the"
    ids = greedy_ids(prompt)
    for k in range(len(ids) - 1):
        text = post("/detokenize", {"tokens": ids[k:k + 2]})["prompt"].lstrip()
        forms = [post("/tokenize", {"prompt": t, "add_special_tokens": False})["tokens"]
                 for t in (text, " " + text)]
        if text and ids[k:k + 2] in forms and ids[k] not in ids[:k]:
            found = (prompt, ids, k, text)
            break
    if found:
        break
if found:
    prompt, ids, k, text = found
    banned = greedy_ids(prompt, {"bad_words": [text]})
    check(banned[:k + 1] == ids[:k + 1] and banned[k + 1] != ids[k + 1],
          f"bad_words [{text!r}] on a greedy completion: tokens {ids} became {banned} (changed at {k + 1})")
else:
    check(False, "bad_words on a greedy completion: no phrase of 40 completions tokenizes back")
try:
    post("/v1/completions", {"prompt": "x", "max_tokens": 2, "allowed_token_ids": [R, r],
                             "bad_words": [RED]})
    check(False, "bad_words leaving no allowed token: answered 200")
except urllib.error.HTTPError as err:
    body = json.load(err)
    check(err.code == 400 and body["error"]["param"] == "bad_words",
          f"bad_words leaving no allowed token: {err.code} naming {body['error']['param']!r}")

# request_id: the reply's id and header.
request = urllib.request.Request(BASE + "/v1/chat/completions",
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                "request_id": "gpu-check-1"}).encode(), {"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=120) as reply:
    header, reply_id = reply.headers.get("X-Request-Id"), json.load(reply)["id"]
check((reply_id, header) == ("chatcmpl-gpu-check-1", "gpu-check-1"),
      f"request_id: id {reply_id!r}, X-Request-Id {header!r}")
print(f"sampling extensions: {passed} of {total} checks passed")
PY
kill -INT "$pid"
wait "$pid"
echo "launcher exit: $?"
