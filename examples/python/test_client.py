"""Checks client.py, two ways.

Against a fake engine (no model, no pagoda needed, only a NATS server with JetStream):

    python examples/python/test_client.py [--url nats://127.0.0.1:4222]

The fake engine speaks wire protocol v1 on a private subject prefix, so a real pagoda on
the same server is not disturbed. It records the requests it decodes and answers with
MessagePack (or JSON) chunks: in order, out of order, after a redelivery (attempt 2), as
an error, or slowly until a cancel arrives. A fake job worker pulls durable jobs from a
private work-queue stream, like `pagoda serve --intake jetstream` does, and gives one job
back (nak) so that JetStream really redelivers it with attempt 2.

Against a real engine (`pagoda serve --intake jetstream` on the same server, prefix
pagoda.v1), durable jobs published by generate_durable():

    python examples/python/test_client.py --url nats://127.0.0.1:4222 --pagoda-jetstream

tests/python_client.rs runs both in the test suite (scripts/python-env.sh installs
requirements.txt for it).
"""

import argparse
import asyncio
import json
import os
import sys
import uuid

import msgpack
import nats
from nats.js.api import ConsumerConfig, RetentionPolicy, StorageType

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from client import (  # noqa: E402
    MSG_ID_HEADER,
    PagodaError,
    cancel,
    collect,
    complete,
    decode,
    encode,
    generate,
    generate_durable,
    publish_job,
)


class FakeEngine:
    def __init__(self, nc, prefix):
        self.nc = nc
        self.prefix = prefix
        self.requests = []  # (headers, decoded body)
        self.cancels = []
        self.cancelled = {}  # id -> asyncio.Event

    async def start(self):
        await self.nc.subscribe(f"{self.prefix}.generate", queue="pagoda", cb=self.on_request)
        await self.nc.subscribe(f"{self.prefix}.cancel", cb=self.on_cancel)
        await self.nc.flush()

    async def on_cancel(self, msg):
        body = msgpack.unpackb(msg.data, raw=False)
        self.cancels.append(body)
        self.cancelled.setdefault(body["id"], asyncio.Event()).set()

    async def on_request(self, msg):
        headers = msg.headers or {}
        req = decode(msg.data, headers)
        self.requests.append((headers, req))
        use_json = headers.get("Content-Type") == "application/json"
        rid = req.get("id")
        reply = req.get("reply_to") or msg.reply

        async def send(body):
            await self.nc.publish(reply, encode(body, use_json),
                                  headers={"Content-Type": "application/json"} if use_json else None)

        def chunk(seq, text, attempt=1, final=None):
            c = {"id": rid, "seq": seq, "attempt": attempt, "text": text,
                 "token_ids": [100 + seq]}
            if final:
                c.update(finish_reason=final,
                         usage={"prompt_tokens": 5, "completion_tokens": seq + 1, "cached_tokens": 0},
                         timings={"queue_ms": 0.1, "ttft_ms": 1.5, "total_ms": 3.0})
            return c

        prompt = req.get("prompt") or (req.get("messages") or [{}])[-1].get("content", "")
        if prompt == "error":
            await send({"id": rid, "seq": 0, "attempt": 1,
                        "error": {"code": "invalid_request", "message": "temperature must be >= 0"}})
        elif prompt == "out of order":
            for c in [chunk(1, " world"), chunk(0, "Hello"), chunk(3, "", final="stop"), chunk(2, "!")]:
                await send(c)
        elif prompt == "redelivered":
            await send(chunk(0, "lost", attempt=1))
            for i, t in enumerate(["Fresh", " start"]):
                await send(chunk(i, t, attempt=2, final="length" if i == 1 else None))
            await send(chunk(1, "late chunk of attempt 1", attempt=1))
        elif prompt == "slow":
            ev = self.cancelled.setdefault(rid, asyncio.Event())
            for i in range(1000):
                if ev.is_set():
                    await send(chunk(i, "", final="abort"))
                    return
                await send(chunk(i, "."))
                await asyncio.sleep(0.01)
        else:
            words = ["fraud" if "fraud" in json.dumps(req) else "legit", "."]
            for i, w in enumerate(words):
                await send(chunk(i, w, final="stop" if i == len(words) - 1 else None))


