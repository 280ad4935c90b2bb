"""Checks client.py against a fake engine (no model, no pagoda needed, only a NATS server):

    python examples/python/test_client.py [--url nats://127.0.0.1:4222]

The fake engine speaks wire protocol v1 on a private subject prefix, so a real pagoda on
the same server is not disturbed. It records the requests it decodes and answers with
MessagePack (or JSON) chunks: in order, out of order, after a redelivery (attempt 2), as
an error, or slowly until a cancel arrives.
"""

import argparse
import asyncio
import json
import os
import sys
import uuid

import msgpack
import nats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from client import PagodaError, cancel, complete, decode, encode, generate  # noqa: E402


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


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default=os.environ.get("PAGODA_NATS_URL", "nats://127.0.0.1:4222"))
    args = p.parse_args()
    nc = await nats.connect(args.url)
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

    await nc.close()
    print("all client checks passed")


if __name__ == "__main__":
    asyncio.run(main())
