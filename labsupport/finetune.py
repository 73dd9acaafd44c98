"""Fine-tuning a trained course model on the held-out "new domain": what trains, and what it costs.

Introduced in lab 11 ("LoRA"). A `FineTune` names which weights train: all of them ("full"), the
last block and the head ("last_block"), or low-rank adapters ("lora", from `labsupport.lora`),
optionally beside a frozen base stored in 4 bits (QLoRA's recipe). A `Run` is one fine-tuning
job: a FineTune, a training config and a zoo model. `run_all` trains many, in parallel processes
on a CPU, and caches each result (losses after training, wall time, the bytes of the file that
carries the fine-tune), so that a second run of a notebook reads them. `training_memory`
measures what one training step holds, by kind.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from . import data, lora, measure, quant, zoo
from .runtime import cache_dir, cached_json, device, map_in_workers, save_tensors, stable_hash
from .train import TrainConfig, evaluate_loss, lm_loss, make_optimizer, train

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
METHODS = ("full", "last_block", "lora")
VERSION = 1  # bump when the code changes what a given Run produces


@dataclass(frozen=True)
class FineTune:
    """Which weights a fine-tuning run trains, and how the frozen rest is stored."""

    method: str = "lora"  # one of METHODS
    r: int = 16  # adapter rank (lora only)
    alpha: float = 16.0  # adapter scale is alpha / r (lora only)
    targets: tuple[str, ...] = ATTENTION + MLP  # Linear layers that get adapters (lora only)
    base_bits: int | None = None  # 4: the frozen base stored in int4, QLoRA-style (lora only)
    group_size: int = 64  # int4 scale group, as QLoRA's block of 64

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method != "lora" and self.base_bits is not None:
            raise ValueError("base_bits needs method='lora': a quantized base cannot be trained")
        if self.base_bits not in (None, 4, 8):
            raise ValueError(f"base_bits must be None, 4 or 8, got {self.base_bits!r}")
        if self.method == "lora":
            lora._check(self.r, self.alpha, 0.0)
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def label(self) -> str:
        """A short name for tables: 'full', 'last block + head', 'LoRA r16 attn+MLP', ..."""
        if self.method == "full":
            return "full"
        if self.method == "last_block":
            return "last block + head"
        names = {frozenset(ATTENTION): "attn", frozenset(ATTENTION + MLP): "attn+MLP",
                 frozenset(ATTENTION + MLP + ("lm_head",)): "attn+MLP+head"}
        where = names.get(frozenset(self.targets), "+".join(self.targets))
        prefix = f"QLoRA int{self.base_bits}" if self.base_bits else "LoRA"
        return f"{prefix} r{self.r} {where}"


def frozen_base(model: nn.Module, ft: FineTune) -> nn.Module:
    """The model a FineTune starts from: a copy, quantized if it asks for a quantized base.

    QLoRA stores every block's Linear layers in 4 bits and keeps the embedding and the head in
    16 bits; so do we (symmetric int4 in groups, where QLoRA uses its NF4 format).
    """
    if ft.base_bits is None:
        return copy.deepcopy(model)
    return quant.quantize_model(model, ft.base_bits, ft.group_size,
                                skip=("embed_tokens", "lm_head"), skip_dtype=torch.bfloat16)


def prepare(model: nn.Module, ft: FineTune) -> nn.Module:
    """A copy of `model` with exactly the weights `ft` trains set to require gradients."""
    model = frozen_base(model, ft).train()
    if ft.method == "full":
        return model.requires_grad_(True)
    if ft.method == "last_block":
        model.requires_grad_(False)
        for part in (model.layers[-1], model.norm, model.lm_head):
            part.requires_grad_(True)
        return model
    return lora.apply_lora(model, ft.r, ft.alpha, ft.targets)


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    cfg: TrainConfig | None = None) -> dict[str, int]:
    """Bytes of one AdamW training step on batch (x, y), by what holds them.

    weights, gradients and optimizer (AdamW's two moments) come from the tensors themselves;
    activations are what autograd saves for the backward pass; peak is the most memory the
    step holds at once: weights and optimizer state plus the largest total of the tensors the
    step creates (activations, gradients and the backward pass's temporaries). One step is
    taken first so that the optimizer state exists, as it does in every step after the first.
    The model's weights change (two steps are taken): pass a copy you can spare.
    """
    opt = make_optimizer(model, cfg or TrainConfig())

    def step():
        opt.zero_grad(set_to_none=True)  # first: no gradients of the step before stay alive
        loss = lm_loss(model, x, y)
        loss.backward()
        opt.step()

    step()
    gradients = measure.tensor_bytes(*(p for p in model.parameters() if p.requires_grad))
    optimizer = sum(measure.tensor_bytes(v) for st in opt.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor) and v.dim() > 0)  # exp_avg, exp_avg_sq
    activations, _ = measure.saved_activation_bytes(lambda: lm_loss(model, x, y), model)
    step_peak, _ = measure.tensor_peak_bytes(step)
    weights = measure.weight_bytes(model)
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer,
            "activations": activations, "peak": weights + optimizer + step_peak}


def save_trained(model: nn.Module, path) -> int:
    """Write what a fine-tune must ship (the adapters, or every trained tensor); return bytes."""
    if lora.lora_layers(model):
        return lora.save_lora(model, path)
    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    save_tensors(path, tensors, {"trained": sorted(tensors)})
    return path.stat().st_size


@dataclass(frozen=True)
class Run:
    """One fine-tuning job: what trains, how long, from which zoo model, judged on how much."""

    tune: FineTune
    train: TrainConfig
    base: str | zoo.ZooSpec = "small"  # a zoo model's name, or its recipe
    val_fraction: float = 0.1  # of the new domain held out by file, for its validation loss
    eval_batches: int = 16  # batches of train.batch_size x train.seq_len per validation loss
    profile: str | None = field(default=None, compare=False)  # zoo profile; None: the active one

    def zoo_spec(self) -> zoo.ZooSpec:
        """The recipe of the model this run starts from."""
        if isinstance(self.base, zoo.ZooSpec):
            return self.base
        return zoo.spec(self.base, self.profile)

    def key(self) -> str:
        """Hash of everything that determines the result."""
        return stable_hash([asdict(self.tune), self.train.to_dict(), self.val_fraction,
                            self.eval_batches, self.zoo_spec().key(), VERSION])

    def path(self):
        """Where the result is cached (the fine-tune's file sits beside it, .safetensors)."""
        return cache_dir() / "finetune" / f"{self.tune.label.replace(' ', '_')}-{self.key()}.json"


def new_domain(val_fraction: float = 0.1, vocab_size: int = 4096):
    """(train, val) token streams of the held-out packages, split by file."""
    return data.split_by_file(data.tokens("new_domain", vocab_size), val_fraction)


def run(spec: Run, progress: bool = False) -> dict:
    """Train `spec` (or read its cached result): losses after, peak memory, seconds, bytes."""
    path = spec.path()
    record, _ = cached_json(path, lambda: _train_run(spec, path.with_suffix(".safetensors"),
                                                     progress),
                            desc=f"fine-tuning run {spec.tune.label}")
    return record


def _train_run(spec: Run, out, progress: bool) -> dict:
    dev = device()
    zspec = spec.zoo_spec()
    label = spec.base if isinstance(spec.base, str) else "model"
    base = zoo.load_spec(zspec, label=label, progress=progress)
    train_ids, val_ids = new_domain(spec.val_fraction, zspec.vocab_size)
    original_val = data.tokens("val", zspec.vocab_size)
    torch.manual_seed(spec.train.seed)  # the adapters' initial A
    model = prepare(base, spec.tune).to(dev)
    del base
    start = time.perf_counter()
    model, history = train(model, train_ids, None, spec.train, progress=progress,
                           desc=spec.tune.label)
    seconds = time.perf_counter() - start

    def loss(ids):
        return evaluate_loss(model, ids, spec.train.seq_len, spec.train.batch_size,
                             spec.eval_batches)

    return {"label": spec.tune.label, "tune": asdict(spec.tune), "lr": spec.train.lr,
            "seed": spec.train.seed, "steps": spec.train.steps,
            "tokens": spec.train.steps * spec.train.tokens_per_step,
            "trainable": trainable_parameters(model), "new_domain_loss": loss(val_ids),
            "original_loss": loss(original_val), "seconds": seconds,
            "saved_bytes": save_trained(model, out), "saved_path": str(out),
            "device": str(dev), "threads": torch.get_num_threads()}


def run_all(specs: list[Run], workers: int | None = None, progress: bool = True) -> list[dict]:
    """Results of `run` for every spec, in order; uncached runs train in parallel processes.

    As with the zoo, one single-thread process per core trains these small models sooner than
    one process after another (`runtime.map_in_workers`; on a GPU they run here, one after
    another). Each run's `seconds` is then one core's wall time, with another run beside it.
    """
    todo = [s for s in specs if not s.path().exists()]
    map_in_workers(run, todo, workers, desc="fine-tuning runs", progress=progress)
    return [run(s) for s in specs]