class FakeJobWorker:
    """Pulls durable jobs from a private work-queue stream (`<prefix>.jobs.>`) the way
    pagoda's JetStream intake does: answers on the body's `reply_to` with `attempt` = the
    delivery count, acks when done. The prompt "redeliver me" is answered in part and
    given back (nak) on its first delivery, so the server redelivers it."""

    def __init__(self, nc, prefix):
        self.nc = nc
        self.js = nc.jetstream()
        self.prefix = prefix
        self.stream = "FAKE_JOBS_" + uuid.uuid4().hex[:8]
        self.jobs = []  # (headers, decoded body, delivery count, the message's own reply)
        self.task = None

    async def start(self):
        await self.js.add_stream(name=self.stream, subjects=[f"{self.prefix}.jobs.>"],
                                 retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.MEMORY)
        self.psub = await self.js.pull_subscribe(
            f"{self.prefix}.jobs.generate", durable="fake", stream=self.stream,
            config=ConsumerConfig(ack_wait=30, max_deliver=3))
        self.task = asyncio.create_task(self.run())

    async def stop(self):
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        await self.js.delete_stream(self.stream)

    async def run(self):
        while True:
            try:
                msgs = await self.psub.fetch(1, timeout=1)
            except nats.errors.TimeoutError:
                continue
            for m in msgs:
                await self.handle(m)

    async def handle(self, m):
        headers = m.headers or {}
        req = decode(m.data, headers)
        attempt = m.metadata.num_delivered
        self.jobs.append((headers, req, attempt, m.reply))
        reply = req.get("reply_to")
        if not reply:
            await m.term()
            return
        use_json = headers.get("Content-Type") == "application/json"

        async def send(seq, text, final=None):
            c = {"id": req["id"], "seq": seq, "attempt": attempt, "text": text, "token_ids": [seq]}
            if final:
                c.update(finish_reason=final,
                         usage={"prompt_tokens": 3, "completion_tokens": seq + 1, "cached_tokens": 0})
            await self.nc.publish(reply, encode(c, use_json),
                                  headers={"Content-Type": "application/json"} if use_json else None)

        if req.get("prompt") == "redeliver me" and attempt == 1:
            await send(0, "lost")
            await self.nc.flush()
            await m.nak()  # as an engine that died would, sooner
            return
        for i, t in enumerate(["Fresh", " start"]):
            await send(i, t, final="length" if i == 1 else None)
        await m.ack()


async def inbox_messages(sub, quiet=0.5):
    """Every message on `sub` until none came for `quiet` seconds."""
    got = []
    while True:
        try:
            got.append(await sub.next_msg(timeout=quiet))
        except nats.errors.TimeoutError:
            return got


