"""A recommendation backend on pagoda: structured answers under a JSON schema.

For each shopper event, the model picks up to three items from the catalogue and gives a
short reason for each. The request carries the JSON schema (`guided_json`), so the answer
is always JSON of that shape — item ids from the catalogue (an `enum`), bounded lists and
strings — which the backend parses without a retry loop. Each answer is checked with the
`jsonschema` package all the same.

    ./scripts/serve.sh                       # in another terminal
    pip install -r examples/python/requirements.txt
    python examples/python/recommend.py [--url nats://127.0.0.1:4222]

With the default toy model (SmolLM2-135M-Instruct) the picks are not worth much; the shape
always is what the schema says.
"""

import argparse
import asyncio
import json
import os
import sys

import jsonschema
import nats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from client import DEFAULT_URL, GENERATE_SUBJECT, PagodaError, collect  # noqa: E402

CATALOGUE = {
    "sku-101": "trail running shoes",
    "sku-102": "waterproof jacket",
    "sku-103": "espresso machine",
    "sku-104": "coffee grinder",
    "sku-105": "yoga mat",
    "sku-106": "camping stove",
    "sku-107": "noise-cancelling headphones",
}

SCHEMA = {
    "type": "object",
    "properties": {
        "recommendations": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "item": {"enum": list(CATALOGUE)},
                    "reason": {"type": "string", "minLength": 3, "maxLength": 80},
                },
                "required": ["item", "reason"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["recommendations"],
    "additionalProperties": False,
}

EVENTS = [
    "The shopper just bought a bag of single-origin coffee beans.",
    "The shopper browsed hiking trails in the Alps and a tent.",
    "The shopper returned a pair of wired earbuds.",
]


async def recommend(nc, event, subject):
    catalogue = "\n".join(f"{sku}: {name}" for sku, name in CATALOGUE.items())
    answer = await collect(
        nc,
        messages=[
            {"role": "system", "content": "You recommend products from this catalogue:\n" + catalogue},
            {"role": "user", "content": event + " Recommend up to three items, as JSON."},
        ],
        subject=subject,
        temperature=0,
        max_tokens=200,
        guided_json=SCHEMA,
    )
    value = json.loads(answer["text"])
    jsonschema.validate(value, SCHEMA)
    return value


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=DEFAULT_URL, help="NATS URL (env PAGODA_NATS_URL)")
    p.add_argument("--subject", default=GENERATE_SUBJECT)
    args = p.parse_args()

    nc = await nats.connect(args.url, connect_timeout=5, max_reconnect_attempts=3)
    try:
        results = await asyncio.gather(
            *(recommend(nc, e, args.subject) for e in EVENTS), return_exceptions=True
        )
    finally:
        await nc.close()
    failed = 0
    for event, result in zip(EVENTS, results):
        print(event)
        if isinstance(result, (PagodaError, json.JSONDecodeError, jsonschema.ValidationError)):
            failed += 1
            print(f"  error: {result}")
            continue
        if isinstance(result, BaseException):
            raise result
        for rec in result["recommendations"]:
            print(f"  {rec['item']} ({CATALOGUE[rec['item']]}): {rec['reason']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
