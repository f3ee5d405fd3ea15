#!/usr/bin/env python3
"""Runs LangChain's `ChatOpenAI` against a running tandem deployment, through chat completions
and through the Responses API (`use_responses_api=True`), invoked and streamed, with the fields
LangChain sends by default (run by tests/responses_api.rs; usage: langchain_openai_plain.py
BASE_URL). Exits non-zero with a message on the first failed check."""

import sys

import openai
from langchain_openai import ChatOpenAI


def check(condition, message):
    """Raises with `message` unless `condition` (an `assert` would vanish under python -O)."""
    if not condition:
        raise AssertionError(message)


base_url = sys.argv[1]
model = openai.OpenAI(base_url=base_url, api_key="unused").models.list().data[0].id
messages = [("human", "What is the capital of France?")]


def text_of(content):
    """A message's text: a string (chat completions) or a list of parts (the Responses API)."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


texts = {}
for use_responses_api in (False, True):
    llm = ChatOpenAI(base_url=base_url, api_key="unused", model=model, temperature=0, max_tokens=24,
                     max_retries=0, use_responses_api=use_responses_api)
    reply = llm.invoke(messages)
    invoked = text_of(reply.content)
    check("Paris" in invoked, (use_responses_api, invoked))
    usage = reply.usage_metadata
    check(usage["input_tokens"] > 0 and usage["output_tokens"] > 0, usage)
    streamed = "".join(text_of(chunk.content) for chunk in llm.stream(messages))
    check(streamed == invoked, (use_responses_api, streamed, invoked))
    texts[use_responses_api] = invoked

check(texts[False] == texts[True], texts)
print("langchain-openai: all checks passed")
