"""The OpenAI-compatible server (lab 30), through the real `openai` client, on 127.0.0.1 only."""

import asyncio
import http.client
import json
import signal
import socket
import threading
import time
from types import SimpleNamespace

import numpy as np
import openai
import pytest
import uvicorn
from test_serving_engine import MODEL, solo

from labsupport.serving import Engine, Request
from labsupport.serving.load import Workload, run_load
from labsupport.serving.process import free_port, serve
from labsupport.serving.server import create_app


class ByteTokenizer:
    """Bytes as tokens (the test model has 256 of them): no tokenizer to train."""

    def encode(self, text):
        return SimpleNamespace(ids=list(text.encode()))

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


class Served:
    """An engine behind the app, served by uvicorn on a thread, on a free loopback port."""

    def __init__(self, **engine_kwargs):
        self.engine = Engine(MODEL, **{"max_batch": 8, **engine_kwargs})
        self.port = free_port()
        config = uvicorn.Config(create_app(self.engine, "tiny", ByteTokenizer()),
                                host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()

    def client(self):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)

    def post(self, body: bytes | dict):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", "/v1/completions", data, {"Content-Type": "application/json"})
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, json.loads(response.read())


@pytest.fixture(scope="module")
def served():
    with Served() as s:
        yield s


def test_completion_through_the_openai_client(served):
    prompt = [3, 1, 4, 1, 5]
    out = served.client().completions.create(model="tiny", prompt=prompt, max_tokens=9,
                                             temperature=0)
    ids = out.choices[0].model_extra["token_ids"]
    assert ids == solo(Request(prompt=prompt, max_tokens=9))
    assert out.choices[0].text == ByteTokenizer().decode(ids)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (5, 9)
    text = served.client().completions.create(model="tiny", prompt="hello", max_tokens=3,
                                              temperature=0)
    assert text.usage.prompt_tokens == 5  # five bytes


def test_streaming_through_the_openai_client(served):
    prompt = [2, 7, 1, 8]
    stream = served.client().completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    ids = [t for c in chunks for choice in c.choices for t in choice.model_extra["token_ids"]]
    assert ids == solo(Request(prompt=prompt, max_tokens=12))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_models_and_health(served):
    assert [m.id for m in served.client().models.list()] == ["tiny"]
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read())["status"] == "ok"


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    ({"model": "tiny", "max_tokens": 4}, "prompt"),
    ({"model": "tiny", "prompt": [1], "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": [1] * 60, "max_tokens": 10}, "max_tokens"),
    ({"model": "gpt-5", "prompt": [1], "max_tokens": 4}, "model"),
    ({"model": "tiny", "prompt": [1], "max_tokens": 4, "seed": "abc"}, "seed"),
    (b'{"model": "tiny", "prompt": [1], "max_tokens": 4, "temperature": NaN}', "temperature"),
])
def test_bad_requests_get_openai_error_bodies(served, body, param):
    status, _, reply = served.post(body)
    assert status == 400
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"]
    assert reply["error"]["param"] == param


def test_the_openai_client_raises_on_bad_requests(served):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        served.client().completions.create(model="tiny", prompt=[1], max_tokens=-1)


def test_a_full_queue_answers_429_with_retry_after():
    with Served(max_queue=0) as s:
        status, headers, reply = s.post({"model": "tiny", "prompt": [1], "max_tokens": 2})
    assert status == 429 and headers["retry-after"] == "1"
    assert "queue full" in reply["error"]["message"]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": "tiny", "prompt": [1, 2], "max_tokens": 60, "stream": True}),
        {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.readline().startswith(b"data: ")  # the first token arrived
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 5
    while served.engine.running or served.engine.waiting:
        assert time.time() < deadline, "the slot was never freed"
        time.sleep(0.02)


def test_a_client_that_disconnects_before_a_plain_response_frees_its_place():
    # a static batch that waits a minute to fill: the request sits in the queue until cancelled
    with Served(policy="static", static_timeout_s=60) as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": "tiny", "prompt": [1, 2], "max_tokens": 8}),
            {"Content-Type": "application/json"})
        deadline = time.time() + 5
        while not s.engine.waiting:
            assert time.time() < deadline, "the request never arrived"
            time.sleep(0.01)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        while s.engine.waiting or s.engine.running:
            assert time.time() < deadline, "the request was kept after its client left"
            time.sleep(0.02)


def test_64_concurrent_streaming_clients(served):
    prompts = [[(7 * i + j) % 256 for j in range(1 + i % 9)] for i in range(64)]
    lengths = [4 + (5 * i) % 17 for i in range(64)]
    client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0)

    async def one(prompt, n):
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=n,
                                                 temperature=0, stream=True)
        return [t async for c in stream for ch in c.choices for t in ch.model_extra["token_ids"]]

    async def everyone():
        return await asyncio.wait_for(asyncio.gather(*map(one, prompts, lengths)), timeout=60)

    outputs = asyncio.run(everyone())
    assert len(outputs) == 64
    for prompt, n, ids in zip(prompts, lengths, outputs, strict=True):
        assert ids == solo(Request(prompt=prompt, max_tokens=n))
    assert served.engine.idle() and served.engine.running == 0


