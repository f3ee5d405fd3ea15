#!/usr/bin/env python3
"""Checks /v1/responses of a running tandem deployment with the official `openai` client (run by
tests/responses_api.rs; usage: responses_conformance.py BASE_URL). Exits non-zero with a message
on the first failed check."""

import sys
import time

import openai


def check(condition, message):
    """Raises with `message` unless `condition` (an `assert` would vanish under python -O)."""
    if not condition:
        raise AssertionError(message)


base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
model = client.models.list().data[0].id
question = "What is the capital of France?"

# A string input, not streamed: the SDK's typed Response, `output_text` computed from `output`.
response = client.responses.create(model=model, input=question, max_output_tokens=24, temperature=0)
check(response.object == "response" and response.id.startswith("resp_"), response)
check(response.status in ("completed", "incomplete"), response.status)
check("Paris" in response.output_text, response.output_text)
check(response.output[0].type == "message" and response.output[0].role == "assistant", response.output)
usage = response.usage
check(usage.input_tokens > 0 and usage.output_tokens > 0, usage)
check(usage.total_tokens == usage.input_tokens + usage.output_tokens, usage)

# Streamed by hand: typed events, numbered in order, deltas adding up to the same text.
events = list(client.responses.create(model=model, input=question, max_output_tokens=24, temperature=0,
                                      stream=True))
check([e.sequence_number for e in events] == list(range(len(events))), events)
check(events[0].type == "response.created" and events[1].type == "response.in_progress", events[:2])
check(events[-1].type == f"response.{response.status}", events[-1])
streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
check(streamed == response.output_text, (streamed, response.output_text))
check(events[-1].response.output_text == response.output_text, events[-1])

# The SDK's stream helper, which rebuilds the response from the events and checks their order.
with client.responses.stream(model=model, input=question, max_output_tokens=24, temperature=0) as stream:
    helper_text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    final = stream.get_final_response()
check(helper_text == response.output_text and final.output_text == response.output_text, final)

# Instructions and a message list: the same text as chat completions with a system message.
instructions = "Answer with one word."
messages = [{"role": "user", "content": "Name a colour of the sky."}]
response = client.responses.create(model=model, instructions=instructions, input=messages,
                                   max_output_tokens=16, temperature=0)
chat = client.chat.completions.create(model=model, max_tokens=16, temperature=0,
                                      messages=[{"role": "system", "content": instructions}] + messages)
check(response.output_text == chat.choices[0].message.content, (response.output_text, chat))
check(response.instructions == instructions, response.instructions)

# A conversation carried by the client: the earlier output sent back.
follow_up = client.responses.create(
    model=model, max_output_tokens=16, temperature=0, instructions=instructions,
    input=messages + [item.model_dump() for item in response.output]
    + [{"role": "user", "content": [{"type": "input_text", "text": "And at night?"}]}])
check(follow_up.status in ("completed", "incomplete") and follow_up.output_text, follow_up)

# The same conversation kept by the server (store defaults to true): the response retrieved,
# its input items listed, the next turn by previous_response_id (instructions are not carried
# over, as with OpenAI), which gives the text of the conversation sent whole.
check(response.store is True, response.store)
stored = client.responses.retrieve(response.id)
check(stored.id == response.id and stored.output_text == response.output_text, stored)
items = client.responses.input_items.list(response.id)
check([item.type for item in items.data] == ["message"] and items.data[0].id.startswith("msg_"), items)
chained = client.responses.create(
    model=model, max_output_tokens=16, temperature=0, instructions=instructions,
    previous_response_id=response.id,
    input=[{"role": "user", "content": [{"type": "input_text", "text": "And at night?"}]}])
check(chained.previous_response_id == response.id, chained)
check(chained.output_text == follow_up.output_text, (chained.output_text, follow_up.output_text))
check(chained.usage.input_tokens == follow_up.usage.input_tokens, (chained.usage, follow_up.usage))
client.responses.delete(response.id)

# Background, as OpenAI's guide polls it: created queued, retrieved until it has finished, with the
# text of the same request in the foreground; a long one cancelled while it runs.
background = client.responses.create(model=model, input=question, max_output_tokens=24, temperature=0,
                                     background=True)
check(background.background is True and background.status == "queued", background)
deadline = time.time() + 60
while background.status in ("queued", "in_progress"):
    check(time.time() < deadline, background)
    time.sleep(0.05)
    background = client.responses.retrieve(background.id)
first_text = client.responses.create(model=model, input=question, max_output_tokens=24,
                                     temperature=0).output_text
check(background.output_text == first_text, (background.output_text, first_text))
numbers = {"type": "json_schema", "name": "numbers", "schema": {
    "type": "object", "properties": {"n": {"type": "array", "items": {"type": "integer"}, "minItems": 300}},
    "required": ["n"]}}
long = client.responses.create(model=model, input="List numbers.", max_output_tokens=3000, temperature=0,
                               background=True, text={"format": numbers})
cancelled = client.responses.cancel(long.id)
check(cancelled.id == long.id and cancelled.status == "cancelled", cancelled)
check(client.responses.retrieve(long.id).status == "cancelled", long.id)

# A background stream left after its first events, resumed by the client's retrieve: the
# events after the last one read, to the end, the same text as the foreground's.
stream = client.responses.create(model=model, input=question, max_output_tokens=24, temperature=0,
                                 background=True, stream=True)
read = []
for event in stream:
    read.append(event)
    if len(read) == 3:
        break
stream.close()
rest = list(client.responses.retrieve(read[0].response.id, stream=True,
                                      starting_after=read[-1].sequence_number))
numbers = [event.sequence_number for event in read + rest]
check(numbers == list(range(len(numbers))), numbers)
check(rest[-1].type == "response.completed" or rest[-1].type == "response.incomplete", rest[-1])
check(rest[-1].response.output_text == first_text, (rest[-1].response.output_text, first_text))

# Typed errors: an unknown field, a response not stored, an unknown model, a deleted response.
try:
    client.responses.create(model=model, input="x", extra_body={"frobnicate": True})
    raise AssertionError("an unknown field was accepted")
except openai.BadRequestError as e:
    check(e.body["param"] == "frobnicate" and e.body["code"] == "unknown_parameter", e.body)
try:
    client.responses.create(model=model, input="x", previous_response_id="resp_not_stored")
    raise AssertionError("an unknown previous_response_id was accepted")
except openai.BadRequestError as e:
    check(e.body["param"] == "previous_response_id", e.body)
try:
    client.responses.create(model="no-such-model", input="x")
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    check(e.status_code == 404, e)
for call in (lambda: client.responses.retrieve(response.id), lambda: client.responses.delete(response.id)):
    try:
        call()
        raise AssertionError("a deleted response was found")
    except openai.NotFoundError as e:
        check(e.body["code"] == "response_not_found", e.body)

print("responses conformance: all checks passed")
