"""A small Python client for pagoda engines on NATS (wire protocol v1).

    import asyncio, nats
    from client import generate

    async def main():
        nc = await nats.connect("nats://127.0.0.1:4222")
        async for chunk in generate(nc, messages=[{"role": "user", "content": "Hi!"}],
                                    max_tokens=32, temperature=0):
            print(chunk["text"], end="", flush=True)
        await nc.close()

    asyncio.run(main())

A request is one message on `pagoda.v1.generate` whose reply subject is an inbox of ours;
the engine streams chunks there: maps with `id`, `seq` (0, 1, 2, ...), `attempt`, `text`
(the new text) and `token_ids`; the last one adds `finish_reason`, `usage` and `timings`.
A failure is a message with `error: {code, message}` instead, which also ends the stream.
Bodies are MessagePack maps, or JSON when the header `Content-Type: application/json` is
set (`use_json=True`).

Run it as a script to stream one answer:

    python examples/python/client.py --chat "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from typing import Any, AsyncIterator, Dict, List, Optional

import msgpack
import nats
from nats.aio.client import Client as NATS

GENERATE_SUBJECT = "pagoda.v1.generate"
CANCEL_SUBJECT = "pagoda.v1.cancel"
DEFAULT_URL = os.environ.get("PAGODA_NATS_URL", "nats://127.0.0.1:4222")
JSON_HEADERS = {"Content-Type": "application/json"}


class PagodaError(Exception):
    """An error reply from the engine (`code` is e.g. invalid_request, prompt_too_long,
    overloaded, cancelled, timeout, internal), or a transport problem (`no_responders`,
    `idle_timeout`)."""

    def __init__(self, code: str, message: str, request_id: Optional[str] = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


def encode(body: Dict[str, Any], use_json: bool = False) -> bytes:
    """MessagePack map with named fields (or compact JSON)."""
    if use_json:
        return json.dumps(body, separators=(",", ":")).encode()
    return msgpack.packb(body, use_bin_type=True)


def decode(data: bytes, headers: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """A reply body: JSON when the Content-Type header says so (or the body starts with
    '{'), MessagePack otherwise."""
    ctype = (headers or {}).get("Content-Type", "")
    if ctype.split(";")[0].strip().lower() == "application/json" or data.lstrip()[:1] == b"{":
        return json.loads(data)
    return msgpack.unpackb(data, raw=False)


def new_request_id() -> str:
    return uuid.uuid4().hex


async def generate(
    nc: NATS,
    prompt: Optional[str] = None,
    messages: Optional[List[Dict[str, str]]] = None,
    subject: str = GENERATE_SUBJECT,
    *,
    prompt_token_ids: Optional[List[int]] = None,
    request_id: Optional[str] = None,
    idle_timeout: float = 60.0,
    use_json: bool = False,
    cancel_subject: str = CANCEL_SUBJECT,
    **sampling: Any,
) -> AsyncIterator[Dict[str, Any]]:
    """Sends one request and yields its reply chunks (dicts) in `seq` order, the last one
    being the chunk with `finish_reason`. An error reply raises PagodaError.

    Exactly one of `prompt`, `messages` ([{role, content}]) or `prompt_token_ids`.
    `sampling` goes into the request as top-level fields: max_tokens, temperature, top_p,
    top_k, min_p, seed, stop, stop_token_ids, ignore_eos, min_tokens, repetition_penalty,
    presence_penalty, frequency_penalty, and also stream (default true) and timeout_ms.
    None values are left out. `idle_timeout` (seconds) bounds the wait for each chunk.

    If the caller stops iterating early and closes the generator (`async with
    contextlib.aclosing(generate(...))`, or `await gen.aclose()`), the request is
    cancelled on the engine.
    """
    given = [x is not None for x in (prompt, messages, prompt_token_ids)]
    if sum(given) != 1:
        raise ValueError("pass exactly one of prompt, messages, prompt_token_ids")
    request_id = request_id or new_request_id()
    body: Dict[str, Any] = {"id": request_id}
    if prompt is not None:
        body["prompt"] = prompt
    elif messages is not None:
        body["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        body["prompt_token_ids"] = list(prompt_token_ids)
    body.update({k: v for k, v in sampling.items() if v is not None})

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    finished = False
    try:
        # Subscribe before publishing so no chunk can be missed.
        await nc.publish(
            subject, encode(body, use_json), reply=inbox, headers=JSON_HEADERS if use_json else None
        )
        attempt = 0  # the delivery attempt whose chunks we are yielding
        next_seq = 0
        pending: Dict[int, Dict[str, Any]] = {}  # out-of-order chunks of this attempt
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout)
            except nats.errors.TimeoutError:
                raise PagodaError(
                    "idle_timeout", f"no reply within {idle_timeout} s", request_id
                ) from None
            if msg.headers and msg.headers.get("Status") == "503":
                raise PagodaError(
                    "no_responders", f"no engine listens on {subject}", request_id
                )
            reply = decode(msg.data, msg.headers)
            if reply.get("error") is not None:
                err = reply["error"]
                finished = True
                raise PagodaError(err.get("code", "?"), err.get("message", ""), reply.get("id"))
            # A redelivered request (JetStream path) starts over with a higher attempt:
            # drop what is left of older attempts.
            a = int(reply.get("attempt", 1))
            if a < attempt:
                continue
            if a > attempt:
                attempt, next_seq, pending = a, 0, {}
            pending[int(reply["seq"])] = reply
            while next_seq in pending:
                chunk = pending.pop(next_seq)
                next_seq += 1
                yield chunk
                if chunk.get("finish_reason") is not None:
                    finished = True
                    return
    finally:
        try:
            await sub.unsubscribe()
            if not finished and nc.is_connected:
                await cancel(nc, request_id, cancel_subject)
        except Exception:
            pass


async def complete(nc: NATS, prompt: Optional[str] = None, messages=None, **kwargs):
    """Runs one request to the end: returns (text, last_chunk)."""
    parts = []
    last: Dict[str, Any] = {}
    async for chunk in generate(nc, prompt, messages, **kwargs):
        if last and chunk.get("attempt", 1) != last.get("attempt", 1):
            parts = []  # a redelivered job starts over: drop the earlier attempt's text
        parts.append(chunk.get("text", ""))
        last = chunk
    return "".join(parts), last


async def cancel(nc: NATS, request_id: str, subject: str = CANCEL_SUBJECT) -> None:
    """Asks every engine to cancel `request_id` (the one running it stops within a step and
    ends the stream with finish_reason "abort")."""
    await nc.publish(subject, encode({"id": request_id}))
    await nc.flush()


async def _main() -> int:
    p = argparse.ArgumentParser(description="Stream one answer from pagoda over NATS.")
    p.add_argument("prompt")
    p.add_argument("--url", default=DEFAULT_URL, help="NATS URL (env PAGODA_NATS_URL)")
    p.add_argument("--subject", default=GENERATE_SUBJECT)
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message")
    p.add_argument("--system", help="a system message (implies --chat)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="JSON bodies instead of MessagePack")
    args = p.parse_args()

    nc = await nats.connect(args.url, connect_timeout=5, max_reconnect_attempts=3)
    try:
        kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature,
                      top_p=args.top_p, seed=args.seed)
        if args.chat or args.system:
            msgs = ([{"role": "system", "content": args.system}] if args.system else [])
            msgs.append({"role": "user", "content": args.prompt})
            stream = generate(nc, messages=msgs, subject=args.subject, use_json=args.json, **kwargs)
        else:
            stream = generate(nc, prompt=args.prompt, subject=args.subject, use_json=args.json, **kwargs)
        try:
            async for chunk in stream:
                sys.stdout.write(chunk.get("text", ""))
                sys.stdout.flush()
                if chunk.get("finish_reason") is not None:
                    print()
                    print(f"[finish_reason={chunk['finish_reason']} usage={chunk.get('usage')} "
                          f"timings={chunk.get('timings')}]", file=sys.stderr)
        except PagodaError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 1
    finally:
        await nc.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(_main()))