async def check_fake(nc):
    prefix = "fake" + uuid.uuid4().hex[:8] + ".v1"
    gen, can = f"{prefix}.generate", f"{prefix}.cancel"
    engine = FakeEngine(nc, prefix)
    await engine.start()

    # 1. MessagePack request: fields at the top level, None dropped, chunks in order.
    chunks = [c async for c in generate(
        nc, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "is this fraud?"}],
        subject=gen, temperature=0, max_tokens=4, top_p=None, stop=["\n"])]
    headers, req = engine.requests[-1]
    assert "Content-Type" not in headers, headers
    assert set(req) == {"id", "messages", "temperature", "max_tokens", "stop"}, req
    assert req["messages"][1] == {"role": "user", "content": "is this fraud?"}, req
    assert req["temperature"] == 0 and req["max_tokens"] == 4 and req["stop"] == ["\n"], req
    assert [c["seq"] for c in chunks] == [0, 1], chunks
    assert "".join(c["text"] for c in chunks) == "fraud.", chunks
    assert chunks[-1]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] == 2
    assert all(c["id"] == req["id"] for c in chunks)
    print("ok: msgpack request, in-order chunks:", chunks[-1])

    # 2. JSON request and replies; our own id.
    text, last = await complete(nc, prompt="hello", subject=gen, use_json=True, request_id="my-id-1", seed=7)
    headers, req = engine.requests[-1]
    assert headers.get("Content-Type") == "application/json", headers
    assert req == {"id": "my-id-1", "prompt": "hello", "seed": 7}, req
    assert text == "legit." and last["id"] == "my-id-1", (text, last)
    print("ok: json request:", repr(text))

    # 3. Out-of-order chunks come out in seq order.
    text, last = await complete(nc, prompt="out of order", subject=gen)
    assert text == "Hello world!" and last["seq"] == 3, (text, last)
    print("ok: reordered:", repr(text))

    # 4. A redelivery (attempt 2) restarts the stream; stale chunks of attempt 1 are dropped.
    chunks = [c async for c in generate(nc, prompt="redelivered", subject=gen)]
    assert [(c["attempt"], c["seq"], c["text"]) for c in chunks] == [
        (1, 0, "lost"), (2, 0, "Fresh"), (2, 1, " start")], chunks
    print("ok: redelivery restarts at attempt 2")

    # 5. An error reply raises PagodaError.
    try:
        await complete(nc, prompt="error", subject=gen)
        raise AssertionError("no error raised")
    except PagodaError as e:
        assert e.code == "invalid_request" and "temperature" in e.message, e
        print("ok: error reply ->", e)

    # 6. cancel(): the stream ends with finish_reason abort.
    rid = "cancel-me"
    got = []
    async for c in generate(nc, prompt="slow", subject=gen, request_id=rid, cancel_subject=can):
        got.append(c)
        if len(got) == 3:
            await cancel(nc, rid, subject=can)
    assert engine.cancels[-1] == {"id": rid}, engine.cancels
    assert got[-1]["finish_reason"] == "abort" and len(got) < 100, got[-1]
    print(f"ok: cancel after 3 chunks, stream ended at seq {got[-1]['seq']} with abort")

    # 7. Closing the generator early cancels the request.
    stream = generate(nc, prompt="slow", subject=gen, request_id="closed-early", cancel_subject=can)
    async for c in stream:
        break
    await stream.aclose()
    await asyncio.sleep(0.1)
    assert {"id": "closed-early"} in engine.cancels, engine.cancels
    print("ok: closing the stream early sends a cancel")

    # 8. Nobody listening: no_responders, quickly.
    try:
        await complete(nc, prompt="x", subject=prefix + ".nobody", idle_timeout=5)
        raise AssertionError("no error raised")
    except PagodaError as e:
        assert e.code == "no_responders", e
        print("ok: no engine ->", e)

    # Durable jobs, through a real JetStream work-queue stream and a fake job worker.
    jobs = f"{prefix}.jobs.generate"
    worker = FakeJobWorker(nc, prefix)
    await worker.start()
    try:
        # 9. generate_durable: Nats-Msg-Id = id, reply_to = our inbox; a redelivery
        # (attempt 2, made by the server after the worker's nak) restarts the stream.
        chunks = [c async for c in generate_durable(
            nc, prompt="redeliver me", subject=jobs, request_id="durable-1", max_tokens=2)]
        assert [(c["attempt"], c["seq"], c["text"]) for c in chunks] == [
            (1, 0, "lost"), (2, 0, "Fresh"), (2, 1, " start")], chunks
        deliveries = [j for j in worker.jobs if j[1]["id"] == "durable-1"]
        assert [j[2] for j in deliveries] == [1, 2], deliveries
        headers, req, _, own_reply = deliveries[0]
        assert headers.get(MSG_ID_HEADER) == "durable-1", headers
        assert "Content-Type" not in headers, headers
        assert req["reply_to"].startswith("_INBOX."), req
        assert own_reply.startswith("$JS.ACK."), own_reply  # not ours: hence reply_to
        assert set(req) == {"id", "prompt", "max_tokens", "reply_to"}, req
        print("ok: durable job (Nats-Msg-Id, reply_to), redelivered by JetStream as attempt 2")

        # 10. complete(durable=True) keeps only the last attempt's text; JSON bodies.
        text, last = await complete(nc, prompt="redeliver me", durable=True, subject=jobs,
                                    request_id="durable-2", use_json=True)
        assert text == "Fresh start" and last["attempt"] == 2, (text, last)
        headers, req, _, _ = [j for j in worker.jobs if j[1]["id"] == "durable-2"][0]
        assert headers.get("Content-Type") == "application/json", headers
        assert headers.get(MSG_ID_HEADER) == "durable-2", headers
        print("ok: complete(durable=True) drops the earlier attempt:", repr(text))

        # 11. A publish repeated with the same id is stored once (the stream's duplicate
        # window): one job, one answer.
        nc_inbox = nc.new_inbox()
        sub = await nc.subscribe(nc_inbox)
        body = {"id": "durable-dup", "prompt": "hello", "reply_to": nc_inbox}
        first = await publish_job(nc, body, jobs)
        second = await publish_job(nc, body, jobs)
        assert not first.duplicate and second.duplicate, (first, second)
        assert second.seq == first.seq, (first, second)
        got = [decode(m.data, m.headers) for m in await inbox_messages(sub)]
        await sub.unsubscribe()
        assert [(c["seq"], c.get("finish_reason")) for c in got] == [(0, None), (1, "length")], got
        assert len([j for j in worker.jobs if j[1]["id"] == "durable-dup"]) == 1, worker.jobs
        print("ok: a repeated publish is a duplicate (seq", second.seq, "), answered once")

        # 12. No stream on the subject: no_stream, at once.
        try:
            await complete(nc, prompt="x", durable=True, subject=f"{prefix}.nostream.generate",
                           idle_timeout=5)
            raise AssertionError("no error raised")
        except PagodaError as e:
            assert e.code == "no_stream", e
            print("ok: durable publish without a stream ->", e)
    finally:
        await worker.stop()

    print("all client checks passed")


