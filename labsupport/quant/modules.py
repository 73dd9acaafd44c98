"""Quantized modules and whole models: model surgery, calibration inputs, saved size."""

from __future__ import annotations

import copy
import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from .formats import QuantizedTensor, _check_bits
from .gptq import gptq_from_hessian
from .rtn import quantize_rtn


class _FrozenLinear(torch.autograd.Function):
    """x W^T for a frozen weight stored compactly, rebuilt in the forward and again in the backward.

    Autograd would otherwise keep the float copy of every such weight alive from the forward to
    the backward pass, as much memory as an unquantized model; QLoRA's 4-bit matmul
    (bitsandbytes) also dequantizes twice rather than keep it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dense_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out @ ctx.layer.dense_weight(grad_out.dtype), None  # dL/dx; W is frozen


def frozen_linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """`layer`'s product with x, saving nothing for the backward pass beyond the layer itself."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenLinear.apply(x, layer)
    return F.linear(x, layer.dense_weight(x.dtype))


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

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight (out, in), dequantized to `dtype`."""
        return self.qtensor.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self)

    def extra_repr(self) -> str:
        return f"in={self.shape[1]}, out={self.shape[0]}, bits={self.bits}, group={self.group_size}"


class QuantizedEmbedding(QuantizedLinear):
    """An embedding table (V, C) stored quantized row by row; looks rows up, then dequantizes."""

    compute_dtype = torch.float32  # dtype of the vectors it returns

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        codes = self.qtensor.codes()[idx].float()  # unpack the table, keep the rows asked for
        scales = self.scales[idx].float().repeat_interleave(self.group_size, dim=-1)
        return (codes * scales).to(self.compute_dtype)


class HalfLinear(nn.Module):
    """A bias-free Linear stored in a 16-bit dtype that computes in its input's dtype.

    Quantized checkpoints (GPTQ, AWQ) keep the output head this way, in 16 bits.
    """

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.float16):
        super().__init__()
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        self.register_buffer("weight", weight.detach().to(dtype))

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight (out, in) in `dtype`."""
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self)


class HalfEmbedding(HalfLinear):
    """An embedding table stored in 16 bits; returns its rows in `compute_dtype`."""

    compute_dtype = torch.float32

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight[idx].to(self.compute_dtype)


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model: nn.Module, bits: int, group_size: int | None = None,
                   method: str = "rtn", calibration: torch.Tensor | None = None,
                   damp: float = 0.01, skip: tuple[str, ...] = (),
                   skip_dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of a course model with every Linear and the embedding table quantized.

    method "rtn" rounds each weight to the nearest grid point; "gptq" needs `calibration`, token
    ids (B, T) to collect each layer's inputs from. The embedding is a lookup, not a matmul, so
    it is always rounded to nearest. Modules named in `skip` (e.g. "lm_head") are not quantized:
    they keep their dtype, or are stored in `skip_dtype` (float16 or bfloat16) if it is given,
    as GPTQ and AWQ checkpoints keep the embedding and the head in 16 bits.
    """
    _check_bits(bits)
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    if skip_dtype not in (None, torch.float16, torch.bfloat16):
        raise ValueError(f"skip_dtype must be None, torch.float16 or torch.bfloat16, "
                         f"got {skip_dtype}")
    if unknown := set(skip) - {n for n, _ in _linears(model)} - {"embed_tokens"}:
        raise ValueError(f"skip names no Linear of the model nor 'embed_tokens': "
                         f"{sorted(unknown)}")
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
        elif skip_dtype is not None:
            _replace(qmodel, name, HalfLinear(linear.weight, skip_dtype))
    if "embed_tokens" not in skip:
        qmodel.embed_tokens = QuantizedEmbedding(
            quantize_rtn(qmodel.embed_tokens.weight, bits, group_size))
    elif skip_dtype is not None:
        qmodel.embed_tokens = HalfEmbedding(qmodel.embed_tokens.weight, skip_dtype)
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
