"""Knowledge distillation: a student trained on a teacher's soft targets or on its text.

Introduced in lab 20 ("Distillation"). Two kinds:

- *soft targets* (Hinton et al. 2015): the student matches the teacher's next-token
  distribution, softened by a temperature T, beside the usual cross-entropy on the data;
  `kd_loss` is that objective and `distill` trains with it through `labsupport.train`;
- *sequence-level* (Kim and Rush 2016): the student trains with plain cross-entropy on text the
  teacher wrote; `teacher_corpus` writes it. DeepSeek-R1's distilled models are this kind.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data, zoo
from .measure import flops_per_token, generation_flops
from .model import ModelConfig, Transformer, generate
from .runtime import cache_dir, cached_json, cached_tensors, device, map_in_workers, stable_hash
from .train import TrainConfig, evaluate_loss, run_flops, train


def _check(temperature: float, alpha: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            temperature: float = 1.0, alpha: float = 0.5, reverse: bool = False) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, targets), per token.

    Logits are (..., V), targets (...). p_T = softmax(logits / T). The T^2 keeps the soft
    term's gradients the same size as the hard term's when T changes (Hinton et al. 2015).
    alpha = 0 is plain cross-entropy, alpha = 1 pure distillation. reverse=True uses
    KL(student_T || teacher_T) instead, MiniLLM's choice, which penalises the student for
    putting mass where the teacher puts little rather than for missing any of the teacher's.
    """
    _check(temperature, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must have the same shape (the same "
                         f"vocabulary), got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    s = student_logits.flatten(0, -2).float()  # (N, V)
    hard = F.cross_entropy(s, targets.flatten()) if alpha < 1 else s.new_zeros(())
    if alpha == 0:
        return hard
    log_s = F.log_softmax(s / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.flatten(0, -2).float() / temperature, dim=-1)
    if reverse:
        kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return alpha * temperature ** 2 * kl.mean() + (1 - alpha) * hard


def _frozen_teacher(student: nn.Module, teacher: nn.Module) -> nn.Module:
    s_vocab, t_vocab = student.cfg.vocab_size, teacher.cfg.vocab_size
    if s_vocab != t_vocab:
        raise ValueError(f"student and teacher must share a vocabulary, got {s_vocab} and "
                         f"{t_vocab} tokens")
    # Put in eval mode rather than refused: a teacher left in training mode is an easy slip,
    # and its targets must not change with dropout or carry gradients.
    return teacher.eval().requires_grad_(False)


def distill(student: nn.Module, teacher: nn.Module, train_tokens: torch.Tensor,
            val_tokens: torch.Tensor | None, config: TrainConfig, temperature: float = 1.0,
            alpha: float = 0.5, reverse: bool = False, progress: bool = True,
            desc: str = "distilling"):
    """Train `student` on `kd_loss` against `teacher` with `labsupport.train`; (student, history).

    The teacher is put in eval mode and frozen (it is not refused). Each step runs the
    teacher's forward pass on the same batch: count it in the student's training cost.
    """
    _check(temperature, alpha)
    teacher = _frozen_teacher(student, teacher)

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(x)
        return kd_loss(model(x), teacher_logits, y, temperature, alpha, reverse)

    return train(student, train_tokens, val_tokens, config, progress=progress, desc=desc,
                 loss_fn=loss_fn)


@torch.no_grad()
def teacher_corpus(teacher: nn.Module, n_tokens: int, prompt_len: int, temperature: float = 1.0,
                   source_tokens: torch.Tensor | None = None, batch_size: int = 16,
                   seed: int = 0) -> torch.Tensor:
    """n_tokens of text written by `teacher`, for sequence-level distillation.

    Each sample starts from a prompt of prompt_len real tokens taken at random from
    `source_tokens` (the training split by default) and continues to the teacher's context
    length, sampled at `temperature`. Only the teacher's tokens are kept, each continuation
    closed by <|endoftext|> (id 0) as the corpus closes its files, so the result is a token
    stream like `data.tokens(...)`.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens!r}")
    if not 1 <= prompt_len < teacher.cfg.max_seq_len:
        raise ValueError(f"prompt_len must be in 1..{teacher.cfg.max_seq_len - 1} (the teacher's "
                         f"context), got {prompt_len!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if source_tokens is None:
        source_tokens = data.tokens("train", teacher.cfg.vocab_size)
    teacher.eval()
    device = next(teacher.parameters()).device
    new = teacher.cfg.max_seq_len - prompt_len  # tokens the teacher writes per sample
    gen = torch.Generator().manual_seed(seed)
    pieces, have, call = [], 0, 0
    while have < n_tokens:
        prompts, _ = data.get_batch(source_tokens, batch_size, prompt_len, gen)  # (B, prompt_len)
        out = generate(teacher, prompts.to(device), new, temperature=temperature,
                       seed=seed * 100_003 + call)
        written = out[:, prompt_len:].cpu()  # (B, new): the teacher's tokens only
        stream = torch.cat([written, written.new_zeros(batch_size, 1)], dim=1).flatten()
        pieces.append(stream)
        have += stream.numel()
        call += 1
    return torch.cat(pieces)[:n_tokens]


@torch.no_grad()
def agreement(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, seq_len: int,
              batch_size: int = 8, n_batches: int = 8, seed: int = 1234) -> dict[str, float]:
    """How close a student is to its teacher on fixed windows of the token stream `ids`.

    top1: the fraction of positions where both predict the same next token; kl: the mean
    KL(teacher || student) in nats per token, at temperature 1.
    """
    student.eval()
    teacher.eval()
    gen = torch.Generator().manual_seed(seed)
    device = next(student.parameters()).device
    same = kl = count = 0.0
    for _ in range(n_batches):
        x, _ = data.get_batch(ids, batch_size, seq_len, gen)
        x = x.to(device)
        s, t = student(x).float(), teacher(x).float()
        same += (s.argmax(-1) == t.argmax(-1)).sum().item()
        log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
        kl += (log_t.exp() * (log_t - log_s)).sum(-1).sum().item()
        count += x.numel()
    return {"top1": same / count, "kl": kl / count}


METHODS = ("hard", "soft", "sequence")
VERSION = 1  # bump when the code changes what a given StudentRun produces


@dataclass(frozen=True)
class TeacherText:
    """What `teacher_text` writes: how many tokens, from which prompts, at what temperature."""

    n_tokens: int
    prompt_len: int = 32
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 64  # samples written at once


@dataclass(frozen=True)
class StudentRun:
    """One student: its shape, its training, and what it learns from.

    method "hard" trains on the data's next tokens; "soft" on `kd_loss` against the teacher's
    logits on the same batches; "sequence" on `text`, tokens the teacher wrote.
    """

    model: ModelConfig
    train: TrainConfig
    method: str = "hard"
    temperature: float = 1.0  # soft only
    alpha: float = 0.5  # soft only
    text: TeacherText | None = None  # sequence only
    teacher: str | zoo.ZooSpec = "large"  # a zoo model's name, or its recipe
    eval_batches: int = 16
    profile: str | None = field(default=None, compare=False)  # zoo profile; None: active one

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        _check(self.temperature, self.alpha)
        if (self.method == "sequence") != (self.text is not None):
            raise ValueError("text (a TeacherText) is needed by method 'sequence' and only by it")

    def key(self) -> str:
        """Hash of everything that determines the result."""
        text = asdict(self.text) if self.text else None
        return stable_hash([self.model.to_dict(), self.train.to_dict(), self.method,
                            self.temperature, self.alpha, text, self.eval_batches,
                            self.teacher_spec().key(), VERSION])

    def teacher_spec(self) -> zoo.ZooSpec:
        """The recipe of the teacher."""
        if isinstance(self.teacher, zoo.ZooSpec):
            return self.teacher
        return zoo.spec(self.teacher, self.profile)

    def teacher_label(self) -> str:
        return self.teacher if isinstance(self.teacher, str) else "teacher"

    def path(self) -> Path:
        return cache_dir() / "distill" / f"student-{self.method}-{self.key()}.json"


def text_samples(text: TeacherText, teacher_context: int) -> int:
    """How many samples `teacher_corpus` writes for `text` (whole batches, as it runs)."""
    per_sample = teacher_context - text.prompt_len + 1  # the teacher's tokens and the closing id
    calls = -(-text.n_tokens // (per_sample * text.batch_size))
    return calls * text.batch_size


def train_flops(spec: StudentRun) -> dict[str, float]:
    """Matmul FLOPs of training the student of `spec`: its own, and the teacher's on its behalf.

    The student's are 3x a forward pass per training token (measure.flops_per_token, at the
    mean context of a window). The teacher's: for "soft", one forward pass over every training
    token; for "sequence", writing all of `spec.text` (measure.generation_flops per sample,
    prompts included); for "hard", none. Text shared by several students is counted in full
    for each: divide by the number of students to amortise it.
    """
    t = spec.train
    tokens = t.steps * t.tokens_per_step
    context = (t.seq_len + 1) / 2  # a window's positions attend to 1..seq_len tokens
    student = run_flops(spec.model, t)
    teacher_cfg = spec.teacher_spec().model
    if spec.method == "soft":
        teacher = flops_per_token(teacher_cfg, context) * tokens
    elif spec.method == "sequence":
        new = teacher_cfg.max_seq_len - spec.text.prompt_len
        teacher = (generation_flops(teacher_cfg, spec.text.prompt_len, new)
                   * text_samples(spec.text, teacher_cfg.max_seq_len))
    else:
        teacher = 0.0
    return {"student": student, "teacher": teacher}


def teacher_text(zspec: zoo.ZooSpec, text: TeacherText, label: str = "teacher") -> torch.Tensor:
    """`teacher_corpus` of the zoo model `zspec`, written once and cached (atomic, locked)."""
    path = (cache_dir() / "distill" /
            f"text-{label}-{stable_hash([asdict(text), zspec.key(), VERSION])}.safetensors")

    def build():
        teacher = zoo.load_spec(zspec, label=label)
        ids = teacher_corpus(teacher, text.n_tokens, text.prompt_len, text.temperature,
                             data.tokens("train", zspec.vocab_size), text.batch_size, text.seed)
        return {"ids": ids}, asdict(text)

    tensors, _ = cached_tensors(path, build, desc="teacher-written text")
    return tensors["ids"].long()


def run(spec: StudentRun, progress: bool = False) -> dict:
    """Train the student of `spec` (or read its cached result): losses, agreement, seconds."""
    record, _ = cached_json(spec.path(), lambda: _train_student(spec, progress),
                            desc=f"student {spec.method}")
    return record


def _train_student(spec: StudentRun, progress: bool) -> dict:
    dev = device()
    zspec = spec.teacher_spec()
    teacher = zoo.load_spec(zspec, label=spec.teacher_label(), progress=progress)
    val = data.tokens("val", zspec.vocab_size)
    torch.manual_seed(spec.train.seed)  # the same initial student for every method
    student = Transformer(spec.model).to(dev)
    start = time.perf_counter()
    if spec.method == "hard":
        student, history = train(student, data.tokens("train", zspec.vocab_size), None,
                                 spec.train, progress=progress)
    elif spec.method == "soft":
        student, history = distill(student, teacher, data.tokens("train", zspec.vocab_size),
                                   None, spec.train, spec.temperature, spec.alpha,
                                   progress=progress)
    else:
        text = teacher_text(zspec, spec.text, spec.teacher_label())
        student, history = train(student, text, None, spec.train, progress=progress)
    seconds = time.perf_counter() - start
    n = spec.eval_batches
    return {"method": spec.method, "temperature": spec.temperature, "alpha": spec.alpha,
            "seed": spec.train.seed, "params": spec.model.num_params(non_embedding=False),
            "val_loss": evaluate_loss(student, val, spec.train.seq_len, 8, n),
            **agreement(student, teacher, val, spec.train.seq_len, 8, n),
            "train_loss": history[-1]["loss"] if history else float("nan"),
            "seconds": seconds, "device": str(dev), "threads": torch.get_num_threads()}


def run_all(specs: list[StudentRun], workers: int | None = None,
            progress: bool = True) -> list[dict]:
    """Results of `run` for every spec, in order; uncached students train in parallel processes.

    Teacher-written text is written here first, once per TeacherText, so that the workers
    only read it.
    """
    for s in specs:
        if s.text is not None:
            teacher_text(s.teacher_spec(), s.text, s.teacher_label())
    todo = [s for s in specs if not s.path().exists()]
    map_in_workers(run, todo, workers, desc="students", progress=progress)
    return [run(s) for s in specs]
