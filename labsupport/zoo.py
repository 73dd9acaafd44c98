"""Trained course models, sized per profile, trained on first use and cached.

`load(name)` returns a trained `Transformer`. The first call trains it (with a progress bar) and
saves it as safetensors under `cache_dir()/zoo`; later calls load the file. The file name holds a
hash of everything that changes the weights (model and training config, tokenizer vocabulary,
corpus fingerprint, recipe version), so a changed recipe never loads stale weights. Writes are
atomic and locked, and a corrupted file is detected by its checksum and retrained.
Introduced in lab 00.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from . import data
from .model import ModelConfig, Transformer
from .runtime import (
    cache_dir,
    cached_tensors,
    check_profile,
    device,
    map_in_workers,
    profile,
    stable_hash,
)
from .train import TrainConfig, train

RECIPE_VERSION = 1  # bump when the training code changes what a given config produces


@dataclass(frozen=True)
class ZooSpec:
    model: ModelConfig
    train: TrainConfig
    vocab_size: int = 4096

    def key(self) -> str:
        """Hash of everything that determines the trained weights."""
        return stable_hash([self.model.to_dict(), self.train.to_dict(), self.vocab_size,
                            data.corpus_fingerprint(), data.tokenizer_fingerprint(self.vocab_size),
                            RECIPE_VERSION])


def _small(profile_name: str) -> ZooSpec:
    if profile_name == "smoke":  # ~0.1M non-embedding parameters, trains in well under a minute
        m = ModelConfig(vocab_size=4096, d_model=64, n_layers=2, n_heads=4, d_ff=192,
                        max_seq_len=128)
        t = TrainConfig(steps=200, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=10,
                        eval_every=100)
    elif profile_name == "cpu":  # ~1.3M non-embedding parameters, about 5 minutes on 2 cores
        m = ModelConfig(vocab_size=4096, d_model=128, n_layers=6, n_heads=4, d_ff=384,
                        max_seq_len=256)
        t = TrainConfig(steps=400, batch_size=16, seq_len=256, lr=3e-3, warmup_steps=30,
                        eval_every=50)
    else:  # gpu: ~10M non-embedding parameters, ~13M tokens
        m = ModelConfig(vocab_size=4096, d_model=384, n_layers=6, n_heads=6, d_ff=1024,
                        max_seq_len=512)
        t = TrainConfig(steps=800, batch_size=32, seq_len=512, lr=2e-3, warmup_steps=50,
                        eval_every=100)
    return ZooSpec(model=m, train=t)


def _large(profile_name: str) -> ZooSpec:
    """About 4x small's non-embedding parameters, trained on more tokens (1.1x to 1.5x): the
    distillation teacher (lab 20) and the cascade's large model (lab 40)."""
    if profile_name == "smoke":  # ~0.43M non-embedding parameters
        m = ModelConfig(vocab_size=4096, d_model=128, n_layers=2, n_heads=4, d_ff=384,
                        max_seq_len=128)
        t = TrainConfig(steps=300, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=15,
                        eval_every=150)
    elif profile_name == "cpu":  # ~4.8M non-embedding parameters, under 10 min on 2 cores
        m = ModelConfig(vocab_size=4096, d_model=256, n_layers=6, n_heads=8, d_ff=704,
                        max_seq_len=256)
        t = TrainConfig(steps=440, batch_size=16, seq_len=256, lr=2e-3, warmup_steps=30,
                        eval_every=110)
    else:  # gpu: ~42M non-embedding parameters
        m = ModelConfig(vocab_size=4096, d_model=768, n_layers=6, n_heads=12, d_ff=2048,
                        max_seq_len=512)
        t = TrainConfig(steps=1200, batch_size=32, seq_len=512, lr=1e-3, warmup_steps=80,
                        eval_every=200)
    return ZooSpec(model=m, train=t)


_SPECS = {"large": _large, "small": _small}


def names() -> list[str]:
    """Names `load` accepts."""
    return sorted(_SPECS)


def spec(name: str, profile_name: str | None = None) -> ZooSpec:
    """The model and training recipe behind `load(name)` at a profile (default: the active one)."""
    if name not in _SPECS:
        raise ValueError(f"unknown zoo model {name!r}; available: {names()}")
    return _SPECS[name](check_profile(profile_name) if profile_name else profile())


def load(name: str, profile_name: str | None = None, progress: bool = True) -> Transformer:
    """The trained zoo model `name` for a profile, trained now if it is not cached yet."""
    return load_spec(spec(name, profile_name), label=name, progress=progress)


def load_spec(s: ZooSpec, label: str = "model", progress: bool = True) -> Transformer:
    """Load (or train, then save) the model described by a ZooSpec; see `load`."""
    path = _spec_path(s, label)
    tensors, info = cached_tensors(path, lambda: _train_spec(s, label, progress),
                                   desc=f"zoo model {label!r}")
    if s.model.tie_embeddings:  # a tied head is stored once, as the embedding
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    model = Transformer(s.model)
    model.load_state_dict(tensors)
    model.zoo_info = {**info, "path": str(path)}
    return model.to(device()).eval()


def _spec_path(s: ZooSpec, label: str):
    return cache_dir() / "zoo" / f"{label}-{s.key()}.safetensors"


def load_specs(specs: dict[str, ZooSpec], workers: int | None = None,
               progress: bool = True) -> dict[str, Transformer]:
    """`load_spec` for every (label, spec); the uncached ones train in parallel processes.

    Course models this small train about as fast on one thread as on two, so on a CPU one
    single-thread process per core trains several of them sooner than one after another
    (`runtime.map_in_workers`; one process on a GPU).
    """
    todo = [(s, label) for label, s in specs.items() if not _spec_path(s, label).exists()]
    map_in_workers(_train_quietly, todo, workers, desc="zoo models", progress=progress)
    return {label: load_spec(s, label, progress) for label, s in specs.items()}


def _train_quietly(spec_and_label: tuple[ZooSpec, str]) -> None:
    s, label = spec_and_label
    load_spec(s, label, progress=False)


def _train_spec(s: ZooSpec, label: str, progress: bool) -> tuple[dict, dict]:
    torch.manual_seed(s.train.seed)
    model = Transformer(s.model).to(device())
    train_tokens = data.tokens("train", s.vocab_size)
    val_tokens = data.tokens("val", s.vocab_size)
    start = time.perf_counter()
    model, history = train(model, train_tokens, val_tokens, s.train, progress=progress,
                           desc=f"training zoo model {label!r} (first use only)")
    seconds = time.perf_counter() - start
    state = {k: v for k, v in model.state_dict().items()
             if not (s.model.tie_embeddings and k == "lm_head.weight")}
    info = {"name": label, "model": s.model.to_dict(), "train": s.train.to_dict(),
            "vocab_size": s.vocab_size, "history": history, "train_seconds": seconds,
            "val_loss": history[-1]["val_loss"], "trained_by_pid": os.getpid(),
            "torch": torch.__version__, "device": str(device())}
    return state, info
