"""The zoo: cached, keyed, locked, and rebuilt when damaged."""

import dataclasses
import multiprocessing as mp
import os

import pytest
import torch
from conftest import TINY_ZOO

from labsupport import zoo
from labsupport.runtime import PROFILES
from labsupport.train import TrainConfig

TINY = TINY_ZOO


def _load_in_child(label, queue):
    model = zoo.load_spec(TINY, label=label, progress=False)
    weights = torch.cat([p.flatten() for p in model.parameters()])
    queue.put((model.zoo_info["trained_by_pid"], weights.sum().item()))


def test_first_load_trains_and_later_loads_read_the_cache():
    first = zoo.load_spec(TINY, label="cached", progress=False)
    again = zoo.load_spec(TINY, label="cached", progress=False)
    assert first.zoo_info["path"] == again.zoo_info["path"]
    assert first.zoo_info["trained_by_pid"] == again.zoo_info["trained_by_pid"]
    for a, b in zip(first.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_changed_recipe_gets_a_new_key():
    other = zoo.ZooSpec(TINY.model, TrainConfig(**{**TINY.train.to_dict(), "steps": 5}),
                        TINY.vocab_size)
    assert other.key() != TINY.key()


def test_corrupted_checkpoint_is_detected_and_retrained():
    model = zoo.load_spec(TINY, label="corrupt", progress=False)
    path = model.zoo_info["path"]
    with open(path, "r+b") as f:
        f.seek(-64, 2)
        f.write(b"\x00" * 64)
    with pytest.warns(UserWarning, match="rebuilding zoo model"):
        again = zoo.load_spec(TINY, label="corrupt", progress=False)
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)  # training is seeded, so the rebuild is the same model


def test_truncated_checkpoint_is_detected_and_retrained():
    model = zoo.load_spec(TINY, label="truncated", progress=False)
    with open(model.zoo_info["path"], "r+b") as f:
        f.truncate(100)
    with pytest.warns(UserWarning, match="unreadable"):
        zoo.load_spec(TINY, label="truncated", progress=False)


def test_two_concurrent_loads_train_once_and_agree():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=("concurrent", queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (pid_a, sum_a), (pid_b, sum_b) = results
    assert pid_a == pid_b, "both processes trained: the file lock did not serialise them"
    assert sum_a == sum_b


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError,
                       match=r"unknown zoo model 'huge'; available: \['large', 'small'\]"):
        zoo.load("huge")


@pytest.mark.parametrize("profile_name", PROFILES)
@pytest.mark.parametrize("name", zoo.names())
def test_every_profile_has_a_valid_recipe(name, profile_name):
    s = zoo.spec(name, profile_name)
    assert s.train.seq_len <= s.model.max_seq_len
    assert s.model.vocab_size == s.vocab_size
    with pytest.raises(ValueError, match="unknown profile"):
        zoo.spec(name, "laptop")


@pytest.mark.parametrize("profile_name", PROFILES)
def test_large_is_about_four_times_small_and_sees_more_tokens(profile_name):
    small, large = zoo.spec("small", profile_name), zoo.spec("large", profile_name)
    ratio = (large.model.num_params(non_embedding=True)
             / small.model.num_params(non_embedding=True))
    assert 3.5 <= ratio <= 4.5, ratio
    assert (large.train.steps * large.train.tokens_per_step
            > small.train.steps * small.train.tokens_per_step)



def test_load_specs_trains_the_missing_in_parallel_and_equals_load_spec():
    specs = {f"parallel-{seed}": dataclasses.replace(
        TINY, train=dataclasses.replace(TINY.train, seed=seed)) for seed in (0, 1)}
    models = zoo.load_specs(specs, workers=2, progress=False)
    assert all(m.zoo_info["trained_by_pid"] != os.getpid() for m in models.values())
    for label, s in specs.items():  # a plain load reads the files the workers wrote
        again = zoo.load_spec(s, label, progress=False)
        assert again.zoo_info["trained_by_pid"] == models[label].zoo_info["trained_by_pid"]
        for a, b in zip(models[label].parameters(), again.parameters(), strict=True):
            assert torch.equal(a, b)
    a, b = (m.lm_head.weight for m in models.values())
    assert not torch.equal(a, b), "different seeds must give different models"
    with pytest.raises(ValueError, match="workers"):
        zoo.load_specs(specs, workers=0)
