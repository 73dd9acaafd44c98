"""Measuring: a timer with warm-up and repeats, bytes, peak memory, FLOPs, the machine's limits.

Introduced in lab 00 ("This machine"). Every speed table in the course comes from `time_fn`,
and every roofline from `matmul_flops_per_s` and `memory_bandwidth_bytes_per_s`.
"""

from __future__ import annotations

import itertools
import multiprocessing
import statistics
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from functools import partial

import psutil
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from . import runtime
from .model import ModelConfig


def _device(device: torch.device | str | None) -> torch.device:
    """The device to measure: the one given, else the one the labs' models run on."""
    return runtime.device() if device is None else torch.device(device)


def _sync(dev: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (dev is None or torch.device(dev).type == "cuda"):
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Seconds per call over repeats: median, quartiles and extremes."""

    times_s: list[float] = field(repr=False)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def max_s(self) -> float:
        return max(self.times_s)

    @property
    def iqr_s(self) -> float:
        """Interquartile range, a spread that one slow outlier does not inflate."""
        if len(self.times_s) < 2:
            return 0.0
        q = statistics.quantiles(self.times_s, n=4, method="inclusive")
        return q[2] - q[0]

    @property
    def spread(self) -> float:
        """IQR relative to the median."""
        return self.iqr_s / self.median_s if self.median_s > 0 else 0.0

    def __str__(self) -> str:
        return (f"median {self.median_s * 1e3:.2f} ms (IQR {self.iqr_s * 1e3:.2f} ms, "
                f"{len(self.times_s)} repeats)")


def time_fn(fn, warmup: int = 1, repeats: int = 5, device: str | None = None) -> Timing:
    """Time fn() `repeats` times after `warmup` untimed calls, synchronising CUDA around each."""
    return time_interleaved({"fn": fn}, warmup, repeats, device)["fn"]


def time_interleaved(fns: dict, warmup: int = 1, repeats: int = 5,
                     device: str | None = None) -> dict[str, Timing]:
    """Time several variants round-robin (a, b, a, b, ...) so that drift hits all of them alike.

    Use it for side-by-side comparisons: timing one variant fully before the other lets
    warm-up effects, frequency scaling and background load favour one of them.
    """
    if not fns:
        raise ValueError("fns must name at least one function to time")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup}, {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: Timing(t) for name, t in times.items()}


def decode_step_fn(model: torch.nn.Module, batch: int, context_len: int):
    """A no-argument function that runs one decode step of `model` for `batch` sequences whose
    KV caches already hold `context_len` tokens; the cache is rewound after each call, so the
    step can be timed again and again (lab 42). The cached values are zeros: a step's time does
    not depend on them."""
    cfg = model.cfg
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    if not (isinstance(context_len, int) and 0 <= context_len < cfg.max_seq_len):
        raise ValueError(f"context_len must be an int in 0..{cfg.max_seq_len - 1} "
                         f"(max_seq_len - 1), got {context_len!r}")
    cache = model.new_cache(batch, context_len + 1)
    cache.advance(context_len)
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=model.norm.weight.device)

    @torch.no_grad()
    def step():
        model(tokens, cache=cache, logits_to_keep=1)
        cache.crop(context_len)

    return step


def count_ops(fn) -> dict[str, int]:
    """How many times fn() calls each ATen operator; each call pays eager PyTorch's fixed cost.

    Counted below autograd with a dispatch mode, so views and casts count too: each one is
    a trip through the dispatcher even when it moves no data.
    """
    counts: dict[str, int] = {}

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            counts[name] = counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return counts


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes held by the given tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _state_tensors(values) -> list[torch.Tensor]:
    """The tensors in state-dict values, looking inside the tuples torch.ao's packed layers hold
    and inside tensor subclasses (torchao's quantized weights hold their codes and scales)."""
    found = []
    for v in values:
        if isinstance(v, torch.Tensor) and hasattr(type(v), "__tensor_flatten__"):
            names, _ = v.__tensor_flatten__()
            found.extend(_state_tensors(getattr(v, name) for name in names))
        elif isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (tuple, list)):
            found.extend(_state_tensors(v))
    return found


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's saved state (parameters, persistent buffers); tied weights once."""
    tensors = _state_tensors(model.state_dict().values())
    return sum({t.data_ptr(): tensor_bytes(t) for t in tensors}.values())


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: all of them but the input embedding table.

    The embedding is a lookup that gathers one row per sequence; an untied output head is a
    full matmul and is read whole (a tied one is read once, as the head).
    """
    total = weight_bytes(model)
    cfg = getattr(model, "cfg", None)
    if cfg is None or cfg.tie_embeddings:
        return total
    return total - tensor_bytes(*model.embed_tokens.state_dict().values())


def peak_memory_bytes(fn, interval_s: float = 0.001,
                      device: torch.device | str | None = None) -> int:
    """Extra memory at the peak of fn() on `device` (default: `runtime.device()`).

    CUDA's allocator counter on a GPU, the process's sampled resident memory on the CPU.
    """
    if _device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(0, max(peak, proc.memory_info().rss) - base)


class _LiveTensorBytes(TorchDispatchMode):
    """Adds up the storages that operators create, and takes each off again when it is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()  # storage -> weakref whose callback subtracts it

    def _free(self, nbytes: int, _ref) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            # an in-place op or a view returns memory that already existed
            if storage.data_ptr() in inputs or storage in self._seen or storage.nbytes() == 0:
                continue
            self._seen[storage] = weakref.ref(storage, partial(self._free, storage.nbytes()))
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        return out


def tensor_peak_bytes(fn) -> tuple[int, int]:
    """(peak, still held at the end): bytes of tensors that fn() creates and keeps alive at once.

    Counts what PyTorch's operators allocate, forward and backward, on any device; memory that
    existed before (weights, data) is not counted, nor is the allocator's own slack. On a CPU
    this is steadier than the process's resident size, which the allocator keeps high after
    frees.
    """
    tracker = _LiveTensorBytes()
    with tracker:
        fn()
    return tracker.peak, tracker.live


def saved_activation_bytes(fn, model: torch.nn.Module | None = None) -> tuple[int, object]:
    """(bytes autograd keeps for the backward pass while fn() runs, fn's result).

    Counts each distinct storage that autograd saves once, leaving out the model's own
    parameters and buffers (they are memory anyway). What is saved depends on what trains:
    a frozen layer whose input needs no gradient saves nothing.
    """
    owned = set()
    if model is not None:
        owned = {t.untyped_storage().data_ptr()
                 for t in itertools.chain(model.parameters(), model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return t  # keeping t alive also keeps its address from being reused during fn()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(saved.values()), result


def generation_peak_memory(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int,
                           device: torch.device | str | None = None) -> int:
    """Peak extra memory of cached generation, in bytes, by a random-weight model of `cfg` (fp32).

    On a GPU, the allocator's peak in this process. On the CPU, the resident memory sampled in
    a new process: in a process that has freed memory before, the allocator hands that memory
    out again without the resident size growing, and the peak would read as zero.
    """
    if batch < 1 or prompt_len < 1 or new_tokens < 1:
        raise ValueError(f"batch, prompt_len and new_tokens must be >= 1, got {batch}, "
                         f"{prompt_len}, {new_tokens}")
    dev = _device(device)
    if dev.type == "cuda":
        return _generation_peak(cfg, batch, prompt_len, new_tokens, str(dev))
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # spawn: fork + OpenMP can hang
        return pool.apply(_generation_peak, (cfg, batch, prompt_len, new_tokens, "cpu",
                                             torch.get_num_threads()))


def _generation_peak(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int,
                     device: str, threads: int | None = None) -> int:
    from .model import Transformer, generate

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Transformer(cfg).eval().to(device)
    prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=device)
    generate(model, prompt[:1], 2)  # load the kernels' code before measuring
    return peak_memory_bytes(lambda: generate(model, prompt, new_tokens), device=device)


def flops_per_token(cfg: ModelConfig, context_len: int, training: bool = False,
                    head: bool = True) -> float:
    """Matmul FLOPs to process one token that attends to `context_len` tokens.

    Counts 2 FLOPs per multiply-add in every weight matmul (non-embedding weights plus, when
    `head`, the output head; the embedding lookup is free) and in attention's two products
    (QK^T and AV). Training counts the backward pass as twice the forward (the usual 3x, i.e.
    6N). Ignores norms, activations, softmax and the optimizer, which are O(d) per token.
    """
    matmul_params = cfg.num_params(non_embedding=True) - (2 * cfg.n_layers + 1) * cfg.d_model
    if head:
        matmul_params += cfg.vocab_size * cfg.d_model
    attention = 2 * 2 * cfg.n_layers * context_len * cfg.n_heads * cfg.head_dim
    forward = 2 * matmul_params + attention
    return 3 * forward if training else forward


def generation_flops(cfg: ModelConfig, prompt_len: int, new_tokens: int,
                     use_cache: bool = True) -> float:
    """Matmul FLOPs of greedy generation as `model.generate` runs it (lab 31).

    Every call of the model runs its body over the positions it is given and the output head
    over the last one only (`logits_to_keep=1`). With a cache: one prefill of the prompt, then
    one token per step, each attending to all earlier ones. Without: step k runs the whole
    sequence of prompt_len + k tokens again. The body at position i costs
    flops_per_token(cfg, i, head=False); each call adds the head's 2 x vocab x d_model.
    """
    if prompt_len < 1 or new_tokens < 0:
        raise ValueError(f"need prompt_len >= 1 and new_tokens >= 0, got {prompt_len}, "
                         f"{new_tokens}")

    head = 2 * cfg.vocab_size * cfg.d_model

    def call(first: int, last: int) -> float:  # one forward over positions first..last (1-based)
        return sum(flops_per_token(cfg, i, head=False) for i in range(first, last + 1)) + head

    if use_cache:
        decode = prompt_len + new_tokens - 1  # the last new token is sampled, never run
        return (call(1, prompt_len) if new_tokens else 0.0) + sum(
            call(i, i) for i in range(prompt_len + 1, decode + 1))
    return sum(call(1, prompt_len + k) for k in range(new_tokens))


def matmul_flops_per_s(n: int = 2048, dtype: torch.dtype = torch.float32,
                       device: str | None = None, repeats: int = 5) -> float:
    """Measured peak of `device` (default: `runtime.device()`): FLOP/s of an n x n matmul
    (2n^3 FLOPs), best of repeats."""
    dev = _device(device)
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    t = time_fn(lambda: a @ b, warmup=2, repeats=repeats, device=dev)
    return 2 * n**3 / t.min_s


def bandwidth_probe_bytes(device: torch.device | str | None = None, factor: int = 4) -> int:
    """Bytes a bandwidth probe must read to measure DRAM rather than cache: `factor` times the
    last-level cache of `device` (default `runtime.device()`), and at least 256 MiB on a CPU,
    2 GiB on a GPU (where a smaller read is dominated by the kernel's launch)."""
    dev = _device(device)
    floor = 2**31 if dev.type == "cuda" else 2**28
    llc = runtime.last_level_cache_bytes(dev) or 0
    return max(floor, factor * llc)


def memory_bandwidth_bytes_per_s(nbytes: int | None = None, device: str | None = None,
                                 repeats: int = 5) -> float:
    """Measured read bandwidth of `device` (default: `runtime.device()`): bytes of a large fp32
    tensor / time to sum it, best of repeats.

    Decoding one token reads every weight once, so this read rate is the roofline of
    memory-bound generation (tokens/s <= bandwidth / bytes read per token). The default size,
    `bandwidth_probe_bytes`, is 4x the last-level cache, so the sum streams from DRAM; a
    smaller `nbytes` is allowed (to measure a cache) but warns.
    """
    dev = _device(device)
    llc = runtime.last_level_cache_bytes(dev) or 0
    if nbytes is None:
        nbytes = bandwidth_probe_bytes(dev)
    elif nbytes < 4:
        raise ValueError(f"nbytes must be at least 4 (one fp32 value), got {nbytes}")
    elif nbytes < 4 * llc:
        warnings.warn(f"nbytes={nbytes:,} is less than 4x the {llc:,}-byte last-level cache: "
                      "the probe measures the cache, not DRAM", stacklevel=2)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    t = time_fn(lambda: x.sum(), warmup=1, repeats=repeats, device=dev)
    return tensor_bytes(x) / t.min_s


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_ghz() -> float | None:
    """Nominal clock: cpufreq's maximum where the kernel exposes it, else /proc/cpuinfo's MHz."""
    try:
        return int(open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read()) / 1e6
    except (OSError, ValueError):
        pass
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1]) / 1e3
    except (OSError, ValueError):
        pass
    return None


