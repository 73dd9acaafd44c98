"""The course model: a small Llama-style decoder, readable in one sitting.

Features: RMSNorm, rotary position embeddings (RoPE, the "rotate half" layout of Hugging Face
Llama), SwiGLU feed-forward, grouped-query attention through `n_kv_heads` (MHA when it equals
`n_heads`, MQA when it is 1), a preallocated KV cache, greedy/temperature generation, and
conversion to and from `transformers.LlamaForCausalLM`.

Shape letters used in comments:
    B batch, T new tokens in this call, S tokens seen so far (cache length), V vocabulary,
    C d_model, H query heads, Hkv key/value heads, D head dim (C // H), F d_ff.

Introduced in lab 00; the KV cache is the subject of lab 31 and GQA of lab 32.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 4096  # tokens the embedding and the output head know
    d_model: int = 128  # width of the residual stream (C)
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads (H); head dim D = d_model // n_heads
    n_kv_heads: int | None = None  # key/value heads (Hkv); None means n_heads (plain MHA)
    d_ff: int = 384  # hidden width of the SwiGLU MLP (F); Llama uses ~8/3 * d_model
    max_seq_len: int = 256  # longest sequence RoPE tables and caches are built for
    rope_theta: float = 10000.0  # RoPE base; Llama 3 uses 500000 for long contexts
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the input embedding with the output head

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads "
                             f"({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads "
                             f"({self.n_kv_heads}): each key/value head serves a whole group")
        if self.head_dim % 2:
            raise ValueError(f"head dim d_model/n_heads = {self.head_dim} must be even for RoPE")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError("rope_theta and norm_eps must be positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; `non_embedding=True` leaves out the embedding and the output head."""
        C, D, L = self.d_model, self.head_dim, self.n_layers
        attn = C * self.n_heads * D * 2 + C * self.n_kv_heads * D * 2  # q, o and k, v
        mlp = 3 * C * self.d_ff
        norms = 2 * C
        body = L * (attn + mlp + norms) + C  # + final norm
        if non_embedding:
            return body
        heads = 1 if self.tie_embeddings else 2
        return body + heads * self.vocab_size * C

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes one token adds to the KV cache: 2 (K and V) x layers x Hkv x D x bytes."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_value

    def kv_cache_bytes(self, batch: int, seq_len: int, bytes_per_value: int = 2) -> int:
        """Bytes of a KV cache holding `seq_len` tokens for each of `batch` sequences."""
        return batch * seq_len * self.kv_bytes_per_token(bytes_per_value)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (as Llama does) so that bf16 activations keep their precision
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, ...]:
    """cos and sin of every (position, frequency) pair, each (max_seq_len, head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # "rotate half" layout, as in HF Llama
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate the pairs (x[i], x[i + D/2]) of x (B, H, T, D) by position-dependent angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B,Hkv,T,D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, D) with S = past + T
        gqa = self.n_kv_heads != self.n_heads  # SDPA shares each K/V head with H/Hkv query heads
        if past == 0 or T == 1:  # a prefill is plainly causal; one new token sees everything
            y = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0 and T > 1,
                                               enable_gqa=gqa)
        else:
            # new query i sits at position past + i and may see keys 0 .. past + i
            S = k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Preallocated keys and values of every layer, (B, Hkv, max_len, D) each, filled in order."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len must be in 1..{cfg.max_seq_len} (cfg.max_seq_len), "
                             f"got {max_len}")
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.max_len, self.length = max_len, 0

    def update(self, layer: int, k, v):
        """Write this step's k, v (B, Hkv, T, D) after the stored ones; return all of them."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {start} stored + {k.shape[2]} new > max_len "
                             f"{self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (keeps a shared prefix)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop length must be in 0..{self.length}, got {length}")
        self.length = length

    @property
    def nbytes(self) -> int:
        """Bytes the cache buffers occupy (allocated for max_len tokens)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # fp32 always: see _apply
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 style: scale residual projections down
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def _apply(self, fn, recurse=True):
        # .half() / .to(bfloat16) would round the RoPE tables (cos/sin to ~2e-3 in fp16), and a
        # cast back to fp32 could not undo it: rebuild them in fp32 wherever the move put them.
        super()._apply(fn, recurse)
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        dev = self.rope_cos.device
        self.rope_cos, self.rope_sin = cos.to(dev), sin.to(dev)
        return self

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Logits (B, T, V) for token ids idx (B, T); with a cache, positions continue from it.

        `logits_to_keep=k > 0` computes the output head for the last k positions only, (B, k, V),
        as transformers' argument of that name does: generation needs the last one, and the
        head over every position would cost B x T x d_model x vocab multiply-adds for nothing.
        """
        B, T = idx.shape
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0 keeps every position), "
                             f"got {logits_to_keep!r}")
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len "
                             f"{self.cfg.max_seq_len}")
        dtype = self.norm.weight.dtype  # the compute dtype (the embedding may be stored quantized)
        cos = self.rope_cos[start:start + T].to(dtype)  # (T, D)
        sin = self.rope_sin[start:start + T].to(dtype)
        x = self.embed_tokens(idx)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        if cache is not None:
            cache.advance(T)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]  # (B, k, C)
        return self.lm_head(self.norm(x))  # (B, T or k, V)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache matching this model's dtype and device."""
        w = self.norm.weight
        return KVCache(self.cfg, batch, max_len, dtype=w.dtype, device=w.device)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B, 1) from last-position logits (B, V); temperature 0 means greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


