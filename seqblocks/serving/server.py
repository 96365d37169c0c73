"""An HTTP server over the continuous-batching ``Engine``, with an OpenAI-compatible API (aiohttp).

Endpoints:

- ``POST /v1/completions``: ``prompt`` (text, or a list of token ids), ``max_tokens`` (16),
  ``temperature`` (1.0), ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``, ``seed``, ``stop`` (a
  string or a list of strings, cut from the text), ``stop_token_ids``, ``stream``; ``n`` must be 1 and
  ``echo`` false. The answer is a ``text_completion`` object with ``choices[0].text``,
  ``finish_reason`` ("stop" / "length") and ``usage``; with ``stream`` it is a stream of server-sent
  events, one ``data: {...}`` per token and ``data: [DONE]`` last.
- ``POST /v1/chat/completions``: ``messages`` [{"role", "content"}], rendered as one line
  ``role: content`` per message followed by ``assistant:`` (the models trained here have no chat
  template), the same sampling fields; ``chat.completion`` objects, or ``chat.completion.chunk``
  deltas when streaming.
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format: requests, tokens,
  running and waiting requests, time to first token).

A bad request gets a 400 with an OpenAI-style ``{"error": {"message", "type", "param"}}`` body naming
the field; a full queue (``max_queue`` waiting requests) or a server shutting down a 503; a request
that runs past ``request_timeout`` seconds is cancelled (504, or a final ``"timeout"`` event when
streaming). A client that disconnects mid-stream cancels its request, which frees its slot. Shutdown
stops taking requests and lets the ones in flight finish (up to ``shutdown_timeout``).

The engine steps in a background thread; each request's tokens cross to the event loop through
``call_soon_threadsafe`` into an ``asyncio.Queue``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

from seqblocks.serving.engine import Engine, Request, SamplingParams

__all__ = ["EngineThread", "create_app", "serve"]


def _aiohttp():
    try:
        from aiohttp import web
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("the HTTP server needs aiohttp: pip install 'seqblocks[serve]'") from err
    return web


class EngineThread:
    """Runs ``engine.step()`` in a daemon thread while the engine has work; idle otherwise."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="seqblocks-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], params: SamplingParams, on_token) -> Request:
        request = self.engine.add_request(prompt, params, request_id=f"cmpl-{uuid.uuid4().hex[:24]}",
                                          on_token=on_token)
        self._wake.set()
        return request

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.engine.has_work():
                try:
                    self.engine.step()
                except BaseException as err:  # noqa: BLE001 - reported to every waiting request
                    self.error = err
                    for request in [*self.engine.waiting, *[r for r in self.engine.slots if r is not None]]:
                        self.engine.cancel(request.request_id)
            else:
                self._wake.wait(0.05)
                self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)


class _BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


_SAMPLING_FIELDS = {"max_tokens": int, "temperature": (int, float), "top_p": (int, float), "top_k": int,
                    "min_p": (int, float), "repetition_penalty": (int, float), "seed": int}


def _sampling(body: dict[str, Any], vocab_size: int) -> tuple[SamplingParams, list[str]]:
    kwargs = {}
    for name, kind in _SAMPLING_FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            raise _BadRequest(f"'{name}' must be a number, got {value!r}", name)
        kwargs[name] = value
    kwargs.setdefault("max_tokens", 16)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise _BadRequest("'stop_token_ids' must be a list of token ids", "stop_token_ids")
    kwargs["stop_tokens"] = tuple(stop_ids)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _BadRequest("'stop' must be a non-empty string or a list of them", "stop")
    if body.get("n", 1) != 1:
        raise _BadRequest("only n=1 is supported", "n")
    if body.get("echo", False):
        raise _BadRequest("echo is not supported", "echo")
    if not isinstance(body.get("stream", False), bool):
        raise _BadRequest("'stream' must be a boolean", "stream")
    try:
        params = SamplingParams(**kwargs)
    except (ValueError, TypeError) as err:
        raise _BadRequest(str(err)) from None
    bad = [t for t in params.stop_tokens if not 0 <= t < vocab_size]
    if bad:
        raise _BadRequest(f"'stop_token_ids' {bad} lie outside [0, {vocab_size})", "stop_token_ids")
    return params, stop


