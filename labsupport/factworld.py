"""A synthetic knowledge base (lab 41): facts that no model can know without reading them.

A seed makes a fictional company: products, teams and policies, each with a few attributes
whose values are drawn at random. Every entity gets one document, written from varied sentence
templates in a shuffled order; questions are generated from the same facts, so every answer is
known and can be checked. Questions about entities the company does not have are unanswerable.
`update` changes a stated fraction of the facts and rewrites the documents that hold them, which
is how lab 41 shows retrieval following new facts while a trained model stays stale.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace

SYLLABLES = ("ka", "lo", "mir", "ven", "tor", "sa", "quin", "bel", "dra", "nox", "fen", "ru",
             "zel", "ta", "vor", "il", "mon", "pra", "sed", "ul", "gar", "eth", "cor", "lyn")
CITIES = ("Oslo", "Lima", "Porto", "Dakar", "Quito", "Perth", "Turin", "Hanoi", "Leeds", "Malmo",
          "Cusco", "Split", "Graz", "Bergen", "Tampere", "Lyon", "Kyoto", "Austin")
FIRST = ("Ada", "Bruno", "Chiara", "Dmitri", "Elif", "Farah", "Goran", "Hana", "Ines", "Jonas",
         "Kemal", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Rui", "Sofia", "Tariq", "Vera")
LAST = ("Okafor", "Lindqvist", "Moreau", "Tanaka", "Novak", "Alvarez", "Haddad", "Kowalski",
        "Brennan", "Ivanova", "Costa", "Nakamura", "Rossi", "Fischer", "Mensah", "Varga")

# kind -> attribute -> (how a value is drawn, sentence templates, question templates)
SCHEMA = {
    "product": {
        "codename": ("word", ["{e} was developed under the codename {v}.",
                              "Internally, {e} is known by the codename {v}.",
                              "The codename of {e} is {v}."],
                     ["What is the codename of {e}?", "Under which codename was {e} built?"]),
        "launch year": ("year", ["{e} was launched in {v}.",
                                 "{e} first shipped to customers in {v}.",
                                 "The launch of {e} took place in {v}."],
                        ["In which year was {e} launched?", "When did {e} first ship?"]),
        "owner team": ("team", ["{e} is owned by the {v} team.",
                                "The {v} team maintains {e}.",
                                "Responsibility for {e} lies with the {v} team."],
                       ["Which team owns {e}?", "Who maintains {e}?"]),
        "user limit": ("limit", ["{e} supports at most {v} users per account.",
                                 "Each account of {e} is limited to {v} users.",
                                 "The user limit of {e} is {v}."],
                       ["How many users does {e} allow per account?",
                        "What is the user limit of {e}?"]),
    },
    "team": {
        "lead": ("person", ["The {e} team is led by {v}.",
                            "{v} heads the {e} team.",
                            "The lead of the {e} team is {v}."],
                 ["Who leads the {e} team?", "Who is the head of the {e} team?"]),
        "city": ("city", ["The {e} team works from {v}.",
                          "The {e} team is based in {v}.",
                          "Members of the {e} team sit in the {v} office."],
                 ["Where is the {e} team based?", "In which city does the {e} team work?"]),
        "size": ("size", ["The {e} team has {v} members.",
                          "{v} people work in the {e} team.",
                          "The headcount of the {e} team is {v}."],
                 ["How many members does the {e} team have?",
                  "What is the headcount of the {e} team?"]),
    },
    "policy": {
        "limit": ("amount", ["Under the {e} policy, the limit is {v} dollars.",
                             "The {e} policy caps spending at {v} dollars.",
                             "Spending under the {e} policy may not exceed {v} dollars."],
                  ["What is the limit of the {e} policy?",
                   "How much does the {e} policy allow?"]),
        "approver": ("person", ["Requests under the {e} policy are approved by {v}.",
                                "{v} approves requests under the {e} policy.",
                                "The approver for the {e} policy is {v}."],
                     ["Who approves requests under the {e} policy?",
                      "Who is the approver for the {e} policy?"]),
    },
}
POLICY_NAMES = ("travel", "equipment", "training", "hospitality", "relocation", "software",
                "conference", "remote work", "wellness", "recruiting", "hardware", "research")
FILLER = ("This page is maintained by the documentation group.",
          "Contact the service desk with any question about this page.",
          "Earlier revisions of this page are kept in the archive.")


@dataclass(frozen=True)
class Fact:
    kind: str
    entity: str
    attribute: str
    value: str


@dataclass(frozen=True)
class Question:
    text: str
    answer: str | None  # None: the knowledge base does not say
    doc: int | None  # the document holding the answer
    fact: Fact | None = None


@dataclass
class World:
    """The knowledge base: its facts, one document per entity, and questions about it."""

    seed: int
    facts: list[Fact]
    entities: list[tuple[str, str]]  # (kind, name), one per document, in document order
    ghosts: list[str]  # product names no document mentions: their questions have no answer
    documents: list[str] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)

    @property
    def answerable(self) -> list[Question]:
        return [q for q in self.questions if q.answer is not None]

    @property
    def unanswerable(self) -> list[Question]:
        return [q for q in self.questions if q.answer is None]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()


def _unique(rng: random.Random, n: int, make, taken: set) -> list[str]:
    out = []
    while len(out) < n:
        name = make()
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def _value(rng: random.Random, how: str, teams: list[str], exclude: str | None = None) -> str:
    while True:
        value = {
            "word": lambda: _word(rng, 2),
            "year": lambda: str(rng.randint(1998, 2024)),
            "team": lambda: rng.choice(teams),
            "limit": lambda: str(rng.choice((5, 10, 25, 50, 100, 250, 500, 1000, 2000))),
            "person": lambda: f"{rng.choice(FIRST)} {rng.choice(LAST)}",
            "city": lambda: rng.choice(CITIES),
            "size": lambda: str(rng.randint(3, 60)),
            "amount": lambda: str(rng.choice((200, 500, 750, 1000, 1500, 2500, 4000, 6000))),
        }[how]()
        if value != exclude:
            return value


def build(n_products: int = 40, n_teams: int = 12, n_policies: int = 8,
          n_unanswerable: int = 40, seed: int = 0) -> World:
    """A knowledge base drawn from `seed`: the same arguments give the same world."""
    for name, value in (("n_products", n_products), ("n_teams", n_teams),
                        ("n_policies", n_policies), ("n_unanswerable", n_unanswerable)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if n_teams < 1 or n_products + n_policies < 1:
        raise ValueError("need at least one team and one product or policy")
    if n_policies > len(POLICY_NAMES):
        raise ValueError(f"n_policies must be at most {len(POLICY_NAMES)}, got {n_policies}")
    rng = random.Random(seed)
    taken: set = set()
    teams = _unique(rng, n_teams, lambda: _word(rng, 2), taken)
    products = _unique(rng, n_products, lambda: _word(rng, 3), taken)
    policies = rng.sample(POLICY_NAMES, n_policies)
    entities = ([("product", p) for p in products] + [("team", t) for t in teams]
                + [("policy", p) for p in policies])
    facts = [Fact(kind, name, attr, _value(rng, how, teams))
             for kind, name in entities for attr, (how, _, _) in SCHEMA[kind].items()]
    # names no document mentions: questions about them have no answer here
    ghosts = _unique(rng, n_unanswerable, lambda: _word(rng, 3), taken)
    world = World(seed, facts, entities, ghosts)
    _write(world)
    return world


def _write(world: World) -> None:
    """Fill in the documents and questions from the facts (deterministic from world.seed)."""
    by_entity: dict[tuple[str, str], list[Fact]] = {}
    for f in world.facts:
        by_entity.setdefault((f.kind, f.entity), []).append(f)
    world.documents, world.questions = [], []
    for doc, (kind, name) in enumerate(world.entities):
        rng = random.Random(f"{world.seed}/{kind}/{name}")  # the same page layout after updates
        sentences = []
        for f in by_entity[(kind, name)]:
            _, templates, questions = SCHEMA[kind][f.attribute]
            sentences.append(rng.choice(templates).format(e=name, v=f.value))
            text = rng.choice(questions).format(e=name)
            world.questions.append(Question(text, f.value, doc, f))
        rng.shuffle(sentences)
        sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(FILLER))
        title = f"{name} ({kind})" if kind != "policy" else f"The {name} policy"
        world.documents.append(title + "\n" + " ".join(sentences))
    rng = random.Random(f"{world.seed}/ghosts")
    for ghost in world.ghosts:  # a product question, about a product that does not exist
        attr = rng.choice(list(SCHEMA["product"]))
        text = rng.choice(SCHEMA["product"][attr][2]).format(e=ghost)
        world.questions.append(Question(text, None, None, None))


def passages(world: World) -> list[tuple[int, str]]:
    """Every document cut into sentences: (document index, sentence), title left out.

    Retrieving sentences rather than whole pages gives a reader a short context: three sentences
    are about half the tokens of a page, so a reader's training steps cost about half as much.
    """
    out = []
    for i, doc in enumerate(world.documents):
        body = doc.split("\n", 1)[1]
        out += [(i, s) for s in re.split(r"(?<=\.) ", body) if s]
    return out


def other_phrasing(question: Question) -> str:
    """The question asked with the other template of its attribute (answerable questions only)."""
    if question.fact is None:
        raise ValueError("an unanswerable question has no fact to rephrase")
    f = question.fact
    texts = [t.format(e=f.entity) for t in SCHEMA[f.kind][f.attribute][2]]
    if question.text not in texts:
        raise ValueError(f"{question.text!r} is not one of factworld's phrasings")
    return texts[1 - texts.index(question.text)]


def update(world: World, fraction: float, seed: int = 1) -> World:
    """A new version of `world` in which `fraction` of the facts have a different value.

    Documents are rewritten with the same templates and order, so only the changed facts'
    sentences differ; questions keep their text and follow the new answers.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    rng = random.Random(seed)
    teams = [name for kind, name in world.entities if kind == "team"]
    chosen = set(rng.sample(range(len(world.facts)), round(fraction * len(world.facts))))
    facts = [replace(f, value=_value(rng, SCHEMA[f.kind][f.attribute][0], teams, f.value))
             if i in chosen else f for i, f in enumerate(world.facts)]
    new = World(world.seed, facts, list(world.entities), list(world.ghosts))
    _write(new)
    return new


def changed(old: World, new: World) -> list[bool]:
    """For each answerable question of `new`: did its answer change from `old`?"""
    before = {(q.fact.kind, q.fact.entity, q.fact.attribute): q.answer for q in old.answerable}
    return [before[(q.fact.kind, q.fact.entity, q.fact.attribute)] != q.answer
            for q in new.answerable]
