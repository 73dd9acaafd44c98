"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022).

Quantize one input column at a time and push each column's rounding error onto the columns not
yet quantized, weighted by the inverse Hessian of the layer's squared output error,
H = 2 X^T X / n.
"""

from __future__ import annotations

import torch

from .formats import SCALE_DTYPE, QuantizedTensor, _check_bits, _check_group_size, _check_weight
from .rtn import _from_codes, _round, _scales


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / n (I, I) of a layer's inputs X (n, I): the curvature of its output error."""
    x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
    return 2.0 * x.T @ x / x.shape[0]


def gptq(weight: torch.Tensor, inputs: torch.Tensor, bits: int, group_size: int | None = None,
         damp: float = 0.01, block_size: int = 128) -> QuantizedTensor:
    """GPTQ-quantize weight (O, I) for calibration inputs (n, I) that the layer sees."""
    _check_bits(bits)
    n_out, n_in = _check_weight(weight)
    if inputs.dim() != 2 or inputs.shape[1] != n_in:
        raise ValueError(f"inputs must have shape (n, in_features={n_in}), "
                         f"got {tuple(inputs.shape)}")
    return gptq_from_hessian(weight, hessian(inputs), bits, group_size, damp, block_size)


def gptq_from_hessian(weight: torch.Tensor, H: torch.Tensor, bits: int,
                      group_size: int | None = None, damp: float = 0.01,
                      block_size: int = 128) -> QuantizedTensor:
    """GPTQ given the Hessian H (I, I) instead of the inputs (the form used inside a model).

    With groups, a group's scale is taken from its weights as updated when the group begins
    (the reference code reads them before in-block updates when groups are smaller than blocks).
    """
    _check_bits(bits)
    n_out, n_in = _check_weight(weight)
    group_size = _check_group_size(group_size, n_in)
    if H.shape != (n_in, n_in):
        raise ValueError(f"H must have shape ({n_in}, {n_in}), got {tuple(H.shape)}")
    if not 0 <= damp < 1:
        raise ValueError(f"damp must be in [0, 1), a fraction of H's mean diagonal, got {damp}")
    W = weight.detach().float().clone()
    H = H.detach().float().clone()
    dead = H.diagonal() == 0  # inputs that are always zero: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * H.diagonal().mean())  # dampening keeps the inverse well behaved
    # Upper Cholesky factor U of H^-1: row j of U holds the update direction for column j.
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    per_channel = group_size == n_in
    scales = _scales(W, bits, n_in) if per_channel else torch.empty(
        n_out, n_in // group_size, dtype=SCALE_DTYPE, device=W.device)
    codes = torch.empty(n_out, n_in, device=W.device)
    if not per_channel:  # blocks hold whole groups, so a group's scale sees its updated weights
        block_size = group_size * -(-block_size // group_size)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for j in range(i2 - i1):
            col = i1 + j
            if not per_channel and col % group_size == 0:
                scales[:, col // group_size] = _scales(W1[:, j:j + group_size], bits,
                                                       group_size)[:, 0]
            s = scales[:, col // group_size].float()
            codes[:, col] = _round(W1[:, j], s, bits)
            err = (W1[:, j] - codes[:, col] * s) / U1[j, j]
            W1[:, j:] -= err.unsqueeze(1) * U1[j, j:].unsqueeze(0)  # compensate within the block
            err1[:, j] = err
        W[:, i2:] -= err1 @ U[i1:i2, i2:]  # lazy batch update: the rest of the row, at once
    return _from_codes(codes, scales, bits, group_size)
