"""Total cost of ownership: serve a model on servers you own, on rented GPUs, or buy it per token
from an API (lab 42).

Every input is a named field of `Scenario`; `SOURCES` says where its default comes from and when
it was read, so a table of assumptions can be printed beside every result. Throughput comes from a
roofline: a decode step reads the weights and the batch's KV cache once (memory roof) and does
2 FLOPs per weight per sequence (compute roof); a prompt's prefill is bound by compute. A serving
stack reaches only `roof_fraction` of both roofs. Owned hardware is written off straight-line over
`years`, with no interest and no resale value. Costs are in US dollars per month.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace

from . import cost
from .measure import flops_per_token

HOURS_PER_MONTH = cost.HOURS_PER_YEAR / 12
SECONDS_PER_MONTH = HOURS_PER_MONTH * cost.SECONDS_PER_HOUR

# bytes per weight, and the tensor-core peak relative to the dense BF16 one
PRECISIONS = {"bf16": (2.0, 1.0), "fp8": (1.0, 2.0)}
FP8_GPUS = ("H100", "H200")  # Hopper: dense FP8 at twice the BF16 rate; A100 and V100 have none


@dataclass(frozen=True)
class ApiPrice:
    """One API's list price per million tokens, on the date it was announced."""

    model: str
    usd_per_m_input: float
    usd_per_m_output: float
    date: str
    source: str  # citation key in book/references.bib


API_PRICES: dict[str, ApiPrice] = {
    "GPT-4 (Mar 2023)": ApiPrice("gpt-4 (8K context)", 30.0, 60.0, "2023-03-14",
                                 "openai2023gpt4"),
    "GPT-4 Turbo (Nov 2023)": ApiPrice("gpt-4-1106-preview", 10.0, 30.0, "2023-11-06",
                                       "openai2023devday"),
    "GPT-4o (May 2024)": ApiPrice("gpt-4o-2024-05-13", 5.0, 15.0, "2024-05-13",
                                  "openai2024pricing"),
    "GPT-4o (Aug 2024)": ApiPrice("gpt-4o-2024-08-06", 2.5, 10.0, "2024-08-06",
                                  "openai2024pricing"),
    "GPT-4.1 (Apr 2025)": ApiPrice("gpt-4.1", 2.0, 8.0, "2025-04-14", "openai2025gpt41"),
}


