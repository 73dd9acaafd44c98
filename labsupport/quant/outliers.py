"""Activation outliers (lab 21, "Outliers"): LLM.int8()'s motivation on a course model."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import _linears, _replace
from .rtn import quantize_rtn

GRANULARITIES = ("tensor", "token", "group", "feature", "mixed")


def fake_quantize(x: torch.Tensor, bits: int = 8, granularity: str = "token",
                  group_size: int = 32, threshold: float = 6.0) -> torch.Tensor:
    """x (..., C) rounded to `bits`-bit codes and back, with one scale per `granularity`.

    "tensor": one scale; "token": one per row (what int8 matmuls can use); "group": one per
    `group_size` features of a row; "feature": one per column (exact for outlier features, but a
    scale on the inner dimension cannot be factored out of an integer matmul); "mixed": LLM.int8()'s
    decomposition, features with any |x| >= threshold kept in float, the rest per token.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    rows = x.reshape(-1, x.shape[-1]).float()  # (N, C)
    if granularity == "tensor":
        out = quantize_rtn(rows.reshape(1, -1), bits).dequantize().view_as(rows)
    elif granularity == "token":
        out = quantize_rtn(rows, bits).dequantize()
    elif granularity == "group":
        out = quantize_rtn(rows, bits, group_size).dequantize()
    elif granularity == "feature":
        out = quantize_rtn(rows.T.contiguous(), bits).dequantize().T
    else:
        outliers = rows.abs().amax(dim=0) >= threshold  # (C,) features kept in float
        out = quantize_rtn(rows.masked_fill(outliers, 0.0), bits).dequantize()
        out[:, outliers] = rows[:, outliers]
    return out.view_as(x).to(x.dtype)


class ActQuantLinear(nn.Module):
    """Inputs quantized per `granularity`, times weights rounded per channel (or kept float)."""

    def __init__(self, weight: torch.Tensor, granularity: str, bits: int = 8,
                 weight_bits: int | None = 8):
        super().__init__()
        weight = weight.detach().float()
        if weight_bits is not None:
            weight = quantize_rtn(weight, weight_bits).dequantize()
        self.register_buffer("weight", weight)
        self.granularity, self.bits = granularity, bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quantize(x, self.bits, self.granularity), self.weight)


def quantize_activations(model: nn.Module, granularity: str, bits: int = 8,
                         weight_bits: int | None = 8) -> nn.Module:
    """A copy of a course model whose Linears quantize their inputs (and weights, per channel).

    W8A8 by default; weight_bits=None keeps weights in float, to study activations alone.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    qmodel = copy.deepcopy(model).eval()
    for name, linear in _linears(qmodel):
        _replace(qmodel, name, ActQuantLinear(linear.weight, granularity, bits, weight_bits))
    return qmodel


@torch.no_grad()
def add_outlier_features(model: nn.Module, features: list[int], alpha: float) -> nn.Module:
    """The same function with outlier features: norm gains x alpha, next layers' columns / alpha.

    Every Linear that reads a normalised residual stream then sees features `features` alpha
    times larger than the rest, as in the large models of Dettmers et al. (2022); in float the
    logits do not change.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    big = copy.deepcopy(model)
    pairs = [(b.input_layernorm, (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj))
             for b in big.layers]
    pairs += [(b.post_attention_layernorm, (b.mlp.gate_proj, b.mlp.up_proj)) for b in big.layers]
    pairs.append((big.norm, (big.lm_head,)))
    for norm, readers in pairs:
        norm.weight[features] *= alpha
        for linear in readers:
            linear.weight[:, features] /= alpha
    return big
