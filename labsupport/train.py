"""A plain training loop: AdamW, warm-up then cosine decay, gradient clipping, periodic eval.

Introduced in lab 00; the zoo, scaling-law, LoRA and distillation labs train with it.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

with warnings.catch_warnings():  # without ipywidgets, tqdm.auto falls back to text bars: fine
    warnings.simplefilter("ignore")
    from tqdm.auto import tqdm

from .data import get_batch
from .measure import flops_per_token
from .model import ModelConfig


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 16  # sequences per step
    seq_len: int = 128  # tokens per sequence
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warm-up from 0
    weight_decay: float = 0.1  # applied to matrices only, not to norms
    grad_clip: float = 1.0  # max global gradient norm
    eval_every: int = 50  # steps between validation estimates (and at the end)
    eval_batches: int = 8  # batches per validation estimate
    seed: int = 0  # batch sampling and dropout-free, so the run is repeatable

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1 and warmup_steps >= 0")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict:
        return asdict(self)


def run_flops(cfg: ModelConfig, tc: TrainConfig) -> float:
    """Matmul FLOPs of training a model of shape `cfg` with `tc`: 3x a forward pass per training
    token (measure.flops_per_token), at the mean context of a window, whose positions attend to
    1..seq_len tokens."""
    tokens = tc.steps * tc.tokens_per_step
    return flops_per_token(cfg, (tc.seq_len + 1) / 2, training=True) * tokens


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at `step`: linear warm-up, then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights only (norm gains are left undecayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats per token (our model or a transformers one)."""
    out = model(x)
    logits = getattr(out, "logits", out)  # (B, T, V); HF models wrap them in an output object
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


@torch.no_grad()
def batch_losses(model: torch.nn.Module, data: torch.Tensor, seq_len: int,
                 batch_size: int = 16, n_batches: int = 8, seed: int = 1234) -> list[float]:
    """Loss of each of n_batches fixed random batches (the same windows on every call)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    losses = []
    for _ in range(n_batches):
        x, y = get_batch(data, batch_size, seq_len, gen)
        losses.append(lm_loss(model, x.to(device), y.to(device)).item())
    model.train(was_training)
    return losses


def evaluate_loss(model: torch.nn.Module, data: torch.Tensor, seq_len: int,
                  batch_size: int = 16, n_batches: int = 8, seed: int = 1234) -> float:
    """Validation loss on fixed random windows (the same windows on every call)."""
    losses = batch_losses(model, data, seq_len, batch_size, n_batches, seed)
    return sum(losses) / len(losses)


def train(model: torch.nn.Module, train_data: torch.Tensor, val_data: torch.Tensor | None,
          cfg: TrainConfig, progress: bool = True, desc: str = "training", loss_fn=None):
    """Train `model` in place; return it and a history of dicts (step, loss, val_loss, ...).

    `loss_fn(model, x, y) -> loss` replaces the next-token cross-entropy (`lm_loss`), as
    distillation does; validation always reports `lm_loss` on real data.
    """
    loss_fn = lm_loss if loss_fn is None else loss_fn
    device = next(model.parameters()).device
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = get_batch(train_data, cfg.batch_size, cfg.seq_len, gen)
        loss = loss_fn(model, x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        last = step == cfg.steps - 1
        if val_data is not None and ((step + 1) % cfg.eval_every == 0 or last):
            val = evaluate_loss(model, val_data, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
            history.append({"step": step + 1, "tokens": (step + 1) * cfg.tokens_per_step,
                            "loss": loss.item(), "val_loss": val, "lr": lr_at(step, cfg),
                            "seconds": time.perf_counter() - start})
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.3f}")
    model.eval()
    return model, history
