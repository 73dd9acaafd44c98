"""Scaling laws: IsoFLOP training runs, the Chinchilla parametric fit, and published fits.

The parametric law of Hoffmann et al. (2022), L(N, D) = E + A / N^alpha + B / D^beta, is fitted
as in their Approach 3: a Huber loss on the residuals of log L, minimised with L-BFGS from a grid
of starting points. Approach 2 (IsoFLOP profiles) fits a parabola to loss against log N at each
compute budget and a power law to the minima. Introduced in lab 10.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import huber, logsumexp

from . import data
from .model import ModelConfig, Transformer
from .runtime import cache_dir, cached_json, device, map_in_workers, stable_hash
from .train import TrainConfig, evaluate_loss, train

RECIPE_VERSION = 1  # bump when the training recipe of scaling runs changes


@dataclass(frozen=True)
class ParametricFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, with N parameters and D training tokens."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = ""

    def predict(self, N, D):
        """Predicted loss (nats/token) for N parameters trained on D tokens."""
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    @property
    def a(self) -> float:
        """Exponent of N_opt proportional to C^a: beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt proportional to C^b: alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)

    def compute_optimal(self, C):
        """(N_opt, D_opt) minimising L under C = 6 N D (Hoffmann et al., eq. 4)."""
        C = np.asarray(C, dtype=float)
        if np.any(C <= 0):
            raise ValueError("compute C must be > 0")
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        N_opt = G * (C / 6) ** self.a
        return N_opt, C / (6 * N_opt)

    def tokens_per_param(self, C) -> float:
        """D_opt / N_opt at compute C."""
        N, D = self.compute_optimal(C)
        return D / N


HOFFMANN_2022 = ParametricFit(
    E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28,
    source="Hoffmann et al. 2022, Approach 3 (rounded values as published)")
BESIROGLU_2024 = ParametricFit(
    E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
    source="Besiroglu et al. 2024 (Epoch AI), refit of Hoffmann's data")
KAPLAN_2020_A = 0.73  # N_opt proportional to C^0.73 (Kaplan et al. 2020, as quoted by Hoffmann)


def _check_points(N, D, L, min_points: int) -> tuple[np.ndarray, ...]:
    arrays = [np.asarray(v, dtype=float).ravel() for v in (N, D, L)]
    lengths = {name: len(a) for name, a in zip("NDL", arrays, strict=True)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"N, D and L must have the same length, got {lengths}")
    if lengths["N"] < min_points:
        raise ValueError(f"need at least {min_points} points to fit, got {lengths['N']}")
    for name, a in zip("NDL", arrays, strict=True):
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise ValueError(f"{name} must be finite and > 0")
    return tuple(arrays)


