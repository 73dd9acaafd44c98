"""GQA conversion and configs, generation FLOPs, cache arithmetic for real models (labs 31-32)."""

import pytest
import torch
from conftest import tiny_config, tiny_model

from labsupport import cost, gqa, measure
from labsupport.model import Transformer, generate


def _with_identical_heads_in_groups(model, group):
    """Make the K and V heads within each group of `group` consecutive heads identical."""
    cfg = model.cfg
    with torch.no_grad():
        for layer in model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                w = proj.weight.view(cfg.n_kv_heads // group, group, cfg.head_dim, cfg.d_model)
                w.copy_(w[:, :1].expand_as(w))
    return model


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_mean_pooling_identical_heads_changes_no_logits(n_kv_heads):
    model = _with_identical_heads_in_groups(tiny_model(seed=3), 4 // n_kv_heads)
    converted = gqa.mean_pool_kv_heads(model, n_kv_heads)
    assert converted.cfg.n_kv_heads == n_kv_heads
    idx = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (converted(idx) - model(idx)).abs().max().item()
    assert diff < 1e-5, f"logits moved by {diff:.2e} although the merged heads were identical"


def test_mean_pooling_averages_each_group():
    model = tiny_model(seed=4)
    converted = gqa.mean_pool_kv_heads(model, 2)
    old = model.layers[1].self_attn.v_proj.weight.view(4, 16, 64)
    new = converted.layers[1].self_attn.v_proj.weight.view(2, 16, 64)
    assert torch.allclose(new[1], (old[2] + old[3]) / 2)
    assert torch.equal(converted.layers[1].self_attn.q_proj.weight,
                       model.layers[1].self_attn.q_proj.weight)
    changed = (gqa.mean_pool_kv_heads(model, 2)(torch.zeros(1, 4, dtype=torch.long))
               - model(torch.zeros(1, 4, dtype=torch.long))).abs().max()
    assert changed > 0  # distinct heads: the conversion is an approximation


def test_gqa_config_keeps_the_parameter_count():
    base = tiny_config(n_heads=8, n_kv_heads=8)
    for n_kv in (4, 2, 1):
        cfg = gqa.gqa_config(base, n_kv)
        assert cfg.n_kv_heads == n_kv and cfg.d_ff > base.d_ff
        ratio = cfg.num_params() / base.num_params()
        assert abs(ratio - 1) < 0.01, f"Hkv={n_kv}: {ratio:.4f} of the MHA parameter count"


@pytest.mark.parametrize("bad", [3, 0, 5, 2.0])
def test_group_counts_that_do_not_divide_the_heads_are_refused(bad):
    with pytest.raises(ValueError, match="n_kv_heads must divide n_heads"):
        gqa.gqa_config(tiny_config(), bad)
    with pytest.raises(ValueError, match="n_kv_heads must divide n_heads"):
        gqa.mean_pool_kv_heads(tiny_model(), bad)
    with pytest.raises(ValueError, match="can only merge heads"):
        gqa.mean_pool_kv_heads(tiny_model(n_kv_heads=1), 2)


def test_generation_flops_cached_grows_linearly_uncached_quadratically():
    cfg = tiny_config(max_seq_len=4096)
    cached = [measure.generation_flops(cfg, 1, n) for n in (256, 512)]
    uncached = [measure.generation_flops(cfg, 1, n, use_cache=False) for n in (256, 512)]
    assert 1.9 < cached[1] / cached[0] < 2.5  # linear parts double, attention quadruples
    assert 3.9 < uncached[1] / uncached[0] < 8.5
    one_step = measure.flops_per_token(cfg, 1)  # one position, output head included
    assert measure.generation_flops(cfg, 1, 1) == measure.generation_flops(cfg, 1, 1, False) \
        == one_step
    assert measure.generation_flops(cfg, 5, 0) == 0.0


def test_step_seconds_and_cache_continuation():
    model = tiny_model(seed=5)
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    times = []
    full = generate(model, prompt, 10, step_seconds=times)
    assert len(times) == 10 and all(t > 0 for t in times)
    cache = model.new_cache(1, 30)
    first = generate(model, prompt, 4, cache=cache)  # the cache now holds 6 + 3 tokens
    assert cache.length == 9
    rest = generate(model, first[:, -1:], 6, cache=cache)
    assert torch.equal(torch.cat([first, rest[:, 1:]], dim=1), full)
    with pytest.raises(ValueError, match="use_cache=False"):
        generate(model, prompt, 2, use_cache=False, cache=cache)


def test_real_architectures_have_their_published_sizes():
    expected = {"Llama-2-7B": 6.74e9, "Llama-2-13B": 13.0e9, "Llama-2-70B": 69.0e9,
                "Llama-3.1-8B": 8.03e9}
    for name, n in expected.items():
        assert cost.MODELS[name].num_params(non_embedding=False) == pytest.approx(n, rel=0.01)
    assert cost.MODELS["Llama-2-7B"].kv_bytes_per_token(2) == 524288  # 0.5 MiB
    assert cost.MODELS["Llama-2-70B"].kv_bytes_per_token(2) == 327680
    gpus, seqs = cost.sequences_per_gpu(cost.MODELS["Llama-2-7B"], 4096)
    assert gpus == 1 and seqs == int((80e9 - 6.738415616e9 * 2) // (524288 * 4096))
    assert cost.sequences_per_gpu(cost.MODELS["Llama-2-70B"], 4096)[0] == 2
    with pytest.raises(ValueError):
        cost.sequences_per_gpu(cost.MODELS["Llama-2-7B"], 0)


def test_converted_model_is_a_plain_transformer_on_the_same_device():
    converted = gqa.mean_pool_kv_heads(tiny_model(seed=6), 1)
    assert isinstance(converted, Transformer)
    assert converted.layers[0].self_attn.k_proj.weight.shape == (16, 64)


def test_generation_flops_counts_exactly_the_positions_generate_runs():
    cfg = tiny_config()
    f = [measure.flops_per_token(cfg, i, head=False) for i in range(0, 8)]
    head = 2 * cfg.vocab_size * cfg.d_model  # run once per call, at its last position
    assert measure.flops_per_token(cfg, 3) == f[3] + head
    # prompt of 2, 3 new tokens: cached runs positions 1-2 (prefill) then 3 and 4;
    # uncached runs 1-2, then 1-3, then 1-4. Each of the three calls runs the head once.
    assert measure.generation_flops(cfg, 2, 3) == f[1] + f[2] + f[3] + f[4] + 3 * head
    assert measure.generation_flops(cfg, 2, 3, use_cache=False) == \
        (f[1] + f[2]) + (f[1] + f[2] + f[3]) + (f[1] + f[2] + f[3] + f[4]) + 3 * head


def test_generate_runs_the_output_head_at_one_position_per_call():
    model = tiny_model(seed=8)
    rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    generate(model, prompt, 4)
    generate(model, prompt, 4, use_cache=False)
    assert rows == [1] * 8  # what generation_flops counts: the head once per call


def test_mean_pooling_from_an_already_grouped_model():
    model = tiny_model(seed=7, n_heads=8, n_kv_heads=4, d_model=64)
    model = _with_identical_heads_in_groups(model, 2)  # pairs of K/V heads made identical
    converted = gqa.mean_pool_kv_heads(model, 2)
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (converted(idx) - model(idx)).abs().max() < 1e-5


def test_gqa_config_from_a_grouped_base():
    base = tiny_config(n_heads=8, n_kv_heads=4)
    mqa = gqa.gqa_config(base, 1)
    assert mqa.n_kv_heads == 1 and abs(mqa.num_params() / base.num_params() - 1) < 0.01
    assert gqa.gqa_config(base, 2, match_params=False).d_ff == base.d_ff


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_gqa_equals_mha_with_each_kv_head_repeated(n_kv_heads):
    """Grouped-query attention is multi-head attention whose K/V heads are shared by a group:
    repeating each K/V head `group` times in an MHA model must give the same logits and the
    same cached generation."""
    grouped = Transformer(tiny_config(n_kv_heads=n_kv_heads)).eval()
    cfg, group = grouped.cfg, grouped.cfg.n_heads // n_kv_heads
    mha = Transformer(tiny_config(n_kv_heads=cfg.n_heads)).eval()
    state = grouped.state_dict()
    for name, w in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = w.view(n_kv_heads, cfg.head_dim, cfg.d_model)
            state[name] = heads.repeat_interleave(group, dim=0).reshape(-1, cfg.d_model)
    mha.load_state_dict(state)
    idx = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (mha(idx) - grouped(idx)).abs().max().item() < 1e-5
    assert torch.equal(generate(mha, idx[:, :8], 12), generate(grouped, idx[:, :8], 12))
