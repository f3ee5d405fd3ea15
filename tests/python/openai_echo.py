#!/usr/bin/env python3
"""`echo`, prompt logprobs and `best_of` through the official `openai` client (run by
tests/echo.rs; usage: openai_echo.py BASE_URL). Exits non-zero with a message on the first
failed check."""

import sys

import openai


def check(condition, message):
    """Raises with `message` unless `condition` (an `assert` would vanish under python -O)."""
    if not condition:
        raise AssertionError(message)


base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
model = client.models.list().data[0].id
prompt = "The quick brown fox jumps over the lazy"

# Echo with a completion: the prompt, then the completion; logprobs over both.
result = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0,
                                   echo=True, logprobs=1)
choice = result.choices[0]
check(choice.text.startswith(prompt) and len(choice.text) > len(prompt), choice)
logprobs = choice.logprobs
check(logprobs is not None, choice)
n = result.usage.prompt_tokens + result.usage.completion_tokens
check(len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == n, logprobs)
check(logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None, logprobs)
check(all(lp is not None and lp <= 0 for lp in logprobs.token_logprobs[1:]), logprobs)
check(all(len(top) == 1 for top in logprobs.top_logprobs[1:]), logprobs)

# The loglikelihood form: max_tokens 0, the prompt's logprobs only.
scored = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
choice = scored.choices[0]
check(choice.text == prompt and choice.finish_reason == "length", choice)
check(scored.usage.completion_tokens == 0, scored.usage)
check(choice.logprobs.token_logprobs == logprobs.token_logprobs[:scored.usage.prompt_tokens], (
    choice.logprobs, logprobs))

# Streamed: the prompt first.
stream = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0,
                                   echo=True, stream=True)
texts = [chunk.choices[0].text for chunk in stream if chunk.choices]
check(texts[0].startswith(prompt), texts)
check("".join(texts) == result.choices[0].text, (texts, result.choices[0].text))

# best_of: one choice, usage for every candidate.
best = client.completions.create(model=model, prompt=prompt, max_tokens=4, n=1, best_of=3,
                                 temperature=1.0, seed=3)
check(len(best.choices) == 1 and best.choices[0].text, best)
check(best.choices[0].logprobs is None, best)

# max_tokens 0 without echo: a typed 400 naming the field.
try:
    client.completions.create(model=model, prompt=prompt, max_tokens=0)
    raise AssertionError("max_tokens 0 without echo was accepted")
except openai.BadRequestError as e:
    check(e.status_code == 400 and e.body and e.body.get("param") == "max_tokens", e.body)

print("openai client echo: all checks passed")
