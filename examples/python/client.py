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
With `logprobs=k` each chunk also carries `logprobs`, one `{logprob, top_logprobs}` per id
in its `token_ids` (`top_logprobs` a list of `[token_id, logprob]` pairs, most likely
first), and the last one `cumulative_logprob`; with `prompt_logprobs=k` the first chunk
carries `prompt_logprobs`, one entry per prompt token (the first None). `collect()` joins
all of it into one answer.
Bodies are MessagePack maps, or JSON when the header `Content-Type: application/json` is
set (`use_json=True`).

`generate_durable()` publishes the request as a durable JetStream job on
`pagoda.v1.jobs.generate` instead (engines serving with `--intake jetstream`): it waits for
the stream's publish ack, sets `reply_to` in the body and the header `Nats-Msg-Id` to the
request id (a retried publish is stored once), and when the job is redelivered after an
engine died it restarts the stream with the new attempt's chunks (docs/reliability.md).

Run it as a script to stream one answer (`--durable` for the JetStream path):

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
import nats.js.errors
from nats.aio.client import Client as NATS

GENERATE_SUBJECT = "pagoda.v1.generate"
JOBS_SUBJECT = "pagoda.v1.jobs.generate"
CANCEL_SUBJECT = "pagoda.v1.cancel"
DEFAULT_URL = os.environ.get("PAGODA_NATS_URL", "nats://127.0.0.1:4222")
JSON_HEADERS = {"Content-Type": "application/json"}
# JetStream's deduplication header: a job published again with the same id (within the
# stream's duplicate window, 2 min by default) is stored once.
MSG_ID_HEADER = "Nats-Msg-Id"


class PagodaError(Exception):
    """An error reply from the engine (`code` is e.g. invalid_request, prompt_too_long,
    overloaded, cancelled, timeout, internal, failed), or a transport problem
    (`no_responders`, `idle_timeout`; for durable jobs `no_stream`, `publish_rejected`,
    `publish_timeout`)."""

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


