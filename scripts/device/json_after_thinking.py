#!/usr/bin/env python3
"""Chat requests with a JSON schema against a deployment with a reasoning parser: each reply's
answer (`content`) must parse and match the schema whatever came before it (`reasoning`), greedy
and seeded, streamed and not; the streamed answer must equal the whole one. Exits 1 on any
failure. Used by scripts/device/qwen3.sh (serve)."""
import json
import sys
import urllib.request

BASE = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1"
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"},
          "word": {"type": "string", "maxLength": 12}},
          "required": ["n", "word"], "additionalProperties": False}


def post(body, stream=False):
    request = urllib.request.Request(BASE + "/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        if not stream:
            return json.load(reply)
        content, reasoning = "", ""
        for line in reply:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                content += choice["delta"].get("content") or ""
                reasoning += choice["delta"].get("reasoning") or ""
        return content, reasoning


def check(answer):
    value = json.loads(answer)
    assert set(value) == {"n", "word"} and isinstance(value["n"], int), value
    assert isinstance(value["word"], str) and len(value["word"]) <= 12, value


failures = 0
for i, sampling in enumerate([{"temperature": 0}, {"temperature": 0.6, "top_p": 0.95, "seed": 1},
                              {"temperature": 1.0, "seed": 2}]):
    body = {"messages": [{"role": "user", "content": f"Give a number and a word ({i})."}],
            "max_tokens": 256, "response_format": {"type": "json_schema",
            "json_schema": {"name": "pair", "schema": SCHEMA}}, **sampling}
    whole = post(body)
    choice = whole["choices"][0]
    message = choice["message"]
    usage = whole["usage"]["completion_tokens_details"]
    try:
        if message["content"] is None:
            # Cut off while thinking: allowed, the answer never began.
            assert choice["finish_reason"] == "length", whole
            print(f"{sampling}: thought for all {whole['usage']['completion_tokens']} tokens")
            continue
        check(message["content"])
        content, reasoning = post({**body, "stream": True}, stream=True)
        assert content == message["content"], (content, message["content"])
        assert reasoning == (message.get("reasoning") or ""), (reasoning, message)
        print(f"{sampling}: answer {message['content']}, reasoning "
              f"{len(message.get('reasoning') or '')} chars / {usage['reasoning_tokens']} tokens, "
              f"streamed the same")
    except (AssertionError, ValueError) as err:
        failures += 1
        print(f"{sampling}: FAILED {err!r}: {whole}")
sys.exit(1 if failures else 0)
