"""Cost arithmetic: a hardware table with sources, and training/inference cost and energy.

Every formula says in its docstring what it counts and what it leaves out. Prices change fast:
each one carries the date it was read. Introduced in lab 00; every lab that quotes dollars,
GPU-hours or joules uses these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .model import ModelConfig

SECONDS_PER_HOUR = 3600.0
HOURS_PER_YEAR = 24 * 365.25


@dataclass(frozen=True)
class Hardware:
    """One accelerator: dense 16-bit tensor peak, memory, power and a typical rental price."""

    name: str
    peak_flops: float  # dense BF16/FP16 tensor-core FLOP/s (no 2:4 sparsity)
    mem_bandwidth: float  # bytes/s of device memory
    memory_bytes: float  # device memory
    watts: float  # board power (TDP)
    usd_per_hour: float  # a typical cloud price per GPU-hour
    price_date: str  # when that price was read
    source: str  # where the specs and the price come from

    @property
    def ridge_flops_per_byte(self) -> float:
        """Arithmetic intensity where the roofline turns from memory- to compute-bound."""
        return self.peak_flops / self.mem_bandwidth


HARDWARE: dict[str, Hardware] = {
    "V100": Hardware(
        "NVIDIA V100 SXM2 32GB", peak_flops=125e12, mem_bandwidth=900e9, memory_bytes=32e9,
        watts=300, usd_per_hour=1.48, price_date="2020-06",
        source="NVIDIA V100 datasheet (125 TFLOPS FP16 tensor, 900 GB/s, 300 W); price implied "
               "by Lambda's GPT-3 estimate, $4.6M / 355 GPU-years (lambda2020gpt3)"),
    "A100": Hardware(
        "NVIDIA A100 SXM4 80GB", peak_flops=312e12, mem_bandwidth=2039e9, memory_bytes=80e9,
        watts=400, usd_per_hour=1.80, price_date="2026",
        source="NVIDIA A100 datasheet (312 TFLOPS dense BF16, 2,039 GB/s, 400 W); typical "
               "2026 cloud price ~$1.8/GPU-h (course factsheet, cloud price notes)"),
    "H100": Hardware(
        "NVIDIA H100 SXM5 80GB", peak_flops=989e12, mem_bandwidth=3350e9, memory_bytes=80e9,
        watts=700, usd_per_hour=3.00, price_date="2026",
        source="NVIDIA H100 datasheet (989 TFLOPS dense BF16; 1,979 includes 2:4 sparsity; "
               "3.35 TB/s, 700 W); 2026 specialty-cloud prices $2.5-3.5/GPU-h"),
    "H200": Hardware(
        "NVIDIA H200 SXM 141GB", peak_flops=989e12, mem_bandwidth=4800e9, memory_bytes=141e9,
        watts=700, usd_per_hour=4.00, price_date="2026-05",
        source="NVIDIA H200 datasheet (same GH100 compute as H100: 989 TFLOPS dense BF16; "
               "141 GB HBM3e at 4.8 TB/s, 700 W); May 2026 specialty-cloud prices $3.5-4.5/GPU-h"),
}


def hardware(name: str) -> Hardware:
    """A row of the hardware table by short name (V100, A100, H100, H200)."""
    if name not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; known: {sorted(HARDWARE)}")
    return HARDWARE[name]


CPU_VM_USD_PER_HOUR = 0.10  # a 2-vCPU cloud VM, roughly (lab 00's stated assumption)


def usd_per_hour_here(gpu_name: str | None = None) -> tuple[float, str]:
    """($ per hour, what it is) for pricing tokens made on this machine.

    The hardware table's row for the GPU named (an H100's when it is not in the table), or
    the course's assumed price of a small CPU cloud VM when there is no GPU.
    """
    if not gpu_name:
        return CPU_VM_USD_PER_HOUR, "a 2-vCPU cloud VM (assumed)"
    row = next((hw for key, hw in HARDWARE.items() if key in gpu_name), HARDWARE["H100"])
    return row.usd_per_hour, f"{row.name} ({row.price_date} price)"


def _positive(**values: float) -> None:
    for name, value in values.items():
        if value is None or not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def training_flops(n_params: float, n_tokens: float) -> float:
    """Training compute C = 6ND: 2 FLOPs per parameter per token forward, 4 backward.

    Leaves out attention's sequence-length term (a few % for GPT-3-like shapes) and any
    recomputation; Hoffmann et al. (App. F) find the full count within 0.99-1.10 x 6ND.
    """
    _positive(n_params=n_params, n_tokens=n_tokens)
    return 6.0 * n_params * n_tokens


def inference_flops_per_token(n_params: float) -> float:
    """Forward-pass compute per generated token, about 2N (attention over the context ignored)."""
    _positive(n_params=n_params)
    return 2.0 * n_params


def gpu_hours(flops: float, peak_flops: float, utilization: float = 1.0) -> float:
    """GPU-hours to do `flops` at `utilization` (MFU) of a GPU's peak FLOP/s."""
    _positive(flops=flops, peak_flops=peak_flops)
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization!r}")
    return flops / (peak_flops * utilization) / SECONDS_PER_HOUR


