"""An OpenAI-compatible HTTP server in front of the engine: /v1/completions, /v1/models, /health.

Introduced in lab 30. One background thread runs `Engine.step()` while there is work; request
handlers only submit requests and wait for their tokens, which the engine thread hands over
through each request's `on_token` callback. Errors use OpenAI's error body, so that the
`openai` client raises its usual exceptions.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import traceback
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from .engine import Engine, Request

END = object()  # marks the end of a request's token stream


class EngineLoop:
    """Runs engine.step() on a thread of its own while there is work; sleeps when idle."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.wake, self.stopping = threading.Event(), threading.Event()
        self.errors = 0  # steps that raised
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                ran = self.engine.step()
            except Exception as e:  # one bad step must not stop the server: drop what it held
                traceback.print_exc()
                self.engine.fail_all(f"the engine failed: {type(e).__name__}: {e}")
                self.errors += 1
                continue
            if not ran:
                # nothing ran: wait for a submit, or re-check soon if a batch is forming
                self.wake.wait(0.005 if self.engine.waiting else 0.1)
                self.wake.clear()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Cancel what is waiting or running, let the engine retire it, and stop the thread."""
        for r in list(self.engine.waiting) + [r for r in self.engine.slots if r is not None]:
            self.engine.cancel(r)
        deadline = time.perf_counter() + 5
        while not self.engine.idle() and time.perf_counter() < deadline:
            self.wake.set()
            time.sleep(0.01)
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout=5)


def error(status: int, message: str, param: str | None = None,
          kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    """A response with OpenAI's error body."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(engine: Engine, model_name: str, tokenizer) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name`; `tokenizer` encodes string prompts."""
    loop = EngineLoop(engine)

    @asynccontextmanager
    async def lifespan(app):
        loop.start()
        yield
        loop.stop()

    app = FastAPI(lifespan=lifespan)
    app.state.engine, app.state.loop = engine, loop

    @app.get("/health")
    async def health():
        alive = loop.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped",
                             "running": engine.running, "waiting": len(engine.waiting),
                             "engine_errors": loop.errors}, status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "labsupport"}]}

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(400, f"the request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object")
        if body.get("model", model_name) != model_name:
            return error(400, f"unknown model {body['model']!r}; this server has "
                              f"{model_name!r}", "model")
        prompt = body.get("prompt")
        if isinstance(prompt, str) and prompt:
            ids = tokenizer.encode(prompt).ids
        elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            ids = prompt
        else:
            return error(400, "prompt is required: a non-empty string or list of token ids",
                         "prompt")
        max_tokens, temperature = body.get("max_tokens", 16), body.get("temperature", 1.0)
        if type(max_tokens) is not int or max_tokens < 1:
            return error(400, f"max_tokens must be an integer >= 1, got {max_tokens!r}",
                         "max_tokens")
        if (not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
                or not 0 <= temperature <= 100):
            return error(400, f"temperature must be a number in [0, 100], got {temperature!r}",
                         "temperature")
        seed = body.get("seed")
        if seed is not None and (type(seed) is not int or not 0 <= seed < 2**63):
            return error(400, f"seed must be an integer in [0, 2**63), got {seed!r}", "seed")
        if len(ids) + max_tokens > engine.cfg.max_seq_len:
            return error(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                              f"the model's context of {engine.cfg.max_seq_len} tokens",
                         "max_tokens")
        aloop, tokens = asyncio.get_running_loop(), asyncio.Queue()

        def on_token(request: Request, token: int) -> None:  # both run on the engine's thread
            aloop.call_soon_threadsafe(tokens.put_nowait, token)

        def on_done(request: Request) -> None:
            aloop.call_soon_threadsafe(tokens.put_nowait, END)

        request = Request(prompt=ids, max_tokens=max_tokens, temperature=float(temperature),
                          seed=seed, on_token=on_token, on_done=on_done)
        try:
            engine.submit(request)
        except OverflowError as e:
            return error(429, f"{e}; retry later", None, "rate_limit_exceeded",
                         headers={"Retry-After": "1"})
        except ValueError as e:
            return error(400, str(e), "prompt")
        loop.wake.set()
        completion_id, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text: str, token_ids: list[int], finish: str | None) -> dict:
            return {"id": completion_id, "object": "text_completion", "created": created,
                    "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None,
                                 "finish_reason": finish, "token_ids": token_ids}]}

        def finish_reason() -> str:
            return "length" if len(request.output) >= request.max_tokens else "abort"

        def usage() -> dict:
            n = len(request.output)
            return {"prompt_tokens": len(ids), "completion_tokens": n,
                    "total_tokens": len(ids) + n}

        if not body.get("stream", False):
            async def all_tokens() -> None:
                while (await tokens.get()) is not END:
                    pass

            waiter = asyncio.ensure_future(all_tokens())
            try:  # a plain response is not cancelled when its client leaves: ask, now and then
                while not (await asyncio.wait({waiter}, timeout=0.1))[0]:
                    if await http.is_disconnected():
                        return error(499, "the client closed the connection", None)
            finally:  # done, or the client is gone: free the slot
                waiter.cancel()
                if not request.done.is_set():
                    engine.cancel(request)
                    loop.wake.set()
            if request.error:
                return error(500, request.error, None, "server_error")
            return {**chunk(tokenizer.decode(request.output), request.output, finish_reason()),
                    "usage": usage()}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events():
            try:
                while True:
                    token = await tokens.get()
                    if token is END:
                        break
                    yield f"data: {json.dumps(chunk(tokenizer.decode([token]), [token], None))}\n\n"
                if request.error:  # OpenAI's way to fail a stream that has started
                    body = {"error": {"message": request.error, "type": "server_error",
                                      "param": None, "code": None}}
                    yield f"data: {json.dumps(body)}\n\n"
                    return
                yield f"data: {json.dumps(chunk('', [], finish_reason()))}\n\n"
                if include_usage:
                    data = {**chunk("", [], None), "choices": [], "usage": usage()}
                    yield f"data: {json.dumps(data)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we finished): free the slot at the next step
                if not request.done.is_set():
                    engine.cancel(request)
                    loop.wake.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
