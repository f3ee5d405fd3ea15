"""Structured outputs against live tandem deployments, with the official `openai` client and
langchain-openai, unchanged (run by tests/structured_outputs.rs).

usage: structured_outputs.py AGGREGATED_BASE_URL DISAGGREGATED_BASE_URL

- 20 prompts with 20 schemas (nested objects, arrays, enums, required fields, bounds): every
  reply ends with finish_reason "stop", parses, and validates against its schema (the
  `jsonschema` package); greedy and seeded requests alike; the disaggregated deployment
  (context worker draws the first token under the grammar, decode worker continues it) gives
  the same text as the aggregated one, and a seeded request sent twice gives the same text.
- `json_object`: replies parse as JSON objects.
- `client.chat.completions.parse` (or `client.beta...`) with a Pydantic model.
- langchain-openai's `ChatOpenAI(...).with_structured_output(PydanticModel)`.
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import List, Literal

import jsonschema
import openai
from pydantic import BaseModel, Field

AGG, DISAGG = sys.argv[1], sys.argv[2]
MAX_TOKENS = 200


def check(condition, message):
    """Raises with `message` unless `condition` (an `assert` would vanish under python -O)."""
    if not condition:
        raise AssertionError(message)


def short(n=24):
    return {"type": "string", "maxLength": n}


def obj(properties, required=None):
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


CASES = [
    ("Give the capital of France and its country.",
     obj({"city": short(), "country": short()})),
    ("Describe a cat: name, age in years and whether it is indoor.",
     obj({"name": short(), "age": {"type": "integer", "minimum": 0, "maximum": 30},
          "indoor": {"type": "boolean"}})),
    ("Classify the sentiment of: 'I love this product!'",
     obj({"sentiment": {"enum": ["positive", "negative", "neutral"]}})),
    ("List three primary colors.",
     obj({"colors": {"type": "array", "items": {"enum": ["red", "green", "blue", "yellow"]},
                     "minItems": 3, "maxItems": 3}})),
    ("Give a person with a name and an address (street and city).",
     obj({"name": short(), "address": obj({"street": short(), "city": short()})})),
    ("What is 2 + 2? Answer with the number and a short explanation.",
     obj({"answer": {"type": "integer", "minimum": 0, "maximum": 100},
          "explanation": short(40)})),
    ("Name a fruit and its color.",
     obj({"fruit": short(), "color": {"enum": ["red", "yellow", "green", "orange", "purple"]}})),
    ("Give a book title, its author and the year it was published.",
     obj({"title": short(30), "author": short(), "year": {"type": "integer", "minimum": 1000,
                                                          "maximum": 2030}})),
    ("List two programming languages with their typing discipline.",
     obj({"languages": {"type": "array", "minItems": 1, "maxItems": 2,
                        "items": obj({"name": short(12),
                                      "typing": {"enum": ["static", "dynamic"]}})}})),
    ("Is water wet? Answer yes or no with a confidence.",
     obj({"answer": {"enum": ["yes", "no"]},
          "confidence": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("Give the weather forecast for tomorrow in Paris.",
     obj({"city": short(), "temperature_c": {"type": "integer", "minimum": -30, "maximum": 50},
          "conditions": {"enum": ["sunny", "cloudy", "rain", "snow"]}})),
    ("Create a to-do item with a title, a priority and optional tags.",
     obj({"title": short(30), "priority": {"enum": ["low", "medium", "high"]},
          "tags": {"type": "array", "items": short(10), "maxItems": 3}},
         required=["title", "priority"])),
    ("Give a point in 2D space.",
     obj({"x": {"type": "integer", "minimum": -100, "maximum": 100},
          "y": {"type": "integer", "minimum": -100, "maximum": 100}})),
    ("Describe a planet of the solar system.",
     obj({"planet": {"enum": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn",
                              "Uranus", "Neptune"]},
          "moons": {"type": "integer", "minimum": 0, "maximum": 200},
          "has_rings": {"type": "boolean"}})),
    ("Give a user profile with a username, an email and a list of roles.",
     obj({"username": short(16), "email": short(30),
          "roles": {"type": "array", "items": {"enum": ["admin", "editor", "viewer"]},
                    "minItems": 1, "maxItems": 3}})),
    ("Translate 'hello' into French and Spanish.",
     obj({"translations": obj({"french": short(12), "spanish": short(12)})})),
    ("Give a recipe name and up to three ingredients.",
     obj({"recipe": short(24), "ingredients": {"type": "array", "items": short(16),
                                               "minItems": 1, "maxItems": 3}})),
    ("Rate the movie Inception from 1 to 5 stars.",
     obj({"movie": short(20), "stars": {"type": "integer", "minimum": 1, "maximum": 5}})),
    ("Give an HTTP status code for 'not found' and its meaning.",
     obj({"code": {"enum": [200, 301, 404, 500]}, "meaning": short(24)})),
    ("Describe a company: name, number of employees, and its headquarters (city, country).",
     obj({"company": short(20),
          "employees": {"type": "integer", "minimum": 1, "maximum": 1000000},
          "headquarters": obj({"city": short(), "country": short()}),
          "public": {"type": "boolean"}},
         required=["company", "headquarters"])),
]
check(len(CASES) == 20, f"{len(CASES)} cases: tests/structured_outputs.rs expects 20")


def request(i):
    prompt, schema = CASES[i]
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": f"case_{i}", "strict": True,
                                            "schema": schema}},
    }
    if i % 2:
        body.update(temperature=0.8, seed=1000 + i)
    else:
        body.update(temperature=0)
    return body


def ask(client, body):
    reply = client.chat.completions.create(model=client.served, **body)
    choice = reply.choices[0]
    return choice.message.content, choice.finish_reason


def client_for(base_url):
    client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=300, max_retries=0)
    client.served = client.models.list().data[0].id
    return client


def all_at_once(client, bodies):
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(lambda body: ask(client, body), bodies))


agg, disagg = client_for(AGG), client_for(DISAGG)
bodies = [request(i) for i in range(len(CASES))]
failures = []

aggregated = all_at_once(agg, bodies)
for i, (content, finish) in enumerate(aggregated):
    schema = CASES[i][1]
    try:
        check(finish == "stop", f"finish_reason {finish}")
        jsonschema.validate(json.loads(content), schema)
    except Exception as e:  # noqa: BLE001 - every case is reported
        failures.append(f"case {i} ({CASES[i][0]!r}): {e}: {content!r}")
print(f"json_schema: {len(CASES) - len(failures)}/{len(CASES)} replies parse and validate")

disaggregated = all_at_once(disagg, bodies)
for i, (a, d) in enumerate(zip(aggregated, disaggregated)):
    if a != d:
        failures.append(f"case {i}: disaggregated {d!r} differs from aggregated {a!r}")
seeded = [i for i in range(len(CASES)) if i % 2]
again = all_at_once(agg, [bodies[i] for i in seeded])
for i, repeat in zip(seeded, again):
    if repeat != aggregated[i]:
        failures.append(f"case {i}: same seed, {repeat!r} then {aggregated[i]!r}")
print("disaggregated equals aggregated; same seed, same output: checked")

# Without a schema a 135M model can loop inside an open object until max_tokens (finish_reason
# "length", as OpenAI answers then); these prompts close their object.
for prompt in ['What is 2+2? Answer as a JSON object with the key "answer".',
               "Give the capital of France as JSON with keys city and country.",
               "Return a JSON object with your name."]:
    content, finish = ask(agg, {"messages": [{"role": "user", "content": prompt}],
                                "max_tokens": MAX_TOKENS, "temperature": 0,
                                "response_format": {"type": "json_object"}})
    try:
        check(finish == "stop", f"finish_reason {finish}")
        check(isinstance(json.loads(content), dict), "not a JSON object")
    except Exception as e:  # noqa: BLE001
        failures.append(f"json_object {prompt!r}: {e}: {content!r}")
print("json_object: checked")


class Pet(BaseModel):
    name: str = Field(max_length=20)
    species: Literal["cat", "dog", "bird"]
    age: int = Field(ge=0, le=30)


class Pets(BaseModel):
    pets: List[Pet] = Field(min_length=1, max_length=2)


parse = getattr(agg.chat.completions, "parse", None) or agg.beta.chat.completions.parse
parsed = parse(model=agg.served, temperature=0, max_tokens=MAX_TOKENS,
               messages=[{"role": "user", "content": "Describe two pets."}],
               response_format=Pets)
result = parsed.choices[0].message.parsed
if not isinstance(result, Pets) or not result.pets:
    failures.append(f"openai parse: {parsed.choices[0].message.content!r}")
print(f"openai parse: {result!r}")

from langchain_openai import ChatOpenAI  # noqa: E402

llm = ChatOpenAI(model=agg.served, base_url=AGG, api_key="unused", temperature=0,
                 max_tokens=MAX_TOKENS, max_retries=0, timeout=300)
structured = llm.with_structured_output(Pet)
pet = structured.invoke("Tell me about a cat called Tom.")
if not isinstance(pet, Pet):
    failures.append(f"langchain with_structured_output: {pet!r}")
print(f"langchain with_structured_output: {pet!r}")

if failures:
    print("\n".join(["FAILURES:"] + failures))
    sys.exit(1)
print("all structured output checks passed")
