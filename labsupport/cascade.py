"""Cascades (lab 40): the small model answers first, the large one only when the small is unsure.

The task: complete the next few tokens of held-out standard-library code exactly, which has a
right answer that a program can check, and whose difficulty varies a lot from one place to the
next (closing a bracket is easy, naming a new variable is not). The small model's confidence in
its own answer is the signal a router reads; `speculative_generate` is the cascade that loses
nothing: the small model drafts, the large one checks every token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from . import data
from .model import Transformer

EOT = 0  # <|endoftext|>, which closes every file of the corpus


# ---- the task ------------------------------------------------------------------------------


def completion_task(n: int, context_len: int, answer_len: int, split: str = "val",
                    seed: int = 0, vocab_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(contexts (n, context_len), answers (n, answer_len)): windows of one file of `split`.

    Positions are drawn without replacement from a seeded generator, and a window never
    crosses a file boundary, so each request is real code followed by its true continuation.
    """
    for name, value in (("n", n), ("context_len", context_len), ("answer_len", answer_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    ids = data.tokens(split, vocab_size)
    width = context_len + answer_len
    # a window is valid when none of its tokens is an end-of-file marker
    eot = (ids == EOT).int()
    inside = torch.cat([torch.zeros(1, dtype=torch.int64), eot.cumsum(0)])
    starts = ((inside[width:] - inside[:-width]) == 0).nonzero().flatten()
    if starts.numel() < n:
        raise ValueError(f"n={n} exceeds the {starts.numel()} windows of {width} tokens in "
                         f"the {split!r} split")
    g = torch.Generator().manual_seed(seed)
    chosen = starts[torch.randperm(starts.numel(), generator=g)[:n]]
    windows = ids[chosen[:, None] + torch.arange(width)]  # (n, width)
    return windows[:, :context_len], windows[:, context_len:]


# ---- one model's answers and its confidence in them ----------------------------------------


@dataclass
class Answers:
    """A model's greedy answers to a batch of contexts, and what it knew about them."""

    tokens: torch.Tensor  # (N, A) the greedy completion
    logprobs: torch.Tensor  # (N, A) log-probability of each chosen token
    entropy: torch.Tensor  # (N, A) entropy of the next-token distribution (nats)
    margin: torch.Tensor  # (N, A) top-1 minus top-2 probability

    def correct(self, answers: torch.Tensor) -> np.ndarray:
        """True where the whole completion equals the reference."""
        return (self.tokens == answers).all(dim=1).numpy()

    def signals(self) -> dict[str, np.ndarray]:
        """Confidence signals, each oriented so that higher means more sure."""
        return {"mean log-prob": self.logprobs.mean(1).numpy(),
                "min token prob": self.logprobs.exp().min(1).values.numpy(),
                "neg. entropy": -self.entropy.mean(1).numpy()}

    def features(self) -> np.ndarray:
        """Cheap features for a learned router: the signals and the first token's margin."""
        s = self.signals()
        return np.column_stack([*s.values(), self.margin[:, 0].numpy(),
                                self.logprobs[:, 0].numpy()])


@torch.no_grad()
def answer(model: Transformer, contexts: torch.Tensor, answer_len: int,
           batch_size: int = 256) -> Answers:
    """Greedy completions of `contexts` (N, T) with the per-token statistics routers read.

    The loop is `generate`'s (prefill, then one token per step with a KV cache), keeping the
    distribution at each step instead of throwing it away.
    """
    device = model.norm.weight.device
    parts = []
    for batch in contexts.split(batch_size):
        batch = batch.to(device)
        cache = model.new_cache(batch.shape[0], batch.shape[1] + answer_len)
        logits = model(batch, cache=cache, logits_to_keep=1)[:, -1]
        rows = []
        for i in range(answer_len):
            logp = F.log_softmax(logits.float(), dim=-1)  # (B, V)
            top2 = logp.topk(2, dim=-1).values.exp()
            token = logp.argmax(dim=-1)  # as sample_next at temperature 0
            rows.append((token, logp.max(dim=-1).values, -(logp.exp() * logp).sum(-1),
                         top2[:, 0] - top2[:, 1]))
            if i < answer_len - 1:
                logits = model(token[:, None], cache=cache, logits_to_keep=1)[:, -1]
        parts.append([torch.stack(x, dim=1).cpu() for x in zip(*rows, strict=True)])
    return Answers(*(torch.cat(x) for x in zip(*parts, strict=True)))


# ---- routers -------------------------------------------------------------------------------


def route(signal: np.ndarray, threshold: float) -> np.ndarray:
    """Escalate where the small model's confidence is below `threshold` (-inf: never)."""
    if math.isnan(threshold):
        raise ValueError("threshold must be a number or +-inf, not NaN")
    return np.asarray(signal) < threshold


def cascade_correct(small_ok: np.ndarray, large_ok: np.ndarray,
                    escalate: np.ndarray) -> np.ndarray:
    """Per request: the large model's result where escalated, else the small one's."""
    return np.where(escalate, large_ok, small_ok)


def oracle(small_ok: np.ndarray, large_ok: np.ndarray) -> np.ndarray:
    """Escalate exactly when the small model is wrong and the large one right."""
    return ~np.asarray(small_ok, bool) & np.asarray(large_ok, bool)


def sweep(signal: np.ndarray, small_ok: np.ndarray, large_ok: np.ndarray) -> np.ndarray:
    """(escalation rate, accuracy) at every threshold, from never to always escalating.

    Sorting by confidence once makes every threshold a prefix: escalating the m least sure
    requests swaps their small-model results for the large model's.
    """
    signal = np.asarray(signal, float)
    if np.isnan(signal).any():
        raise ValueError("signal holds NaN")
    order = np.argsort(signal, kind="stable")
    s, lg, sig = np.asarray(small_ok)[order], np.asarray(large_ok)[order], signal[order]
    gain = np.concatenate([[0], np.cumsum(lg.astype(int) - s.astype(int))])
    m = np.concatenate([[0], np.flatnonzero(np.diff(sig)) + 1, [len(sig)]])  # ties go together
    return np.column_stack([m / len(sig), (s.sum() + gain[m]) / len(sig)])


class LogisticRouter:
    """P(the small model is right) from cheap features: standardised logistic regression."""

    def __init__(self, l2: float = 1e-2):
        self.l2 = l2

    def fit(self, features: np.ndarray, small_ok: np.ndarray) -> LogisticRouter:
        x = torch.as_tensor(features, dtype=torch.float64)
        y = torch.as_tensor(np.asarray(small_ok), dtype=torch.float64)
        if x.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"features must be (N, F) with N = len(small_ok), got {tuple(x.shape)}"
                             f" and {tuple(y.shape)}")
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-12)
        x = (x - self.mean) / self.std
        w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

        def loss():
            opt.zero_grad()
            value = F.binary_cross_entropy_with_logits(x @ w[1:] + w[0], y)
            value = value + self.l2 * (w[1:] ** 2).sum()
            value.backward()
            return value

        opt.step(loss)
        self.w = w.detach()
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        x = (torch.as_tensor(features, dtype=torch.float64) - self.mean) / self.std
        return torch.sigmoid(x @ self.w[1:] + self.w[0]).numpy()


