"""Symmetric integer formats and their storage: codes, scales, bit-packing (lab 21).

The weights of one output row (per channel), or of each run of `group_size` consecutive inputs
of a row (group-wise), share one scale s = max|w| / qmax, and each weight is stored as the
integer code round(w / s) in [-qmax, qmax], with qmax = 2^(bits-1) - 1. Codes are bit-packed
(two 4-bit codes per byte, eight 3-bit codes per three bytes) and scales are float16, so
`nbytes` is what a file holds.

Shape letters: O output features, I input features, G groups per row (I / group_size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16  # what GPTQ, AWQ and llama.cpp store their scales in


def qmax(bits: int) -> int:
    """Largest code of a symmetric `bits`-bit quantizer (127 for int8, 7 for int4)."""
    _check_bits(bits)
    return 2 ** (bits - 1) - 1


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _check_weight(weight: torch.Tensor) -> tuple[int, int]:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D float tensor (out_features, in_features), "
                         f"got {got}")
    return weight.shape


def _check_group_size(group_size: int | None, in_features: int) -> int:
    """The group size to use: the whole row when None; otherwise it must divide in_features."""
    if group_size is None:
        return in_features
    if not isinstance(group_size, int) or group_size < 1 or in_features % group_size:
        raise ValueError(f"group_size must be None (per channel) or a positive divisor of "
                         f"in_features={in_features}, got {group_size!r}")
    return group_size



# Packing: codes of `bits` bits each, laid end to end in a byte stream (least significant first).


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes in [0, 2^bits) -> uint8 stream of ceil(n * bits / 8) bytes."""
    _check_bits(bits)
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for bits={bits}, got "
                         f"[{codes.min().item()}, {codes.max().item()}]")
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    shifts = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)  # (n * bits,) one bit per entry
    stream = F.pad(stream, (0, -stream.numel() % 8))
    weights = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (stream.view(-1, 8) << weights).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first n codes, as uint8."""
    _check_bits(bits)
    if bits == 8:
        return packed[:n]
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[: n * bits]
    weights = torch.arange(bits, dtype=torch.uint8, device=packed.device)
    return (stream.view(n, bits) << weights).sum(dim=1, dtype=torch.uint8)


@dataclass
class QuantizedTensor:
    """A weight (O, I) stored as packed `bits`-bit codes and float16 scales, one per group."""

    packed: torch.Tensor  # uint8, ceil(O * I * bits / 8) bytes
    scales: torch.Tensor  # float16 (O, G)
    shape: tuple[int, int]  # (O, I)
    bits: int
    group_size: int  # I when quantized per output channel

    def codes(self) -> torch.Tensor:
        """Signed integer codes (O, I) in [-qmax, qmax], as int8."""
        offset = 2 ** (self.bits - 1)
        unsigned = unpack_codes(self.packed, self.bits, self.shape[0] * self.shape[1])
        return (unsigned.to(torch.int16) - offset).to(torch.int8).view(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the codes stand for: code x scale of its group, shape (O, I)."""
        n_out, n_in = self.shape
        codes = self.codes().float().view(n_out, -1, self.group_size)  # (O, G, group)
        return (codes * self.scales.float().unsqueeze(-1)).view(n_out, n_in).to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes plus scales."""
        return self.packed.numel() * self.packed.element_size() + \
            self.scales.numel() * self.scales.element_size()

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight, scales included (4.125 for int4 with groups of 128)."""
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])
