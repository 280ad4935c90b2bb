"""An event-driven backend on pagoda: score card transactions as they arrive.

Each transaction event becomes one chat request (a system prompt for a fraud analyst, two
worked examples, the event as JSON for the last user turn; temperature 0 and a few tokens,
as scoring wants). All
events are sent at once, as a stream of events would be; the engines batch them.

    ./scripts/serve.sh                       # in another terminal
    pip install -r examples/python/requirements.txt
    python examples/python/fraud_check.py [--url nats://127.0.0.1:4222]

The default model (SmolLM2-135M-Instruct) is a toy: it answers in the format but gives every
event the same verdict. Take the output as a demo of the plumbing, and serve a larger
instruct model (`scripts/serve.sh --model PATH`) for verdicts worth reading.
"""

import argparse
import asyncio
import json
import os
import sys
import time

import nats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from client import DEFAULT_URL, GENERATE_SUBJECT, PagodaError, complete  # noqa: E402

SYSTEM = (
    "You are a fraud analyst at a card issuer. You get one card transaction as JSON. "
    "The cardholder lives in Germany and usually spends small amounts in the daytime. "
    "Answer with one word: fraud or legit."
)

# Two worked examples (user/assistant turns) teach even a small model the answer format.
EXAMPLES = [
    {"role": "user", "content": json.dumps(
        {"tx": "t-0998", "amount_eur": 2500.00, "country": "BR", "merchant": "Electronics Online", "time": "04:10"})},
    {"role": "assistant", "content": "fraud"},
    {"role": "user", "content": json.dumps(
        {"tx": "t-0999", "amount_eur": 8.50, "country": "DE", "merchant": "Bakery", "time": "07:50"})},
    {"role": "assistant", "content": "legit"},
]

EVENTS = [
    {"tx": "t-1001", "amount_eur": 12.40, "country": "DE", "merchant": "Bakery Mueller", "time": "08:14"},
    {"tx": "t-1002", "amount_eur": 4999.00, "country": "NG", "merchant": "LuxWatches Online", "time": "03:52"},
    {"tx": "t-1003", "amount_eur": 56.90, "country": "DE", "merchant": "Supermarket", "time": "18:30"},
    {"tx": "t-1004", "amount_eur": 1850.00, "country": "RU", "merchant": "Crypto Exchange", "time": "02:07"},
    {"tx": "t-1005", "amount_eur": 3.20, "country": "DE", "merchant": "Coffee Bar", "time": "09:01"},
]


def verdict_of(text: str) -> str:
    """The first of the words fraud / legit in the answer."""
    words = [w.strip(".,!:;\"'").lower() for w in text.split()]
    for w in words:
        if w in ("fraud", "legit"):
            return w
    return f"unclear ({text.strip()!r})"


async def check(nc, event, subject):
    start = time.perf_counter()
    text, last = await complete(
        nc,
        messages=[
            {"role": "system", "content": SYSTEM},
            *EXAMPLES,
            {"role": "user", "content": json.dumps(event)},
        ],
        subject=subject,
        temperature=0,
        max_tokens=4,
    )
    return verdict_of(text), last, (time.perf_counter() - start) * 1000


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=DEFAULT_URL, help="NATS URL (env PAGODA_NATS_URL)")
    p.add_argument("--subject", default=GENERATE_SUBJECT)
    args = p.parse_args()

    nc = await nats.connect(args.url, connect_timeout=5, max_reconnect_attempts=3)
    try:
        results = await asyncio.gather(
            *(check(nc, e, args.subject) for e in EVENTS), return_exceptions=True
        )
    finally:
        await nc.close()

    failed = 0
    for event, result in zip(EVENTS, results):
        desc = (f"{event['tx']}  {event['amount_eur']:>8.2f} EUR  {event['country']}  "
                f"{event['time']}  {event['merchant']:<18}")
        if isinstance(result, PagodaError):
            failed += 1
            print(f"{desc} -> error: {result}")
        elif isinstance(result, BaseException):
            raise result
        else:
            verdict, last, ms = result
            print(f"{desc} -> {verdict:<6} ({ms:.0f} ms, "
                  f"{last.get('usage', {}).get('completion_tokens')} tokens)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
