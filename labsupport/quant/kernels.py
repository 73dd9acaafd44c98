"""Fast kernels: torch's own weight-only int8 and int4 matmuls fed with our codes.

These are the aten kernels torchao's int4 path calls (tinygemm). They take bfloat16 activations
and read the weights in their integer form.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn

from .formats import QuantizedTensor
from .modules import HalfEmbedding, HalfLinear, QuantizedEmbedding, QuantizedLinear, _replace
from .rtn import quantize_rtn

INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes tinygemm's int4 kernels take


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
        if qt.bits != 4 or qt.group_size not in INT4_GROUP_SIZES:
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
        elif isinstance(module, (QuantizedEmbedding, HalfEmbedding)):
            module.compute_dtype = dtype
        elif isinstance(module, HalfLinear):  # stored in 16 bits: store it in the kernels' dtype
            module.weight = module.weight.to(dtype)
        elif not isinstance(module, (Int8Linear, Int4Linear)):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(dtype)
    return fast


@functools.cache
def _probe(bits: int, group_size: int | None, device_type: str) -> bool:
    """Run a 256 x 256 layer through the kernel once; False where torch has none."""
    weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    kernel = Int8Linear if bits == 8 else Int4Linear
    try:
        layer = kernel(quantize_rtn(weight.to(device_type), bits, group_size))
        layer(torch.zeros(1, 256, device=device_type))
    except (RuntimeError, NotImplementedError, AttributeError):  # no such kernel here
        return False
    return True


def kernel_available(bits: int, group_size: int | None, device: torch.device | str) -> bool:
    """Whether `with_kernels` can run `bits`-bit codes in groups of `group_size` on `device`.

    int8 needs per-channel scales (group_size=None); int4 groups of 32, 64, 128 or 256. The
    answer is probed once per device type with a small layer, so a torch build without the
    kernel (or a device it does not support) answers False instead of failing mid-lab.
    """
    int8 = bits == 8 and group_size is None
    int4 = bits == 4 and group_size in INT4_GROUP_SIZES
    if not (int8 or int4):
        return False
    return _probe(bits, group_size, torch.device(device).type)


# ----------------------------------------------------------------------------------------
# torchao, PyTorch's quantization library, where it has the fast kernel.

TORCHAO_SCHEMES = ("w8a8", "int4")  # int8 weights and activations; int4 weight-only groups


def torchao_config(scheme: str, device: torch.device | str, group_size: int = 128):
    """torchao's `quantize_` config for `scheme` where torchao has a fast kernel on `device`.

    On CUDA, "int4" packs the weights for tinygemm (the kernel `Int4Linear` calls) and "w8a8"
    multiplies int8 by int8 with `torch._int_mm`. On the CPU, torchao 0.18's configs have no
    eager kernel that beats bfloat16 (its int8 weight-only path casts the matrix to bfloat16 on
    every call, its CPU int4 layout is a prototype, and its int8 x int8 path measured several
    times slower than torch.ao's fbgemm one), so the answer is None and the labs use
    `with_kernels` there. None too where torchao is not installed or is too old.
    """
    if scheme not in TORCHAO_SCHEMES:
        raise ValueError(f"scheme must be one of {TORCHAO_SCHEMES}, got {scheme!r}")
    if torch.device(device).type != "cuda" or not _torchao_runs(scheme, group_size):
        return None
    return _torchao_config(scheme, group_size)


@functools.cache
def _torchao_runs(scheme: str, group_size: int) -> bool:
    """Quantize and run a 256 x 256 bf16 layer on the GPU once (tinygemm needs sm80 or newer)."""
    config = _torchao_config(scheme, group_size)
    if config is None or not torch.cuda.is_available():
        return False
    try:
        layer = _apply_torchao(nn.Sequential(nn.Linear(256, 256, bias=False)).cuda(), config, ())
        layer(torch.zeros(1, 256, dtype=torch.bfloat16, device="cuda"))
    except Exception:  # no kernel for this GPU or this torch; any failure means "not here"
        return False
    return True


def _torchao_config(scheme: str, group_size: int):
    try:
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
        )

        if scheme == "w8a8":
            return Int8DynamicActivationInt8WeightConfig()
        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    except (ImportError, TypeError, ValueError):  # not installed, or an older API
        return None


def torchao_quantized(model: nn.Module, scheme: str, group_size: int = 128,
                      skip: tuple[str, ...] = ("embed_tokens",)) -> nn.Module:
    """A bfloat16 copy of `model` whose Linears torchao's `quantize_` has quantized for `scheme`.

    torchao rounds the weights itself (round to nearest); use it for speed, and our RTN/GPTQ
    for the lesson. Raises ValueError where `torchao_config` finds no fast kernel.
    """
    device = next(model.parameters()).device
    config = torchao_config(scheme, device, group_size)
    if config is None:
        raise ValueError(f"torchao has no fast {scheme!r} kernel on {device} here (or is not "
                         f"installed); use quant.with_kernels instead")
    return _apply_torchao(model, config, skip)


def _apply_torchao(model: nn.Module, config, skip: tuple[str, ...]) -> nn.Module:
    from torchao.quantization import quantize_

    fast = copy.deepcopy(model).to(torch.bfloat16).eval()
    quantize_(fast, config, filter_fn=lambda module, name: isinstance(module, nn.Linear)
              and name not in skip)
    return fast