def test_the_command_line_server_stops_cleanly_on_sigterm():
    with serve("small", random_init=True, startup_timeout_s=60,
               env={"LABS_PROFILE": "smoke"}) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                               timeout=10)
        assert [m.id for m in client.models.list()] == ["small"]
        stream = client.completions.create(model="small", prompt="def", max_tokens=100,
                                           stream=True)
        first = next(iter(stream))  # a request is in flight
        server.proc.send_signal(signal.SIGTERM)
        rest = list(stream)  # the request in flight is finished before the server stops
        # uvicorn shuts down gracefully, then re-raises the signal: exit status -SIGTERM
        assert server.proc.wait(timeout=20) in (0, -signal.SIGTERM)
        assert "Traceback" not in server.log()
    tokens = [t for c in [first, *rest] for ch in c.choices for t in ch.model_extra["token_ids"]]
    assert len(tokens) == 100 and rest[-1].choices[0].finish_reason == "length"
    with socket.socket() as s:  # nobody listens on the port: a new server may bind it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        s.bind(("127.0.0.1", server.port))
        s.listen()


def test_a_server_that_cannot_start_is_reported_with_its_log():
    with pytest.raises(RuntimeError, match="invalid choice"), serve("no-such-model"):
        pass


def test_the_workload_is_skewed_bounded_and_repeatable():
    w = Workload(n_requests=400, output_median=20, output_sigma=1.0, output_max=200,
                 vocab_size=256)
    lengths = np.array([r["max_tokens"] for r in w.requests()])
    assert w.requests() == Workload(n_requests=400, output_median=20, output_sigma=1.0,
                                    output_max=200, vocab_size=256).requests()
    assert lengths.min() >= 1 and lengths.max() <= 200
    assert 15 <= np.median(lengths) <= 25 and lengths.mean() > np.median(lengths)  # right skew
    assert all(0 < t < 256 for r in w.requests() for t in r["prompt"])


@pytest.mark.parametrize("mode", [{"rate": 200.0}, {"concurrency": 4}])
def test_the_load_generator_measures_every_request(served, mode):
    requests = Workload(n_requests=24, prompt_median=8, prompt_max=20, output_median=6,
                        output_max=30, vocab_size=256, seed=2).requests()
    summary, results = run_load(served.url, requests, "tiny", timeout_s=30, **mode)
    assert summary["completed"] == 24 and summary["failed"] == 0
    assert [r.output_tokens for r in results] == [r["max_tokens"] for r in requests]
    for r in results:
        assert 0 < r.ttft <= r.e2e
    assert summary["ttft_p50_ms"] <= summary["ttft_p90_ms"] <= summary["ttft_p99_ms"]
    assert summary["output_tokens_per_s"] == pytest.approx(
        sum(q["max_tokens"] for q in requests) / summary["duration_s"])


def test_the_load_generator_counts_failures_and_stays_on_loopback(served):
    summary, results = run_load(served.url, [{"prompt": [1] * 60, "max_tokens": 30}], "tiny")
    assert summary["failed"] == 1 and "BadRequest" in results[0].error
    with pytest.raises(ValueError, match="not a loopback address"):
        run_load("http://192.0.2.1:8000", [{"prompt": [1], "max_tokens": 1}], "tiny")
    with pytest.raises(ValueError, match="rate must be > 0"):
        run_load(served.url, [{"prompt": [1], "max_tokens": 1}], "tiny", rate=0)


def test_the_load_generator_runs_inside_an_event_loop(served):
    async def from_a_notebook_cell():  # Jupyter runs cells inside a running loop
        return run_load(served.url, [{"prompt": [1, 2], "max_tokens": 3}], "tiny")

    summary, _ = asyncio.run(from_a_notebook_cell())
    assert summary["completed"] == 1


def test_an_error_inside_a_step_fails_its_requests_and_the_server_carries_on(monkeypatch):
    with Served() as s:
        def broken(*args, **kwargs):
            raise RuntimeError("a kernel failed")

        monkeypatch.setattr(s.engine, "_forward", broken)
        with pytest.raises(openai.InternalServerError, match="a kernel failed"):
            s.client().completions.create(model="tiny", prompt=[1, 2], max_tokens=4,
                                          timeout=10)
        with pytest.raises(openai.APIError, match="a kernel failed"):
            list(s.client().completions.create(model="tiny", prompt=[1, 2], max_tokens=4,
                                               stream=True, timeout=10))
        monkeypatch.undo()
        out = s.client().completions.create(model="tiny", prompt=[1, 2], max_tokens=4,
                                            temperature=0)
        assert out.choices[0].model_extra["token_ids"] == solo(Request(prompt=[1, 2],
                                                                        max_tokens=4))
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read())["engine_errors"] >= 1