def build_request(
    prompt: Optional[str] = None,
    messages: Optional[List[Dict[str, str]]] = None,
    prompt_token_ids: Optional[List[int]] = None,
    request_id: Optional[str] = None,
    **sampling: Any,
) -> Dict[str, Any]:
    """The request body: `id`, exactly one prompt form, and the sampling fields that are
    not None (as top-level fields)."""
    given = [x is not None for x in (prompt, messages, prompt_token_ids)]
    if sum(given) != 1:
        raise ValueError("pass exactly one of prompt, messages, prompt_token_ids")
    body: Dict[str, Any] = {"id": request_id or new_request_id()}
    if prompt is not None:
        body["prompt"] = prompt
    elif messages is not None:
        body["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        body["prompt_token_ids"] = list(prompt_token_ids)
    body.update({k: v for k, v in sampling.items() if v is not None})
    return body


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
    presence_penalty, frequency_penalty, logprobs, prompt_logprobs, n (completions of the
    prompt: every chunk then carries `index`), and also stream
    (default true) and timeout_ms.
    None values are left out. `idle_timeout` (seconds) bounds the wait for each chunk.

    If the caller stops iterating early and closes the generator (`async with
    contextlib.aclosing(generate(...))`, or `await gen.aclose()`), the request is
    cancelled on the engine.
    """
    body = build_request(prompt, messages, prompt_token_ids, request_id, **sampling)
    inbox = nc.new_inbox()
    # Subscribe before publishing so no chunk can be missed.
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(
            subject, encode(body, use_json), reply=inbox, headers=JSON_HEADERS if use_json else None
        )
    except BaseException:
        await sub.unsubscribe()
        raise
    n = int(body.get("n") or 1)
    async for chunk in _read_replies(nc, sub, body["id"], subject, idle_timeout, cancel_subject, n):
        yield chunk


async def publish_job(
    nc: NATS,
    body: Dict[str, Any],
    subject: str = JOBS_SUBJECT,
    *,
    use_json: bool = False,
    publish_timeout: float = 5.0,
    publish_attempts: int = 3,
):
    """Publishes `body` (which must have `id` and `reply_to`) as a durable job with
    JetStream and returns the stream's PubAck once the job is stored. The header
    `Nats-Msg-Id` is the request id, so a publish retried after a lost ack (up to
    `publish_attempts` tries of `publish_timeout` seconds) is stored once; `ack.duplicate`
    says when the stream already had it.

    Raises PagodaError: `no_stream` (no stream holds the subject: no engine with
    `--intake jetstream` ever started, and nobody created the stream), `publish_rejected`
    (the stream refused it, e.g. full), `publish_timeout`."""
    if not body.get("id") or not body.get("reply_to"):
        raise ValueError("a durable job needs an id and a reply_to")
    headers = {MSG_ID_HEADER: str(body["id"])}
    if use_json:
        headers.update(JSON_HEADERS)
    data = encode(body, use_json)
    js = nc.jetstream()
    for attempt in range(1, max(1, publish_attempts) + 1):
        try:
            return await js.publish(subject, data, timeout=publish_timeout, headers=dict(headers))
        except nats.js.errors.NoStreamResponseError:
            raise PagodaError(
                "no_stream", f"no JetStream stream holds {subject}", body["id"]
            ) from None
        except nats.js.errors.APIError as e:
            raise PagodaError("publish_rejected", str(e), body["id"]) from None
        except nats.errors.TimeoutError:
            if attempt >= publish_attempts:
                raise PagodaError(
                    "publish_timeout",
                    f"the stream did not acknowledge the job in {publish_attempts} tries",
                    body["id"],
                ) from None
            # Same Nats-Msg-Id: if the first publish was stored after all, this one is
            # recognised as a duplicate.


async def generate_durable(
    nc: NATS,
    prompt: Optional[str] = None,
    messages: Optional[List[Dict[str, str]]] = None,
    subject: str = JOBS_SUBJECT,
    *,
    prompt_token_ids: Optional[List[int]] = None,
    request_id: Optional[str] = None,
    idle_timeout: float = 60.0,
    use_json: bool = False,
    cancel_subject: str = CANCEL_SUBJECT,
    publish_timeout: float = 5.0,
    publish_attempts: int = 3,
    **sampling: Any,
) -> AsyncIterator[Dict[str, Any]]:
    """Like generate(), as a durable JetStream job on `pagoda.v1.jobs.generate` (engines
    serving with `--intake jetstream`): the job survives an engine's death. The body
    carries `reply_to` = a fresh inbox (subscribed before publishing), the header
    `Nats-Msg-Id` = the request id; the job is published with publish_job() (waits for
    the stream's ack, retries with the same id). When the job is redelivered, its chunks
    come with a higher `attempt` from `seq` 0 again: the stream restarts with them (what
    the earlier attempt yielded is void; complete() drops it). An error with code
    `failed` means every delivery failed: it is final.

    Keep `idle_timeout` above the consumer's ack_wait (30 s by default) plus the longest
    time a job may wait in the stream."""
    body = build_request(prompt, messages, prompt_token_ids, request_id, **sampling)
    inbox = nc.new_inbox()
    body["reply_to"] = inbox
    sub = await nc.subscribe(inbox)
    try:
        await publish_job(
            nc,
            body,
            subject,
            use_json=use_json,
            publish_timeout=publish_timeout,
            publish_attempts=publish_attempts,
        )
    except BaseException:
        await sub.unsubscribe()
        raise
    n = int(body.get("n") or 1)
    async for chunk in _read_replies(nc, sub, body["id"], subject, idle_timeout, cancel_subject, n):
        yield chunk


async def _read_replies(
    nc: NATS,
    sub,
    request_id: str,
    subject: str,
    idle_timeout: float,
    cancel_subject: str,
    n: int = 1,
) -> AsyncIterator[Dict[str, Any]]:
    """Yields the chunks of one request from `sub` in seq order, restarting on a higher
    attempt; cancels the request when the caller stops early. With `n` > 1 each chunk has
    an `index`; an error that names its `index` ends that completion only and is yielded
    (a dict with `index` and `error`); the stream ends once every completion ended."""
    finished = False
    try:
        attempt = 0  # the delivery attempt whose chunks we are yielding
        next_seq = 0
        pending: Dict[int, Dict[str, Any]] = {}  # out-of-order chunks of this attempt
        ended: set = set()  # completions (index) that ended, with n > 1
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
            # A redelivered request (JetStream path) starts over with a higher attempt:
            # drop what is left of older attempts, and ignore their late messages.
            a = int(reply.get("attempt", 1))
            if a < attempt:
                continue
            if reply.get("error") is not None and (n <= 1 or reply.get("index") is None):
                err = reply["error"]
                finished = True
                raise PagodaError(err.get("code", "?"), err.get("message", ""), reply.get("id"))
            if a > attempt:
                attempt, next_seq, pending, ended = a, 0, {}, set()
            pending[int(reply["seq"])] = reply
            while next_seq in pending:
                chunk = pending.pop(next_seq)
                next_seq += 1
                yield chunk
                if chunk.get("finish_reason") is not None or chunk.get("error") is not None:
                    if n <= 1 or chunk.get("index") is None:
                        finished = True
                        return
                    ended.add(chunk["index"])
                    if len(ended) >= n:
                        finished = True
                        return
    finally:
        try:
            await sub.unsubscribe()
            if not finished and nc.is_connected:
                await cancel(nc, request_id, cancel_subject)
        except Exception:
            pass


async def complete(
    nc: NATS, prompt: Optional[str] = None, messages=None, *, durable: bool = False, **kwargs
):
    """Runs one request to the end: returns (text, last_chunk). `durable=True` sends it as
    a JetStream job (generate_durable)."""
    parts = []
    last: Dict[str, Any] = {}
    stream = generate_durable if durable else generate
    async for chunk in stream(nc, prompt, messages, **kwargs):
        if last and chunk.get("attempt", 1) != last.get("attempt", 1):
            parts = []  # a redelivered job starts over: drop the earlier attempt's text
        parts.append(chunk.get("text", ""))
        last = chunk
    return "".join(parts), last


async def collect(
    nc: NATS, prompt: Optional[str] = None, messages=None, *, durable: bool = False, **kwargs
):
    """Runs one request to the end and joins its chunks: a dict with `id`, `text`,
    `token_ids`, `finish_reason`, `usage`, `timings`, `attempt`, and when asked for,
    `logprobs` (one entry per token id), `prompt_logprobs` and `cumulative_logprob`.
    With `n` > 1: a list of such dicts, one per completion in `index` order (one that
    ended with an error has `error` instead of `finish_reason`)."""
    answers: Dict[int, Dict[str, Any]] = {}
    attempt = None
    stream = generate_durable if durable else generate
    async for chunk in stream(nc, prompt, messages, **kwargs):
        if chunk.get("attempt", 1) != attempt:
            answers = {}  # a redelivered job starts over
            attempt = chunk.get("attempt", 1)
        index = chunk.get("index") or 0
        answer = answers.setdefault(index, {"index": index})
        answer["id"] = chunk.get("id")
        answer["attempt"] = attempt
        answer["text"] = answer.get("text", "") + chunk.get("text", "")
        answer.setdefault("token_ids", []).extend(chunk.get("token_ids", []))
        if chunk.get("logprobs") is not None:
            answer.setdefault("logprobs", []).extend(chunk["logprobs"])
        for key in ("prompt_logprobs", "finish_reason", "usage", "timings", "cumulative_logprob", "error"):
            if chunk.get(key) is not None:
                answer[key] = chunk[key]
    if int(kwargs.get("n") or 1) > 1:
        return [answers[i] for i in sorted(answers)]
    answer = answers.get(0, {})
    answer.pop("index", None)
    return answer


async def cancel(nc: NATS, request_id: str, subject: str = CANCEL_SUBJECT) -> None:
    """Asks every engine to cancel `request_id` (the one running it stops within a step and
    ends the stream with finish_reason "abort")."""
    await nc.publish(subject, encode({"id": request_id}))
    await nc.flush()


async def _main() -> int:
    p = argparse.ArgumentParser(description="Stream one answer from pagoda over NATS.")
    p.add_argument("prompt")
    p.add_argument("--url", default=DEFAULT_URL, help="NATS URL (env PAGODA_NATS_URL)")
    p.add_argument("--subject", help=f"default {GENERATE_SUBJECT} ({JOBS_SUBJECT} with --durable)")
    p.add_argument("--durable", action="store_true",
                   help="publish a durable JetStream job (engines with --intake jetstream)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message")
    p.add_argument("--system", help="a system message (implies --chat)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--logprobs", type=int, metavar="K",
                   help="print each token's logprob and its K most likely alternatives")
    p.add_argument("--n", type=int, metavar="N",
                   help="N completions of the prompt (printed one after another)")
    p.add_argument("--json", action="store_true", help="JSON bodies instead of MessagePack")
    p.add_argument("--inbox-prefix", default=os.environ.get("PAGODA_NATS_INBOX_PREFIX", "_INBOX"),
                   help="prefix of the reply inboxes, e.g. _INBOX.client on a server with "
                        "per-client permissions (configs/nats/pagoda.conf)")
    args = p.parse_args()

    nc = await nats.connect(args.url, connect_timeout=5, max_reconnect_attempts=3,
                            inbox_prefix=args.inbox_prefix)
    try:
        kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature,
                      top_p=args.top_p, seed=args.seed, logprobs=args.logprobs,
                      n=args.n, use_json=args.json)
        if args.durable:
            send, kwargs["subject"] = generate_durable, args.subject or JOBS_SUBJECT
        else:
            send, kwargs["subject"] = generate, args.subject or GENERATE_SUBJECT
        if args.chat or args.system:
            msgs = ([{"role": "system", "content": args.system}] if args.system else [])
            msgs.append({"role": "user", "content": args.prompt})
            stream = send(nc, messages=msgs, **kwargs)
        else:
            stream = send(nc, prompt=args.prompt, **kwargs)
        try:
            if (args.n or 1) > 1:
                # Completions interleave on the wire: gather them, print each whole.
                texts: Dict[int, str] = {}
                async for chunk in stream:
                    i = chunk.get("index") or 0
                    texts[i] = texts.get(i, "") + chunk.get("text", "")
                    if chunk.get("error") is not None:
                        print(f"[{i}] error: {chunk['error']}", file=sys.stderr)
                    elif chunk.get("finish_reason") is not None:
                        print(f"[{i}] {texts[i]}")
                        print(f"[{i} finish_reason={chunk['finish_reason']} "
                              f"usage={chunk.get('usage')}]", file=sys.stderr)
                return 0
            async for chunk in stream:
                sys.stdout.write(chunk.get("text", ""))
                sys.stdout.flush()
                for tid, lp in zip(chunk.get("token_ids", []), chunk.get("logprobs") or []):
                    top = " ".join(f"{t}:{v:.4f}" for t, v in lp["top_logprobs"])
                    print(f"token {tid} {lp['logprob']:.4f} [{top}]", file=sys.stderr)
                if chunk.get("finish_reason") is not None:
                    print()
                    print(f"[finish_reason={chunk['finish_reason']} attempt={chunk.get('attempt')} "
                          f"usage={chunk.get('usage')} timings={chunk.get('timings')}]",
                          file=sys.stderr)
        except PagodaError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 1
    finally:
        await nc.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(_main()))
