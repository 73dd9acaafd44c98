"""Fine-tuning runs (lab 11): what each method trains, its memory, its cached results."""

import copy

import pytest
import torch
from conftest import TINY_ZOO, tiny_model

from labsupport import cost, data, finetune, lora, measure, quant, zoo
from labsupport.finetune import ATTENTION, MLP, FineTune
from labsupport.train import TrainConfig

TINY = TINY_ZOO
FT_TRAIN = TrainConfig(steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1,
                       eval_every=6, eval_batches=1)


def test_split_by_file_cuts_between_files_near_the_fraction():
    ids = torch.tensor([5, 6, 0, 7, 8, 9, 0, 1, 0, 2, 3, 0])  # four files, each closed by 0
    train, val = data.split_by_file(ids, 0.3)
    assert train[-1] == 0 and torch.equal(torch.cat([train, val]), ids)
    assert val.numel() == 5  # the boundary after token 7, nearest 70% of 12
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_by_file(ids, 1.0)
    with pytest.raises(ValueError, match="single file"):
        data.split_by_file(torch.tensor([4, 5, 6, 0]), 0.5)


def test_each_method_trains_exactly_its_weights():
    model = tiny_model()
    n = sum(p.numel() for p in model.parameters())
    full = finetune.prepare(model, FineTune("full"))
    assert finetune.trainable_parameters(full) == n
    last = finetune.prepare(model, FineTune("last_block"))
    expected = sum(p.numel() for part in (model.layers[-1], model.norm, model.lm_head)
                   for p in part.parameters())
    assert finetune.trainable_parameters(last) == expected
    for targets in (ATTENTION, ATTENTION + MLP):
        adapted = finetune.prepare(model, FineTune("lora", r=4, targets=targets))
        assert finetune.trainable_parameters(adapted) == lora.lora_param_count(
            model.cfg, 4, targets)
    # prepare works on a copy: the model itself is untouched
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())


def test_qlora_base_stores_blocks_in_int4_and_keeps_the_ends_in_16_bits():
    model = finetune.prepare(tiny_model(), FineTune("lora", r=4, base_bits=4, group_size=32))
    bases = [m.base for m in lora.lora_layers(model).values()]
    assert bases and all(isinstance(b, quant.QuantizedLinear) and b.bits == 4 for b in bases)
    assert isinstance(model.lm_head, quant.HalfLinear)
    assert finetune.trainable_parameters(model) == lora.lora_param_count(
        model.cfg, 4, ATTENTION + MLP)


def test_labels_name_the_method():
    assert FineTune("full").label == "full"
    assert FineTune("lora", r=4, targets=ATTENTION).label == "LoRA r4 attn"
    assert FineTune("lora", r=16, base_bits=4).label == "QLoRA int4 r16 attn+MLP"
    assert FineTune("lora", r=2, targets=ATTENTION + MLP + ("lm_head",)).label == \
        "LoRA r2 attn+MLP+head"


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "prefix"}, "method must be one of"),
    ({"method": "full", "base_bits": 4}, "base_bits needs method='lora'"),
    ({"base_bits": 3}, "base_bits must be None, 4 or 8"),
    ({"r": 0}, "r must be a positive int"),
])
def test_bad_fine_tunes_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FineTune(**kwargs)


def test_frozen_quantized_layer_saves_no_float_weight_for_backward():
    qt = quant.quantize_rtn(torch.randn(48, 32, generator=torch.Generator().manual_seed(0)), 4, 32)
    layer = quant.QuantizedLinear(qt)
    x = torch.randn(5, 32, requires_grad=True)
    saved, out = measure.saved_activation_bytes(lambda: layer(x), layer)
    assert saved == 0  # a plain F.linear with the dequantized weight would keep 48 x 32 floats
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, 48) @ qt.dequantize(), rtol=1e-6,
                               atol=1e-6)


