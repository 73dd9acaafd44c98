"""Quantization: round-to-nearest and GPTQ weights in packed storage, and the kernels that use them.

Introduced in lab 21 ("Quantization"). Quantization here is symmetric: the weights of one
output row (per channel), or of each run of `group_size` consecutive inputs of a row
(group-wise), share one scale s = max|w| / qmax, and each weight is stored as the integer code
round(w / s) in [-qmax, qmax], with qmax = 2^(bits-1) - 1. Codes are bit-packed (two 4-bit codes
per byte, eight 3-bit codes per three bytes) and scales are float16, so `nbytes` is what a
file holds.

Shape letters: O output features, I input features, G groups per row (I / group_size).
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

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


# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022): quantize one input column at a time and
# push each column's rounding error onto the columns not yet quantized, weighted by the
# inverse Hessian of the layer's squared output error, H = 2 X^T X / n.


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


# ----------------------------------------------------------------------------------------
# Quantized modules and whole models.


class QuantizedLinear(nn.Module):
    """A bias-free Linear whose weight is stored quantized; it computes with the dequantized weight.

    This is "fake quantization" for measuring quality: the arithmetic is float, the stored bytes
    are the packed ones. `with_kernels` swaps in modules that compute on the codes directly.
    """

    def __init__(self, qt: QuantizedTensor):
        super().__init__()
        self.register_buffer("packed", qt.packed)
        self.register_buffer("scales", qt.scales)
        self.shape, self.bits, self.group_size = qt.shape, qt.bits, qt.group_size

    @property
    def qtensor(self) -> QuantizedTensor:
        return QuantizedTensor(self.packed, self.scales, self.shape, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qtensor.dequantize(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.shape[1]}, out={self.shape[0]}, bits={self.bits}, group={self.group_size}"


class QuantizedEmbedding(QuantizedLinear):
    """An embedding table (V, C) stored quantized row by row; looks rows up, then dequantizes."""

    compute_dtype = torch.float32  # dtype of the vectors it returns

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        codes = self.qtensor.codes()[idx].float()  # unpack the table, keep the rows asked for
        scales = self.scales[idx].float().repeat_interleave(self.group_size, dim=-1)
        return (codes * scales).to(self.compute_dtype)


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model: nn.Module, bits: int, group_size: int | None = None,
                   method: str = "rtn", calibration: torch.Tensor | None = None,
                   damp: float = 0.01, skip: tuple[str, ...] = ()) -> nn.Module:
    """A copy of a course model with every Linear and the embedding table quantized.

    method "rtn" rounds each weight to the nearest grid point; "gptq" needs `calibration`, token
    ids (B, T) to collect each layer's inputs from. The embedding is a lookup, not a matmul, so
    it is always rounded to nearest. Modules named in `skip` (e.g. "lm_head") keep their dtype.
    """
    _check_bits(bits)
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    if method == "gptq" and (calibration is None or calibration.dim() != 2):
        raise ValueError("method='gptq' needs calibration token ids of shape (batch, length)")
    if model.embed_tokens.weight is getattr(model.lm_head, "weight", None):
        raise ValueError("quantize_model does not handle tied embeddings; untie them first")
    qmodel = copy.deepcopy(model).eval()
    if method == "gptq":
        _gptq_linears(qmodel, calibration, bits, group_size, damp, skip)
    for name, linear in _linears(qmodel):
        if name not in skip:
            _replace(qmodel, name, QuantizedLinear(quantize_rtn(linear.weight, bits, group_size)))
    if "embed_tokens" not in skip:
        qmodel.embed_tokens = QuantizedEmbedding(
            quantize_rtn(qmodel.embed_tokens.weight, bits, group_size))
    return qmodel


@torch.no_grad()
def capture_inputs(model: nn.Module, name: str, tokens: torch.Tensor) -> torch.Tensor:
    """The inputs (n, I) that the layer `name` sees while the model reads tokens (B, T)."""
    seen = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda module, args, output: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        model(tokens.to(model.norm.weight.device))
    finally:
        handle.remove()
    return torch.cat(seen).float()


@torch.no_grad()
def _input_hessians(model: nn.Module, names: list[str],
                    calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / n of the inputs X that each named Linear sees on the calibration tokens."""
    sums = {name: 0.0 for name in names}
    counts = dict.fromkeys(names, 0)

    def collect(name):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # (B*T, I)
            sums[name] = sums[name] + x.T @ x
            counts[name] += x.shape[0]
        return hook

    handles = [model.get_submodule(n).register_forward_hook(collect(n)) for n in names]
    try:
        for batch in calibration.split(8):
            model(batch.to(model.norm.weight.device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: 2.0 * sums[name] / counts[name] for name in names}


def _gptq_linears(model: nn.Module, calibration: torch.Tensor, bits: int,
                  group_size: int | None, damp: float, skip: tuple[str, ...]) -> None:
    """GPTQ block by block: each block's layers see inputs from the already-quantized blocks."""
    stages = [[f"layers.{i}.{n}" for n, _ in _linears(layer)]
              for i, layer in enumerate(model.layers)] + [["lm_head"]]
    for stage in stages:
        names = [name for name in stage if name not in skip]
        for name, H in _input_hessians(model, names, calibration).items():
            qt = gptq_from_hessian(model.get_submodule(name).weight, H, bits, group_size, damp)
            _replace(model, name, QuantizedLinear(qt))


def saved_bytes(model: nn.Module) -> int:
    """Size in bytes of the model's state saved as a safetensors file (header included)."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        save_file(state, path)
        return os.path.getsize(path)


# ----------------------------------------------------------------------------------------
# Fast kernels: torch's own weight-only int8 and int4 matmuls (the ones torchao calls), fed
# with our codes. They take bfloat16 activations and read the weights in their integer form.


class Int8Linear(nn.Module):
    """Weight-only int8 Linear on `torch._weight_int8pack_mm`: bf16 activations x int8 codes.

    The kernel takes its scales in bfloat16, whose rounding (up to 2^-8 relative) can move a
    weight by up to one quantization step from the original instead of half a step.
    """

    def __init__(self, qt: QuantizedTensor):
        super().__init__()
        if qt.bits != 8 or qt.group_size != qt.shape[1]:
            raise ValueError("Int8Linear needs 8-bit codes quantized per channel (group_size=None)")
        self.register_buffer("codes", qt.codes())  # int8 (O, I): 8-bit codes need no packing
        self.register_buffer("scales", qt.scales[:, 0].to(torch.bfloat16))  # (O,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (B*T, I)
        y = torch._weight_int8pack_mm(x2, self.codes, self.scales)  # (B*T, O)
        return y.view(*x.shape[:-1], -1).to(x.dtype)


class Int4Linear(nn.Module):
    """Weight-only int4 Linear on torch's tinygemm kernels (`_weight_int4pack_mm*`), groups of g.

    The kernel computes w = (u - 8) * scale + zero from unsigned nibbles u; our symmetric codes
    c map to u = c + 8 with zero = 0. Scales become bfloat16, the kernel's only scale type.
    """

    def __init__(self, qt: QuantizedTensor):
        super().__init__()
        if qt.bits != 4 or qt.group_size not in (32, 64, 128, 256):
            raise ValueError("Int4Linear needs 4-bit codes in groups of 32, 64, 128 or 256")
        unsigned = qt.codes().to(torch.int32) + 8  # (O, I) in [1, 15]
        if unsigned.is_cuda:  # the CUDA layout takes nibble pairs, first one high
            pairs = (unsigned[:, ::2] << 4 | unsigned[:, 1::2]).to(torch.uint8)  # (O, I/2)
            packed = torch._convert_weight_to_int4pack(pairs, 8)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(unsigned, 1)
        scales = qt.scales.T.float()  # (G, O)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros",
                             torch.stack([scales, torch.zeros_like(scales)], dim=-1)
                             .to(torch.bfloat16).contiguous())  # (G, O, 2)
        self.group_size = qt.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (B*T, I)
        mm = torch._weight_int4pack_mm if x2.is_cuda else torch._weight_int4pack_mm_for_cpu
        y = mm(x2, self.packed, self.group_size, self.scales_and_zeros)  # (B*T, O)
        return y.view(*x.shape[:-1], -1).to(x.dtype)


def with_kernels(qmodel: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A copy of a quantized model whose int8 / int4 layers run on torch's integer kernels.

    Everything else (norms, unquantized layers) is cast to `dtype`, the kernels' activation type.
    Layers with no kernel (3-bit, int8 in groups) raise: a speed test should not silently fall
    back to dequantizing on every call.
    """
    fast = copy.deepcopy(qmodel)
    for name, module in list(fast.named_modules()):
        if type(module) is QuantizedLinear:
            kernel = {8: Int8Linear, 4: Int4Linear}.get(module.bits)
            if kernel is None:
                raise ValueError(f"no integer kernel for {module.bits}-bit layer {name!r}")
            _replace(fast, name, kernel(module.qtensor))
        elif isinstance(module, QuantizedEmbedding):
            module.compute_dtype = dtype
        elif not isinstance(module, (Int8Linear, Int4Linear)):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(dtype)
    return fast


# ----------------------------------------------------------------------------------------
# Activation outliers (lab 21, "Outliers"): LLM.int8()'s motivation, reproduced on a course model.

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
