"""Corpus, tokenizer and training loop."""

import pytest
import torch
from conftest import tiny_config, tiny_model

from labsupport import data
from labsupport.runtime import cache_dir
from labsupport.train import TrainConfig, batch_losses, evaluate_loss, lr_at, train

VOCAB = 512  # small vocabulary: the tokenizer trains in a second or two


def test_splits_are_disjoint_and_hold_out_whole_packages():
    files = data.corpus_files()
    sets = {s: set(files[s]) for s in data.SPLITS}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["new_domain"]
    root = data.stdlib_root()
    held = {p.relative_to(root).parts[0] for p in files["new_domain"]}
    assert held == set(data.HELD_OUT_PACKAGES)
    assert all(p.relative_to(root).parts[0] not in held for p in files["train"] + files["val"])
    assert not any("test" in p.relative_to(root).parts[:-1] for s in sets.values() for p in s)


def test_tokenizer_round_trips_source_text():
    tok = data.tokenizer(VOCAB)
    text = data.read_texts("val")[0][:2000]
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.get_vocab_size() == VOCAB and tok.token_to_id(data.EOT) == 0


def test_token_cache_is_rebuilt_when_corrupted():
    ids = data.tokens("val", VOCAB)
    assert ids.dtype == torch.long and 0 < int(ids.max()) < VOCAB
    [path] = (cache_dir() / "data").glob(f"tokens-val-v{VOCAB}-*.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF  # flip one byte inside the token data
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        again = data.tokens("val", VOCAB)
    assert torch.equal(ids, again)


@pytest.mark.parametrize("damage", [lambda raw: raw[:1000],  # a truncated JSON file
                                    lambda raw: raw[:50] + b"\xff\xfe" + raw[52:]])  # bad UTF-8
def test_corrupt_tokenizer_is_reported_and_rebuilt(damage):
    tok = data.tokenizer(VOCAB)
    [path] = (cache_dir() / "data").glob(f"bpe-v{VOCAB}-*.json")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.warns(UserWarning, match="rebuilding tokenizer.*unreadable"):
        again = data.tokenizer(VOCAB)
    assert again.to_str() == tok.to_str()


def test_token_and_zoo_keys_include_the_tokenizer_hash(monkeypatch):
    from labsupport import zoo

    data.tokens("val", VOCAB)
    fingerprint = data.tokenizer_fingerprint(VOCAB)
    assert list((cache_dir() / "data").glob(f"tokens-val-v{VOCAB}-*-{fingerprint}.safetensors"))
    key = zoo.spec("small").key()
    monkeypatch.setattr(data, "tokenizer_fingerprint", lambda vocab_size=4096: "another")
    assert zoo.spec("small").key() != key


def test_get_batch_targets_are_inputs_shifted_by_one():
    stream = torch.arange(1000)
    x, y = data.get_batch(stream, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        data.get_batch(torch.arange(10), 1, 16)


@pytest.mark.parametrize("call, match", [
    (lambda: data.tokens("test"), "split must be one of"),
    (lambda: data.tokenizer(100), "vocab_size must be in"),
])
def test_bad_data_requests_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    stream = torch.randint(0, 256, (64,)).repeat(200)  # a memorisable repeating text
    model = tiny_model()
    before = evaluate_loss(model, stream, seq_len=32, n_batches=4)
    cfg = TrainConfig(steps=60, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=5,
                      eval_every=30, eval_batches=4)
    model, history = train(model, stream, stream, cfg, progress=False)
    assert [h["step"] for h in history] == [30, 60]
    assert history[-1]["val_loss"] < 0.5 * before, (before, history)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)


def test_evaluate_loss_is_the_mean_of_batch_losses():
    data = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0))
    model = tiny_model(seed=1)
    losses = batch_losses(model, data, 32, batch_size=4, n_batches=5)
    assert len(losses) == 5 and len(set(losses)) > 1
    assert evaluate_loss(model, data, 32, batch_size=4, n_batches=5) == pytest.approx(
        sum(losses) / 5)


def test_run_flops_is_three_forward_passes_per_training_token():
    from labsupport import measure
    from labsupport.train import run_flops

    cfg = tiny_config()
    tc = TrainConfig(steps=10, batch_size=4, seq_len=32)
    per_token = measure.flops_per_token(cfg, 16.5, training=True)
    assert per_token == 3 * measure.flops_per_token(cfg, 16.5)
    assert run_flops(cfg, tc) == per_token * 10 * 4 * 32
