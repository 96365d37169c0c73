"""The HTTP server end to end with a real HTTP client on 127.0.0.1: completions and chat, streaming with
server-sent events, concurrent requests (each gets its tokens alone), malformed requests, a client
that disconnects mid-stream (its slot is freed), a full queue, timeouts, metrics, and shutdown with
requests in flight."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from seqblocks import LRNNLMHeadModel, generate  # noqa: E402
from seqblocks.serving import Engine  # noqa: E402
from seqblocks.serving.server import create_app  # noqa: E402
from seqblocks.tasks.chars import CharTokenizer  # noqa: E402

TOK = CharTokenizer()


def model():
    torch.manual_seed(0)
    return LRNNLMHeadModel(32, 4, 2, TOK.vocab_size, ["mamba", "attn"], d_intermediate=64,
                           mixer_kwargs={"attn": {"num_heads": 2}, "mamba": {"expand": 1}},
                           dtype=torch.float64).eval()


def greedy_text(m, prompt: str, n: int) -> str:
    out = generate(m, torch.tensor([TOK.encode(prompt)]), n, temperature=0)
    return TOK.decode(out.tokens[0].tolist())


async def start(app):
    runner = web.AppRunner(app, shutdown_timeout=10)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


def run(coro_fn, **app_kwargs):
    m = model()
    engine = Engine(m, max_batch_size=app_kwargs.pop("max_batch_size", 4), max_seqlen=128, prefill_chunk_size=8)
    app = create_app(engine, TOK, model_name="tiny", **app_kwargs)

    async def main():
        runner, url = await start(app)
        try:
            async with aiohttp.ClientSession() as session:
                return await coro_fn(session, url, m, engine, runner)
        finally:
            if runner.server is not None:  # not already shut down by the test
                await runner.cleanup()

    return asyncio.run(main())


async def events(response):
    """The data payloads of a server-sent-event stream."""
    out = []
    async for line in response.content:
        line = line.decode().strip()
        if line.startswith("data: "):
            out.append(line[len("data: "):])
    return out


def test_completion_streaming_and_concurrency():
    async def go(session, url, m, engine, runner):
        async with session.post(f"{url}/v1/completions", json={"prompt": "def f", "max_tokens": 6,
                                                                "temperature": 0}) as r:
            assert r.status == 200
            body = await r.json()
        assert body["object"] == "text_completion" and body["model"] == "tiny"
        assert body["choices"][0]["text"] == greedy_text(m, "def f", 6)
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}

        async with session.post(f"{url}/v1/completions", json={"prompt": "abc", "max_tokens": 5,
                                                                "temperature": 0, "stream": True}) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            data = await events(r)
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == greedy_text(m, "abc", 5)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"

        prompts = ["x = 1", "for i in", "import os", "class A", "while", "return"]  # more than the 4 slots

        async def one(p):
            async with session.post(f"{url}/v1/completions",
                                    json={"prompt": p, "max_tokens": 7, "temperature": 0}) as r:
                return (await r.json())["choices"][0]["text"]

        texts = await asyncio.gather(*(one(p) for p in prompts))
        assert texts == [greedy_text(m, p, 7) for p in prompts]

    run(go)


def test_chat_stop_strings_seed_models_health_metrics():
    async def go(session, url, m, engine, runner):
        messages = [{"role": "user", "content": "hi"}]
        async with session.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 4,
                                                                     "temperature": 0}) as r:
            body = await r.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant",
                                                  "content": greedy_text(m, "user: hi\nassistant:", 4)}
        async with session.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 4,
                                                                     "temperature": 0, "stream": True}) as r:
            data = await events(r)
        deltas = [json.loads(d)["choices"][0]["delta"] for d in data[:-1]]
        assert deltas[0] == {"role": "assistant"}
        assert "".join(d.get("content", "") for d in deltas) == body["choices"][0]["message"]["content"]

        full = greedy_text(m, "abc", 12)
        stop = full[3:5]
        async with session.post(f"{url}/v1/completions", json={"prompt": "abc", "max_tokens": 12, "temperature": 0,
                                                                "stop": [stop]}) as r:
            body = await r.json()
        assert body["choices"][0]["text"] == full[: full.find(stop)] and body["choices"][0]["finish_reason"] == "stop"

        payload = {"prompt": "ab", "max_tokens": 5, "temperature": 1.0, "seed": 7}
        texts = []
        for _ in range(2):
            async with session.post(f"{url}/v1/completions", json=payload) as r:
                texts.append((await r.json())["choices"][0]["text"])
        assert texts[0] == texts[1]  # the same seed, the same tokens

        async with session.get(f"{url}/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == "tiny"
        async with session.get(f"{url}/health") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with session.get(f"{url}/metrics") as r:
            text = await r.text()
        assert "seqblocks_generated_tokens_total" in text and "seqblocks_requests_running 0" in text

    run(go)


def test_malformed_requests_get_a_400_naming_the_field():
    async def go(session, url, m, engine, runner):
        cases = [
            (b"{not json", None),
            (json.dumps({"max_tokens": 3}).encode(), "prompt"),
            (json.dumps({"prompt": "a", "max_tokens": "many"}).encode(), "max_tokens"),
            (json.dumps({"prompt": "a", "temperature": -1}).encode(), None),
            (json.dumps({"prompt": [1, 9999]}).encode(), "prompt"),
            (json.dumps({"prompt": "a", "n": 2}).encode(), "n"),
            (json.dumps({"prompt": "a", "stop": 3}).encode(), "stop"),
            (json.dumps({"prompt": "x" * 200}).encode(), "prompt"),
            (json.dumps({"messages": "hello"}).encode(), "messages"),
        ]
        for i, (raw, param) in enumerate(cases):
            path = "/v1/chat/completions" if i == len(cases) - 1 else "/v1/completions"
            async with session.post(f"{url}{path}", data=raw, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400, raw
                err = (await r.json())["error"]
                assert err["type"] == "invalid_request_error" and err["message"]
                if param is not None:
                    assert err["param"] == param, (raw, err)
        assert engine.stats["requests"] == 0  # none reached the engine

    run(go)


def test_a_client_that_disconnects_mid_stream_frees_its_slot():
    async def go(session, url, m, engine, runner):
        r = await session.post(f"{url}/v1/completions", json={"prompt": "abc", "max_tokens": 100, "stream": True})
        seen = 0
        async for line in r.content:
            if line.startswith(b"data: "):
                seen += 1
                if seen == 3:
                    break
        r.close()  # the client goes away mid-stream
        for _ in range(200):
            await asyncio.sleep(0.05)
            if engine.num_running == 0:
                break
        assert engine.num_running == 0 and engine.stats["finished"] == 1
        assert engine.stats["generated_tokens"] < 100  # cancelled, not run to the end

    run(go)


def test_a_request_past_its_timeout_is_cancelled_with_a_504():
    async def go(session, url, m, engine, runner):
        async with session.post(f"{url}/v1/completions", json={"prompt": "abc", "max_tokens": 120}) as r:
            assert r.status == 504 and (await r.json())["error"]["type"] == "timeout"
        for _ in range(100):
            if engine.num_running == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.num_running == 0 and engine.stats["generated_tokens"] < 120  # cancelled

    run(go, request_timeout=0.05)


def test_a_full_queue_is_a_503():
    async def go(session, url, m, engine, runner):
        body = {"prompt": "abc", "max_tokens": 120, "temperature": 0}
        first = asyncio.ensure_future(session.post(f"{url}/v1/completions", json=body))
        while engine.num_running == 0:
            await asyncio.sleep(0.005)
        second = asyncio.ensure_future(session.post(f"{url}/v1/completions", json=body))
        while engine.num_waiting == 0 and engine.stats["requests"] < 2:
            await asyncio.sleep(0.005)
        async with session.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}) as r:
            assert r.status == 503 and "queue is full" in (await r.json())["error"]["message"]
        for task in (first, second):
            response = await task
            assert response.status == 200
            response.close()

    run(go, max_batch_size=1, max_queue=1)


def test_shutdown_finishes_requests_in_flight():
    async def go(session, url, m, engine, runner):
        request = asyncio.ensure_future(session.post(f"{url}/v1/completions",
                                                     json={"prompt": "abc", "max_tokens": 30, "temperature": 0}))
        while engine.num_running == 0:
            await asyncio.sleep(0.01)
        shutdown = asyncio.ensure_future(runner.cleanup())
        response = await request
        body = await response.json()
        await shutdown
        assert response.status == 200 and body["choices"][0]["text"] == greedy_text(m, "abc", 30)

    run(go)


def test_seqblocks_serve_command_end_to_end(tmp_path):
    """`seqblocks serve CKPT` in its own process: health, a completion, then SIGINT shuts it down cleanly."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    m = model()
    m.save_pretrained(tmp_path / "ckpt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "seqblocks", "serve", str(tmp_path / "ckpt"), "--port", str(port),
                             "--device", "cpu", "--max-batch-size", "2", "--max-seqlen", "64", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    assert json.loads(r.read())["status"] == "ok"
                break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(proc.stderr.read().decode()) from None
                time.sleep(0.1)
        data = json.dumps({"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(f"{url}/v1/completions", data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = json.loads(r.read())
        expected = generate(m, torch.tensor([[1, 2, 3]]), 4, temperature=0).tokens[0].tolist()
        assert body["choices"][0]["text"] == "".join(f" {t}" for t in expected)  # no tokenizer: ids
        assert body["model"] == "ckpt"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, proc.stderr.read().decode()
