"""Shared fixtures: a private cache folder per test session, tiny seeded model configs."""

import os

# Pin the profile so that the suite computes the same thing on a GPU machine as here: without
# this, CUDA would make the default profile `gpu` and move every measurement to the GPU.
os.environ["LABS_PROFILE"] = "smoke"

import pytest
import torch

from labsupport.model import ModelConfig, Transformer
from labsupport.train import TrainConfig
from labsupport.zoo import ZooSpec


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Point LABS_CACHE at an empty folder so tests never touch (or trust) a user's cache."""
    path = tmp_path_factory.mktemp("labs-cache")
    old = os.environ.get("LABS_CACHE")
    os.environ["LABS_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LABS_CACHE", None)
    else:
        os.environ["LABS_CACHE"] = old


def tiny_config(**overrides) -> ModelConfig:
    """2 layers, width 64, vocab 256: small enough that every test runs in milliseconds."""
    base = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=160,
                max_seq_len=64)
    base.update(overrides)
    return ModelConfig(**base)


# A zoo recipe small enough to train in a second: for the tests of the zoo and of fine-tuning runs.
TINY_ZOO = ZooSpec(
    model=ModelConfig(vocab_size=512, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                      max_seq_len=32),
    train=TrainConfig(steps=4, batch_size=4, seq_len=32, warmup_steps=1, eval_every=4,
                      eval_batches=1),
    vocab_size=512,
)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides)).eval()
