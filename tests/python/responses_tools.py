#!/usr/bin/env python3
"""Function tools on /v1/responses against a running tandem deployment serving SmolLM2, with the
official `openai` client and the OpenAI Agents SDK (run by tests/tool_calls.rs).

usage: responses_tools.py BASE_URL

- `responses.create` with a function tool: the call as a `function_call` output item (no
  message beside it), the same call streamed (typed events: the item added, argument deltas,
  the item done), the round trip (the call and a `function_call_output` sent back in `input`:
  the model answers in text carrying the result; again chained by `previous_response_id`, the
  same answer), `tool_choice` "none", "required" and a named
  function (every reply a call whose arguments validate against the tool's schema), and the
  400s that name the field.
- langchain-openai's `ChatOpenAI(use_responses_api=True).bind_tools`: a named call, streamed
  and not, and its `ToolMessage` back.
- an Agents SDK agent with a `function_tool`: the SDK runs the call the model makes and sends
  its output back, streamed and not.

SmolLM2-135M was not trained to call tools: in "auto" the input shows one earlier call, which
the model follows (greedy, so the reply is the same every run); "required" and a named function
are enforced by the workers' grammar. Exits non-zero with a message on the first failed check.
"""

import asyncio
import json
import sys

import jsonschema
import openai

def check(condition, message):
    """Raises with `message` unless `condition` (an `assert` would vanish under python -O)."""
    if not condition:
        raise AssertionError(message)


base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
model = client.models.list().data[0].id

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
           "parameters": WEATHER_PARAMETERS, "strict": False}
