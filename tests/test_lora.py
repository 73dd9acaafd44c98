"""LoRA: a fresh adapter changes nothing, merging changes nothing, PEFT computes the same."""

import copy

import pytest
import torch
from conftest import tiny_model

from labsupport import lora, quant
from labsupport.model import to_hf
from labsupport.train import TrainConfig, lm_loss, train

IDX = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _randomise_b(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=gen))
    return model


def test_a_fresh_adapter_changes_no_output():
    model = tiny_model(seed=1)
    with torch.no_grad():
        ref = model(IDX)
        adapted = lora.apply_lora(copy.deepcopy(model), r=4, alpha=8)
        assert torch.equal(adapted(IDX), ref)
    layer = adapted.layers[0].self_attn.q_proj
    assert layer.lora_A.shape == (4, 64) and layer.lora_B.shape == (64, 4)
    assert layer.lora_A.abs().max() > 0 and layer.scaling == 2.0


def test_only_the_adapters_train():
    model = lora.apply_lora(tiny_model(seed=2), r=2, alpha=4, targets=("q_proj", "v_proj",
                                                                      "down_proj"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith(("lora_A",
                                                                               "lora_B"))}
    assert len(lora.lora_parameters(model)) == 2 * 3 * model.cfg.n_layers
    x, y = IDX[:, :-1], IDX[:, 1:]
    lm_loss(model, x, y).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.endswith(("lora_A", "lora_B")), name
    # B starts at zero, so A's first gradient is zero and B's is not
    assert model.layers[0].self_attn.q_proj.lora_B.grad.abs().max() > 0


def test_merged_equals_unmerged_and_puts_plain_layers_back():
    model = _randomise_b(lora.apply_lora(tiny_model(seed=3), r=4, alpha=16,
                                         targets=("q_proj", "v_proj", "gate_proj")))
    with torch.no_grad():
        before = model(IDX)
        lora.merge_lora(model)
        after = model(IDX)
    assert not lora.lora_layers(model)
    assert type(model.layers[0].mlp.gate_proj) is torch.nn.Linear
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_peft_computes_the_same_logits_and_adapter_gradients():
    peft = pytest.importorskip("peft")
    base = tiny_model(seed=4)
    ours = _randomise_b(lora.apply_lora(copy.deepcopy(base), r=4, alpha=8))
    theirs = peft.get_peft_model(to_hf(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    pairs = lora.copy_adapters_to_peft(ours, theirs)
    assert len(pairs) == 2 * len(lora.lora_layers(ours))
    probe = torch.randn(2, 24, 256, generator=torch.Generator().manual_seed(5))
    logits_ours = ours(IDX)
    logits_theirs = theirs(input_ids=IDX).logits
    rel = ((logits_ours - logits_theirs).norm() / logits_theirs.norm()).item()
    assert rel <= 1e-5, rel
    (logits_ours * probe).sum().backward()
    (logits_theirs * probe).sum().backward()
    for a, b in pairs:
        assert ((a.grad - b.grad).norm() / b.grad.norm()).item() <= 1e-5


def test_save_and_load_round_trip(tmp_path):
    model = _randomise_b(lora.apply_lora(tiny_model(seed=5), r=8, alpha=8,
                                         targets=("q_proj", "k_proj", "v_proj", "o_proj")))
    path = tmp_path / "adapter.safetensors"
    nbytes = lora.save_lora(model, path)
    adapter_numbers = sum(p.numel() for p in lora.lora_parameters(model))
    assert 4 * adapter_numbers <= nbytes <= 4 * adapter_numbers + 8192  # the adapter alone
    fresh = lora.load_lora(tiny_model(seed=5), path)  # applies LoRA from the file's settings
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDX), model(IDX), rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not match"):
        lora.load_lora(lora.apply_lora(tiny_model(), r=8, alpha=8), path)


def test_lora_on_a_quantized_base_trains_and_leaves_the_base_alone():
    torch.manual_seed(0)
    base = quant.quantize_model(tiny_model(seed=6), 4, 32, skip=("embed_tokens", "lm_head"))
    model = lora.apply_lora(base, r=4, alpha=8, targets=("q_proj", "v_proj", "up_proj"))
    codes = model.layers[0].self_attn.q_proj.base.packed.clone()
    opt = torch.optim.AdamW(lora.lora_parameters(model), lr=1e-2)
    x, y = IDX[:, :-1], IDX[:, 1:]
    losses = []
    for _ in range(20):
        loss = lm_loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert torch.equal(model.layers[0].self_attn.q_proj.base.packed, codes)
    with torch.no_grad():  # merging dequantizes the base into an fp32 Linear
        before = model(IDX)
        after = lora.merge_lora(model)(IDX)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    ({"r": 0, "alpha": 8}, "r must be"),
    ({"r": 4, "alpha": 0}, "alpha must be"),
    ({"r": 4, "alpha": 8, "dropout": 1.0}, "dropout"),
    ({"r": 4, "alpha": 8, "targets": ("query",)}, r"match no Linear.*'q_proj'"),
])
def test_bad_input_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora.apply_lora(tiny_model(), **kwargs)


def test_applying_lora_twice_to_a_layer_is_refused():
    model = lora.apply_lora(tiny_model(), r=4, alpha=8)
    with pytest.raises(ValueError, match="already applied"):
        lora.apply_lora(model, r=4, alpha=8, targets=("v_proj",))
    with pytest.raises(ValueError, match="already carries"):
        lora.LoRALinear(model.layers[0].self_attn.q_proj, r=2, alpha=2)


def test_the_course_training_loop_trains_only_the_adapters():
    model = lora.apply_lora(tiny_model(seed=7), r=4, alpha=8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tokens = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=5, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=1, eval_every=5,
                      eval_batches=1)
    train(model, tokens, tokens, cfg, progress=False)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} changed but is frozen"
    assert model.layers[0].self_attn.q_proj.lora_B.abs().max() > 0, "the adapters must train"


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("k_proj", "o_proj", "down_proj"),
                                     ("gate_proj", "up_proj", "lm_head")])
def test_the_adapter_count_from_the_shape_equals_the_built_adapters(targets):
    model = tiny_model(n_kv_heads=2)  # GQA: k and v are narrower than q
    built = sum(p.numel() for p in lora.lora_parameters(lora.apply_lora(model, 3, 6, targets)))
    assert lora.lora_param_count(model.cfg, 3, targets) == built
    with pytest.raises(ValueError, match="not Linear layers"):
        lora.lora_param_count(model.cfg, 3, ("wq",))
