"""A small LLM serving engine: slots with their own KV cache, and three batching policies.

Introduced in lab 30 ("Batching"). The engine holds up to `max_batch` sequences at once, each in
a *slot* of a preallocated KV cache. One call of `step()` is one iteration in Orca's sense
(Yu et al. 2022): it admits waiting requests into free slots as the policy allows, runs each
newly admitted prompt (prefill), then runs one decoding step for every running sequence
together, and retires the sequences that are done.

- "static": a batch starts when `max_batch` requests wait (or when `drain()` says no more are
  coming, or after `static_timeout_s` so that nobody waits forever) and runs until its longest
  member finishes; slots freed early stay empty.
- "dynamic": as static, but the batch starts when it is full or when the oldest waiting request
  has waited `window_s` (Triton's dynamic batcher).
- "continuous": every step fills every free slot (iteration-level scheduling, as Orca and vLLM).

The model is any `labsupport.model.Transformer`. Sequences in one decoding step sit at different
positions, which `Transformer.forward` does not handle (its cache has one length for the whole
batch), so the engine keeps that bookkeeping itself and runs the model's own modules: each
slot's position picks its rotary angles, its keys go to its own row of the cache, and a mask
hides the cache entries past each slot's length. model.py stays as it was.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..model import Transformer, apply_rope, sample_next

POLICIES = ("static", "dynamic", "continuous")


@torch.no_grad()
def near_tie_gap(model: Transformer, prompt: list[int], output: list[int],
                 alone: list[int]) -> float | None:
    """None if `output` equals `alone` (the solo greedy output); else the gap between the two
    best logits of the solo run at the first token where they differ.

    A batch adds floats in another order than a solo run; that may flip a near-tie (a gap
    of ~1e-6), and nothing else.
    """
    if output == alone:
        return None
    first = next((i for i, (a, b) in enumerate(zip(output, alone, strict=False))
                  if a != b),
                 min(len(output), len(alone)))
    device = model.norm.weight.device
    context = torch.tensor([prompt + alone[:first]], device=device)
    top2 = model(context)[0, -1].float().topk(2).values
    return float(top2[0] - top2[1])


@dataclass
class Request:
    """One completion request and what happened to it (times from time.perf_counter())."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    id: int = field(default_factory=itertools.count().__next__)
    output: list[int] = field(default_factory=list)
    arrived: float | None = None  # set by submit()
    first_token: float | None = None
    finished: float | None = None
    cancelled: bool = False
    error: str | None = None  # why the engine dropped it, if it did
    on_token: object = None  # optional callable(request, token_id), called on the engine's thread
    on_done: object = None  # optional callable(request), called once when it finishes or is dropped
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def reserved_tokens(self) -> int:
        """Cache positions the request may fill: its prompt and every token it may write."""
        return len(self.prompt) + self.max_tokens


@dataclass
class StepRecord:
    """What one engine step did, for the timeline of slots (lab 30's plot)."""

    start: float
    seconds: float
    running: int  # sequences that decoded a token in this step
    prefilled: int  # prompts run in this step
    held_tokens: int  # cache positions holding a real token, over all slots
    reserved_tokens: int  # positions reserved by the running requests (prompt + max_tokens)
    keys_read: int = 0  # cache positions the decode attention read: sequences x longest span


