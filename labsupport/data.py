"""The course corpus and tokenizer: the Python standard library, byte-level BPE, token tensors.

The corpus is the source of the running interpreter's standard library (no download, the same on
every Python install). Files are split into train and validation by a hash of their path, and a
few packages are held out entirely as a "new domain" for the fine-tuning labs. Introduced in
lab 00; every lab that trains uses `tokens()` and `get_batch()`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .runtime import CorruptCacheError, cache_dir, cached_file, cached_tensors, stable_hash

DATA_VERSION = 1  # bump when the corpus selection or the tokenizer recipe changes
SPLITS = ("train", "val", "new_domain")
HELD_OUT_PACKAGES = ("email", "tkinter")  # the fine-tuning labs' "new domain"
VAL_FRACTION = 0.08
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
EOT = "<|endoftext|>"  # separates files in the token stream; id 0


def stdlib_root() -> Path:
    """Folder holding the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def corpus_files() -> dict[str, list[Path]]:
    """Standard-library .py files (tests left out) grouped by split: train, val, new_domain."""
    root = stdlib_root()
    splits: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        if rel.parts[0] in HELD_OUT_PACKAGES:
            splits["new_domain"].append(path)
        elif hashlib.sha1(rel.as_posix().encode()).digest()[0] < 256 * VAL_FRACTION:
            splits["val"].append(path)
        else:
            splits["train"].append(path)
    if not splits["train"]:
        raise RuntimeError(f"no Python sources found under {root}")
    return splits


def read_texts(split: str) -> list[str]:
    """The text of every file in `split`, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [p.read_text(encoding="utf-8", errors="replace") for p in corpus_files()[split]]


def corpus_fingerprint() -> str:
    """A hash of what the corpus contains here: Python version, file names and sizes."""
    root = stdlib_root()
    listing = [
        (s, p.relative_to(root).as_posix(), p.stat().st_size)
        for s, paths in corpus_files().items() for p in paths
    ]
    return stable_hash([DATA_VERSION, sys.version_info[:3], listing])


def corpus_stats() -> dict[str, dict[str, int]]:
    """Files and bytes per split."""
    return {s: {"files": len(ps), "bytes": sum(p.stat().st_size for p in ps)}
            for s, ps in corpus_files().items()}


def _tokenizer_path(vocab_size: int) -> Path:
    return cache_dir() / "data" / f"bpe-v{vocab_size}-{corpus_fingerprint()}.json"


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
    )
    tok.train_from_iterator(read_texts("train"), trainer=trainer)
    return tok


def _check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or not 256 + 1 <= vocab_size <= 65535:
        raise ValueError(f"vocab_size must be in 257..65535 (an int: bytes + <|endoftext|>, "
                         f"and token ids stored as uint16), got {vocab_size!r}")


def _read_tokenizer(path: Path, vocab_size: int):
    from tokenizers import Tokenizer

    blob = path.read_bytes()  # an OSError (permissions, a failing disk) is raised as itself
    try:
        tok = Tokenizer.from_str(blob.decode("utf-8"))
    except Exception as e:  # bad UTF-8, or the bare Exception tokenizers raises on bad JSON
        raise CorruptCacheError(f"{path}: unreadable ({e})") from e
    if tok.get_vocab_size() != vocab_size or tok.token_to_id(EOT) != 0:
        raise CorruptCacheError(f"{path}: vocabulary of {tok.get_vocab_size()} with "
                                f"{EOT} at {tok.token_to_id(EOT)}, expected {vocab_size} and 0")
    return tok


def tokenizer(vocab_size: int = 4096):
    """A byte-level BPE tokenizer trained on the train split; cached per vocabulary size."""
    _check_vocab_size(vocab_size)
    tok, _ = cached_file(_tokenizer_path(vocab_size), lambda: _train_tokenizer(vocab_size),
                         lambda t, tmp: t.save(str(tmp)),
                         lambda p: _read_tokenizer(p, vocab_size), desc="tokenizer")
    return tok


def tokenizer_fingerprint(vocab_size: int = 4096) -> str:
    """A hash of the tokenizer itself (vocabulary, merges, pre-tokenizer), for cache keys.

    Training the same corpus with another `tokenizers` release may give other merges; every
    cache built from token ids (token arrays, zoo models) includes this hash in its key.
    """
    spec = json.loads(tokenizer(vocab_size).to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return stable_hash([spec["model"]["vocab"], merges, spec.get("pre_tokenizer"),
                        spec.get("normalizer"), [t["content"] for t in spec["added_tokens"]]])


def tokens(split: str = "train", vocab_size: int = 4096) -> torch.Tensor:
    """All token ids of a split as one 1-D int64 tensor, files separated by <|endoftext|>."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_vocab_size(vocab_size)
    path = (cache_dir() / "data" /
            f"tokens-{split}-v{vocab_size}-{corpus_fingerprint()}-"
            f"{tokenizer_fingerprint(vocab_size)}.safetensors")

    def build():
        tok = tokenizer(vocab_size)
        encoded = tok.encode_batch(read_texts(split))  # batch: one 12 MB string is ~10x slower
        eot = np.zeros(1, dtype=np.uint16)
        ids = np.concatenate([x for e in encoded for x in (np.asarray(e.ids, np.uint16), eot)])
        meta = {"split": split, "vocab_size": vocab_size, "files": len(encoded)}
        return {"ids": torch.from_numpy(ids)}, meta

    tensors, _ = cached_tensors(path, build, desc=f"{split} tokens")
    return tensors["ids"].long()


def split_by_file(ids: torch.Tensor,
                  val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) of a token stream, cut at the file boundary nearest `val_fraction` from the end.

    Cutting between files, not inside one, keeps any file out of both halves, as the corpus's
    own train/val split does; the fine-tuning labs split the "new_domain" stream this way.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    ends = (ids == 0).nonzero().flatten() + 1  # the <|endoftext|> closing each file (id 0)
    target = round(ids.numel() * (1 - val_fraction))
    inner = ends[(ends > 0) & (ends < ids.numel())]
    if inner.numel() == 0:
        raise ValueError("ids hold a single file; there is no file boundary to split at")
    cut = int(inner[(inner - target).abs().argmin()])
    return ids[:cut], ids[cut:]


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs x (B, T) and next-token targets y (B, T)."""
    if data.numel() < seq_len + 2:
        raise ValueError(f"data has {data.numel()} tokens, fewer than seq_len + 2 = "
                         f"{seq_len + 2}")
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    windows = data[starts[:, None] + offsets]  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]


def data_summary(vocab_size: int = 4096) -> dict:
    """Files, bytes, tokens and bytes per token of every split, for the labs' data tables."""
    stats = corpus_stats()
    for split in SPLITS:
        n = tokens(split, vocab_size).numel()
        stats[split].update(tokens=n, bytes_per_token=round(stats[split]["bytes"] / n, 2))
    return stats