@torch.no_grad()  # not inference_mode: its tensors could not be trained on afterwards
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int,
             use_cache: bool = True, temperature: float = 0.0, top_k: int | None = None,
             seed: int | None = None, cache: KVCache | None = None,
             step_seconds: list | None = None) -> torch.Tensor:
    """Extend prompt (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).

    Without a cache every step runs the whole sequence again; with one, the prompt is run once
    (prefill) and each step runs only the newest token (decode). Pass `cache` to continue a
    conversation: it already holds the earlier tokens, and `prompt` holds only the new ones
    (the last generated token is never in the cache: it comes back as the next prompt's first).
    If `step_seconds` is a list, the wall time of each step is appended to it (lab 31).
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be a (batch, length>=1) tensor of ids, got {prompt.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    past = cache.length if cache is not None else 0
    total = past + prompt.shape[1] + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"cached + prompt + max_new_tokens = {total} exceeds max_seq_len "
                         f"{model.cfg.max_seq_len}")
    if cache is not None and not use_cache:
        raise ValueError("a cache was passed with use_cache=False")
    gen = None
    if seed is not None:
        gen = torch.Generator(device=prompt.device).manual_seed(seed)
    if use_cache and cache is None:
        cache = model.new_cache(prompt.shape[0], total)
    out, step_input = prompt, prompt
    for _ in range(max_new_tokens):
        start = time.perf_counter()
        logits = model(step_input, cache=cache, logits_to_keep=1)[:, -1, :]  # (B, V)
        nxt = sample_next(logits, temperature, top_k, gen)  # (B, 1)
        out = torch.cat([out, nxt], dim=1)
        step_input = nxt if use_cache else out
        if step_seconds is not None:
            if nxt.is_cuda:
                torch.cuda.synchronize()
            step_seconds.append(time.perf_counter() - start)
    return out


# ----------------------------------------------------------------------------------------
# Conversion to and from Hugging Face transformers' LlamaForCausalLM.
# Our module names mirror theirs, so the state dicts differ only by a "model." prefix.


def to_hf(model: Transformer):
    """A `transformers.LlamaForCausalLM` with the same weights (and the same logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.cfg
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,  # transformers 5 files it under rope_parameters; 4.x as is
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        hidden_act="silu", bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    w = model.embed_tokens.weight
    hf = LlamaForCausalLM(hf_cfg).to(device=w.device, dtype=w.dtype)
    state = {_hf_name(k): v for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"to_hf: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head") else "model." + name


def _rope_theta(hf_cfg) -> float:
    params = getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None)
    if params and params.get("rope_type", "default") != "default":
        raise ValueError(f"from_hf supports plain RoPE only, got rope_type "
                         f"{params['rope_type']!r}")
    if params and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(hf_cfg, "rope_theta", 10000.0))


def from_hf(hf) -> Transformer:
    """Our Transformer from any `LlamaForCausalLM` (tied or untied, any RoPE base and eps)."""
    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise ValueError(f"from_hf needs head_dim * num_attention_heads == hidden_size, got "
                         f"{head_dim} * {c.num_attention_heads} != {c.hidden_size}")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("from_hf: checkpoints with attention or MLP biases are not supported")
    if c.hidden_act != "silu":
        raise ValueError(f"from_hf needs hidden_act='silu' (SwiGLU), got {c.hidden_act!r}")
    cfg = ModelConfig(
        vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        d_ff=c.intermediate_size, max_seq_len=c.max_position_embeddings,
        rope_theta=_rope_theta(c), norm_eps=c.rms_norm_eps,
        tie_embeddings=bool(c.tie_word_embeddings),
    )
    model = Transformer(cfg).to(device=hf.device, dtype=hf.dtype)
    hf_state = hf.state_dict()
    state = {}
    for name in model.state_dict():
        key = _hf_name(name)
        if key == "lm_head.weight" and key not in hf_state:  # tied checkpoints may omit it
            key = "model.embed_tokens.weight"
        state[name] = hf_state[key]
    model.load_state_dict(state)
    return model.eval()
