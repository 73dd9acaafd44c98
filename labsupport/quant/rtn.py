"""Round-to-nearest quantization: every weight to the nearest point of its group's grid."""

from __future__ import annotations

import torch

from .formats import (
    SCALE_DTYPE,
    QuantizedTensor,
    _check_bits,
    _check_group_size,
    _check_weight,
    pack_codes,
    qmax,
)


def _scales(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Float16 scales (O, G) = max|w| / qmax per group, rounded up so no code exceeds qmax."""
    n_out, n_in = weight.shape
    amax = weight.detach().float().view(n_out, n_in // group_size, group_size).abs().amax(dim=-1)
    exact = (amax / qmax(bits)).clamp(min=2.0**-24)  # all-zero groups get the smallest scale
    if not torch.isfinite(exact).all() or exact.max() > torch.finfo(SCALE_DTYPE).max:
        raise ValueError(f"weights must be finite with max|w| / qmax below float16's maximum "
                         f"(65504) to store their scales; got max|w| = {amax.max().item():.3g}")
    stored = exact.to(SCALE_DTYPE)
    up = torch.nextafter(stored, torch.tensor(float("inf"), dtype=SCALE_DTYPE,
                                              device=stored.device))
    return torch.where(stored.float() < exact, up, stored)


def _round(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest codes of w on a grid of step `scale` (broadcast), clamped to +-qmax."""
    q = qmax(bits)
    return torch.round(w / scale).clamp(-q, q)


def _from_codes(codes: torch.Tensor, scales: torch.Tensor, bits: int,
                group_size: int) -> QuantizedTensor:
    unsigned = codes.to(torch.int16) + 2 ** (bits - 1)  # [-qmax, qmax] -> [1, 2^bits - 1]
    return QuantizedTensor(pack_codes(unsigned, bits), scales.to(SCALE_DTYPE),
                           tuple(codes.shape), bits, group_size)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int | None = None) -> QuantizedTensor:
    """Round-to-nearest: every weight to the nearest point of its group's grid, |w - w^| <= s/2."""
    _check_bits(bits)
    n_out, n_in = _check_weight(weight)
    group_size = _check_group_size(group_size, n_in)
    w = weight.detach().float()
    scales = _scales(w, bits, group_size)  # (O, G)
    codes = _round(w.view(n_out, -1, group_size), scales.float().unsqueeze(-1), bits)
    return _from_codes(codes.view(n_out, n_in), scales, bits, group_size)