def training_cost_usd(flops: float, hw: Hardware, utilization: float,
                      usd_per_hour: float | None = None) -> float:
    """Rental cost of a training run: GPU-hours x $/GPU-hour (the table's price by default).

    Counts accelerator time only: no failed runs, experiments, storage, staff or networking.
    """
    price = hw.usd_per_hour if usd_per_hour is None else usd_per_hour
    _positive(usd_per_hour=price)
    return gpu_hours(flops, hw.peak_flops, utilization) * price


def energy_kwh(gpu_hours_: float, watts: float, pue: float = 1.0) -> float:
    """Electricity for `gpu_hours_` at `watts` average draw per GPU, times the datacenter PUE."""
    _positive(gpu_hours=gpu_hours_, watts=watts)
    if pue < 1:
        raise ValueError(f"pue (power usage effectiveness) must be >= 1, got {pue!r}")
    return gpu_hours_ * watts * pue / 1000.0


def co2_tonnes(kwh: float, kg_per_kwh: float) -> float:
    """Operational emissions: energy x the grid's carbon intensity (kgCO2e/kWh), in tonnes."""
    _positive(kwh=kwh, kg_per_kwh=kg_per_kwh)
    return kwh * kg_per_kwh / 1000.0


def fleet_usd_per_day(n_gpus: float, usd_per_gpu_hour: float) -> float:
    """What a fleet of GPUs rented around the clock costs per day."""
    _positive(n_gpus=n_gpus, usd_per_gpu_hour=usd_per_gpu_hour)
    return n_gpus * usd_per_gpu_hour * 24.0


def usd_per_query(usd_per_day: float, daily_users: float, queries_per_user: float) -> float:
    """Daily cost spread over the day's queries."""
    _positive(usd_per_day=usd_per_day, daily_users=daily_users,
              queries_per_user=queries_per_user)
    return usd_per_day / (daily_users * queries_per_user)


def usd_per_mtok(tokens_per_s: float, usd_per_hour: float) -> float:
    """Dollars per million tokens for a machine rented at `usd_per_hour` producing tokens_per_s."""
    _positive(tokens_per_s=tokens_per_s, usd_per_hour=usd_per_hour)
    return usd_per_hour / (tokens_per_s * SECONDS_PER_HOUR) * 1e6


def joules_per_token(watts: float, tokens_per_s: float) -> float:
    """Energy per token at an average power draw: W / (tokens/s) = J/token."""
    _positive(watts=watts, tokens_per_s=tokens_per_s)
    return watts / tokens_per_s