def _render_chat(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    lines = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _BadRequest("each message needs a string 'role' and a string 'content'", "messages")
        lines.append(f"{m['role']}: {m['content']}\n")
    return "".join(lines) + "assistant:"


class _Server:
    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, max_queue: int, request_timeout: float,
                 shutdown_timeout: float) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.max_queue, self.request_timeout, self.shutdown_timeout = max_queue, request_timeout, shutdown_timeout
        self.loop_thread: EngineThread | None = None
        self.in_flight = 0
        self.shutting_down = False
        self.ttft_sum, self.ttft_count = 0.0, 0

    # -- helpers --------------------------------------------------------------------------------------

    def error(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        web = _aiohttp()
        return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": None}},
                                 status=status)

    def encode(self, prompt: Any) -> list[int]:
        V = self.engine.model.vocab_size
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise _BadRequest("this model has no tokenizer: give 'prompt' as a list of token ids", "prompt")
            ids = list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
        else:
            raise _BadRequest("'prompt' must be a string or a list of token ids", "prompt")
        if not ids:
            raise _BadRequest("'prompt' is empty", "prompt")
        if min(ids) < 0 or max(ids) >= V:
            raise _BadRequest(f"'prompt' holds token ids outside [0, {V})", "prompt")
        if len(ids) >= self.engine.max_seqlen:
            raise _BadRequest(f"the prompt has {len(ids)} tokens; this server holds at most "
                              f"{self.engine.max_seqlen} per request", "prompt")
        return ids

    def decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            return "".join(f" {t}" for t in tokens)
        return self.tokenizer.decode(tokens)

    # -- handlers -------------------------------------------------------------------------------------

    async def health(self, request):
        web = _aiohttp()
        status = "shutting_down" if self.shutting_down else "ok"
        return web.json_response({"status": status}, status=503 if self.shutting_down else 200)

    async def models(self, request):
        web = _aiohttp()
        return web.json_response({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                               "owned_by": "seqblocks"}]})

    async def metrics(self, request):
        web = _aiohttp()
        s = self.engine.stats
        lines = [
            "# TYPE seqblocks_requests_total counter", f"seqblocks_requests_total {s['requests']}",
            "# TYPE seqblocks_requests_finished_total counter", f"seqblocks_requests_finished_total {s['finished']}",
            "# TYPE seqblocks_generated_tokens_total counter",
            f"seqblocks_generated_tokens_total {s['generated_tokens']}",
            "# TYPE seqblocks_prompt_tokens_total counter", f"seqblocks_prompt_tokens_total {s['prompt_tokens']}",
            "# TYPE seqblocks_requests_running gauge", f"seqblocks_requests_running {self.engine.num_running}",
            "# TYPE seqblocks_requests_waiting gauge", f"seqblocks_requests_waiting {self.engine.num_waiting}",
            "# TYPE seqblocks_time_to_first_token_seconds summary",
            f"seqblocks_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
            f"seqblocks_time_to_first_token_seconds_count {self.ttft_count}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def completions(self, request):
        return await self._handle(request, chat=False)

    async def chat(self, request):
        return await self._handle(request, chat=True)

    async def _handle(self, request, chat: bool):
        if self.shutting_down:
            return self.error(503, "the server is shutting down", kind="unavailable")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self.error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return self.error(400, "the request body must be a JSON object")
        try:
            if chat:
                ids = self.encode(_render_chat(body.get("messages")))
            elif "prompt" not in body:
                raise _BadRequest("'prompt' is required", "prompt")
            else:
                ids = self.encode(body["prompt"])
            params, stop = _sampling(body, self.engine.model.vocab_size)
            if stop and self.tokenizer is None:
                raise _BadRequest("'stop' strings need a tokenizer; give 'stop_token_ids'", "stop")
        except _BadRequest as err:
            return self.error(400, str(err), err.param)
        if self.engine.num_waiting >= self.max_queue:
            return self.error(503, f"the queue is full ({self.max_queue} requests waiting); retry later",
                              kind="unavailable")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int] = asyncio.Queue()
        on_token = lambda _r, token: loop.call_soon_threadsafe(queue.put_nowait, token)  # noqa: E731
        try:
            job = self.loop_thread.submit(ids, params, on_token)
        except (ValueError, TypeError) as err:
            return self.error(400, str(err))
        self.in_flight += 1
        try:
            if body.get("stream", False):
                return await self._stream(request, job, queue, stop, chat)
            return await self._complete(job, queue, stop, chat)
        finally:
            self.in_flight -= 1
            if not job.finished:
                self.loop_thread.cancel(job.request_id)

    async def _tokens(self, job: Request, queue: asyncio.Queue, stop: list[str], deadline: float):
        """Yield (text so far, new text piece, finish_reason or None) per generated token."""
        text, tokens = "", []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise asyncio.TimeoutError
            token = await asyncio.wait_for(queue.get(), timeout=remaining)
            if token < 0:
                if self.loop_thread.error is not None:
                    raise RuntimeError(f"the engine failed: {self.loop_thread.error}")
                yield text, "", job.finish_reason or "stop"
                return
            if len(tokens) == 0 and job.first_token_time is not None:
                self.ttft_sum += job.first_token_time - job.arrival
                self.ttft_count += 1
            tokens.append(token)
            full = self.decode(tokens)
            cut = min((full.find(s) for s in stop if s in full), default=-1)
            if cut >= 0:
                piece = full[len(text):cut] if cut > len(text) else ""
                self.loop_thread.cancel(job.request_id)
                yield full[:cut], piece, "stop"
                return
            piece, text = full[len(text):], full
            yield text, piece, None

    def _object(self, job: Request, chat: bool, text: str | None, finish: str | None, delta: bool) -> dict:
        created = int(time.time())
        if chat:
            if delta:
                choice = {"index": 0, "delta": {"content": text} if text is not None else {}, "finish_reason": finish}
            else:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            kind = "chat.completion.chunk" if delta else "chat.completion"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        return {"id": job.request_id, "object": kind, "created": created, "model": self.model_name,
                "choices": [choice]}

    async def _complete(self, job: Request, queue: asyncio.Queue, stop: list[str], chat: bool):
        web = _aiohttp()
        deadline = time.monotonic() + self.request_timeout
        text, finish = "", None
        try:
            async for so_far, _, finish in self._tokens(job, queue, stop, deadline):
                text = so_far
                if finish is not None:
                    break
        except asyncio.TimeoutError:
            self.loop_thread.cancel(job.request_id)
            return self.error(504, f"the request ran past {self.request_timeout} s and was cancelled",
                              kind="timeout")
        except RuntimeError as err:
            return self.error(500, str(err), kind="server_error")
        out = self._object(job, chat, text, finish, delta=False)
        n = len(job.tokens)
        out["usage"] = {"prompt_tokens": len(job.prompt), "completion_tokens": n, "total_tokens": len(job.prompt) + n}
        return web.json_response(out)

    async def _stream(self, request, job: Request, queue: asyncio.Queue, stop: list[str], chat: bool):
        web = _aiohttp()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(obj: Any) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            await response.write(f"data: {data}\n\n".encode())

        deadline = time.monotonic() + self.request_timeout
        try:
            if chat:
                first = self._object(job, chat, None, None, delta=True)
                first["choices"][0]["delta"] = {"role": "assistant"}
                await send(first)
            async for _, piece, finish in self._tokens(job, queue, stop, deadline):
                if piece or finish is None:
                    await send(self._object(job, chat, piece, None, delta=True))
                if finish is not None:
                    await send(self._object(job, chat, None if chat else "", finish, delta=True))
                    break
            await send("[DONE]")
        except asyncio.TimeoutError:
            self.loop_thread.cancel(job.request_id)
            await send(self._object(job, chat, None if chat else "", "timeout", delta=True))
            await send("[DONE]")
        except (ConnectionResetError, asyncio.CancelledError):
            self.loop_thread.cancel(job.request_id)  # the client left: free the slot
            raise
        await response.write_eof()
        return response

    # -- lifecycle ------------------------------------------------------------------------------------

    async def on_startup(self, app) -> None:
        self.loop_thread = EngineThread(self.engine)

    async def on_shutdown(self, app) -> None:
        self.shutting_down = True
        deadline = time.monotonic() + self.shutdown_timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def on_cleanup(self, app) -> None:
        if self.loop_thread is not None:
            self.loop_thread.stop()


