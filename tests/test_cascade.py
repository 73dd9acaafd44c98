"""Cascades (lab 40): the task, the answers and their signals, routers, speculative decoding."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_serving_engine import decisive_model

from labsupport import cascade, data
from labsupport.cascade import (
    LogisticRouter,
    SpeculativeStats,
    answer,
    cascade_correct,
    completion_task,
    oracle,
    route,
    speculative_generate,
    sweep,
)
from labsupport.model import Transformer, generate, to_hf

TARGET = decisive_model(0)
VOCAB = 512  # the small tokenizer of the data tests: it trains in a second or two


def test_the_task_is_windows_of_one_file_and_repeatable():
    ctx, ans = completion_task(300, 12, 3, seed=4, vocab_size=VOCAB)
    assert ctx.shape == (300, 12) and ans.shape == (300, 3)
    assert not (ctx == cascade.EOT).any() and not (ans == cascade.EOT).any()
    again, _ = completion_task(300, 12, 3, seed=4, vocab_size=VOCAB)
    other, _ = completion_task(300, 12, 3, seed=5, vocab_size=VOCAB)
    assert torch.equal(ctx, again) and not torch.equal(ctx, other)
    # each window is really in the split, context followed by its answer
    ids = data.tokens("val", VOCAB)
    windows = ids.unfold(0, 15, 1)
    row = torch.cat([ctx[0], ans[0]])
    assert (windows == row).all(dim=1).any()


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 0, "context_len": 4, "answer_len": 1}, "n must be an integer >= 1"),
    ({"n": 5, "context_len": 4, "answer_len": 0}, "answer_len must be an integer >= 1"),
    ({"n": 10**9, "context_len": 4, "answer_len": 1}, "exceeds the"),
])
def test_bad_task_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        completion_task(**kwargs, vocab_size=VOCAB)


def test_answers_are_greedy_generation_with_their_statistics():
    contexts = torch.randint(0, 256, (10, 7), generator=torch.Generator().manual_seed(0))
    got = answer(TARGET, contexts, 5, batch_size=4)
    assert torch.equal(got.tokens, generate(TARGET, contexts, 5)[:, 7:])
    with torch.no_grad():  # the first token's log-probability, recomputed plainly
        logp = TARGET(contexts)[:, -1].log_softmax(-1)
    assert torch.allclose(got.logprobs[:, 0], logp.max(-1).values, atol=1e-5)
    assert (got.entropy >= 0).all() and (got.margin >= 0).all() and (got.logprobs <= 0).all()
    signals = got.signals()
    assert set(signals) == {"mean log-prob", "min token prob", "neg. entropy"}
    assert got.features().shape == (10, 5)
    assert got.correct(got.tokens).all() and not got.correct(got.tokens + 1).any()


def test_thresholds_at_the_ends_never_and_always_escalate():
    signal = np.random.default_rng(0).normal(size=50)
    assert not route(signal, -np.inf).any() and route(signal, np.inf).all()
    with pytest.raises(ValueError, match="NaN"):
        route(signal, float("nan"))


def test_the_oracle_is_never_worse_than_either_model():
    rng = np.random.default_rng(1)
    for _ in range(20):
        small, large = rng.random(200) < rng.random(), rng.random(200) < rng.random()
        acc = cascade_correct(small, large, oracle(small, large)).mean()
        assert acc >= max(small.mean(), large.mean())
        assert acc == (small | large).mean()


def test_the_sweep_runs_from_the_small_model_to_the_large():
    rng = np.random.default_rng(2)
    small, large = rng.random(300) < 0.4, rng.random(300) < 0.6
    signal = np.round(rng.normal(size=300), 1)  # ties: a threshold moves them together
    curve = sweep(signal, small, large)
    assert curve[0, 0] == 0 and curve[0, 1] == small.mean()
    assert curve[-1, 0] == 1 and curve[-1, 1] == large.mean()
    assert (np.diff(curve[:, 0]) > 0).all()
    for t in (-0.5, 0.0, 0.7):  # every point is what route() gives at some threshold
        esc = route(signal, t)
        point = curve[np.isclose(curve[:, 0], esc.mean())]
        assert np.isclose(point[0, 1], cascade_correct(small, large, esc).mean())
    with pytest.raises(ValueError, match="NaN"):
        sweep(np.array([0.1, np.nan]), small[:2], large[:2])


def test_a_perfect_signal_sweeps_through_the_oracle():
    rng = np.random.default_rng(3)
    small, large = rng.random(400) < 0.5, rng.random(400) < 0.7
    curve = sweep(~oracle(small, large) * 1.0, small, large)  # lowest = escalate-worthy
    best = cascade_correct(small, large, oracle(small, large)).mean()
    assert np.isclose(curve[:, 1].max(), best)


def test_the_learned_router_finds_a_signal_in_its_features():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2000, 3))
    ok = rng.random(2000) < 1 / (1 + np.exp(-3 * x[:, 1]))  # only feature 1 matters
    router = LogisticRouter().fit(x[:1000], ok[:1000])
    p = router.predict(x[1000:])
    assert np.abs(router.w[1:].numpy()).argmax() == 1
    assert ok[1000:][p > 0.8].mean() > 0.75 and ok[1000:][p < 0.2].mean() < 0.25
    with pytest.raises(ValueError, match="features must be"):
        LogisticRouter().fit(x[:10], ok[:5])


def test_the_paired_gap_brackets_a_real_difference():
    rng = np.random.default_rng(5)
    a = rng.random(3000) < 0.3
    b = a | (rng.random(3000) < 0.1)  # b is right wherever a is, and sometimes more
    gap, lo, hi = cascade.paired_gap(a, b)
    assert np.isclose(gap, b.mean() - a.mean()) and 0 < lo < gap < hi
    gap, lo, hi = cascade.paired_gap(a, a)
    assert gap == lo == hi == 0
    with pytest.raises(ValueError, match="one length"):
        cascade.paired_gap(a, b[:10])


def test_calibration_bins_hold_every_request():
    conf = np.linspace(0, 1, 100)
    rows = cascade.calibration(conf, conf > 0.5, bins=4)
    assert rows[:, 2].sum() == 100 and rows[0, 1] == 0 and rows[-1, 1] == 1


def test_auroc_orders_and_chance():
    assert cascade.auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert cascade.auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert cascade.auroc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == 0.5


PROMPTS = [torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(n))
           for n in (1, 3, 8, 15)]


def noisy_copy(model: Transformer, scale: float, seed: int = 0) -> Transformer:
    """The model with noise on its weights: a draft that agrees with it some of the time."""
    torch.manual_seed(seed)
    copy = Transformer(model.cfg).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(scale * p.std() * torch.randn_like(p))
    return copy


NOISY = noisy_copy(TARGET, 0.05)  # accepts about half its drafts


@pytest.mark.parametrize("k", range(1, 9))
def test_speculative_output_is_the_targets_greedy_output(k):
    stats = SpeculativeStats()
    for draft in (decisive_model(1), NOISY):
        for prompt in PROMPTS:
            want = generate(TARGET, prompt, 20)
            got = speculative_generate(TARGET, draft, prompt, 20, k=k, stats=stats)
            assert torch.equal(got, want)
    # the noisy draft is right part of the time: rounds that accept some drafts and not others
    assert 0 < stats.accepted < stats.drafted


def test_speculative_output_equals_transformers_assisted_generation():
    hf_target, hf_draft = to_hf(TARGET), to_hf(NOISY)
    hf_draft.generation_config.num_assistant_tokens = 4
    hf_draft.generation_config.num_assistant_tokens_schedule = "constant"
    for prompt in PROMPTS[1:3]:
        theirs = hf_target.generate(prompt, attention_mask=torch.ones_like(prompt),
                                    assistant_model=hf_draft, do_sample=False,
                                    max_new_tokens=20, eos_token_id=None, pad_token_id=0)
        assert torch.equal(speculative_generate(TARGET, NOISY, prompt, 20, k=4), theirs)


def test_a_draft_that_is_the_target_has_every_token_accepted():
    stats = SpeculativeStats()
    out = speculative_generate(TARGET, TARGET, PROMPTS[1], 30, k=4, stats=stats)
    assert torch.equal(out, generate(TARGET, PROMPTS[1], 30))
    assert stats.acceptance == 1.0 and stats.accepted == stats.drafted
    assert stats.rounds == 6  # 30 tokens, 5 per round: 4 drafted and accepted, 1 from the target


def test_a_random_draft_has_almost_none_accepted():
    torch.manual_seed(7)
    random_draft = Transformer(TARGET.cfg).eval()
    stats = SpeculativeStats()
    out = speculative_generate(TARGET, random_draft, PROMPTS[2], 40, k=4, stats=stats)
    assert torch.equal(out, generate(TARGET, PROMPTS[2], 40))
    assert stats.acceptance < 0.2 and stats.rounds >= 30


def test_a_cached_pass_can_be_repeated():
    run = cascade.cached_pass(TARGET, 20, 5)
    for _ in range(3):  # the cache holds 25 positions: a pass that was kept would overflow it
        run()


def test_expected_tokens_per_round_formula():
    assert cascade.expected_tokens_per_round(0.0, 4) == 1.0
    assert cascade.expected_tokens_per_round(1.0, 4) == 5.0
    assert np.isclose(cascade.expected_tokens_per_round(0.5, 2), 1 + 0.5 + 0.25)


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 0}, "k must be an integer >= 1"),
    ({"draft": Transformer(tiny_config(vocab_size=300))}, "share a vocabulary"),
    ({"max_new_tokens": 100}, "exceeds the models' context"),
    ({"prompt": torch.zeros(2, 3, dtype=torch.long)}, r"prompt must be \(1, length>=1\)"),
])
def test_bad_speculative_arguments_are_refused(kwargs, match):
    args = {"target": TARGET, "draft": decisive_model(1), "prompt": PROMPTS[0],
            "max_new_tokens": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        speculative_generate(**args)
