#!/usr/bin/env python3
"""Tool calling against a running tandem deployment serving SmolLM2, with the official `openai`
client and langchain-openai (run by tests/tool_calls.rs).

usage: tool_calls.py BASE_URL auto|required

auto:     a tool round trip with `openai` and with langchain-openai `bind_tools` (the answer to
          the tool's result is text that carries it, finish_reason "stop"); the streamed call
          reassembles to the non-streamed one; tool_choice "none" answers in text; the request
          checks answer 400 naming the field.
required: tool_choice "required" and a named function on varied prompts: every reply is a call
          of a declared tool whose arguments validate against its schema (jsonschema), streamed
          or not. Needs the workers' grammar-constrained decoding.

SmolLM2-135M was not trained to call tools. SmolLM2's template ignores `tools`, so tandem writes
them into the system prompt in the Hermes format; in `auto` the conversation shows one earlier
call, which the model follows (greedy, so the reply is the same every run). Exits non-zero with
a message on the first failed check.
"""

import json
import sys
import urllib.request

import openai


def check(condition, message):
    """Raises with `message` unless `condition` (an `assert` would vanish under python -O)."""
    if not condition:
        raise AssertionError(message)


base_url, mode = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
model = client.models.list().data[0].id

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]


def example_call():
    """A user question and the assistant's call answering it: the in-context example."""
    return [
        {"role": "user", "content": "What is the weather in Berlin?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_example0", "type": "function",
                            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Berlin"})}}],
        },
    ]


def reassemble(stream):
    """The streamed reply: content, calls by index (id, name, arguments), finish reason."""
    content, calls, finish, seen_role = "", {}, None, False
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            seen_role = seen_role or delta.role == "assistant"
            content += delta.content or ""
            for piece in delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
                if piece.id:
                    check(call["id"] is None, f"call {piece.index} got a second id: {piece}")
                    call["id"] = piece.id
                    check(piece.type == "function", piece)
                if piece.function and piece.function.name:
                    check(call["name"] is None, f"call {piece.index} got a second name: {piece}")
                    call["name"] = piece.function.name
                if piece.function and piece.function.arguments:
                    check(call["name"] is not None, f"arguments before the name: {piece}")
                    call["arguments"] += piece.function.arguments
            finish = choice.finish_reason or finish
    check(seen_role, "no role chunk")
    return content, [calls[i] for i in sorted(calls)], finish


def expect_400(param, **request):
    try:
        client.chat.completions.create(model=model, max_tokens=4, **request)
    except openai.BadRequestError as err:
        body = err.body or {}
        check(body.get("param") == param, f"expected param {param!r}: {body}")
        check(body.get("message"), body)
        return
    raise AssertionError(f"accepted: {request}")


