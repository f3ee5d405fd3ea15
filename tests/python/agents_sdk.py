#!/usr/bin/env python3
"""Runs an OpenAI Agents SDK agent (no tools) against a running tandem deployment through the
SDK's Responses model, its default (run by tests/responses_api.rs; usage: agents_sdk.py
BASE_URL): a run, a streamed run, and a second turn built from the first run's items and again
chained by `previous_response_id`; then the
same agent through the SDK's chat completions model. Exits non-zero with a message on the first
failed check."""

import asyncio
import sys

from openai import AsyncOpenAI

from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner,
                    set_default_openai_api, set_default_openai_client, set_tracing_disabled)


def check(condition, message):
    """Raises with `message` unless `condition` (an `assert` would vanish under python -O)."""
    if not condition:
        raise AssertionError(message)


base_url = sys.argv[1]


async def main():
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    set_default_openai_client(client, use_for_tracing=False)
    set_default_openai_api("responses")
    set_tracing_disabled(True)
    model = (await client.models.list()).data[0].id

    agent = Agent(name="Assistant", instructions="You are a helpful assistant. Answer briefly.",
                  model=model, model_settings=ModelSettings(temperature=0, max_tokens=32))
    result = await Runner.run(agent, "What is the capital of France?")
    check("Paris" in result.final_output, result.final_output)
    check(isinstance(result.raw_responses[0].response_id, str), result.raw_responses)

    # The same through an explicit Responses model and a streamed run.
    streamed_agent = agent.clone(model=OpenAIResponsesModel(model=model, openai_client=client))
    streamed = Runner.run_streamed(streamed_agent, input="What is the capital of France?")
    deltas = []
    async for event in streamed.stream_events():
        if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
            deltas.append(event.data.delta)
    check("".join(deltas) == streamed.final_output == result.final_output, (deltas, streamed.final_output))

    # A second turn: the first run's items (its output message included) sent back.
    second = await Runner.run(agent, result.to_input_list() + [{"role": "user", "content": "And of Italy?"}])
    check(second.final_output, second)
    # The same turn chained by id (the server keeps the first run's response): the same text.
    chained = await Runner.run(agent, [{"role": "user", "content": "And of Italy?"}],
                               previous_response_id=result.last_response_id)
    check(chained.final_output == second.final_output, (chained.final_output, second.final_output))

    # The SDK's chat completions model sends its own set of fields; same prompt, same text.
    chat_agent = agent.clone(model=OpenAIChatCompletionsModel(model=model, openai_client=client))
    chat = await Runner.run(chat_agent, "What is the capital of France?")
    check(chat.final_output == result.final_output, (chat.final_output, result.final_output))
    streamed = Runner.run_streamed(chat_agent, input="What is the capital of France?")
    async for _ in streamed.stream_events():
        pass
    check(streamed.final_output == result.final_output, streamed.final_output)

    print("agents sdk: all checks passed")


asyncio.run(main())