def decode_tokens_per_s_roofline(weight_bytes: float, mem_bandwidth: float, batch: int = 1,
                                 flops_per_token: float | None = None,
                                 peak_flops: float | None = None) -> float:
    """Upper bound on decoding tokens/s: the lower of the memory roof and the compute roof.

    Memory roof: every decode step reads the weights once for the whole batch, so
    tokens/s <= batch x bandwidth / weight_bytes. Compute roof (when flops_per_token and
    peak_flops are given): tokens/s <= peak_flops / flops_per_token. The memory roof binds while
    batch x flops_per_token / weight_bytes (FLOPs per byte read) is below the hardware's ridge
    point. KV-cache reads are left out (small at short context).
    """
    _positive(weight_bytes=weight_bytes, mem_bandwidth=mem_bandwidth, batch=batch)
    memory_roof = batch * mem_bandwidth / weight_bytes
    if flops_per_token is None and peak_flops is None:
        return memory_roof
    _positive(flops_per_token=flops_per_token, peak_flops=peak_flops)
    return min(memory_roof, peak_flops / flops_per_token)


# ----------------------------------------------------------------------------------------
# Real architectures, for KV-cache arithmetic (lab 31). Shapes from each family's paper and the
# published config.json files; max_seq_len is the context the model was released with.

MODELS: dict[str, ModelConfig] = {
    "LLaMA-65B": ModelConfig(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64,
                             d_ff=22016, max_seq_len=2048),
    "Llama-2-7B": ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
                              d_ff=11008, max_seq_len=4096),
    "Llama-2-13B": ModelConfig(vocab_size=32000, d_model=5120, n_layers=40, n_heads=40,
                               d_ff=13824, max_seq_len=4096),
    "Llama-2-70B": ModelConfig(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64,
                               n_kv_heads=8, d_ff=28672, max_seq_len=4096),
    "Llama-3.1-8B": ModelConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                                n_kv_heads=8, d_ff=14336, max_seq_len=131072,
                                rope_theta=500000.0),
    "Llama-3.1-70B": ModelConfig(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64,
                                 n_kv_heads=8, d_ff=28672, max_seq_len=131072,
                                 rope_theta=500000.0),
}
MODEL_SOURCES = {
    "LLaMA-65B": "Touvron et al. 2023 (LLaMA, Table 2: 8192 wide, 64 heads, 80 layers), "
                 "params.json of the released 65B model; QLoRA's 65B",
    "Llama-2-7B": "Touvron et al. 2023 (Llama 2), config.json of meta-llama/Llama-2-7b-hf",
    "Llama-2-13B": "Touvron et al. 2023 (Llama 2), config.json of meta-llama/Llama-2-13b-hf",
    "Llama-2-70B": "Touvron et al. 2023 (Llama 2, GQA with 8 KV heads), config.json",
    "Llama-3.1-8B": "Dubey et al. 2024 (The Llama 3 Herd of Models, Table 3), config.json",
    "Llama-3.1-70B": "Dubey et al. 2024 (The Llama 3 Herd of Models, Table 3), config.json",
}


FINETUNE_METHODS = ("full", "lora", "qlora")
# Mixed-precision AdamW, per trained parameter: a bf16 weight (2 bytes) and gradient (2), and an
# optimizer state of an fp32 master copy and two fp32 moments (4 + 4 + 4); 16 bytes in all, as
# Rajbhandari et al. 2020 (ZeRO) count.
TRAINED_BYTES = {"weight": 2.0, "gradient": 2.0, "optimizer": 12.0}
# A frozen weight: bf16 (2 bytes), or QLoRA's 4-bit NF4 with double-quantized constants, 4.127
# bits (Dettmers et al. 2023, section 3). Embedding and head stay in bf16 in both, as
# bitsandbytes leaves every layer but the blocks' Linear layers unquantized.
FROZEN_BYTES_PER_PARAM = {"lora": 2.0, "qlora": 4.127 / 8}