@dataclass
class CpuPeak:
    """A CPU's theoretical fp32 peak: cores x GHz x FLOPs per cycle per core."""

    cores: int
    ghz: float
    isa: str  # the widest vector FMA instruction set the CPU reports
    fp32_lanes: int  # fp32 values per vector register of that set
    fma_units: int  # vector FMA pipes per core (assumed, see `cpu_peak_flops`)
    flops_per_s: float

    @property
    def flops_per_cycle(self) -> int:
        return 2 * self.fp32_lanes * self.fma_units  # an FMA is 2 FLOPs per lane


def cpu_peak_flops(cores: int | None = None, fma_units: int = 2) -> CpuPeak | None:
    """Theoretical fp32 peak of this CPU from what it reports, or None off Linux/x86.

    cores: those torch computes on (default `torch.get_num_threads()`); clock: nominal (a
    virtual machine reports its host's base clock; turbo can be higher); vector width from the
    flags (avx512f: 16 fp32 lanes, avx2+fma: 8, sse: 4); `fma_units` FMA pipes per core, 2 on
    Intel server cores since Haswell and AMD Zen 2-4 (check your CPU's documentation).
    """
    flags, ghz = _cpu_flags(), _cpu_ghz()
    if not flags or not ghz:
        return None
    if "avx512f" in flags:
        isa, lanes = "AVX-512 FMA", 16
    elif "avx2" in flags and "fma" in flags:
        isa, lanes = "AVX2 FMA", 8
    else:
        isa, lanes, fma_units = "SSE (no FMA)", 4, 1  # separate add and multiply: 2 FLOPs/lane
    cores = cores or torch.get_num_threads()
    peak = CpuPeak(cores, ghz, isa, lanes, fma_units, 0.0)
    peak.flops_per_s = cores * ghz * 1e9 * peak.flops_per_cycle
    return peak