def paired_gap(a_ok: np.ndarray, b_ok: np.ndarray, n_boot: int = 2000,
               seed: int = 0) -> tuple[float, float, float]:
    """Accuracy of b minus accuracy of a on the same requests, with a 95% paired bootstrap."""
    a, b = np.asarray(a_ok, float), np.asarray(b_ok, float)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"a_ok and b_ok must be 1-D and of one length, got {a.shape}, {b.shape}")
    diff = b - a
    idx = np.random.default_rng(seed).integers(0, len(diff), (n_boot, len(diff)))
    lo, hi = np.percentile(diff[idx].mean(1), [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    score, label = np.asarray(score, float), np.asarray(label, bool)
    if label.all() or not label.any():
        raise ValueError("label must hold both positives and negatives")
    ranks = rankdata(score)  # average ranks, so that ties count half
    pos = label.sum()
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * (~label).sum()))


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> np.ndarray:
    """Rows (mean confidence, accuracy, count) over equal-count bins of `confidence`."""
    order = np.argsort(confidence, kind="stable")
    rows = [(confidence[i].mean(), correct[i].mean(), len(i))
            for i in np.array_split(order, bins) if len(i)]
    return np.array(rows)


# ---- speculative decoding: the cascade that loses nothing -----------------------------------


@dataclass
class SpeculativeStats:
    """What happened in one speculative run."""

    rounds: int = 0  # target forward passes
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the target agreed with
    examined: int = 0  # draft tokens compared before the first rejection, in every round

    @property
    def acceptance(self) -> float:
        """Per-token acceptance rate alpha: accepted over examined (Leviathan et al.'s alpha)."""
        return self.accepted / self.examined if self.examined else float("nan")

    @property
    def tokens_per_round(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else float("nan")


def expected_tokens_per_round(alpha: float, k: int) -> float:
    """Leviathan et al.'s (1 - alpha^(k+1)) / (1 - alpha): tokens per target pass."""
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def cached_pass(model: Transformer, context_len: int, new_tokens: int):
    """A function that runs one cached forward pass over `new_tokens` after `context_len`.

    One decode step is new_tokens=1; a speculative round's check is new_tokens=k+1. Time
    several of them side by side with `measure.time_interleaved`.
    """
    device = model.norm.weight.device
    cache = model.new_cache(1, context_len + new_tokens)
    with torch.no_grad():
        model(torch.ones(1, context_len, dtype=torch.long, device=device), cache=cache)
    tokens = torch.ones(1, new_tokens, dtype=torch.long, device=device)

    @torch.no_grad()
    def run() -> None:
        model(tokens, cache=cache, logits_to_keep=new_tokens)
        cache.crop(context_len)  # forget the pass, so that every call is the same

    return run


@torch.no_grad()
def speculative_generate(target: Transformer, draft: Transformer, prompt: torch.Tensor,
                         max_new_tokens: int, k: int = 4,
                         stats: SpeculativeStats | None = None) -> torch.Tensor:
    """Greedy speculative decoding: (1, T + max_new_tokens), the target's own greedy output.

    Each round the draft proposes k tokens one by one; the target scores all of them in one
    forward pass and keeps the longest prefix it agrees with, then adds its own next token.
    Each model's KV cache holds a prefix of the output; a round feeds it what it lacks.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(f"draft and target must share a vocabulary: draft has "
                         f"{draft.cfg.vocab_size} tokens, target {target.cfg.vocab_size}")
    if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (1, length>=1), got {tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    total = prompt.shape[1] + max_new_tokens
    limit = min(target.cfg.max_seq_len, draft.cfg.max_seq_len)
    if total > limit:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds the models' context "
                         f"of {limit}")
    stats = SpeculativeStats() if stats is None else stats
    out = prompt[0].tolist()
    t_cache, d_cache = target.new_cache(1, total), draft.new_cache(1, total)
    device = target.norm.weight.device
    while len(out) < total:
        n_draft = min(k, total - len(out) - 1)  # the target adds one token of its own
        proposal = []
        for _ in range(n_draft):  # the draft catches up on what it lacks, then runs ahead
            feed = torch.tensor([(out + proposal)[d_cache.length:]], device=device)
            proposal.append(int(draft(feed, cache=d_cache, logits_to_keep=1)[0, -1].argmax()))
        feed = torch.tensor([(out + proposal)[t_cache.length:]], device=device)
        # the target's choice after every prefix: n_draft + 1 positions in one pass
        choice = target(feed, cache=t_cache, logits_to_keep=n_draft + 1)[0].argmax(-1).tolist()
        n = 0
        while n < n_draft and proposal[n] == choice[n]:
            n += 1
        out += proposal[:n] + [choice[n]]
        # both caches may keep only tokens that are now part of the output
        t_cache.crop(min(t_cache.length, len(out) - 1))
        d_cache.crop(min(d_cache.length, len(out) - 1))
        stats.rounds += 1
        stats.drafted += n_draft
        stats.accepted += n
        stats.examined += n + (n < n_draft)
    return torch.tensor([out], device=prompt.device)
