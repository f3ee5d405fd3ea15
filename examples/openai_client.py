#!/usr/bin/env python3
"""Talk to a tandem deployment with the official `openai` client, unchanged.

    pip install openai
    tandem serve --port 8000 &           # or scripts/up
    python examples/openai_client.py "What is the capital of France?"
    python examples/openai_client.py --no-stream --max-tokens 64 "Write a haiku about the sea."

The server is OPENAI_BASE_URL where it is set, as the official client takes it (else
http://127.0.0.1:8000/v1; `--base-url` overrides both). The model name is optional for tandem
(it serves one model); it is read from /v1/models here so the same script works against any
OpenAI-compatible server. A deployment with API keys (`api_keys` in its config, or
TANDEM_API_KEY) wants one: `export OPENAI_API_KEY=...` first.
"""

import argparse
import os
import sys

import openai


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="What is the capital of France?")
    parser.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL") or "http://127.0.0.1:8000/v1",
                        help="the server's /v1 URL (default: $OPENAI_BASE_URL, else http://127.0.0.1:8000/v1)")
    parser.add_argument("--system", default=None, help="an optional system message")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-stream", action="store_true", help="one response instead of a stream")
    args = parser.parse_args()

    # A deployment without keys serves anyone; the client insists on having one all the same.
    api_key = os.environ.get("OPENAI_API_KEY", "unused")
    client = openai.OpenAI(base_url=args.base_url, api_key=api_key, max_retries=0)
    model = client.models.list().data[0].id
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    options = dict(model=model, messages=messages, max_tokens=args.max_tokens,
                   temperature=args.temperature, seed=args.seed)

    if args.no_stream:
        completion = client.chat.completions.create(**options)
        print(completion.choices[0].message.content)
        usage = completion.usage
        print(f"[{completion.choices[0].finish_reason}; {usage.prompt_tokens} prompt + "
              f"{usage.completion_tokens} completion tokens]", file=sys.stderr)
        return 0

    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **options)
    finish_reason, usage = None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                print(choice.delta.content, end="", flush=True)
            if choice.finish_reason:
                finish_reason = choice.finish_reason
    print()
    if usage is not None:
        print(f"[{finish_reason}; {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens]",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