class Engine:
    """Serve many requests on one model with a slotted KV cache and a batching policy."""

    def __init__(self, model: Transformer, max_batch: int = 8, policy: str = "continuous",
                 window_s: float = 0.05, static_timeout_s: float = 1.0,
                 max_queue: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if window_s < 0 or static_timeout_s < 0:
            raise ValueError("window_s and static_timeout_s must be >= 0")
        self.model = model.eval()
        self.cfg = model.cfg
        self.policy, self.max_batch = policy, max_batch
        self.window_s, self.static_timeout_s, self.max_queue = window_s, static_timeout_s, max_queue
        w = model.norm.weight
        shape = (max_batch, self.cfg.n_kv_heads, self.cfg.max_seq_len, self.cfg.head_dim)
        # every slot can hold a whole context: the reservation a simple server makes
        self.k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in model.layers]
        self.v = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in model.layers]
        self.length = [0] * max_batch  # tokens held in each slot's cache
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self.steps: list[StepRecord] = []
        self.draining = False
        self.lock = threading.Lock()
        self._generators: dict[int, torch.Generator] = {}

    # ---- requests in and out -------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue a request; ValueError if it cannot fit the context, OverflowError if full."""
        if not request.prompt:
            raise ValueError("prompt must hold at least one token")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if request.reserved_tokens > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({len(request.prompt)} tokens) + max_tokens "
                             f"({request.max_tokens}) exceeds the context of "
                             f"{self.cfg.max_seq_len} tokens")
        if not all(0 <= t < self.cfg.vocab_size for t in request.prompt):
            raise ValueError(f"prompt token ids must be in 0..{self.cfg.vocab_size - 1}")
        if request.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {request.temperature}")
        with self.lock:
            if self.max_queue is not None and len(self.waiting) >= self.max_queue:
                raise OverflowError(f"queue full ({self.max_queue} waiting)")
            request.arrived = time.perf_counter()
            self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request; its slot is freed at the next step."""
        request.cancelled = True

    def fail_all(self, reason: str) -> None:
        """Drop every running and waiting request now (after an error inside a step)."""
        with self.lock:
            dropped = [r for r in self.slots if r is not None] + list(self.waiting)
            self.slots = [None] * self.max_batch
            self.waiting.clear()
        for request in dropped:
            request.cancelled, request.error = True, reason
            request.finished = time.perf_counter()
            self._generators.pop(request.id, None)
            self._done(request)

    def drain(self) -> None:
        """No more requests are coming: static and dynamic batches need not wait to fill."""
        self.draining = True

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.slots)

    def idle(self) -> bool:
        """True when no request is waiting or running."""
        return not self.waiting and self.running == 0

    # ---- scheduling ----------------------------------------------------------------------

    def _admit(self, now: float) -> list[int]:
        """Move waiting requests into free slots as the policy allows; their slot numbers."""
        with self.lock:
            if any(r.cancelled for r in self.waiting):  # anywhere in the queue, not only first
                for request in [r for r in self.waiting if r.cancelled]:
                    self._finish_unstarted(request)
                self.waiting = deque(r for r in self.waiting if not r.cancelled)
            free = [i for i, r in enumerate(self.slots) if r is None]
            if not self.waiting or not free:
                return []
            if self.policy != "continuous":
                if self.running:  # a static or dynamic batch runs to completion
                    return []
                waited = now - self.waiting[0].arrived
                limit = self.window_s if self.policy == "dynamic" else self.static_timeout_s
                if len(self.waiting) < self.max_batch and not self.draining and waited < limit:
                    return []
            admitted = []
            for slot in free:
                if not self.waiting:
                    break
                self.slots[slot] = self.waiting.popleft()
                self.length[slot] = 0
                admitted.append(slot)
            return admitted

    def _finish_unstarted(self, request: Request) -> None:
        request.finished = time.perf_counter()
        self._done(request)

    @staticmethod
    def _done(request: Request) -> None:
        request.done.set()
        if request.on_done is not None:
            request.on_done(request)

    # ---- the model, slot by slot ---------------------------------------------------------

    def _forward(self, tokens: torch.Tensor, slots: list[int], positions: torch.Tensor,
                 prefill: bool) -> torch.Tensor:
        """Last-position logits (B, V) for tokens (B, T) of `slots`, written to their caches.

        prefill: one slot, T prompt tokens at positions 0..T-1, plainly causal (as `generate`).
        decode: B slots, one token each at its own position; keys past a slot's length masked.
        """
        model, B, T = self.model, tokens.shape[0], tokens.shape[1]
        dtype = model.norm.weight.dtype
        if prefill:
            cos, sin = model.rope_cos[:T].to(dtype), model.rope_sin[:T].to(dtype)  # (T, D)
        else:
            cos = model.rope_cos[positions].to(dtype)[:, None, None, :]  # (B, 1, 1, D)
            sin = model.rope_sin[positions].to(dtype)[:, None, None, :]
            span = int(positions.max()) + 1  # keys any slot can see
            visible = torch.arange(span, device=positions.device)[None, :] <= positions[:, None]
            mask = visible[:, None, None, :]  # (B, 1, 1, span)
        rows = torch.tensor(slots, device=tokens.device)
        x = model.embed_tokens(tokens)  # (B, T, C)
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            gqa = attn.n_kv_heads != attn.n_heads
            if prefill:
                self.k[i][rows, :, :T] = k
                self.v[i][rows, :, :T] = v
                y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
            else:
                self.k[i][rows, :, positions] = k[:, :, 0]  # (B, Hkv, D) into each slot's row
                self.v[i][rows, :, positions] = v[:, :, 0]
                keys, values = self.k[i][rows, :, :span], self.v[i][rows, :, :span]
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                   enable_gqa=gqa)
            y = y.transpose(1, 2).reshape(B, T, attn.n_heads * attn.head_dim)
            x = x + attn.o_proj(y)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.lm_head(model.norm(x[:, -1]))  # (B, V)

    def _sample(self, request: Request, logits: torch.Tensor) -> int:
        gen = None
        if request.temperature > 0 and request.seed is not None:
            gen = self._generators.setdefault(
                request.id, torch.Generator(device=logits.device).manual_seed(request.seed))
        return int(sample_next(logits[None], request.temperature, generator=gen)[0, 0])

    def _emit(self, slot: int, token: int, now: float) -> None:
        request = self.slots[slot]
        request.output.append(token)
        if request.first_token is None:
            request.first_token = now
        if request.on_token is not None:
            request.on_token(request, token)

    def _retire(self, now: float) -> None:
        for slot, request in enumerate(self.slots):
            if request is not None and (request.cancelled
                                        or len(request.output) >= request.max_tokens):
                request.finished = now
                self.slots[slot] = None
                self._generators.pop(request.id, None)
                self._done(request)

    @torch.no_grad()
    def step(self) -> bool:
        """One iteration: admit, prefill the admitted, decode the running, retire. False if idle."""
        start = time.perf_counter()
        self._retire(start)  # cancelled requests leave before any work is done for them
        admitted = self._admit(start)
        device = self.model.norm.weight.device
        for slot in admitted:  # prefill: the prompt's cache, and the first new token
            request = self.slots[slot]
            prompt = torch.tensor([request.prompt], device=device)
            logits = self._forward(prompt, [slot], None, prefill=True)
            self.length[slot] = len(request.prompt)
            self._emit(slot, self._sample(request, logits[0]), time.perf_counter())
        self._retire(time.perf_counter())
        decoding = [s for s, r in enumerate(self.slots) if r is not None and s not in admitted]
        keys_read = len(decoding) * (max((self.length[s] for s in decoding), default=-1) + 1)
        if decoding:  # decode: the newest token of every running sequence, all at once
            tokens = torch.tensor([[self.slots[s].output[-1]] for s in decoding], device=device)
            positions = torch.tensor([self.length[s] for s in decoding], device=device)
            logits = self._forward(tokens, decoding, positions, prefill=False)
            now = time.perf_counter()
            for row, slot in enumerate(decoding):
                self.length[slot] += 1
                self._emit(slot, self._sample(self.slots[slot], logits[row]), now)
            self._retire(time.perf_counter())
        if not admitted and not decoding:
            return False
        self.steps.append(StepRecord(
            start=start, seconds=time.perf_counter() - start, running=len(decoding),
            prefilled=len(admitted), held_tokens=sum(self.length[s] for s, r in
                                                     enumerate(self.slots) if r is not None),
            reserved_tokens=sum(r.reserved_tokens for r in self.slots if r is not None),
            keys_read=keys_read))
        return True

    def run(self, requests: list[Request]) -> list[Request]:
        """Offline: submit every request, drain, and step until all are done; the requests."""
        for r in requests:
            self.submit(r)
        self.drain()
        while not self.idle():
            if not self.step():
                time.sleep(0)  # a static or dynamic batch is still waiting to form
        return requests

    @property
    def cache_bytes(self) -> int:
        """Bytes the slots' caches occupy (every slot reserved for a whole context)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
