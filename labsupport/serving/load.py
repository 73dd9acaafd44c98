"""A load generator for OpenAI-compatible servers, in the manner of vLLM's benchmark_serving.

Introduced in lab 30. Requests arrive as a Poisson process at a given rate, or are kept at a
fixed concurrency; each one streams, so that the time to the first token (TTFT) and the time
per output token after it (TPOT) can be measured beside the end-to-end latency. It targets
loopback addresses only unless told otherwise, and every run is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import math
import random
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import openai


@dataclass(frozen=True)
class Workload:
    """Prompt and output lengths, each log-normal (median, sigma), clipped to [1, max]."""

    n_requests: int = 64
    prompt_median: int = 32
    prompt_sigma: float = 0.5
    prompt_max: int = 96
    output_median: int = 24
    output_sigma: float = 1.0  # skewed: a few outputs are many times the median
    output_max: int = 128
    vocab_size: int = 4096
    seed: int = 0

    def requests(self) -> list[dict]:
        """The requests: {"prompt": token ids, "max_tokens": n}, the same for the same seed."""
        rng = random.Random(self.seed)

        def length(median, sigma, top):
            return max(1, min(top, round(rng.lognormvariate(math.log(median), sigma))))

        out = []
        for _ in range(self.n_requests):
            n_prompt = length(self.prompt_median, self.prompt_sigma, self.prompt_max)
            out.append({"prompt": [rng.randrange(1, self.vocab_size) for _ in range(n_prompt)],
                        "max_tokens": length(self.output_median, self.output_sigma,
                                             self.output_max)})
        return out


@dataclass
class Result:
    """One request as the client saw it (seconds from its own start)."""

    ok: bool
    output_tokens: int = 0
    ttft: float = math.nan
    e2e: float = math.nan
    error: str = ""

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first."""
        if self.output_tokens < 2:
            return math.nan
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def check_loopback(url: str) -> None:
    """ValueError unless `url` points at this machine (127.0.0.0/8, ::1 or localhost)."""
    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve the host of url {url!r}: {e}") from e
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(f"url {url!r} is not a loopback address; pass allow_remote=True to "
                         f"load a server you run elsewhere")


async def _one(client, model: str, request: dict, timeout_s: float) -> Result:
    start = time.perf_counter()
    seen = {"ttft": None, "tokens": 0, "usage": None}

    async def stream_all():
        stream = await client.completions.create(
            model=model, prompt=request["prompt"], max_tokens=request["max_tokens"],
            temperature=0, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                seen["usage"] = chunk.usage.completion_tokens
            choice = chunk.choices[0] if chunk.choices else None
            if choice is not None and (choice.text or choice.finish_reason is None):
                seen["tokens"] += 1  # one token per chunk; the usage chunk corrects if not
                if seen["ttft"] is None:
                    seen["ttft"] = time.perf_counter() - start

    try:
        await asyncio.wait_for(stream_all(), timeout_s)
    except (openai.APIError, asyncio.TimeoutError) as e:
        return Result(ok=False, error=f"{type(e).__name__}: {e}")
    n = seen["usage"] if seen["usage"] is not None else seen["tokens"]
    ttft = seen["ttft"] if seen["ttft"] is not None else math.nan
    return Result(ok=True, output_tokens=n, ttft=ttft, e2e=time.perf_counter() - start)


async def _run(url, model, requests, rate, concurrency, timeout_s, seed) -> list[Result]:
    client = openai.AsyncOpenAI(base_url=f"{url.rstrip('/')}/v1", api_key="none",
                                max_retries=0, timeout=timeout_s)
    limit = asyncio.Semaphore(concurrency or len(requests))
    rng = random.Random(seed)

    async def limited(request):
        async with limit:
            return await _one(client, model, request, timeout_s)

    tasks = []
    for request in requests:
        tasks.append(asyncio.create_task(limited(request)))
        if rate is not None:  # Poisson arrivals: exponential gaps with mean 1 / rate
            await asyncio.sleep(rng.expovariate(rate))
    try:
        return await asyncio.gather(*tasks)
    finally:
        await client.close()


def run_load(url: str, requests: list[dict], model: str, rate: float | None = None,
             concurrency: int | None = None, timeout_s: float = 60.0, seed: int = 0,
             allow_remote: bool = False) -> tuple[dict, list[Result]]:
    """Send `requests` to the server at `url`; (summary, per-request results).

    rate: Poisson arrivals per second (None sends them all at once); concurrency: the most
    requests in flight. Each request is bounded by timeout_s, so a run lasts at most about
    len(requests) / rate + timeout_s.
    """
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (or None), got {rate!r}")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1 (or None), got {concurrency!r}")
    if not requests:
        raise ValueError("requests must not be empty")
    if not allow_remote:
        check_loopback(url)
    start = time.perf_counter()
    results = _run_to_end(_run(url, model, requests, rate, concurrency, timeout_s, seed))
    return summarize(results, time.perf_counter() - start), results


def _run_to_end(coroutine):
    """asyncio.run, also from code that already runs in an event loop (a Jupyter cell)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a loop of its own, on a thread
        return pool.submit(asyncio.run, coroutine).result()


def summarize(results: list[Result], duration_s: float) -> dict:
    """Throughput and latency percentiles (p50, p90, p99) in the style of benchmark_serving."""
    ok = [r for r in results if r.ok]
    summary = {"completed": len(ok), "failed": len(results) - len(ok),
               "duration_s": duration_s,
               "request_throughput": len(ok) / duration_s,
               "output_tokens_per_s": sum(r.output_tokens for r in ok) / duration_s}
    for name in ("ttft", "tpot", "e2e"):
        values = np.array([getattr(r, name) for r in ok], dtype=float)
        values = values[~np.isnan(values)]
        for p in (50, 90, 99):
            summary[f"{name}_p{p}_ms"] = (float(np.percentile(values, p)) * 1e3 if values.size
                                         else math.nan)
    return summary