def _objective(theta, logN, logD, logL, delta):
    """Huber loss of log-space residuals and its gradient; theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])  # (3, n)
    lse = logsumexp(terms, axis=0)
    r = lse - logL
    weights = np.exp(terms - lse)  # d lse / d term
    dr = np.clip(r, -delta, delta)  # derivative of huber(delta, r)
    grad = np.array([
        np.sum(dr * weights[0]), np.sum(dr * weights[1]), np.sum(dr * weights[2]),
        np.sum(dr * weights[0] * -logN), np.sum(dr * weights[1] * -logD)])
    return np.sum(huber(delta, r)), grad


def fit_parametric(N, D, L, delta: float = 1e-3, starts=None, refine: int = 16) -> ParametricFit:
    """Fit L = E + A/N^alpha + B/D^beta as Hoffmann et al. Approach 3.

    Minimises the Huber loss (delta 1e-3) between log L and
    log(exp(a - alpha log N) + exp(b - beta log D) + exp(e)) with L-BFGS from a grid of starts
    over (a, b, e, alpha, beta), keeping the best; A = exp(a), B = exp(b), E = exp(e).
    The objective is evaluated at all 192 grid points and L-BFGS runs from the `refine` best
    of them (on the course's runs, the 8 best already reach the optimum the full grid finds,
    at a tenth of the time). `starts` replaces the grid and is used whole.
    """
    N, D, L = _check_points(N, D, L, min_points=5)
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    if starts is None:
        if refine < 1:
            raise ValueError(f"refine must be >= 1, got {refine}")
        grid = [np.array(s) for s in itertools.product(
            [0.0, 5.0, 10.0, 15.0], [0.0, 5.0, 10.0, 15.0], [-1.0, 0.0, 1.0], [0.2, 0.5],
            [0.2, 0.5])]
        first = [_objective(s, logN, logD, logL, delta)[0] for s in grid]
        starts = [grid[i] for i in np.argsort(first)[:refine]]
    best = None
    for start in starts:
        # The objective is tiny (~1e-4), so L-BFGS-B's default tolerances, relative to it, stop
        # far from the optimum: the failure Besiroglu et al. found in the published fit.
        res = minimize(_objective, np.array(start, dtype=float), args=(logN, logD, logL, delta),
                       jac=True, method="L-BFGS-B",
                       bounds=[(None, None), (None, None), (None, None), (0, 3), (0, 3)],
                       options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000})
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return ParametricFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta,
                         source="fitted here")


def isoflop_minimum(N, L) -> float:
    """N at the minimum of a parabola fitted to L against log N (one compute budget).

    The minimum is kept within the sizes of the profile: a vertex outside them would be an
    extrapolation, and means the profile did not bracket the optimum (widen it).
    """
    logN, L = np.log(np.asarray(N, dtype=float)), np.asarray(L, dtype=float)
    if len(np.unique(logN)) < 3:
        raise ValueError("an IsoFLOP profile needs at least 3 distinct sizes")
    c2, c1, _ = np.polyfit(logN, L, 2)
    vertex = -c1 / (2 * c2) if c2 > 0 else logN[np.argmin(L)]
    return float(np.exp(np.clip(vertex, logN.min(), logN.max())))


def fit_power_law(x, y) -> tuple[float, float]:
    """(exponent, prefactor) of y = prefactor * x^exponent, by least squares in log space."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y) or len(x) < 2 or np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("fit_power_law needs >= 2 positive (x, y) pairs of equal length")
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope), float(math.exp(intercept))


def isoflop_exponent(C, N, L) -> tuple[float, dict[float, float], dict[float, bool]]:
    """Approach 2: exponent a of N_opt proportional to C^a, N_opt per budget, and whether each
    minimum is interior.

    Budgets whose minimum sits at the edge of their profile did not bracket the optimum; they
    are left out of the power law when at least two interior ones remain.
    """
    C, N, L = (np.asarray(v, dtype=float) for v in (C, N, L))
    minima, interior = {}, {}
    for c in np.unique(C):
        sizes = N[C == c]
        minima[float(c)] = n_opt = isoflop_minimum(sizes, L[C == c])
        interior[float(c)] = bool(sizes.min() < n_opt < sizes.max())
    use = [c for c in minima if interior[c]]
    use = use if len(use) >= 2 else list(minima)
    a, _ = fit_power_law(use, [minima[c] for c in use])
    return a, minima, interior


def bootstrap(fn, n_points: int, n_boot: int = 200, seed: int = 0, groups=None) -> np.ndarray:
    """Values of fn(indices) over bootstrap resamples of the points (within groups if given)."""
    rng = np.random.default_rng(seed)
    groups = np.zeros(n_points, dtype=int) if groups is None else np.asarray(groups)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    values = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(m, size=len(m), replace=True) for m in members])
        try:
            values.append(fn(idx))
        except (ValueError, np.linalg.LinAlgError):
            continue  # a degenerate resample (e.g. one distinct size in a profile)
    return np.array(values)


