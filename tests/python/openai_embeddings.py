"""The official `openai` client against /v1/embeddings: argv BASE_URL MODEL TEXT EXPECTED_JSON.

The client asks for base64 by default and decodes it; the vector must be the one the raw
request returned (EXPECTED_JSON, floats), and float and base64 agree.
"""

import json
import math
import sys

from openai import OpenAI

base_url, model, text, expected = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
client = OpenAI(base_url=base_url, api_key="unused")

response = client.embeddings.create(model=model, input=text)
assert response.object == "list", response
assert response.model == model, response.model
assert len(response.data) == 1 and response.data[0].index == 0, response.data
vector = response.data[0].embedding
assert len(vector) == len(expected), (len(vector), len(expected))
assert max(abs(a - b) for a, b in zip(vector, expected)) < 1e-6
assert response.usage.prompt_tokens == response.usage.total_tokens > 0, response.usage

floats = client.embeddings.create(model=model, input=[text, text], encoding_format="float", dimensions=32)
assert [d.index for d in floats.data] == [0, 1]
short = floats.data[0].embedding
assert len(short) == 32
assert abs(math.sqrt(sum(x * x for x in short)) - 1) < 1e-4
print("ok")