def create_app(engine: Engine, tokenizer: Any = None, *, model_name: str = "seqblocks", max_queue: int = 64,
               request_timeout: float = 600.0, shutdown_timeout: float = 60.0):
    """The aiohttp ``web.Application`` serving ``engine`` (module docstring). ``tokenizer`` (with
    ``encode(str) -> list[int]`` and ``decode(list[int]) -> str``) turns text prompts into ids; without
    one, prompts are token-id lists and the text is the ids separated by spaces."""
    web = _aiohttp()
    if not isinstance(engine, Engine):
        raise TypeError(f"create_app: engine must be a seqblocks.serving.Engine, got {type(engine).__name__}")
    for name, value in (("max_queue", max_queue), ("request_timeout", request_timeout),
                        ("shutdown_timeout", shutdown_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"create_app: {name}={value!r} must be positive")
    server = _Server(engine, tokenizer, model_name, max_queue, float(request_timeout), float(shutdown_timeout))
    app = web.Application()
    app.router.add_get("/health", server.health)
    app.router.add_get("/metrics", server.metrics)
    app.router.add_get("/v1/models", server.models)
    app.router.add_post("/v1/completions", server.completions)
    app.router.add_post("/v1/chat/completions", server.chat)
    app.on_startup.append(server.on_startup)
    app.on_shutdown.append(server.on_shutdown)
    app.on_cleanup.append(server.on_cleanup)
    return app


def serve(engine: Engine, tokenizer: Any = None, *, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    """Run the server until interrupted (Ctrl-C / SIGTERM shut it down gracefully)."""
    web = _aiohttp()
    app = create_app(engine, tokenizer, **kwargs)
    web.run_app(app, host=host, port=port, shutdown_timeout=kwargs.get("shutdown_timeout", 60.0))
