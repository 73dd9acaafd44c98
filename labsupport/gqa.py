"""Grouped-query attention helpers: configs at equal size, and MHA-to-GQA conversion (lab 32).

In the course model, query head h reads key/value head h // (H / Hkv): the H query heads fall
into Hkv consecutive groups, one K/V head each (MHA when Hkv = H, MQA when Hkv = 1).
Shape letters as in `labsupport.model`: C d_model, H query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .model import ModelConfig, Transformer


def _check_groups(cfg: ModelConfig, n_kv_heads: int) -> None:
    if not isinstance(n_kv_heads, int) or n_kv_heads < 1 or cfg.n_heads % n_kv_heads:
        divisors = [d for d in range(1, cfg.n_heads + 1) if cfg.n_heads % d == 0]
        raise ValueError(f"n_kv_heads must divide n_heads={cfg.n_heads} (one of {divisors}), "
                         f"got {n_kv_heads!r}")


def gqa_config(cfg: ModelConfig, n_kv_heads: int, match_params: bool = True) -> ModelConfig:
    """`cfg` with n_kv_heads K/V heads; with match_params, d_ff grows to keep the parameter count.

    Fewer K/V heads remove 2 (H - Hkv) D C weights per layer; giving them back to the MLP lets
    the variants compare at (nearly) equal size and training compute.
    """
    _check_groups(cfg, n_kv_heads)
    new = replace(cfg, n_kv_heads=n_kv_heads)
    if match_params:
        removed = 2 * (cfg.n_kv_heads - n_kv_heads) * cfg.head_dim * cfg.d_model  # per layer
        new = replace(new, d_ff=cfg.d_ff + round(removed / (3 * cfg.d_model)))  # 3 MLP matrices
    return new


@torch.no_grad()
def mean_pool_kv_heads(model: Transformer, n_kv_heads: int) -> Transformer:
    """Convert a model to n_kv_heads K/V heads by averaging the K and V heads of each group.

    This is the conversion of Ainslie et al. (2023): each new key (value) projection is the mean
    of the projections of the heads in its group. Queries, MLPs and everything else are kept.
    """
    cfg = model.cfg
    _check_groups(cfg, n_kv_heads)
    if cfg.n_kv_heads % n_kv_heads:
        raise ValueError(f"can only merge heads: n_kv_heads={n_kv_heads} must divide the "
                         f"model's {cfg.n_kv_heads} K/V heads")
    new_cfg = replace(cfg, n_kv_heads=n_kv_heads)
    converted = Transformer(new_cfg).to(model.norm.weight.device, model.norm.weight.dtype)
    state = dict(model.state_dict())  # load_state_dict copies, so the model is not touched
    group = cfg.n_kv_heads // n_kv_heads
    for i in range(cfg.n_layers):
        for name in ("k_proj", "v_proj"):
            key = f"layers.{i}.self_attn.{name}.weight"
            w = state[key].view(n_kv_heads, group, cfg.head_dim, cfg.d_model)  # (Hkv, g, D, C)
            state[key] = w.mean(dim=1).reshape(n_kv_heads * cfg.head_dim, cfg.d_model)
    converted.load_state_dict(state)
    return converted.eval()