ADD = {"type": "function", "name": "add", "description": "Add two integers",
       "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                      "required": ["a", "b"], "additionalProperties": False}}
SCHEMAS = {"get_weather": WEATHER["parameters"], "add": ADD["parameters"]}


def example_call():
    """A user question and the call answering it, as a first response's item: the in-context
    example SmolLM2 follows."""
    return [
        {"role": "user", "content": "What is the weather in Berlin?"},
        {"type": "function_call", "call_id": "call_example0", "name": "get_weather",
         "arguments": json.dumps({"city": "Berlin"})},
    ]


def calls_of(response):
    return [item for item in response.output if item.type == "function_call"]


def expect_400(param, **request):
    try:
        client.responses.create(model=model, max_output_tokens=4, **request)
    except openai.BadRequestError as err:
        body = err.body or {}
        check(body.get("param") == param, f"expected param {param!r}: {body}")
        check(body.get("message"), body)
        return
    raise AssertionError(f"accepted: {request}")


def auto():
    question = example_call() + [{"role": "user", "content": "What is the weather in Paris?"}]

    # Not streamed: one function_call item, no message beside it.
    response = client.responses.create(model=model, input=question, tools=[WEATHER], temperature=0,
                                       max_output_tokens=64)
    check(response.status == "completed", response)
    check([item.type for item in response.output] == ["function_call"], response.output)
    (call,) = calls_of(response)
    check(call.name == "get_weather" and call.status == "completed", call)
    check(call.call_id.startswith("call_") and call.id.startswith("fc_"), call)
    check(json.loads(call.arguments) == {"city": "Paris"}, call.arguments)
    check(response.output_text == "", response.output_text)
    check(response.tools[0].name == "get_weather" and response.tools[0].strict is False, response.tools)
    check("<tool_call>" not in response.model_dump_json(), response)

    # Streamed: the same call, in typed events.
    kinds, deltas, done = [], "", None
    with client.responses.stream(model=model, input=question, tools=[WEATHER], temperature=0,
                                 max_output_tokens=64) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.function_call_arguments.delta":
                deltas += event.delta
            if event.type == "response.function_call_arguments.done":
                done = event.arguments
        final = stream.get_final_response()
    check(kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"], kinds)
    check(kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                         "response.completed"], kinds)
    check(deltas == done == call.arguments, (deltas, done, call.arguments))
    (streamed_call,) = calls_of(final)
    check((streamed_call.name, streamed_call.arguments) == (call.name, call.arguments), streamed_call)

    # The round trip: the response's items and the call's output go back in `input`; the
    # model answers in text carrying the result (SmolLM2-135M, greedy).
    follow_up = question + [item.model_dump(exclude_none=True) for item in response.output] + [
        {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temperature_c": 21})}]
    answer = client.responses.create(model=model, input=follow_up, tools=[WEATHER], temperature=0,
                                     max_output_tokens=32)
    check(not calls_of(answer), f"an answer, not another call: {answer.output}")
    check("21" in answer.output_text, f"the answer carries the tool's result (21): {answer.output_text!r}")
    check(answer.usage.input_tokens > response.usage.input_tokens, (answer.usage, response.usage))
    # The same round trip chained by previous_response_id, as agent loops send it: only the
    # call's output goes in `input`, and the server puts the question and the call before it.
    chained = client.responses.create(
        model=model, previous_response_id=response.id, tools=[WEATHER], temperature=0, max_output_tokens=32,
        input=[{"type": "function_call_output", "call_id": call.call_id,
                "output": json.dumps({"temperature_c": 21})}])
    check(chained.output_text == answer.output_text, (chained.output_text, answer.output_text))
    check(chained.usage.input_tokens == answer.usage.input_tokens, (chained.usage, answer.usage))

    # tool_choice "none": a message, tools not shown, nothing parsed.
    plain = client.responses.create(model=model, input=question, tools=[WEATHER], tool_choice="none",
                                    temperature=0, max_output_tokens=16)
    check([item.type for item in plain.output] == ["message"], plain.output)
    print("openai responses: call, streamed call, round trip, tool_choice none: ok")


def required():
    prompts = ["What is the weather in Paris?", "Add 2 and 3.", "Tell me a joke.", "Hello!"]
    for prompt in prompts:
        for choice in ["required", {"type": "function", "name": "add"}]:
            label = f"{prompt!r} tool_choice={choice}"
            request = dict(model=model, input=prompt, tools=[WEATHER, ADD], tool_choice=choice, temperature=0,
                           max_output_tokens=128)
            response = client.responses.create(**request)
            calls = calls_of(response)
            check(calls and response.status == "completed", f"{label}: {response.output}")
            check(len(calls) == len(response.output), f"{label}: only calls: {response.output}")
            for call in calls:
                if isinstance(choice, dict):
                    check(call.name == "add", f"{label}: {call}")
                jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
            with client.responses.stream(**request) as stream:
                streamed = calls_of(stream.get_final_response())
            check([(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls],
                  f"{label}: {streamed} != {calls}")
        # parallel_tool_calls false: one call at most.
        response = client.responses.create(model=model, input=prompt, tools=[WEATHER, ADD], tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_output_tokens=128)
        check(len(calls_of(response)) == 1, response.output)
    print(f"openai responses: required and named tool_choice on {len(prompts)} prompts: every reply a valid call")


def refusals():
    expect_400("tools[1].name", input="hi", tools=[WEATHER, WEATHER])
    expect_400("tools[0].type", input="hi", tools=[{"type": "web_search"}])
    expect_400("tools[0].parameters", input="hi", tools=[{"type": "function", "name": "f",
                                                          "parameters": {"type": "array"}}])
    # A schema llguidance cannot enforce, with a call required: named by the grammar check.
    expect_400("tools[0].parameters", input="hi", tool_choice="required",
               tools=[{"type": "function", "name": "f", "parameters": {
                   "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}])
    expect_400("tool_choice.name", input="hi", tools=[WEATHER], tool_choice={"type": "function", "name": "nope"})
    expect_400("tool_choice", input="hi", tool_choice="required")
    expect_400("input[1].call_id", input=[{"role": "user", "content": "hi"},
                                          {"type": "function_call_output", "call_id": "call_x", "output": "1"}])
    expect_400("input[1].arguments", input=[{"role": "user", "content": "hi"},
                                            {"type": "function_call", "call_id": "c", "name": "f"}])
    print("openai responses: request checks: ok")


async def agents_sdk():
    from agents import (Agent, ModelSettings, Runner, function_tool, set_default_openai_api,
                        set_default_openai_client, set_tracing_disabled)

    async_client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    set_default_openai_client(async_client, use_for_tracing=False)
    set_default_openai_api("responses")
    set_tracing_disabled(True)
    asked = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city.

        Args:
            city: The city's name.
        """
        asked.append(city)
        return f"21 degrees Celsius in {city}"

    # The model must make one call (the SDK sends tool_choice "required" and
    # parallel_tool_calls false); the SDK runs it, and its output is the run's answer.
    agent = Agent(name="Weather", instructions="Answer with the weather tool.", model=model,
                  tools=[get_weather], tool_use_behavior="stop_on_first_tool",
                  model_settings=ModelSettings(temperature=0, max_tokens=64, tool_choice="required",
                                               parallel_tool_calls=False))
    result = await Runner.run(agent, "What is the weather in Paris?", max_turns=2)
    check(len(asked) == 1 and asked[0], asked)
    check(result.final_output == f"21 degrees Celsius in {asked[0]}", result.final_output)
    kinds = [item.type for item in result.new_items]
    check(kinds == ["tool_call_item", "tool_call_output_item"], kinds)

    streamed = Runner.run_streamed(agent, input="What is the weather in Paris?", max_turns=2)
    argument_deltas = 0
    async for event in streamed.stream_events():
        if event.type == "raw_response_event" and event.data.type == "response.function_call_arguments.delta":
            argument_deltas += 1
    check(argument_deltas > 0, "no argument deltas in the streamed run")
    check(streamed.final_output == result.final_output and asked[1] == asked[0], (streamed.final_output, asked))

    # The run's items as the SDK sends them back in a next turn (its function_call item with
    # id and status, its function_call_output): accepted and rendered. SmolLM2-135M does not
    # reliably end a text answer to a tool's output within a bound (the SDK treats a response
    # cut by max_output_tokens as a failure), so this turn goes through the client.
    history = result.to_input_list()
    check([item.get("type") for item in history[1:]] == ["function_call", "function_call_output"], history)
    answer = client.responses.create(model=model, input=history, tools=[WEATHER], tool_choice="none",
                                     temperature=0, max_output_tokens=16)
    check([item.type for item in answer.output] == ["message"] and answer.output_text, answer.output)
    check(answer.usage.input_tokens > 20, answer.usage)
    print("agents sdk: function tool run, streamed and not, its items sent back: ok")


def langchain():
    """langchain-openai's `ChatOpenAI(use_responses_api=True)` with `bind_tools`: a named call,
    streamed alike, and its `ToolMessage` sent back (LangChain's own function_call items)."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=base_url, api_key="unused", model=model, temperature=0, max_tokens=64,
                     max_retries=0, use_responses_api=True)
    tool = {"type": "function", "function": {"name": "get_weather", "description": WEATHER["description"],
                                             "parameters": WEATHER_PARAMETERS}}
    bound = llm.bind_tools([tool], tool_choice="get_weather")
    question = [HumanMessage("What is the weather in Paris?")]
    ai = bound.invoke(question)
    check(len(ai.tool_calls) == 1 and ai.tool_calls[0]["name"] == "get_weather", ai)
    jsonschema.validate(ai.tool_calls[0]["args"], WEATHER_PARAMETERS)
    streamed = None
    for chunk in bound.stream(question):
        streamed = chunk if streamed is None else streamed + chunk
    check([(c["name"], c["args"]) for c in streamed.tool_calls] == [(c["name"], c["args"]) for c in ai.tool_calls],
          (streamed.tool_calls, ai.tool_calls))
    answer = llm.bind_tools([tool], tool_choice="none").invoke(
        question + [ai, ToolMessage(content="21 degrees Celsius", tool_call_id=ai.tool_calls[0]["id"])])
    check(not answer.tool_calls and answer.content, answer)
    print("langchain-openai responses: bind_tools, a named call streamed and not, its result back: ok")


auto()
required()
refusals()
langchain()
asyncio.run(agents_sdk())
print("responses tools: all checks passed")
