"""LoRA: trainable low-rank updates beside frozen weights (Hu et al. 2021), as PEFT builds them.

Introduced in lab 11 ("LoRA"). A frozen Linear W (out, in) gets two small matrices, A (r, in)
and B (out, r), and computes

    y = x W^T + (alpha / r) * dropout(x) A^T B^T.

B starts at zero, so a fresh adapter changes nothing; A starts as PEFT's does (Kaiming-uniform).
Only A and B train: r (in + out) numbers per layer instead of in x out. The base may be a plain
`nn.Linear` or a layer quantized by `labsupport.quant` (a 4-bit frozen base with fp32 adapters
is QLoRA's recipe).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch
import torch.nn as nn

from .model import ModelConfig
from .quant import HalfLinear, QuantizedLinear
from .quant.modules import _replace  # swap a named submodule
from .runtime import load_tensors, save_tensors

BASE_TYPES = (nn.Linear, QuantizedLinear, HalfLinear)  # layers an adapter can sit beside


def _features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear-like layer."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, QuantizedLinear):
        return base.shape[1], base.shape[0]
    if isinstance(base, HalfLinear):
        return base.weight.shape[1], base.weight.shape[0]
    raise ValueError(f"base must be one of {[t.__name__ for t in BASE_TYPES]}, "
                     f"got {type(base).__name__}")


def _check(r, alpha, dropout) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


class LoRALinear(nn.Module):
    """A frozen Linear-like `base` plus the low-rank update (alpha / r) B A."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        _check(r, alpha, dropout)
        if isinstance(base, LoRALinear):
            raise ValueError("base already carries a LoRA adapter; apply LoRA once per layer")
        n_in, n_out = _features(base)
        self.base = base.requires_grad_(False)
        device = next(itertools.chain(base.parameters(), base.buffers())).device
        self.lora_A = nn.Parameter(torch.empty(r, n_in, device=device))  # (r, in)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT (and nn.Linear) do
        self.lora_B = nn.Parameter(torch.zeros(n_out, r, device=device))  # (out, r)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T
        return self.base(x) + (self.scaling * update).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update (out, in) that merging adds to the base weight: (alpha / r) B A."""
        return self.scaling * self.lora_B @ self.lora_A

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def _base_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight (out, in) in fp32, dequantized if it is stored quantized."""
    if isinstance(base, nn.Linear):
        return base.weight.detach().float()
    return base.dense_weight(torch.float32)  # QuantizedLinear, HalfLinear


def apply_lora(model: nn.Module, r: int, alpha: float, targets=("q_proj", "v_proj"),
               dropout: float = 0.0) -> nn.Module:
    """Wrap every Linear whose attribute name is in `targets` with a LoRALinear; freeze the rest.

    Works on any module (the course model, `to_hf(model)`, quantized copies). Modifies `model`
    in place and returns it.
    """
    _check(r, alpha, dropout)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ValueError("targets must name at least one Linear layer, e.g. ('q_proj', 'v_proj')")
    modules = dict(model.named_modules())
    wrapped = sorted({n.rpartition(".")[2] for n, m in modules.items()
                      if isinstance(m, LoRALinear)} & set(targets))
    if wrapped:
        raise ValueError(f"LoRA is already applied to the {wrapped} layers; apply it once")
    linear_names = sorted({n.rpartition(".")[2] for n, m in modules.items()
                           if isinstance(m, BASE_TYPES)})
    if missing := [t for t in targets if t not in linear_names]:
        raise ValueError(f"targets {missing} match no Linear layer; the Linear layers are named "
                         f"{linear_names}")
    model.requires_grad_(False)
    for name, module in modules.items():
        if isinstance(module, BASE_TYPES) and name.rpartition(".")[2] in targets:
            _replace(model, name, LoRALinear(module, r, alpha, dropout))
    return model


