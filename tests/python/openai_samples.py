#!/usr/bin/env python3
"""Requests with n > 1 through the official `openai` client (run by tests/samples.rs; usage:
openai_samples.py BASE_URL). Exits non-zero with a message on the first failed check."""

import sys

import openai


def check(condition, message):
    """Raises with `message` unless `condition` (an `assert` would vanish under python -O)."""
    if not condition:
        raise AssertionError(message)


base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
model = client.models.list().data[0].id
messages = [{"role": "user", "content": "Name a color and say why you like it."}]


def chat(**kwargs):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=12, **kwargs)


# n=3 with a seed: three choices in index order, the same three for the same request twice.
first = chat(n=3, seed=11, temperature=0.9)
check([c.index for c in first.choices] == [0, 1, 2], first.choices)
texts = [c.message.content for c in first.choices]
check(all(texts), texts)
check(len(set(texts)) > 1, f"seeded choices draw from different streams: {texts}")
again = chat(n=3, seed=11, temperature=0.9)
check([c.message.content for c in again.choices] == texts, (again.choices, texts))
one = chat(n=1, seed=11, temperature=0.9)
check(one.choices[0].message.content == texts[0], (one.choices[0], texts[0]))
check(first.usage.prompt_tokens == one.usage.prompt_tokens, (first.usage, one.usage))
check(first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens, first.usage)

# Streamed: each chunk names its choice; the same texts; one role and one finish per choice.
stream = chat(n=3, seed=11, temperature=0.9, stream=True, stream_options={"include_usage": True})
streamed, roles, finishes, usage = {}, {}, {}, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
        if choice.delta.role:
            roles[choice.index] = roles.get(choice.index, 0) + 1
        if choice.finish_reason:
            finishes[choice.index] = finishes.get(choice.index, 0) + 1
check([streamed[i] for i in range(3)] == texts, (streamed, texts))
check(roles == {0: 1, 1: 1, 2: 1} and finishes == {0: 1, 1: 1, 2: 1}, (roles, finishes))
check(usage is not None and usage.completion_tokens == first.usage.completion_tokens, (usage, first.usage))

# Completions with n=3.
result = client.completions.create(model=model, prompt="My favourite fruit is", max_tokens=8, n=3, seed=5,
                                   temperature=0.9)
check([c.index for c in result.choices] == [0, 1, 2] and all(c.text for c in result.choices), result)

# best_of below n: a typed 400 naming the field.
try:
    client.completions.create(model=model, prompt="x", max_tokens=2, n=2, best_of=1)
    raise AssertionError("best_of < n was accepted")
except openai.BadRequestError as e:
    check(e.status_code == 400 and e.body and e.body.get("param") == "best_of", e.body)

print("openai client n > 1: all checks passed")
