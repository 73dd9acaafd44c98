"""Lab 41's readers and closed-book models: prompts, labels, held-out phrasings, answering."""

import pytest
import torch
from conftest import tiny_config

from labsupport import factworld, rag
from labsupport.model import Transformer
from labsupport.retrieval import BM25
from labsupport.train import TrainConfig


def test_other_phrasing_swaps_the_two_templates_and_refuses_unanswerable_questions():
    world = factworld.build(seed=2)
    for q in world.answerable:
        other = factworld.other_phrasing(q)
        assert other != q.text and q.fact.entity in other
        swapped = factworld.Question(other, q.answer, q.doc, q.fact)
        assert factworld.other_phrasing(swapped) == q.text
    with pytest.raises(ValueError, match="unanswerable"):
        factworld.other_phrasing(world.unanswerable[0])


def test_closed_book_training_never_asks_a_test_question():
    world = factworld.build(seed=0)
    examples = rag.closed_book_examples(world)
    prompts = {p for p, _ in examples}
    assert not prompts & {rag.prompt(q.text) for q in world.questions}
    assert sum(p == "" for p, _ in examples) == len(world.documents)  # every document, whole
    answers = [t for p, t in examples if p]
    assert answers.count(rag.target(None)) == len(world.unanswerable)
    assert len(answers) == len(world.answerable) + len(world.unanswerable)


def test_reader_examples_answer_only_what_their_passages_hold():
    world = factworld.build(seed=1000)
    passages = factworld.passages(world)
    examples = rag.reader_examples(world, k=3, drop=0.15)
    assert len(examples) == len(world.questions)
    for (p, t), q in zip(examples, world.questions, strict=True):
        assert p.startswith(f"question: {q.text}\n") and p.endswith("\nanswer:")
        assert 1 <= p.count("context: ") <= 3
        if t != rag.target(None):
            assert t == rag.target(q.answer) and q.answer in p.split("\n", 1)[1]
        elif q.answer is not None:  # taken out on purpose: the answer's sentence is not shown
            assert passages[rag.gold_passage(q, passages)][1] not in p
    taught = sum(t != rag.target(None) for _, t in examples) / len(world.answerable)
    assert 0.75 < taught < 0.95  # the answer is put in where BM25 missed it, and dropped in ~15%
    assert {p.count("context: ") for p, _ in examples} == {1, 2, 3}  # short contexts too
    assert rag.reader_examples(world, k=3) == examples  # deterministic


def test_gold_passage_and_with_gold():
    world = factworld.build(seed=0)
    passages = factworld.passages(world)
    for q in world.answerable:
        text = passages[rag.gold_passage(q, passages)][1]
        assert q.answer in text and q.fact.entity in text
    assert rag.gold_passage(world.unanswerable[0], passages) is None
    assert rag.with_gold([4, 5, 6], 9, 3) == [4, 5, 9]
    assert rag.with_gold([4, 9, 6], 9, 3) == [4, 9, 6]
    assert rag.with_gold([4, 5], None, 3) == [4, 5]
    assert rag.with_gold([4, 5, 6, 9], 9, 3) == [4, 5, 9]  # found beyond k counts as missed


def test_batch_puts_labels_on_the_target_tokens_only():
    x, y = rag.batch([([5, 6, 7], [8, 9]), ([], [1, 2, 3])])
    assert x.tolist() == [[5, 6, 7, 8], [1, 2, 0, 0]]
    ignore = rag.IGNORE
    assert y.tolist() == [[ignore, ignore, 8, 9], [2, 3, ignore, ignore]]


def test_a_model_trained_on_pairs_answers_them_and_batched_answers_equal_single_ones():
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=4096, max_seq_len=128))
    qa = [("What is the codename of Kalo?", "Torcor"), ("Who leads the Zel team?", "Ada Novak"),
          ("Where is the Zel team based?", "Oslo"), ("What is the limit of Kalo?", "250")]
    pairs = rag.encode([(rag.prompt(q), rag.target(a)) for q, a in qa], 128)
    model, record = rag.train_on_pairs(model, pairs, TrainConfig(steps=150, batch_size=8, lr=3e-3,
                                                                warmup_steps=10))
    assert record["final_loss"] < 0.05 and record["flops"] > 0
    prompts = [rag.prompt(q) for q, _ in qa]
    assert rag.answer(model, prompts) == [a for _, a in qa]
    assert rag.answer(model, prompts) == [rag.answer(model, [p])[0] for p in prompts]


def test_grade_counts_abstentions_apart_from_hallucinations():
    graded = rag.grade(["Oslo", "unknown", "Lima", "unknown", "Torcor"],
                       ["Oslo", "Lima", "Oslo", None, None])
    assert graded["correct"] == [True, False, False, True, False]
    assert graded["abstained"] == [False, True, False, True, False]
    assert graded["hallucinated"] == [False, False, True, False, True]
    with pytest.raises(ValueError, match="one prediction per answer"):
        rag.grade(["Oslo"], [])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="role"):
        rag.QARun("oracle", TrainConfig())
    with pytest.raises(ValueError, match="k >= 1"):
        rag.QARun("reader", TrainConfig(), k=0)
    with pytest.raises(ValueError, match="exceeds max_len"):
        rag.encode([("word " * 200, " x\n")], 128)
    model = Transformer(tiny_config(vocab_size=4096, max_seq_len=16))
    with pytest.raises(ValueError, match="no room"):
        rag.answer(model, ["word " * 40])


def test_retrieve_returns_k_passages_for_each_question():
    world = factworld.build(seed=0)
    passages = factworld.passages(world)
    bm25 = BM25([t for _, t in passages])
    found = rag.retrieve(bm25, passages, [q.text for q in world.answerable[:5]], 3)
    assert all(len(f) == 3 for f in found)