async def check_pagoda_jetstream(nc, prefix):
    """Durable jobs answered by a real `pagoda serve --intake jetstream` (prefix `prefix`)."""
    jobs = f"{prefix}.jobs.generate"
    js = nc.jetstream()
    common = dict(max_tokens=8, temperature=0, ignore_eos=True)

    # 1. The same greedy request through core NATS and as a durable job: same answer.
    core_text, core_last = await complete(nc, prompt="The capital of France is",
                                          subject=f"{prefix}.generate", **common)
    chunks = [c async for c in generate_durable(
        nc, prompt="The capital of France is", subject=jobs, request_id="py-durable-1", **common)]
    assert [c["seq"] for c in chunks] == list(range(len(chunks))), chunks
    assert all(c["attempt"] == 1 and c["id"] == "py-durable-1" for c in chunks), chunks
    last = chunks[-1]
    assert last["finish_reason"] == "length", last
    assert last["usage"]["completion_tokens"] == 8, last
    text = "".join(c["text"] for c in chunks)
    assert text == core_text and text.strip(), (text, core_text)
    print(f"ok: durable job answered by pagoda in {len(chunks)} chunks, same as core: {text!r}")

    # 2. JSON bodies, and a chat request, as durable jobs.
    text, last = await complete(nc, messages=[{"role": "user", "content": "Say hi."}],
                                durable=True, subject=jobs, use_json=True, **common)
    assert last["attempt"] == 1 and last["usage"]["completion_tokens"] == 8, last
    print(f"ok: JSON chat job: {text!r}")

    # 3. Several jobs at once: each answered once, with its own id.
    ids = [f"py-many-{i}" for i in range(8)]
    results = await asyncio.gather(*[
        complete(nc, prompt=f"Job {i}: one, two,", durable=True, subject=jobs,
                 request_id=rid, **common)
        for i, rid in enumerate(ids)])
    assert [last["id"] for _, last in results] == ids, results
    assert all(last["usage"]["completion_tokens"] == 8 for _, last in results), results
    print(f"ok: {len(ids)} concurrent durable jobs answered")

    # 4. A publish repeated with the same id is stored once: one answer.
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    body = {"id": "py-dup", "prompt": "Once upon a time", "reply_to": inbox, "stream": False,
            **common}
    first = await publish_job(nc, body, jobs)
    second = await publish_job(nc, body, jobs)
    assert not first.duplicate and second.duplicate and second.seq == first.seq, (first, second)
    got = [decode(m.data, m.headers) for m in await inbox_messages(sub, quiet=2.0)]
    await sub.unsubscribe()
    assert len(got) == 1 and got[0]["finish_reason"] == "length", got
    print("ok: a repeated publish is stored once and answered once")

    # 5. An invalid job gets its typed error on reply_to (and is not redelivered).
    try:
        await complete(nc, prompt="x", durable=True, subject=jobs, temperature=-1.0,
                       idle_timeout=30)
        raise AssertionError("no error raised")
    except PagodaError as e:
        assert e.code == "invalid_request" and "temperature" in e.message, e
        print("ok: invalid durable job ->", e)

    # 5b. n = 3 completions of one prompt, core NATS and durable: one answer per index,
    # each reproducible from its seed (index i samples with seed + i).
    sampled = dict(max_tokens=8, temperature=0.9, ignore_eos=True, seed=11)
    core = await collect(nc, prompt="Three words about the sea:", subject=f"{prefix}.generate",
                         n=3, **sampled)
    durable = await collect(nc, prompt="Three words about the sea:", durable=True, subject=jobs,
                            n=3, **sampled)
    assert [a["index"] for a in core] == [0, 1, 2], core
    for a, b in zip(core, durable):
        assert a["finish_reason"] == "length" and a["usage"]["completion_tokens"] == 8, a
        assert a["token_ids"] == b["token_ids"], (a, b)
    alone = await collect(nc, prompt="Three words about the sea:", subject=f"{prefix}.generate",
                          **dict(sampled, seed=12))
    assert alone["token_ids"] == core[1]["token_ids"], (alone, core[1])
    print("ok: n=3 answered per index, core and durable alike:", [a["text"] for a in core])

    # 6. Every job was acknowledged: the work-queue stream is empty.
    for _ in range(100):
        info = await js.stream_info("PAGODA_JOBS")
        if info.state.messages == 0:
            break
        await asyncio.sleep(0.1)
    assert info.state.messages == 0, info.state
    print("all pagoda jetstream checks passed")


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default=os.environ.get("PAGODA_NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--pagoda-jetstream", action="store_true",
                   help="check durable jobs against a real `pagoda serve --intake jetstream` "
                        "on the server instead of the fake engine")
    p.add_argument("--prefix", default="pagoda.v1", help="the engine's subject prefix")
    args = p.parse_args()
    nc = await nats.connect(args.url)
    try:
        if args.pagoda_jetstream:
            await check_pagoda_jetstream(nc, args.prefix)
        else:
            await check_fake(nc)
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