def auto():
    messages = example_call() + [{"role": "user", "content": "What is the weather in Paris?"}]

    # Non-streamed: the call, no content, finish_reason tool_calls.
    reply = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER],
                                           temperature=0, max_tokens=64)
    choice = reply.choices[0]
    check(choice.finish_reason == "tool_calls", choice)
    check(choice.message.content is None, choice.message)
    (call,) = choice.message.tool_calls
    check(call.type == "function" and call.id.startswith("call_"), call)
    check(call.function.name == "get_weather", call)
    check(json.loads(call.function.arguments) == {"city": "Paris"}, call.function.arguments)
    check("<tool_call>" not in json.dumps(reply.model_dump()), reply)

    # Streamed: the same call, in OpenAI's delta shape.
    content, calls, finish = reassemble(client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER], temperature=0, max_tokens=64, stream=True))
    check(finish == "tool_calls", finish)
    check(content == "", f"content beside the call: {content!r}")
    check([(c["name"], c["arguments"]) for c in calls] == [(call.function.name, call.function.arguments)], calls)
    check(calls[0]["id"].startswith("call_"), calls)

    # The round trip: the call and its result go back; the template renders them, and the
    # model answers in text from the result, ending on its own (SmolLM2-135M, greedy, repeats
    # the tool's response: '<tool_response>\n{"temperature_c": 21}').
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER],
                                            temperature=0, max_tokens=32)
    after_tool = answer.choices[0]
    check(after_tool.finish_reason == "stop", f"the answer to the tool's result stops: {after_tool}")
    check(after_tool.message.tool_calls is None, f"an answer, not another call: {after_tool.message}")
    check(after_tool.message.content and "21" in after_tool.message.content,
          f"the answer carries the tool's result (21): {after_tool.message.content!r}")
    check(answer.usage.prompt_tokens > reply.usage.prompt_tokens, (answer.usage, reply.usage))

    # tool_choice "none": text only, tools not shown.
    plain = client.chat.completions.create(model=model, messages=messages[:3], tools=[WEATHER],
                                           tool_choice="none", temperature=0, max_tokens=16)
    check(plain.choices[0].message.tool_calls is None, plain)
    check(plain.choices[0].finish_reason in ("stop", "length"), plain)

    # Request checks: 400 naming the field.
    user = [{"role": "user", "content": "hi"}]
    expect_400("tool_choice.function.name", messages=user, tools=[WEATHER],
               tool_choice={"type": "function", "function": {"name": "nope"}})
    expect_400("tools[1].function.name", messages=user, tools=[WEATHER, WEATHER])
    expect_400("tools[0].function.parameters", messages=user,
               tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}])
    # A schema llguidance cannot enforce, with a call required: named by the grammar check.
    expect_400("tools[0].function.parameters", messages=user, tool_choice="required",
               tools=[{"type": "function", "function": {"name": "f", "parameters": {
                   "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}])
    expect_400("tool_choice", messages=user, tool_choice="required")
    expect_400("tool_choice", messages=user, tools=[WEATHER], tool_choice="sometimes")
    expect_400("messages[1].tool_call_id", messages=user + [{"role": "tool", "tool_call_id": "call_x", "content": "1"}])
    expect_400("messages[1].role", messages=user + [{"role": "function", "name": "f", "content": "1"}])
    expect_400("messages[1].tool_calls[0].function.arguments",
               messages=user + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                                      "function": {"name": "f"}}]}])
    # Counted for operators.
    metrics = urllib.request.urlopen(base_url.rsplit("/v1", 1)[0] + "/metrics").read().decode()
    parsed = [line for line in metrics.splitlines() if line.startswith('tandem_tool_calls_total{outcome="parsed"}')]
    check(parsed and float(parsed[0].split()[-1]) >= 2, parsed)
    print("openai: tool round trip, streamed call, tool_choice none, request checks: ok")

    # langchain-openai: bind_tools, a call, the ToolMessage back.
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=base_url, api_key="unused", model=model, temperature=0, max_tokens=64,
                     max_retries=0)
    bound = llm.bind_tools([WEATHER])
    history = [
        HumanMessage("What is the weather in Berlin?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Berlin"}, "id": "call_example0"}]),
        HumanMessage("What is the weather in Paris?"),
    ]
    ai = bound.invoke(history)
    check(ai.tool_calls, ai)
    check(ai.tool_calls[0]["name"] == "get_weather" and ai.tool_calls[0]["args"] == {"city": "Paris"}, ai.tool_calls)
    streamed = None
    for piece in bound.stream(history):
        streamed = piece if streamed is None else streamed + piece
    check([(c["name"], c["args"]) for c in streamed.tool_calls] == [("get_weather", {"city": "Paris"})], streamed)
    history += [ai, ToolMessage(json.dumps({"temperature_c": 21}), tool_call_id=ai.tool_calls[0]["id"])]
    final = bound.invoke(history)
    check(isinstance(final, AIMessage), final)
    check(final.response_metadata.get("finish_reason") == "stop", f"the answer stops: {final}")
    check(not final.tool_calls, f"an answer, not another call: {final}")
    check(isinstance(final.content, str) and "21" in final.content,
          f"the answer carries the tool's result (21): {final.content!r}")
    print("langchain-openai: bind_tools round trip and stream: ok")


def required():
    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    prompts = [
        "What is the weather in Paris?",
        "Add 2 and 3.",
        "Tell me a joke.",
        "Is it raining in Tokyo, in fahrenheit?",
        "What is 40 plus 2?",
        "Hello!",
    ]

    def check_calls(calls, allowed, label):
        check(calls, f"{label}: no call")
        for name, arguments in calls:
            check(name in allowed, f"{label}: called {name!r}")
            jsonschema.validate(json.loads(arguments), schemas[name])

    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        for tool_choice, allowed in [("required", set(schemas)),
                                     ({"type": "function", "function": {"name": "add"}}, {"add"})]:
            label = f"{prompt!r} tool_choice={tool_choice}"
            reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                                   tool_choice=tool_choice, temperature=0, max_tokens=128)
            choice = reply.choices[0]
            check(choice.finish_reason == "tool_calls", f"{label}: {choice}")
            calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
            check_calls(calls, allowed, label)
            content, streamed, finish = reassemble(client.chat.completions.create(
                model=model, messages=messages, tools=TOOLS, tool_choice=tool_choice, temperature=0,
                max_tokens=128, stream=True))
            check(finish == "tool_calls", f"{label}: {finish}")
            check([(c["name"], c["arguments"]) for c in streamed] == calls, f"{label}: {streamed} != {calls}")
        # One call at most without parallel_tool_calls.
        reply = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="required",
                                               parallel_tool_calls=False, temperature=0, max_tokens=128)
        check(len(reply.choices[0].message.tool_calls or []) == 1, reply)
    print(f"required and named tool_choice on {len(prompts)} prompts: every reply a valid call")


{"auto": auto, "required": required}[mode]()