@dataclass(frozen=True)
class Scenario:
    """Every assumption of the cost model; see SOURCES for where each default comes from."""

    # owned servers
    gpu: str = "H100"  # a key of cost.HARDWARE
    gpus_per_server: int = 8
    server_usd: float = 300_000.0  # one 8-GPU server, bought
    years: float = 4.0  # written off straight-line over this many years
    support_per_year: float = 0.10  # vendor support and spares per year, fraction of server_usd
    server_kw: float = 10.2  # the server's maximum power draw
    idle_power: float = 0.3  # fraction of server_kw drawn when it serves nothing
    pue: float = 1.58  # facility power / IT power
    usd_per_kwh: float = 0.09
    colo_usd_per_kw_month: float = 184.0  # colocation rent per kW of capacity (power billed apart)
    staff_usd_per_year: float = 100_000.0  # people who run the deployment (not needed for an API)
    # rented GPUs
    cloud_usd_per_gpu_hour: float = 3.0
    # the model and how it is served
    model: str = "Llama-3.1-70B"  # a key of cost.MODELS
    precision: str = "bf16"  # weights: a key of PRECISIONS
    kv_bytes: int = 2  # bytes per cached key or value
    max_batch: int = 64  # most sequences decoded together per model copy
    usable_memory: float = 0.9  # fraction of GPU memory the server may fill
    roof_fraction: float = 0.5  # fraction of the roofline a serving stack reaches
    peak_load: float = 0.8  # load at the busiest hour, as a fraction of capacity (headroom)
    # the workload
    users: float = 10_000
    requests_per_day: float = 20  # per user per working day
    prompt_tokens: float = 300  # question and instructions
    rag_tokens: float = 2_000  # retrieved context added to every prompt
    output_tokens: float = 300
    days_per_month: float = 21.7  # working days (260 a year)
    busy_hours: float = 8  # the day's requests arrive evenly within this many hours
    # the API it is compared with
    api: str = "GPT-4o (Aug 2024)"  # a key of API_PRICES

    def __post_init__(self):
        choices = {"gpu": cost.HARDWARE, "model": cost.MODELS, "precision": PRECISIONS,
                   "api": API_PRICES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {sorted(allowed)}, got "
                                 f"{getattr(self, name)!r}")
        if self.precision == "fp8" and self.gpu not in FP8_GPUS:
            raise ValueError(f"precision 'fp8' needs a GPU with FP8 tensor cores {FP8_GPUS}, "
                             f"got gpu={self.gpu!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in choices:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            if f.name in _FRACTIONS and not 0 < value <= 1:
                raise ValueError(f"{f.name} must be in (0, 1], got {value!r}")
            if f.name in _MAY_BE_ZERO and value < 0:
                raise ValueError(f"{f.name} must be >= 0, got {value!r}")
            if f.name not in _FRACTIONS | _MAY_BE_ZERO and not value > 0:
                raise ValueError(f"{f.name} must be > 0, got {value!r}")
        if self.idle_power > 1:
            raise ValueError(f"idle_power must be in [0, 1], got {self.idle_power!r}")
        if self.pue < 1:
            raise ValueError(f"pue must be >= 1 (facility power includes the IT power), got "
                             f"{self.pue!r}")
        if self.busy_hours > 24:
            raise ValueError(f"busy_hours must be in (0, 24], got {self.busy_hours!r}")
        for name in ("gpus_per_server", "max_batch", "kv_bytes"):
            if int(getattr(self, name)) != getattr(self, name):
                raise ValueError(f"{name} must be a whole number, got {getattr(self, name)!r}")

    def with_(self, **changes) -> Scenario:
        """A copy with some assumptions changed (validated again)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown assumption(s) {sorted(unknown)}; known: "
                             f"{[f.name for f in fields(self)]}")
        return replace(self, **changes)


_FRACTIONS = {"usable_memory", "roof_fraction", "peak_load"}
_MAY_BE_ZERO = {"support_per_year", "idle_power", "usd_per_kwh", "colo_usd_per_kw_month",
                "staff_usd_per_year", "rag_tokens"}

# Where each default comes from: (citation key or "assumption", date read or published, note).
SOURCES: dict[str, tuple[str, str, str]] = {
    "gpu": ("nvidia2022h100", "2022", "80 GB HBM3 at 3.35 TB/s, 989 TFLOP/s dense BF16"),
    "gpus_per_server": ("nvidia2023dgxh100", "2023", "an HGX/DGX H100 board holds 8"),
    "server_usd": ("cottier2024rising", "2023-2024",
                   "DGX H100 estimated at ~$270k (SemiAnalysis, 2023) and an 8x H100 server "
                   "quoted at $317k (Aug 2024), as collected by Epoch AI"),
    "years": ("esg2025inference", "2025", "the ESG study's four-year horizon"),
    "support_per_year": ("assumption", "", "support contract and spares, 10% of price a year"),
    "server_kw": ("nvidia2023dgxh100", "2023", "DGX H100 maximum system power ~10.2 kW"),
    "idle_power": ("assumption", "", "fans, CPUs, NICs and idle GPUs"),
    "pue": ("uptime2023pue", "2023", "industry average PUE 1.58 (Uptime Institute survey)"),
    "usd_per_kwh": ("eia2024electricity", "2023 data",
                    "US commercial rate in Virginia 8.95 c/kWh (California 23.9)"),
    "colo_usd_per_kw_month": ("cbre2025datacenter", "H2 2024",
                              "North American colocation, 250-500 kW, $184.06/kW-month"),
    "staff_usd_per_year": ("assumption", "", "half of one engineer's loaded cost"),
    "cloud_usd_per_gpu_hour": ("mercatus2026gpupricing", "2026-05",
                               "specialty-cloud H100 $2.5-3.5 per GPU-hour"),
    "model": ("dubey2024llama3", "2024", "80 layers, d 8192, 64 query / 8 KV heads"),
    "precision": ("assumption", "", "BF16 weights as released; FP8 as an option"),
    "kv_bytes": ("assumption", "", "BF16 cache, vLLM's default for a BF16 model"),
    "max_batch": ("assumption", "", "a common serving limit; memory may allow fewer"),
    "usable_memory": ("vllm2024docs", "2024", "vLLM's gpu_memory_utilization default 0.9"),
    "roof_fraction": ("assumption", "", "lab 42 compares it with published runs"),
    "peak_load": ("assumption", "", "20% headroom at the busiest hour keeps queues short"),
    "users": ("esg2025inference", "2025", "the ESG study's smaller deployment"),
    "requests_per_day": ("assumption", "", "an internal assistant used through the day"),
    "prompt_tokens": ("assumption", "", "a question and its instructions"),
    "rag_tokens": ("assumption", "", "four retrieved passages of ~500 tokens"),
    "output_tokens": ("assumption", "", "a few paragraphs"),
    "days_per_month": ("assumption", "", "260 working days a year"),
    "busy_hours": ("assumption", "", "a working day; no peak within it"),
    "api": ("openai2024pricing", "2024-08", "GPT-4o's price from Aug 2024 on"),
}


def assumptions(s: Scenario) -> list[dict]:
    """Rows of (assumption, value, source, date, note) for printing beside a result."""
    values = asdict(s)
    return [{"assumption": name, "value": values[name], "source": src, "date": date,
             "note": note} for name, (src, date, note) in SOURCES.items()]


# ----------------------------------------------------------------------------------------
# Throughput of one server, from the roofline

def weight_bytes(s: Scenario) -> float:
    """Bytes of the model's weights at the scenario's precision (embeddings included)."""
    return cost.MODELS[s.model].num_params(non_embedding=False) * PRECISIONS[s.precision][0]


def context_tokens(s: Scenario) -> float:
    """Tokens one request holds in the KV cache at its end: prompt, retrieved text, answer."""
    return s.prompt_tokens + s.rag_tokens + s.output_tokens


def replica(s: Scenario, gpus: int | None = None) -> tuple[int, int]:
    """(GPUs per copy of the model, sequences one copy decodes together).

    The fewest GPUs, a power of two as tensor parallelism needs, whose usable memory holds the
    weights and the KV cache of `max_batch` whole requests; if none does, all the server's GPUs
    with as many sequences as fit. `gpus` fixes the count instead.
    """
    hw, cfg = cost.hardware(s.gpu), cost.MODELS[s.model]
    per_sequence = cfg.kv_cache_bytes(1, math.ceil(context_tokens(s)), s.kv_bytes)

    def fits(g: int) -> int:
        free = g * hw.memory_bytes * s.usable_memory - weight_bytes(s)
        return max(0, int(free // per_sequence))

    if gpus is not None:
        if not (isinstance(gpus, int) and 1 <= gpus <= s.gpus_per_server):
            raise ValueError(f"gpus must be an int in 1..{s.gpus_per_server} (gpus_per_server), "
                             f"got {gpus!r}")
        options = [gpus]
    else:
        options = [2**k for k in range(int(math.log2(s.gpus_per_server)) + 1)]
    for g in options:
        if fits(g) >= s.max_batch:
            return g, s.max_batch
    g = options[-1]
    if fits(g) < 1:
        raise ValueError(f"{s.model} at {s.precision} with {context_tokens(s):,.0f}-token "
                         f"requests does not fit in {g} x {hw.name}")
    return g, fits(g)


def decode_times(s: Scenario, batch: int, gpus: int) -> tuple[float, float]:
    """(memory time, compute time) in seconds of one decode step for `batch` sequences on `gpus`
    GPUs, each at roof_fraction of its roof; the step takes the larger.

    Memory: the weights once, plus each sequence's cache at its mean length during decoding
    (prompt + half the answer). Compute: measure.flops_per_token at that length, per sequence.
    """
    hw, cfg = cost.hardware(s.gpu), cost.MODELS[s.model]
    mean_context = s.prompt_tokens + s.rag_tokens + s.output_tokens / 2
    read = weight_bytes(s) + batch * cfg.kv_cache_bytes(1, 1, s.kv_bytes) * mean_context
    memory = read / (gpus * hw.mem_bandwidth * s.roof_fraction)
    flops = batch * flops_per_token(cfg, round(mean_context))
    return memory, flops / (gpus * peak_flops(s) * s.roof_fraction)


def decode_step_seconds(s: Scenario, batch: int, gpus: int) -> tuple[float, str]:
    """(seconds of one decode step, the roof that binds it: "memory" or "compute")."""
    memory, compute = decode_times(s, batch, gpus)
    return max(memory, compute), ("memory" if memory >= compute else "compute")


def peak_flops(s: Scenario) -> float:
    """Dense tensor-core FLOP/s of one GPU at the scenario's precision."""
    return cost.hardware(s.gpu).peak_flops * PRECISIONS[s.precision][1]


def prefill_seconds(s: Scenario, gpus: int) -> float:
    """Seconds to run one request's prompt and retrieved text, bound by compute."""
    cfg, n = cost.MODELS[s.model], s.prompt_tokens + s.rag_tokens
    flops = n * flops_per_token(cfg, round(n / 2))  # a token attends to half the prompt on average
    return flops / (gpus * peak_flops(s) * s.roof_fraction)


def server_capacity(s: Scenario, gpus: int | None = None) -> dict:
    """What one server sustains at full load: requests/s, tokens/s, and how it is split.

    Each copy of the model decodes `batch` sequences together (continuous batching keeps the
    batch full) and runs each request's prefill in between, so a request occupies a copy for
    its prefill plus output_tokens x step / batch. Tensor-parallel communication and
    scheduling overheads are inside roof_fraction.
    """
    g, batch = replica(s, gpus)
    step, bound = decode_step_seconds(s, batch, g)
    prefill = prefill_seconds(s, g)
    per_request = prefill + s.output_tokens * step / batch
    copies = s.gpus_per_server // g
    rps = copies / per_request
    return {"gpus per copy": g, "copies": copies, "batch": batch, "decode bound by": bound,
            "step ms": 1e3 * step, "prefill share": prefill / per_request,
            "requests/s": rps, "output tokens/s": rps * s.output_tokens,
            "tokens/s (in + out)": rps * (s.prompt_tokens + s.rag_tokens + s.output_tokens)}


def implied_roof_fraction(s: Scenario, output_tokens_per_s: float, gpus: int,
                          servers: float = 1.0) -> float:
    """The roof_fraction at which the model predicts a published throughput (output tokens/s
    on `servers` x `gpus` GPUs for s's request shape): prediction is linear in it."""
    cost._positive(output_tokens_per_s=output_tokens_per_s, servers=servers)
    at_roof = server_capacity(s.with_(roof_fraction=1.0, gpus_per_server=gpus), gpus)
    return output_tokens_per_s / (servers * at_roof["output tokens/s"])


# ----------------------------------------------------------------------------------------
# Cost per month

def requests_per_month(s: Scenario) -> float:
    return s.users * s.requests_per_day * s.days_per_month


def tokens_per_month(s: Scenario) -> float:
    """Tokens processed per month, input (prompt and retrieved text) plus output."""
    return requests_per_month(s) * context_tokens(s)


def api_usd_per_request(s: Scenario) -> float:
    """An API request's price: the retrieved text is input too, since the API must read it."""
    p = API_PRICES[s.api]
    return ((s.prompt_tokens + s.rag_tokens) * p.usd_per_m_input
            + s.output_tokens * p.usd_per_m_output) / 1e6


def server_usd_per_month(s: Scenario, utilisation: float) -> dict:
    """One owned server's monthly cost at an average `utilisation` of its capacity, by item."""
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation must be in (0, 1], got {utilisation!r}")
    kw = s.server_kw * (s.idle_power + (1 - s.idle_power) * utilisation)
    return {"hardware": s.server_usd / (12 * s.years),
            "support": s.server_usd * s.support_per_year / 12,
            "power": kw * s.pue * HOURS_PER_MONTH * s.usd_per_kwh,
            "hosting": s.server_kw * s.colo_usd_per_kw_month}


def servers_needed(s: Scenario, per_server_rps: float) -> int:
    """Servers (or model copies) that carry the busiest hour at peak_load of their capacity."""
    peak_rps = s.users * s.requests_per_day / (s.busy_hours * cost.SECONDS_PER_HOUR)
    return max(1, math.ceil(peak_rps / (per_server_rps * s.peak_load)))


def on_prem(s: Scenario) -> dict:
    """Monthly cost of owned servers sized for the workload, by item and per user and token."""
    cap = server_capacity(s)
    n = servers_needed(s, cap["requests/s"])
    utilisation = requests_per_month(s) / (n * cap["requests/s"] * SECONDS_PER_MONTH)
    items = {k: n * v for k, v in server_usd_per_month(s, min(utilisation, 1.0)).items()}
    items["staff"] = s.staff_usd_per_year / 12
    return _summary(s, items, servers=n, gpus=n * s.gpus_per_server, utilisation=utilisation)


def cloud(s: Scenario) -> dict:
    """Monthly cost of renting GPUs around the clock, one model copy's GPUs at a time."""
    cap = server_capacity(s)
    per_copy = cap["requests/s"] / cap["copies"]
    n = servers_needed(s, per_copy)
    gpus = n * cap["gpus per copy"]
    utilisation = requests_per_month(s) / (n * per_copy * SECONDS_PER_MONTH)
    items = {"GPU rental": gpus * s.cloud_usd_per_gpu_hour * HOURS_PER_MONTH,
             "staff": s.staff_usd_per_year / 12}
    return _summary(s, items, servers=n, gpus=gpus, utilisation=utilisation)


def api(s: Scenario) -> dict:
    """Monthly cost of buying every request from the API at its list price."""
    return _summary(s, {"API tokens": requests_per_month(s) * api_usd_per_request(s)},
                    servers=0, gpus=0, utilisation=float("nan"))


def _summary(s: Scenario, items: dict, **extra) -> dict:
    total = sum(items.values())
    return {"usd per month": total, "usd per user-month": total / s.users,
            "usd per million tokens": total / tokens_per_month(s) * 1e6,
            "items": items, **extra}


def owned_usd_per_mtok(s: Scenario, utilisation: float) -> float:
    """$ per million tokens of a one-server deployment (staff included) run at `utilisation`."""
    items = server_usd_per_month(s, utilisation)
    monthly = sum(items.values()) + s.staff_usd_per_year / 12
    tokens = server_capacity(s)["tokens/s (in + out)"] * utilisation * SECONDS_PER_MONTH
    return monthly / tokens * 1e6


def users_per_server(s: Scenario) -> float:
    """Users one server carries with its busiest hour at peak_load of its capacity."""
    busy_requests = server_capacity(s)["requests/s"] * s.peak_load * s.busy_hours
    return busy_requests * cost.SECONDS_PER_HOUR / s.requests_per_day


def break_even_utilisation(s: Scenario, usd_per_mtok: float) -> float:
    """Utilisation at which one owned server (staff included) costs `usd_per_mtok` per million
    tokens; nan if it costs more even when fully busy. Cost falls as utilisation rises, so a
    bisection finds it."""
    cost._positive(usd_per_mtok=usd_per_mtok)
    if owned_usd_per_mtok(s, 1.0) > usd_per_mtok:
        return float("nan")
    lo, hi = 1e-9, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if owned_usd_per_mtok(s, mid) > usd_per_mtok else (lo, mid)
    return hi


def _owned_line(s: Scenario, n: int, per_server: float) -> tuple[float, float]:
    """(intercept, slope) of the owned monthly cost in users while n servers are needed: fixed
    costs, plus power that grows with the load, are affine in users."""
    u1, u2 = (n - 0.75) * per_server, (n - 0.25) * per_server
    o1, o2 = (on_prem(s.with_(users=u))["usd per month"] for u in (u1, u2))
    slope = (o2 - o1) / (u2 - u1)
    return o1 - slope * u1, slope


def break_even_users(s: Scenario, for_good: bool = False) -> float:
    """Fewest users at which owning costs no more than the API; with `for_good`, the fewest
    from which it stays so at every larger number. nan if never.

    Servers come whole: just past each server's capacity the owned cost jumps by one server's
    fixed cost, and the API can be cheaper again for a while, so the first break-even and the
    lasting one can differ. With n servers the owned cost is a + F (n - 1) + b x users (F: one
    server's fixed cost a month, b: power per user), and the API's is p x users, so the owned
    line meets the API's at u_n = (a + F (n - 1)) / (p - b), solved for each n in turn.
    """
    p = s.requests_per_day * s.days_per_month * api_usd_per_request(s)  # API $ per user-month
    per_server = users_per_server(s)
    a, b = _owned_line(s, 1, per_server)
    fixed = _owned_line(s, 2, per_server)[0] - a  # what one more server adds a month
    if p - b <= fixed / per_server:
        return float("nan")  # a full server costs at least the API's price per user: never
    since = float("nan")  # where the current stretch of owning being cheaper began
    n = 1
    while True:
        lo, hi = (n - 1) * per_server, n * per_server
        meet = (a + fixed * (n - 1)) / (p - b)
        if meet <= lo:  # cheaper over all of this server's range, and so at every n after it
            return since if not math.isnan(since) else lo
        if meet <= hi:
            if not for_good:
                return meet
            since = meet
        else:
            since = float("nan")
        n += 1
