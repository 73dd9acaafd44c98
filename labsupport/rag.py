"""Readers and closed-book models for lab 41: the course model taught to answer questions.

Two ways to answer a question about factworld's company:

- a *reader* sees the question and a few passages a retriever found, and copies the answer out
  of them. It is trained on other companies drawn from the same generator, so it has never seen
  the facts it is tested on: all it can learn is to read. Where its passages do not hold the
  answer, it is taught to say "unknown".
- a *closed-book* model sees only the question. It is trained on the company's documents and on
  questions about every fact, phrased with one of the two question templates, so that it has
  the facts in its weights; it is tested on the other phrasing, as a user would ask.

Both are the course model fully fine-tuned (`finetune.prepare` with method "full") from a zoo
model, with the loss on the answer tokens only. `run_all` trains many in parallel processes and
caches each (weights and record in one checked safetensors file).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import cascade, data, factworld, finetune, zoo
from .measure import flops_per_token
from .model import Transformer, generate
from .retrieval import BM25
from .runtime import cache_dir, cached_tensors, device, map_in_workers, stable_hash
from .train import TrainConfig, lr_at, make_optimizer, run_flops

ABSTAIN = "unknown"  # what a model says when it does not know
ROLES = ("reader", "closed_book")
MAX_NEW_TOKENS = 14  # the longest answer (a two-part name) is 12 tokens with its newline
IGNORE = -100  # label of tokens that carry no loss
VERSION = 2  # bump when the code changes what a given QARun produces


def prompt(question: str, passages: list[str] | None = None) -> str:
    """The text a model continues: the question, the passages (a reader's), then 'answer:'.

    The question comes first so that, reading the passages, the model already knows what it is
    looking for (a causal model's passage tokens cannot see a question that comes after them).
    """
    context = "" if passages is None else "".join(f"context: {p}\n" for p in passages)
    return f"question: {question}\n{context}answer:"


def target(answer: str | None) -> str:
    """What the model should write after 'answer:' (one line)."""
    return f" {answer if answer is not None else ABSTAIN}\n"


def gold_passage(question: factworld.Question, passages: list[tuple[int, str]]) -> int | None:
    """Index of the passage that states the question's answer (None for an unanswerable one)."""
    if question.answer is None:
        return None
    for i, (doc, text) in enumerate(passages):
        if doc == question.doc and question.answer in text and question.fact.entity in text:
            return i
    raise ValueError(f"no passage of document {question.doc} states {question.answer!r}")


def retrieve(retriever, passages: list[tuple[int, str]], questions: list[str],
             k: int) -> list[list[int]]:
    """The first k passage indices the retriever finds for each question."""
    return [[i for i, _ in hits] for hits in retriever.search_many(questions, k)]


def with_gold(found: list[int], gold: int | None, k: int) -> list[int]:
    """`found` with the gold passage put in (in place of the last) if it is missing."""
    if gold is None or gold in found[:k]:
        return found[:k]
    return found[:k - 1] + [gold]


def reader_examples(world: factworld.World, k: int = 3, drop: float = 0.15,
                    seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, target) pairs for a reader: each question with 1 to k passages like a
    retriever's.

    The passages are BM25's top sentences: hard distractors (the same entity's other facts,
    or the same fact of other entities). Where BM25 missed the answer's sentence it is put in,
    so that the reader learns to read rather than to guess; in a share `drop` of answerable
    questions it is taken out and the target is "unknown", so that the reader learns to say
    what its context holds. Unanswerable questions are answered "unknown". The number of
    passages is drawn from 1 to k: in a trial at `cpu` a reader so trained was ahead early and
    level after 1,200 steps with one trained on k always, on sequences a tenth cheaper.
    """
    passages = factworld.passages(world)
    bm25 = BM25([text for _, text in passages])
    rng = random.Random(f"{world.seed}/{seed}/reader")
    out = []
    for q in world.questions:
        found = [i for i, _ in bm25.search(q.text, k + 1)]
        gold = gold_passage(q, passages)
        n = rng.randint(1, k)
        if gold is not None and rng.random() < drop:
            shown, answer = [i for i in found if i != gold][:n], None
        else:
            shown, answer = with_gold(found, gold, n), q.answer
        rng.shuffle(shown)  # the answer's sentence is not always first
        out.append((prompt(q.text, [passages[i][1] for i in shown]), target(answer)))
    return out


def closed_book_examples(world: factworld.World, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, target) pairs for a closed-book model: documents, and questions in training words.

    Every document is a pair with an empty prompt (the loss covers all its tokens); every fact
    is asked with the question template the test does not use; questions about products that
    do not exist (another draw of names) are answered "unknown".
    """
    out = [("", doc + "\n") for doc in world.documents]
    out += [(prompt(factworld.other_phrasing(q)), target(q.answer)) for q in world.answerable]
    n = len(world.unanswerable)
    other = factworld.build(n_products=0, n_teams=1, n_policies=1, n_unanswerable=2 * n + 10,
                            seed=seed + 10_000)
    taken = set(world.ghosts) | {name for _, name in world.entities}
    fresh = [q for name, q in zip(other.ghosts, other.unanswerable, strict=True)
             if name not in taken]  # never a name the test asks about
    out += [(prompt(q.text), target(None)) for q in fresh[:n]]
    return out


def encode(examples: list[tuple[str, str]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """Token ids of (prompt, target) pairs; ValueError if one is longer than `max_len`."""
    tok = data.tokenizer()
    out = []
    for p, t in examples:
        pair = (tok.encode(p).ids if p else [], tok.encode(t).ids)
        if len(pair[0]) + len(pair[1]) > max_len + 1:
            raise ValueError(f"an example of {sum(map(len, pair))} tokens exceeds max_len "
                             f"{max_len} (+1): shorten the contexts")
        out.append(pair)
    return out


def batch(pairs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) right-padded to the longest pair, with labels only on the target tokens."""
    width = max(len(p) + len(t) for p, t in pairs) - 1
    x = torch.zeros(len(pairs), width, dtype=torch.long)
    y = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    for row, (p, t) in enumerate(pairs):
        ids = torch.tensor(p + t)
        x[row, :len(ids) - 1] = ids[:-1]
        first = max(len(p) - 1, 0)  # the position whose next token is the target's first
        y[row, first:len(ids) - 1] = ids[first + 1:]
    return x, y


def train_on_pairs(model: Transformer, pairs: list[tuple[list[int], list[int]]],
                   cfg: TrainConfig) -> tuple[Transformer, dict]:
    """Fine-tune `model` in place on random batches of `pairs`, loss on target tokens only.

    Uses the course's optimizer and schedule (AdamW, warm-up, cosine); `cfg.seq_len` is unused
    (every batch is as long as its longest pair). Returns the model and a record of the last
    loss, the tokens processed and their matmul FLOPs (3x forward, at each batch's mean context).
    """
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = next(model.parameters()).device
    tokens, flops, losses = 0, 0.0, []
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        rows = torch.randint(len(pairs), (cfg.batch_size,), generator=gen).tolist()
        x, y = batch([pairs[i] for i in rows])
        logits = model(x.to(dev))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(dev).flatten(),
                               ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        tokens += x.numel()
        flops += flops_per_token(model.cfg, (x.shape[1] + 1) / 2, training=True) * x.numel()
    model.eval()
    tail = losses[-max(1, cfg.steps // 10):]
    return model, {"final_loss": sum(tail) / len(tail), "tokens": tokens, "flops": flops}


@dataclass(frozen=True)
class QARun:
    """One model taught to answer: its role, the zoo model it starts from, and its training."""

    role: str  # "reader" or "closed_book"
    train: TrainConfig
    base: str = "small"  # a zoo model's name
    base_profile: str | None = None  # the zoo profile it comes from; None: the active one
    world_seed: int = 0  # the company tested on (and memorised by a closed-book model)
    reader_worlds: int = 200  # readers: companies they train on, seeds 1000, 1001, ...
    k: int = 3  # readers: passages (sentences) per question
    label: str = field(default="", compare=False)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.k < 1 or self.reader_worlds < 1:
            raise ValueError(f"need k >= 1 and reader_worlds >= 1, got {self.k}, "
                             f"{self.reader_worlds}")

    def zoo_spec(self) -> zoo.ZooSpec:
        return zoo.spec(self.base, self.base_profile)

    def key(self) -> str:
        """Hash of everything that determines the weights."""
        what = ([self.reader_worlds, self.k] if self.role == "reader" else [self.world_seed])
        return stable_hash([self.role, self.train.to_dict(), self.zoo_spec().key(), what,
                            VERSION])

    def path(self) -> Path:
        return cache_dir() / "rag" / f"{self.role}-{self.key()}.safetensors"

    def examples(self) -> list[tuple[str, str]]:
        """The (prompt, target) pairs this run trains on."""
        if self.role == "closed_book":
            return closed_book_examples(factworld.build(seed=self.world_seed), self.world_seed)
        return [e for i in range(self.reader_worlds)
                for e in reader_examples(factworld.build(seed=1000 + i), self.k)]


def pretrain_flops(spec: zoo.ZooSpec) -> float:
    """Matmul FLOPs of training a zoo model from scratch (3x forward at a window's mean context)."""
    return run_flops(spec.model, spec.train)


def run(spec: QARun, progress: bool = False) -> dict:
    """Train `spec` (or read it from the cache); its record: loss, tokens, FLOPs, seconds."""
    _, record = cached_tensors(spec.path(), lambda: _train(spec, progress),
                               desc=f"{spec.role} {spec.label or spec.base}")
    return record


def _train(spec: QARun, progress: bool) -> tuple[dict, dict]:
    zspec = spec.zoo_spec()
    base = zoo.load_spec(zspec, label=spec.base, progress=progress)
    model = finetune.prepare(base, finetune.FineTune("full")).to(device())
    pairs = encode(spec.examples(), model.cfg.max_seq_len)
    torch.manual_seed(spec.train.seed)
    start = time.perf_counter()
    model, record = train_on_pairs(model, pairs, spec.train)
    record.update(role=spec.role, base=spec.base, label=spec.label, examples=len(pairs),
                  seconds=time.perf_counter() - start, steps=spec.train.steps,
                  seed=spec.train.seed, pretrain_flops=pretrain_flops(zspec),
                  params=model.cfg.num_params(non_embedding=False),
                  non_embedding_params=model.cfg.num_params(non_embedding=True),
                  threads=torch.get_num_threads(), device=str(device()))
    return dict(model.state_dict()), record


def run_all(specs: list[QARun], workers: int | None = None, progress: bool = True) -> list[dict]:
    """Records of `run` for every spec, in order; uncached runs train in parallel processes."""
    todo = [s for s in specs if not s.path().exists()]
    map_in_workers(run, todo, workers, desc="question-answering models", progress=progress)
    return [run(s) for s in specs]


def load(spec: QARun) -> Transformer:
    """The trained model of `spec` (trained first if it is not cached), in eval mode."""
    tensors, _ = cached_tensors(spec.path(), lambda: _train(spec, False))
    model = Transformer(spec.zoo_spec().model)
    model.load_state_dict(tensors)
    return model.eval().to(device())


@torch.no_grad()
def answer(model: Transformer, prompts: list[str],
           max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers (text up to the first newline, stripped), prompts of one length batched."""
    tok = data.tokenizer()
    newline = tok.encode("\n").ids[0]
    dev = next(model.parameters()).device
    ids = [tok.encode(p).ids for p in prompts]
    out: list[str] = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(ids):
        by_length.setdefault(len(p), []).append(i)
    for length, rows in by_length.items():
        new = min(max_new_tokens, model.cfg.max_seq_len - length)
        if new < 1:
            raise ValueError(f"a prompt of {length} tokens leaves no room to answer "
                             f"(max_seq_len {model.cfg.max_seq_len})")
        x = torch.tensor([ids[i] for i in rows], device=dev)
        written = generate(model, x, new)[:, length:].tolist()
        for i, toks in zip(rows, written, strict=True):
            if newline in toks:
                toks = toks[:toks.index(newline)]
            out[i] = tok.decode(toks).strip()
    return out


def grade(predictions: list[str], answers: list[str | None]) -> dict[str, list[bool]]:
    """Per question: correct (exact match, or 'unknown' where there is no answer), abstained,
    and hallucinated (an answer that is not 'unknown' and is wrong)."""
    if len(predictions) != len(answers):
        raise ValueError(f"need one prediction per answer, got {len(predictions)} and "
                         f"{len(answers)}")
    expected = [a if a is not None else ABSTAIN for a in answers]
    correct = [p == e for p, e in zip(predictions, expected, strict=True)]
    abstained = [p == ABSTAIN for p in predictions]
    wrong = [not c and not s for c, s in zip(correct, abstained, strict=True)]
    return {"correct": correct, "abstained": abstained, "hallucinated": wrong}


def sample(items: list, n: int, seed: int = 0) -> list:
    """n items drawn without replacement, in a repeatable order (all of them if n is larger)."""
    return random.Random(seed).sample(items, min(n, len(items)))


def interval(ok, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Share of True in `ok` with a 95% bootstrap interval over the questions: (mean, lo, hi)."""
    ok = np.asarray(ok, dtype=float)
    return cascade.paired_gap(np.zeros_like(ok), ok, n_boot, seed)  # the gap above zero
