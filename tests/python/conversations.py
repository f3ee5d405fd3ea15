#!/usr/bin/env python3
"""The Conversations API through the official `openai` client and the OpenAI Agents SDK's
`OpenAIConversationsSession`, against a running tandem deployment (run by
tests/conversations_api.rs; usage: conversations.py BASE_URL). Exits non-zero with a message on
the first failed check."""

import asyncio
import sys

import openai
from openai import AsyncOpenAI, OpenAI

from agents import (Agent, ModelSettings, OpenAIConversationsSession, Runner,
                    set_default_openai_api, set_default_openai_client, set_tracing_disabled)


def check(condition, message):
    """Raises with `message` unless `condition` (an `assert` would vanish under python -O)."""
    if not condition:
        raise AssertionError(message)


base_url = sys.argv[1]


def official_client():
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    conversation = client.conversations.create(
        items=[{"role": "user", "content": "My name is Ada."}], metadata={"topic": "names"})
    check(conversation.id.startswith("conv_") and conversation.object == "conversation",
          conversation)
    check(conversation.metadata == {"topic": "names"}, conversation)
    check(client.conversations.retrieve(conversation.id) == conversation, conversation)

    response = client.responses.create(model=model, conversation=conversation.id,
                                       input="What is my name?", temperature=0,
                                       max_output_tokens=12)
    check(response.conversation.id == conversation.id, response)
    items = list(client.conversations.items.list(conversation.id, order="asc"))
    check([item.role for item in items] == ["user", "user", "assistant"], items)
    check(items[0].content[0].type == "input_text"
          and items[0].content[0].text == "My name is Ada.", items[0])
    check(items[2].id == response.output[0].id
          and items[2].content[0].text == response.output_text, (items[2], response))
    # The client's pager walks every page (limit 1, newest first).
    paged = [item.id for item in client.conversations.items.list(conversation.id, limit=1)]
    check(paged == [item.id for item in reversed(items)], paged)

    one = client.conversations.items.retrieve(items[1].id, conversation_id=conversation.id)
    check(one.id == items[1].id and one.content[0].text == "What is my name?", one)
    added = client.conversations.items.create(
        conversation.id, items=[{"type": "message", "role": "user", "content": "Thanks."}])
    check(len(added.data) == 1 and added.first_id == added.data[0].id, added)
    after = client.conversations.items.delete(items[0].id, conversation_id=conversation.id)
    check(after.id == conversation.id, after)
    check(len(list(client.conversations.items.list(conversation.id))) == 3, "one deleted")
    updated = client.conversations.update(conversation.id, metadata={"topic": "thanks"})
    check(updated.metadata == {"topic": "thanks"}, updated)

    deleted = client.conversations.delete(conversation.id)
    check(deleted.deleted and deleted.id == conversation.id, deleted)
    try:
        client.conversations.retrieve(conversation.id)
        raise AssertionError("a deleted conversation was found")
    except openai.NotFoundError:
        pass
    try:
        client.responses.create(model=model, conversation=conversation.id, input="x")
        raise AssertionError("a response named a deleted conversation")
    except openai.BadRequestError as err:
        check(err.body["param"] == "conversation", err.body)


async def agents_sdk():
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    set_default_openai_client(client, use_for_tracing=False)
    set_default_openai_api("responses")
    set_tracing_disabled(True)
    model = (await client.models.list()).data[0].id
    # The SDK raises on a response that stops at its token limit (`incomplete`), so each
    # greedy answer must end by itself: one short sentence does on the default model.
    agent = Agent(name="Assistant",
                  instructions="You are a helpful assistant. Answer in one short sentence.",
                  model=model, model_settings=ModelSettings(temperature=0, max_tokens=400))

    # A session kept in a conversation: each run's items are added, and the next run sees them.
    session = OpenAIConversationsSession(openai_client=client)
    first = await Runner.run(agent, "My name is Ada.", session=session)
    second = await Runner.run(agent, "What is my name?", session=session)
    kept = await session.get_items()
    texts = [item.get("content") for item in kept]
    check(len(kept) == 4, kept)
    check(kept[0]["content"] == "My name is Ada." or kept[0]["content"][0]["text"] == "My name is Ada.",
          kept[0])
    check(second.final_output and first.final_output, (first, second))
    latest = await session.get_items(limit=1)
    check(len(latest) == 1 and latest[0]["role"] == "assistant", latest)
    popped = await session.pop_item()
    check(popped["role"] == "assistant", popped)
    check(len(await session.get_items()) == 3, texts)
    await session.clear_session()

    # A run that names the conversation (the server starts from its items and adds the run's).
    conversation = await client.conversations.create()
    run = await Runner.run(agent, "What is the capital of France?",
                           conversation_id=conversation.id)
    listed = [item async for item in client.conversations.items.list(conversation.id,
                                                                     order="asc")]
    check([item.role for item in listed] == ["user", "assistant"], listed)
    check(listed[1].content[0].text == run.final_output, (listed, run.final_output))


official_client()
asyncio.run(agents_sdk())
print("conversations: official client and Agents SDK passed")