def finetune_memory(cfg: ModelConfig, method: str, adapter_params: int = 0,
                    batch: int = 1, seq_len: int = 2048) -> dict[str, float]:
    """Bytes to fine-tune a model of shape `cfg` with AdamW, by kind (weights, gradients, ...).

    method "full" trains every parameter; "lora" and "qlora" train `adapter_params` beside a
    frozen base in bf16 or 4 bits. Activations assume full activation checkpointing (each
    block's input kept, one block recomputed at a time) and a fused attention kernel: 2 bytes
    per token per d_model per block, plus one block's ~34 bytes per token per d_model
    (Korthikanti et al. 2022's count without the attention-score term, made for a GeLU MLP four
    times d_model wide; an approximation for SwiGLU), plus 12 bytes per token per vocabulary
    entry for the output (bf16 logits, the fp32 log-softmax the loss keeps, and their
    gradients). LoRA keeps the same activations as full fine-tuning: every adapted layer still
    needs its input for A's gradient. QLoRA adds one frozen MLP matrix dequantized to bf16 at a
    time. Leaves out the framework, the CUDA context and fragmentation; on several GPUs the
    states are assumed sharded (ZeRO-3 / FSDP), so the total divides between them.
    """
    if method not in FINETUNE_METHODS:
        raise ValueError(f"method must be one of {FINETUNE_METHODS}, got {method!r}")
    if method == "full" and adapter_params:
        raise ValueError("adapter_params is for 'lora' and 'qlora'; 'full' trains every weight")
    if method != "full" and not adapter_params > 0:
        raise ValueError(f"method {method!r} needs adapter_params > 0, got {adapter_params!r}")
    _positive(batch=batch, seq_len=seq_len)
    n = cfg.num_params(non_embedding=False)
    tokens = batch * seq_len
    trained = n if method == "full" else adapter_params
    if method == "full":
        frozen = 0.0
    else:
        blocks = cfg.num_params(non_embedding=True)
        frozen = blocks * FROZEN_BYTES_PER_PARAM[method] + (n - blocks) * 2.0
    activations = (tokens * cfg.d_model * (2.0 * cfg.n_layers + 34.0)
                   + 12.0 * tokens * cfg.vocab_size)
    if method == "qlora":
        activations += 2.0 * cfg.d_model * cfg.d_ff  # the dequantized matrix being used
    out = {"weights": frozen + TRAINED_BYTES["weight"] * trained,
           "gradients": TRAINED_BYTES["gradient"] * trained,
           "optimizer": TRAINED_BYTES["optimizer"] * trained, "activations": activations}
    out["total"] = sum(out.values())
    return out


def finetune_flops_per_token(n_params: float, method: str, checkpointing: bool = True) -> float:
    """Training FLOPs per token: 6N for full fine-tuning, 4N with frozen weights, +2N to recompute.

    A frozen weight still costs its forward product (2N) and the product that carries the
    gradient back to its input (2N), but not the one for its own gradient (2N). Adapters add
    a fraction of a percent, and QLoRA's dequantization costs time, not FLOPs.
    """
    if method not in FINETUNE_METHODS:
        raise ValueError(f"method must be one of {FINETUNE_METHODS}, got {method!r}")
    _positive(n_params=n_params)
    per_token = (6.0 if method == "full" else 4.0) * n_params
    return per_token + (2.0 * n_params if checkpointing else 0.0)


def sequences_per_gpu(cfg: ModelConfig, context_len: int, gpu_bytes: float = 80e9,
                      weight_bytes_per_param: float = 2, kv_bytes_per_value: int = 2
                      ) -> tuple[int, int]:
    """(GPUs needed for the weights, sequences of context_len whose KV cache fits beside them).

    Uses the fewest GPUs of gpu_bytes that hold the weights, then fills what is left with
    caches. Ignores activations, the framework's own memory and fragmentation, so real servers
    fit fewer sequences.
    """
    _positive(context_len=context_len, gpu_bytes=gpu_bytes,
              weight_bytes_per_param=weight_bytes_per_param)
    weights = cfg.num_params(non_embedding=False) * weight_bytes_per_param
    n_gpus = max(1, math.ceil(weights / gpu_bytes))
    free = n_gpus * gpu_bytes - weights
    return n_gpus, int(free // cfg.kv_cache_bytes(1, context_len, kv_bytes_per_value))