def noise_bootstrap(fn, losses, sigma, n_boot: int = 200, seed: int = 0) -> np.ndarray:
    """Values of fn(perturbed losses) with Gaussian noise of std `sigma` added to every loss.

    A parametric bootstrap for seed noise: `sigma` is the spread between seeds of the same
    run (one number, or one per loss: a mean over k seeds has sigma / sqrt(k)), so each
    resample is a plausible rerun of the whole grid with other seeds. Unlike resampling runs,
    it keeps every size in every profile.
    """
    losses = np.asarray(losses, dtype=float)
    sigma = np.broadcast_to(np.asarray(sigma, dtype=float), losses.shape)
    if np.any(sigma < 0) or not np.all(np.isfinite(sigma)):
        raise ValueError(f"sigma must be finite standard deviations >= 0, got {sigma}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        try:
            values.append(fn(losses + rng.normal(0.0, 1.0, size=losses.shape) * sigma))
        except (ValueError, np.linalg.LinAlgError):
            continue
    return np.array(values)


def pooled_seed_std(groups, losses) -> tuple[float, int]:
    """(std, degrees of freedom) of the loss between seeds, pooled over runs with >= 2 seeds.

    `groups` labels runs that differ only in their seed (e.g. (budget, N) pairs)."""
    frame = {}
    for g, v in zip(groups, np.asarray(losses, dtype=float), strict=True):
        frame.setdefault(g, []).append(v)
    sq, dof = 0.0, 0
    for values in frame.values():
        if len(values) >= 2:
            sq += float(np.sum((np.array(values) - np.mean(values)) ** 2))
            dof += len(values) - 1
    if dof == 0:
        raise ValueError("pooled_seed_std needs at least one run with two or more seeds")
    return math.sqrt(sq / dof), dof


# ----------------------------------------------------------------------------------------
# Training runs: one model size, one token budget, cached so that a notebook can resume.


def lr_for_width(d_model: int) -> float:
    """Peak learning rate falling as 1/width (0.16 / d, capped at 1e-2).

    Narrow models tolerate, and in a few hundred steps need, larger steps than wide ones;
    a rate tuned for one width would favour it in the comparison.
    """
    return min(1e-2, 0.16 / d_model)


@dataclass(frozen=True)
class RunSpec:
    """One scaling run: a model config trained on `tokens` tokens."""

    model: ModelConfig
    tokens: int
    batch_size: int = 8
    seq_len: int = 128
    lr: float | None = None  # None: lr_for_width(d_model)
    seed: int = 0
    budget: float = 0.0  # the nominal compute C = 6ND this run belongs to (IsoFLOP profile)

    @property
    def steps(self) -> int:
        return max(1, round(self.tokens / (self.batch_size * self.seq_len)))

    def train_config(self) -> TrainConfig:
        lr = lr_for_width(self.model.d_model) if self.lr is None else self.lr
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len,
                           lr=lr, warmup_steps=max(1, min(50, self.steps // 10)),
                           eval_every=self.steps, eval_batches=16, seed=self.seed)

    def key(self) -> str:
        return stable_hash([self.model.to_dict(), asdict(self) | {"model": None},
                            data.corpus_fingerprint(), RECIPE_VERSION])


# (width, layers) of the course's size ladder: non-embedding parameters grow by ~1.3-2x a rung
LADDER = [(16, 1), (16, 2), (24, 1), (24, 2), (32, 2), (40, 2), (40, 3), (48, 2), (48, 3),
          (64, 2), (64, 3), (80, 3), (96, 3), (96, 4), (128, 4), (128, 6), (160, 6), (192, 6),
          (192, 8), (256, 8)]


def ladder_config(d_model: int, n_layers: int, vocab_size: int, max_seq_len: int) -> ModelConfig:
    """A rung of the size ladder: 16-wide heads (MHA) and a SwiGLU hidden width of ~8/3 d."""
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                       n_heads=d_model // 16, d_ff=(8 * d_model // 3) // 8 * 8,
                       max_seq_len=max_seq_len)


def isoflop_specs(budgets, ratios, vocab_size: int = 512, seq_len: int = 128,
                  batch_size: int = 8) -> list[RunSpec]:
    """Runs for IsoFLOP profiles: at each compute budget C, one run per target tokens/param r.

    Compute is counted as Hoffmann et al. did, C = 6ND with N all parameters (embeddings
    included). The size is the ladder rung whose N is nearest sqrt(C / 6r); D is then set so
    that 6ND = C. Rungs picked twice for one budget are run once.
    """
    if not budgets or not ratios or min(budgets) <= 0 or min(ratios) <= 0:
        raise ValueError("budgets and ratios must be non-empty lists of positive numbers")
    rungs = [ladder_config(d, n, vocab_size, seq_len) for d, n in LADDER]
    specs = []
    for C in budgets:
        chosen = []
        for r in ratios:
            target = math.sqrt(C / (6 * r))
            cfg = min(rungs, key=lambda c: abs(math.log(c.num_params(False) / target)))
            if cfg not in chosen:
                chosen.append(cfg)
        for cfg in chosen:
            tokens = round(C / (6 * cfg.num_params(non_embedding=False)))
            specs.append(RunSpec(cfg, tokens, batch_size=batch_size, seq_len=seq_len,
                                 budget=float(C)))
    return specs


def _run_path(spec: RunSpec) -> Path:
    return cache_dir() / "scaling" / f"run-{spec.key()}.json"


def run(spec: RunSpec, progress: bool = False) -> dict:
    """Train one scaling run (or read its cached result): N (all parameters), N_nonemb, D,
    C = 6ND, val loss, wall time."""
    path = _run_path(spec)
    result, built = cached_json(path, lambda: _train_run(spec, progress),
                                desc=f"scaling run {spec.key()}")
    return result | {"cached": not built}


def run_all(specs: list[RunSpec], workers: int | None = None, progress: bool = True) -> list[dict]:
    """Results of `run` for every spec, in order; uncached runs train in parallel processes.

    Runs this small are bound by per-operation overhead, not arithmetic: one thread trains
    them about as fast as two, so single-thread processes, one per core on a CPU
    (`runtime.map_in_workers`; one process on a GPU), finish the grid up to that many times
    sooner. Each run's `seconds` is then one core's wall time.
    """
    # longest first, so that the last worker does not start the longest run last
    todo = sorted((s for s in specs if not _run_path(s).exists()), key=lambda s: -s.tokens)
    map_in_workers(run, todo, workers, desc="scaling runs", progress=progress)
    trained_now = {s.key() for s in todo}
    # reads each file (and retrains a damaged one); "cached" says whether it trained just now
    return [run(s) | ({"cached": False} if s.key() in trained_now else {}) for s in specs]


def _train_run(spec: RunSpec, progress: bool) -> dict:
    torch.manual_seed(spec.seed)
    cfg = spec.model
    model = Transformer(cfg).to(device())
    train_tokens, val_tokens = data.tokens("train", cfg.vocab_size), data.tokens("val",
                                                                                  cfg.vocab_size)
    start = time.perf_counter()
    model, history = train(model, train_tokens, None, spec.train_config(), progress=progress,
                           desc=f"N={cfg.num_params():,}, D={spec.tokens:,}")
    seconds = time.perf_counter() - start
    val = evaluate_loss(model, val_tokens, spec.seq_len, batch_size=16, n_batches=16)
    N, D = cfg.num_params(non_embedding=False), spec.steps * spec.batch_size * spec.seq_len
    return {"key": spec.key(), "d_model": cfg.d_model, "n_layers": cfg.n_layers,
            "N": N, "N_nonemb": cfg.num_params(non_embedding=True), "D": D, "C": 6 * N * D,
            "budget": spec.budget,
            "val_loss": val, "seconds": seconds, "steps": spec.steps}
