#!/usr/bin/env python3
"""Checks a running tandem deployment with the official `openai` client (run by
tests/openai_client.rs; usage: openai_conformance.py BASE_URL). Exits non-zero with a message
on the first failed check."""

import json
import sys
import urllib.error
import urllib.request

import openai


def check(condition, message):
    """Raises with `message` unless `condition` (an `assert` would vanish under python -O)."""
    if not condition:
        raise AssertionError(message)


base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)

models = client.models.list().data
check(len(models) == 1, models)
model = models[0].id
retrieved = client.models.retrieve(model)
check(retrieved.id == model and retrieved.object == "model", retrieved)
try:
    client.models.retrieve("no-such-model")
    raise AssertionError("retrieved a model that is not served")
except openai.NotFoundError as err:
    check((err.body or {}).get("code") == "model_not_found", err.body)
embedded = client.embeddings.create(model=model, input=["x", "y z"])
check([d.index for d in embedded.data] == [0, 1], embedded.data)
check(embedded.usage.prompt_tokens == embedded.usage.total_tokens > 0, embedded.usage)
try:
    client.moderations.create(input="x")
    raise AssertionError("moderations answered")
except openai.NotFoundError as err:
    check((err.body or {}).get("code") == "unknown_url", err.body)
messages = [{"role": "user", "content": "What is the capital of France?"}]

# A streamed chat completion: a role chunk, content deltas, a finish reason, usage at the end.
stream = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0,
                                        stream=True, stream_options={"include_usage": True})
text, finish, usage, roles = "", None, None, []
for chunk in stream:
    check(chunk.object == "chat.completion.chunk", chunk)
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.role:
            roles.append(choice.delta.role)
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
check(roles == ["assistant"], roles)
check("Paris" in text, text)
check(finish in ("stop", "length"), finish)
check(usage is not None and usage.completion_tokens > 0, usage)

# Non-streamed: the same text (temperature 0), usage that adds up.
completion = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
check(completion.choices[0].message.content == text, (completion.choices[0].message.content, text))
u = completion.usage
check(u.prompt_tokens > 0 and u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens, u)

# Logprobs with alternatives.
completion = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0,
                                            logprobs=True, top_logprobs=2)
content = completion.choices[0].logprobs.content
check(len(content) == completion.usage.completion_tokens, content)
check(all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content), content)

# /v1/completions.
result = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
check(result.object == "text_completion" and result.choices[0].text, result)
check(result.usage.completion_tokens > 0, result.usage)

# vLLM's request_id and bad_words through the client's extra_body: the reply named by the id
# (in its `id` and X-Request-Id), and a banned word's tokens never drawn.
raw = client.chat.completions.with_raw_response.create(
    model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8,
    temperature=0, extra_body={"request_id": "conformance-1"})
named = raw.parse()
check(named.id == "chatcmpl-conformance-1", named.id)
check(raw.headers.get("x-request-id") == "conformance-1", raw.headers)
answer = named.choices[0].message.content
check("Paris" in answer, answer)
banned = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8,
    temperature=0, extra_body={"bad_words": ["Paris"]})
check(" Paris" not in banned.choices[0].message.content, banned.choices[0].message.content)

# Predicted outputs: the client's typed `prediction`; the same answer as without it, and the
# usage's completion_tokens_details counting the draft tokens kept.
copy = [{"role": "user", "content": "Repeat exactly: The quick brown fox jumps over the lazy dog."}]
plain = client.chat.completions.create(model=model, messages=copy, max_tokens=24, temperature=0)
predicted = client.chat.completions.create(
    model=model, messages=copy, max_tokens=24, temperature=0,
    prediction={"type": "content", "content": plain.choices[0].message.content})
check(predicted.choices[0].message.content == plain.choices[0].message.content, predicted)
details = predicted.usage.completion_tokens_details
check(details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens == 0, details)
check(plain.usage.completion_tokens_details.accepted_prediction_tokens == 0, plain.usage)

# Bad input: typed errors from the client, OpenAI error bodies.
try:
    client.chat.completions.create(model=model, messages=[], max_tokens=4)
    raise AssertionError("an empty messages list was accepted")
except openai.BadRequestError as e:
    check(e.status_code == 400 and e.body and e.body.get("message"), e.body)
try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    check(e.status_code == 404, e)

request = urllib.request.Request(base_url + "/chat/completions", data=b'{"messages": [', method="POST",
                                 headers={"Content-Type": "application/json"})
try:
    urllib.request.urlopen(request, timeout=30)
    raise AssertionError("malformed JSON was accepted")
except urllib.error.HTTPError as e:
    check(e.code == 400, e.code)
    error = json.loads(e.read())["error"]
    check(error["message"] and error["type"] == "invalid_request_error", error)
    check("param" in error and "code" in error, error)

print("openai client conformance: all checks passed")