def test_training_memory_separates_what_lora_removes_from_what_it_keeps():
    model = tiny_model()
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    full = finetune.training_memory(finetune.prepare(model, FineTune("full")), x, y)
    adapted = finetune.prepare(model, FineTune("lora", r=4))
    small = finetune.training_memory(adapted, x, y)
    n = sum(p.numel() for p in model.parameters())
    assert full["gradients"] == 4 * n and full["optimizer"] == 8 * n  # fp32 AdamW: m and v
    assert small["gradients"] == 4 * finetune.trainable_parameters(adapted)
    assert small["optimizer"] == 2 * small["gradients"]
    for m in (full, small):  # the peak holds weights, optimizer state and the activations
        assert m["peak"] >= m["weights"] + m["optimizer"] + m["activations"]
    assert small["activations"] > 0.8 * full["activations"]  # LoRA keeps the activations
    assert small["peak"] < full["peak"]


def test_tensor_peak_bytes_follows_allocations_and_frees():
    kept = []

    def fn():
        a = torch.ones(1000)
        b = torch.ones(2000)
        b.add_(1)  # in place: no new memory
        del a
        c = torch.ones(500)
        kept.append(b)
        return c.sum()

    peak, live = measure.tensor_peak_bytes(fn)
    assert peak == 4 * 3000  # a and b at once; c came after a was freed
    assert live == 4 * 2000  # b, kept; c and the result were freed


def test_saved_activation_bytes_counts_inputs_only_where_a_weight_trains():
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    saved, _ = measure.saved_activation_bytes(lambda: layer(x), layer)
    assert saved == 4 * 16 * 4  # x, for the weight's gradient
    layer.requires_grad_(False)
    saved, _ = measure.saved_activation_bytes(lambda: layer(x), layer)
    assert saved == 0


def test_run_trains_caches_and_ships_an_adapter(tmp_path):
    spec = finetune.Run(FineTune("lora", r=4), FT_TRAIN, base=TINY, eval_batches=2)
    first = finetune.run(spec)
    assert first["trainable"] == lora.lora_param_count(TINY.model, 4, ATTENTION + MLP)
    assert first == finetune.run(spec)  # read back from the cache, not retrained
    base = zoo.load_spec(TINY, label="model", progress=False)
    reloaded = lora.load_lora(finetune.prepare(base, spec.tune), first["saved_path"])
    _, val = finetune.new_domain(spec.val_fraction, TINY.vocab_size)
    loss = finetune.evaluate_loss(reloaded, val, FT_TRAIN.seq_len, FT_TRAIN.batch_size, 2)
    assert loss == pytest.approx(first["new_domain_loss"], abs=1e-5)


def test_run_all_in_workers_equals_run_in_process():
    specs = [finetune.Run(FineTune("last_block"), FT_TRAIN, base=TINY, eval_batches=2),
             finetune.Run(FineTune("full"), FT_TRAIN, base=TINY, eval_batches=2)]
    results = finetune.run_all(specs, workers=2, progress=False)
    assert [r["label"] for r in results] == ["last block + head", "full"]
    assert results[1]["trainable"] > results[0]["trainable"]
    fresh = copy.deepcopy(specs[0])
    assert finetune.run(fresh) == results[0]
    with pytest.raises(ValueError, match="workers"):
        finetune.run_all(specs, workers=0)


def test_finetune_memory_at_scale_counts_bytes_per_parameter():
    cfg = cost.MODELS["Llama-2-7B"]
    n = cfg.num_params(non_embedding=False)
    adapters = lora.lora_param_count(cfg, 16, ATTENTION + MLP)
    full = cost.finetune_memory(cfg, "full")
    lo = cost.finetune_memory(cfg, "lora", adapters)
    q = cost.finetune_memory(cfg, "qlora", adapters)
    states = ("weights", "gradients", "optimizer")
    assert sum(full[k] for k in states) == 16 * n  # mixed-precision AdamW
    assert sum(lo[k] for k in states) == 2 * n + 16 * adapters
    assert full["total"] == sum(full[k] for k in (*states, "activations"))
    assert q["weights"] < 0.3 * lo["weights"] and q["activations"] > lo["activations"]
    assert full["total"] > 6 * lo["total"]
    assert cost.finetune_flops_per_token(n, "full") == 8 * n
    assert cost.finetune_flops_per_token(n, "lora", checkpointing=False) == 4 * n
    with pytest.raises(ValueError, match="needs adapter_params"):
        cost.finetune_memory(cfg, "lora")
    with pytest.raises(ValueError, match="method must be one of"):
        cost.finetune_memory(cfg, "prefix")
