"""An event-driven backend on pagoda: score card transactions as they arrive.

Each transaction event becomes one chat request (a system prompt for a fraud analyst, two
worked examples, the event as JSON for the last user turn, temperature 0). The answer is
constrained to `fraud` or `legit` (`guided_choice`), and `logprobs` gives the model's
probability of each: the first token of the two answers differs, so P(fraud) is the
softmax of the two first tokens' log-probabilities at the first step. (Which token starts
each answer is learnt once at start-up, by asking for each choice alone.) All events are
sent at once, as a stream of events would be; the engines batch them.

    ./scripts/serve.sh                       # in another terminal
    pip install -r examples/python/requirements.txt
    python examples/python/fraud_check.py [--url nats://127.0.0.1:4222]

The default model (SmolLM2-135M-Instruct) is a toy: its probabilities barely move between
events. Take the output as a demo of the plumbing, and serve a larger instruct model
(`scripts/serve.sh --model PATH`) for verdicts worth reading.
"""

import argparse
import asyncio
import json
import math
import os
import sys
import time

import nats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from client import DEFAULT_URL, GENERATE_SUBJECT, PagodaError, collect  # noqa: E402

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


CHOICES = ["fraud", "legit"]


def messages(event):
    return [
        {"role": "system", "content": SYSTEM},
        *EXAMPLES,
        {"role": "user", "content": json.dumps(event)},
    ]


async def first_tokens(nc, subject):
    """The token each choice starts with: ask for that choice alone, one token."""
    out = {}
    for choice in CHOICES:
        answer = await collect(nc, messages=messages(EVENTS[0]), subject=subject,
                               temperature=0, max_tokens=1, guided_choice=[choice])
        out[choice] = answer["token_ids"][0]
    if len(set(out.values())) != len(out):
        raise SystemExit(f"the choices start with the same token: {out}")
    return out


async def check(nc, event, subject, starts):
    start = time.perf_counter()
    answer = await collect(nc, messages=messages(event), subject=subject, temperature=0,
                           max_tokens=8, guided_choice=CHOICES, logprobs=20)
    first = dict(answer["logprobs"][0]["top_logprobs"])
    # The raw log-probabilities of the two first tokens, renormalised over the two.
    lp = {c: first.get(t, float("-inf")) for c, t in starts.items()}
    top = max(lp.values())
    weights = {c: math.exp(v - top) for c, v in lp.items()}
    p_fraud = weights["fraud"] / sum(weights.values())
    return answer["text"], p_fraud, answer, (time.perf_counter() - start) * 1000


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=DEFAULT_URL, help="NATS URL (env PAGODA_NATS_URL)")
    p.add_argument("--subject", default=GENERATE_SUBJECT)
    args = p.parse_args()

    nc = await nats.connect(args.url, connect_timeout=5, max_reconnect_attempts=3)
    try:
        starts = await first_tokens(nc, args.subject)
        results = await asyncio.gather(
            *(check(nc, e, args.subject, starts) for e in EVENTS), return_exceptions=True
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
            verdict, p_fraud, answer, ms = result
            print(f"{desc} -> {verdict:<6} P(fraud) = {p_fraud:.3f} ({ms:.0f} ms, "
                  f"{answer.get('usage', {}).get('completion_tokens')} tokens)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
