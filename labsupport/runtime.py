"""Where a lab runs: its profile, device, seeds, the machine line and the cache folder.

Introduced in lab 00 ("This machine"). Every lab starts with `profile()` and prints
`machine()` above its timing tables.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import platform
import random
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import torch
from filelock import FileLock

with warnings.catch_warnings():  # without ipywidgets, tqdm.auto falls back to text bars: fine
    warnings.simplefilter("ignore")
    from tqdm.auto import tqdm

PROFILES = ("smoke", "cpu", "gpu")
_PROFILE_HELP = {
    "smoke": "CI and `make test`: tiny models, about 2 min per notebook on 2 CPU cores",
    "cpu": "default without CUDA: models up to a few M parameters, at most 8 min per notebook",
    "gpu": "default with CUDA: models up to ~100M parameters, about 10 min per notebook",
}


def check_profile(name: str) -> str:
    """Return `name` if it is a known profile, else raise a ValueError listing the valid ones."""
    if name not in PROFILES:
        valid = ", ".join(f"{p!r} ({_PROFILE_HELP[p]})" for p in PROFILES)
        raise ValueError(f"unknown profile {name!r}; LABS_PROFILE must be one of: {valid}")
    return name


def profile() -> str:
    """The active profile: $LABS_PROFILE if set, else 'gpu' with CUDA and 'cpu' without."""
    name = os.environ.get("LABS_PROFILE", "").strip()
    if not name:
        return "gpu" if torch.cuda.is_available() else "cpu"
    return check_profile(name)


def device() -> torch.device:
    """The device labs compute on: CUDA at the `gpu` profile when present, else the CPU."""
    if profile() == "gpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


_profile_device = device  # for functions whose `device` argument hides this one


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so that a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds the legacy global RNG that libraries still use)
    torch.manual_seed(seed)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers() -> int:
    """Processes for a batch of independent small trainings: one per core on a CPU, one on a GPU.

    Course models this small are bound by per-operator overhead, not arithmetic: one thread
    trains them about as fast as two, so one single-thread process per core finishes a batch
    of them up to that many times sooner. A GPU is shared better by one process.
    """
    return 1 if device().type == "cuda" else min(usable_cores(), 8)


def _worker_start(cache: str) -> None:
    os.environ["LABS_CACHE"] = cache  # the parent's cache, even if it was set after start-up
    torch.set_num_threads(1)


def map_in_workers(fn, items: list, workers: int | None = None, desc: str = "",
                   progress: bool = True) -> list:
    """[fn(item) for item in items], in `workers` spawned single-thread processes; in order.

    `fn` must be a module-level function (it is pickled by name). Spawned, not forked: a forked
    child of a process that has used OpenMP can hang; a script (not a notebook) that calls this
    must do so under `if __name__ == "__main__":`. With one worker, or one item, it runs here.
    """
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    results: list = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc, disable=not progress or not items)
    if workers == 1 or len(items) <= 1:
        for i, item in enumerate(items):
            results[i] = fn(item)
            bar.update()
    else:
        with ProcessPoolExecutor(min(workers, len(items)),
                                 mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_start, initargs=(str(cache_dir()),)) as pool:
            futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    bar.close()
    return results


def cache_dir() -> Path:
    """Folder for tokenizers, token arrays, zoo checkpoints and claim tables ($LABS_CACHE)."""
    root = os.environ.get("LABS_CACHE") or Path.home() / ".cache" / "llm-cost-course"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _parse_size(text: str) -> int:
    """Bytes of a sysfs cache size such as '32768K' or '1M'."""
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def _cpu_last_level_cache() -> tuple[int, int] | None:
    """(level, bytes) of the CPU's largest cache level as one core sees it, or None if unknown.

    Linux reports it per core in sysfs; macOS through sysctl. A shared L3 counts once.
    """
    best = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = _parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if best is None or level > best[0]:
            best = (level, size)
    if best is None and platform.system() == "Darwin":
        import subprocess
        for level in (3, 2):
            out = subprocess.run(["sysctl", "-n", f"hw.l{level}cachesize"], capture_output=True,
                                 text=True).stdout.strip()
            if out.isdigit() and int(out) > 0:
                return level, int(out)
    return best


def last_level_cache_bytes(device: torch.device | str | None = None) -> int | None:
    """Bytes of the last-level cache in front of `device`'s memory (default `device()`).

    The CPU's largest cache (L3 on most servers) or a CUDA GPU's L2; None where the system does
    not say. A bandwidth probe or a working set smaller than a few times this size is read from
    cache, not from DRAM, and measures the cache.
    """
    dev = _profile_device() if device is None else torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev).L2_cache_size)
    found = _cpu_last_level_cache()
    return found[1] if found else None


def _cache_label(level_and_bytes: tuple[int, int] | None) -> str:
    if level_and_bytes is None:
        return "last-level cache unknown"
    level, size = level_and_bytes
    return f"L{level} {size / 2**20:g} MiB"


def machine() -> dict:
    """Facts about this machine that a timing depends on: CPU, caches, cores, threads, torch,
    GPU."""
    llc = _cpu_last_level_cache()
    gpu_l2 = (torch.cuda.get_device_properties(0).L2_cache_size
              if torch.cuda.is_available() else None)
    info = {
        "profile": profile(),
        "cpu": _cpu_name(),
        "cpu_last_level_cache": _cache_label(llc),
        "cpu_last_level_cache_bytes": llc[1] if llc else None,
        "gpu_l2_cache_bytes": gpu_l2,
        "cores": psutil.cpu_count(logical=False) or os.cpu_count(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def machine_line() -> str:
    """One line describing the machine, printed above every measurement."""
    m = machine()
    gpu = (f", GPU {m['gpu']} (L2 {m['gpu_l2_cache_bytes'] / 2**20:g} MiB)" if m["gpu"]
           else ", no GPU")
    return (
        f"profile={m['profile']} | {m['cpu']}, {m['logical_cpus']} logical CPUs, "
        f"{m['cpu_last_level_cache']}, "
        f"{m['torch_threads']} torch threads, {m['memory_gib']} GiB{gpu} | "
        f"device={m['device']} | Python {m['python']}, torch {m['torch']}"
    )


def by_profile(**values):
    """Pick the value for the active profile: `by_profile(smoke=64, cpu=256, gpu=1024)`."""
    missing = [p for p in PROFILES if p not in values]
    unknown = [k for k in values if k not in PROFILES]
    if missing or unknown:
        raise ValueError(
            f"by_profile needs exactly the keys {PROFILES}; missing {missing}, unknown {unknown}"
        )
    return values[profile()]


# ----------------------------------------------------------------------------------------
# Cached tensors: written atomically under a file lock, checked on every load.


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim tensors too
    return digest.hexdigest()


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; once written, it replaces `path` in one rename.

    Readers see either the old file or the complete new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class CorruptCacheError(RuntimeError):
    """A cache file exists but its contents are unreadable or do not match their checksum."""


def cached_file(path: Path, build, save, load, desc: str = ""):
    """The one cache helper: load `path`, or build the value, save it atomically, and load it.

    `build()` makes the value, `save(value, tmp_path)` writes it, `load(path)` reads it back and
    raises CorruptCacheError when the contents are bad. A file lock makes concurrent callers wait
    for one build. A corrupt file is reported and rebuilt, never used; an OSError while reading
    (permissions, a failing disk) is raised, so good work is never deleted because it could not
    be read. The value returned is always what `load` gives, so a cold and a warm cache return
    the same types. Returns (value, built_now).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                return load(path), False
            except CorruptCacheError as e:
                warnings.warn(f"rebuilding {desc or path.name}: {e}", stacklevel=3)
        value = build()
        with atomic_path(path) as tmp:
            save(value, tmp)
        return load(path), True


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write a safetensors file atomically, with a checksum of its tensors inside."""
    with atomic_path(path) as tmp:
        _write_tensors((tensors, metadata), tmp)


def _write_tensors(value: tuple[dict[str, torch.Tensor], dict], path: Path) -> None:
    from safetensors.torch import save_file

    tensors, metadata = value
    meta = {"metadata_json": json.dumps(metadata), "sha256": _checksum(tensors)}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata=meta)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by `save_tensors`; raise CorruptCacheError if it does not check out.

    The bytes are read here, so an OSError (no permission, a disk error) surfaces as itself;
    only contents that do not parse or do not match their checksum count as corruption.
    """
    from safetensors.torch import load as load_bytes

    blob = Path(path).read_bytes()
    try:
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + n]).get("__metadata__") or {}
        tensors = load_bytes(blob)
        metadata = json.loads(header.get("metadata_json", "{}"))
    except Exception as e:  # truncated or garbled contents
        raise CorruptCacheError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    if header.get("sha256") != _checksum(tensors):
        raise CorruptCacheError(f"{path}: checksum mismatch")
    return tensors, metadata


def cached_tensors(path: Path, build, desc: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """Load tensors from `path`, or call `build() -> (tensors, metadata)` and save them first.

    Locked, atomic and checked as `cached_file` describes.
    """
    value, _ = cached_file(path, build, _write_tensors, load_tensors, desc)
    return value


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCacheError(f"{path}: unreadable ({e})") from e


def cached_json(path: Path, build, desc: str = "") -> tuple[dict, bool]:
    """Load a JSON record from `path`, or call `build() -> dict` and save it first.

    Returns (record, built_now); the record is read back from the file either way, so tuples
    become lists and keys strings on the first call as on every later one.
    """
    return cached_file(path, build, lambda record, tmp: tmp.write_text(json.dumps(record)),
                       _read_json, desc)


def stable_hash(obj) -> str:
    """A short hash of a JSON-serialisable object, stable across runs and machines."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