def lora_param_count(cfg: ModelConfig, r: int, targets=("q_proj", "v_proj")) -> int:
    """Adapter parameters `apply_lora(Transformer(cfg), r, ...)` adds: r (in + out) per layer.

    Needs only the shape, so it prices adapters for models too large to build here (Llama-2-70B).
    """
    _check(r, 1.0, 0.0)
    C, F, D = cfg.d_model, cfg.d_ff, cfg.head_dim
    shapes = {"q_proj": (C, cfg.n_heads * D), "k_proj": (C, cfg.n_kv_heads * D),
              "v_proj": (C, cfg.n_kv_heads * D), "o_proj": (cfg.n_heads * D, C),
              "gate_proj": (C, F), "up_proj": (C, F), "down_proj": (F, C),
              "lm_head": (C, cfg.vocab_size)}
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if unknown := [t for t in targets if t not in shapes]:
        raise ValueError(f"targets {unknown} are not Linear layers of the course model; they "
                         f"are named {sorted(shapes)}")
    per_block = sum(r * sum(shapes[t]) for t in targets if t != "lm_head")
    return cfg.n_layers * per_block + (r * sum(shapes["lm_head"]) if "lm_head" in targets else 0)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear layers by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (every A and B): what the optimizer of a LoRA run trains."""
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]


@torch.no_grad()
def copy_adapters_to_peft(ours: nn.Module,
                          theirs: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """Copy our A and B into a PEFT model of the same base; return (ours, theirs) parameter pairs.

    `theirs` is `peft.get_peft_model(to_hf(base), LoraConfig(...))` with the same r, alpha and
    targets; PEFT keeps each adapter in `lora_A["default"]` and `lora_B["default"]` Linear layers,
    under the Hugging Face module names (`base_model.model.model.layers.0.self_attn.q_proj`).
    """
    pairs = []
    for name, layer in lora_layers(ours).items():
        twin = theirs.get_submodule(f"base_model.model.model.{name}")
        for mine, their in ((layer.lora_A, twin.lora_A["default"].weight),
                            (layer.lora_B, twin.lora_B["default"].weight)):
            if mine.shape != their.shape:
                raise ValueError(f"{name}: our adapter has shape {tuple(mine.shape)}, PEFT's "
                                 f"{tuple(their.shape)}; build PEFT's with the same r and targets")
            their.copy_(mine)
            pairs.append((mine, their))
    return pairs


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain layers back (in place).

    A quantized (or 16-bit stored) base becomes an fp32 nn.Linear: adding a small update to
    4-bit codes would round most of it away.
    """
    for name, layer in lora_layers(model).items():
        base = layer.base
        n_in, n_out = _features(base)
        weight = _base_weight(base) + layer.delta_weight().float()
        bias = getattr(base, "bias", None)
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else torch.float32
        merged = nn.Linear(n_in, n_out, bias=bias is not None, device=weight.device, dtype=dtype)
        merged.weight.copy_(weight)
        if bias is not None:
            merged.bias.copy_(bias)
        _replace(model, name, merged.requires_grad_(False))
    return model


def save_lora(model: nn.Module, path: str | Path) -> int:
    """Write the adapters alone (safetensors, atomically, with a checksum); returns the bytes."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save; call apply_lora first")
    tensors = {f"{n}.{p}": getattr(m, p) for n, m in layers.items() for p in ("lora_A", "lora_B")}
    first = next(iter(layers.values()))
    meta = {"r": first.r, "alpha": first.alpha,
            "targets": sorted({n.rpartition(".")[2] for n in layers}),
            "dropout": getattr(first.dropout, "p", 0.0)}
    save_tensors(Path(path), tensors, meta)
    return Path(path).stat().st_size


@torch.no_grad()
def load_lora(model: nn.Module, path: str | Path) -> nn.Module:
    """Load adapters written by `save_lora` into `model`, applying LoRA first if it has none."""
    tensors, meta = load_tensors(Path(path))
    if not lora_layers(model):
        apply_lora(model, meta["r"], meta["alpha"], meta["targets"], meta["dropout"])
    params = {f"{n}.{p}": getattr(m, p) for n, m in lora_layers(model).items()
              for p in ("lora_A", "lora_B")}
    if set(params) != set(tensors):
        raise ValueError(f"the adapters in {path} do not match the model's: only in the file "
                         f"{sorted(set(tensors) - set(params))[:3]}, only in the model "
                         f"{sorted(set(params) - set(tensors))[:3]}")
    for name, value in tensors.items():
        if params[name].shape != value.shape:
            raise ValueError(f"{name}: the file holds shape {tuple(value.shape)}, the model "
                             f"{tuple(params[name].shape)} (a different r?)")
        params[name].copy_(value)
    return model
