"""The course model against Hugging Face Llama, and its cache and generation contracts."""

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from labsupport.model import KVCache, ModelConfig, Transformer, from_hf, generate, to_hf

ATTENTION_VARIANTS = {"MHA": 4, "GQA": 2, "MQA": 1}


@pytest.mark.parametrize("n_kv_heads", ATTENTION_VARIANTS.values(), ids=ATTENTION_VARIANTS)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_to_hf_logits_match_llama(n_kv_heads, tie):
    model = tiny_model(n_kv_heads=n_kv_heads, tie_embeddings=tie, rope_theta=5e4)
    hf = to_hf(model)
    idx = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-4, f"to_hf logits differ from LlamaForCausalLM by {diff:.2e} (fp32)"


def test_from_hf_round_trip_is_exact():
    model = tiny_model(n_kv_heads=2)
    back = from_hf(to_hf(model))
    assert back.cfg == model.cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_from_hf_takes_a_foreign_checkpoint_as_it_comes():
    """A Llama checkpoint with its own eps, RoPE base, tied head and GQA converts faithfully."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                      max_position_embeddings=80, rms_norm_eps=1e-6,
                      rope_theta=500000.0,  # transformers 5 files it under rope_parameters
                      tie_word_embeddings=True)
    hf = LlamaForCausalLM(cfg).eval()
    ours = from_hf(hf)
    assert ours.cfg.rope_theta == 500000.0 and ours.cfg.norm_eps == 1e-6
    assert ours.cfg.tie_embeddings and ours.lm_head.weight is ours.embed_tokens.weight
    idx = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4, f"from_hf logits differ by {diff:.2e}"


def test_from_hf_refuses_scaled_rope():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4,
                      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_type"):
        from_hf(LlamaForCausalLM(cfg))


@pytest.mark.parametrize("n_kv_heads", ATTENTION_VARIANTS.values(), ids=ATTENTION_VARIANTS)
def test_cached_generation_is_token_identical_to_uncached_and_to_transformers(n_kv_heads):
    model = tiny_model(n_kv_heads=n_kv_heads)
    prompt = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(2))
    cached = generate(model, prompt, 40, use_cache=True)
    uncached = generate(model, prompt, 40, use_cache=False)
    assert torch.equal(cached, uncached)
    hf_out = to_hf(model).generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False,
                                   attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert torch.equal(cached, hf_out)


def test_cached_logits_match_full_forward_at_every_position():
    model = tiny_model(n_kv_heads=2)
    idx = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2)
        parts = [model(idx[:, :11], cache=cache), model(idx[:, 11:12], cache=cache),
                 model(idx[:, 12:], cache=cache)]  # prefill, one decode step, a multi-token chunk
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_prefix_reuse_after_crop_matches_recomputation():
    model = tiny_model()
    turn1, turn2 = torch.randint(0, 256, (1, 20)), torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        cache = model.new_cache(1)
        model(turn1, cache=cache)
        model(torch.randint(0, 256, (1, 5)), cache=cache)  # a reply we then discard
        cache.crop(20)
        reused = model(turn2, cache=cache)
        fresh = model(torch.cat([turn1, turn2], dim=1))[:, 20:]
    assert torch.allclose(reused, fresh, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_equals_a_filled_cache(dtype):
    cfg = tiny_config(n_kv_heads=2)
    model = Transformer(cfg).to(dtype)
    cache = model.new_cache(batch=3)
    with torch.no_grad():
        model(torch.randint(0, 256, (3, cfg.max_seq_len)), cache=cache)
    assert cache.length == cfg.max_seq_len
    elem = torch.tensor([], dtype=dtype).element_size()
    assert cache.nbytes == cfg.kv_cache_bytes(3, cfg.max_seq_len, elem)
    assert cfg.kv_bytes_per_token(2) == 2 * 2 * 2 * 16 * 2  # K and V x layers x Hkv x D x bytes


@pytest.mark.parametrize("tie", [False, True])
def test_num_params_counts_what_the_module_holds(tie):
    model = tiny_model(n_kv_heads=1, tie_embeddings=tie)
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert model.cfg.num_params(non_embedding=False) == sum(unique.values())
    emb = model.cfg.vocab_size * model.cfg.d_model * (1 if tie else 2)
    assert model.cfg.num_params(non_embedding=True) == sum(unique.values()) - emb


def test_sampling_is_seeded_and_temperature_zero_is_greedy():
    model = tiny_model()
    prompt = torch.zeros(2, 3, dtype=torch.long)
    a = generate(model, prompt, 12, temperature=1.0, top_k=20, seed=7)
    b = generate(model, prompt, 12, temperature=1.0, top_k=20, seed=7)
    assert torch.equal(a, b)
    greedy = generate(model, prompt, 12, temperature=0.0)
    assert torch.equal(greedy, generate(model, prompt, 12, temperature=0.0, seed=99))


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_heads=4, n_kv_heads=3), "divisible by n_kv_heads"),
    (dict(d_model=60, n_heads=8), "divisible by n_heads"),
    (dict(d_model=36, n_heads=4), "even for RoPE"),
    (dict(n_layers=0), "n_layers must be a positive int"),
])
def test_bad_config_is_refused_with_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kwargs)


def test_bad_generation_requests_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="prompt must be"):
        generate(model, torch.zeros(5, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 3, temperature=-1.0)
    with pytest.raises(ValueError, match="KV cache full"):
        cache = KVCache(model.cfg, batch=1, max_len=4)
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_default_config_is_mha():
    assert ModelConfig(n_heads=4).n_kv_heads == 4


def test_logits_to_keep_returns_the_last_positions_of_the_full_forward():
    model = tiny_model(seed=11)
    idx = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(idx)
        assert torch.allclose(model(idx, logits_to_keep=1), full[:, -1:], atol=1e-6)
        assert torch.allclose(model(idx, logits_to_keep=3), full[:, -3:], atol=1e-6)
        assert model(idx, logits_to_keep=0).shape == (2, 9, 256)
    for bad in (-1, 1.5, "1"):
        with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
            model(idx, logits_to_keep=bad)


def test_generated_ids_can_be_trained_on():
    model = tiny_model(seed=12)
    prompt = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(5))
    ids = generate(model, prompt, 12, temperature=1.0, seed=0)
    assert not ids.is_inference()
    before = model.lm_head.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(model.lm_head.weight, before)


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_rope_tables_stay_fp32_through_a_cast_round_trip(cast):
    model = tiny_model(seed=13)
    exact_cos, exact_sin = model.rope_cos.clone(), model.rope_sin.clone()
    low = getattr(model, cast)()
    assert low.rope_cos.dtype == torch.float32 and low.norm.weight.dtype != torch.float32
    back = low.float()
    assert torch.equal(back.rope_cos, exact_cos) and torch.equal(back.rope_sin, exact_sin)
    # the round-tripped model computes exactly what a fresh fp32 model with its weights does
    fresh = Transformer(back.cfg).eval()
    fresh.load_state_dict(back.state_dict())  # the tables are not in the state dict
    idx = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(back(idx), fresh(idx))


def test_bf16_cached_decoding_agrees_with_uncached():
    # forward casts the tables to the compute dtype, so this checks bf16 decoding as a whole;
    # the fp32 tables themselves are checked by the round trip above.
    model = tiny_model(seed=14, max_seq_len=128)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # sharp logits, as a trained model has, so argmax is stable
    model = model.to(torch.bfloat16)
    prompt = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(6))
    cached = generate(model, prompt, 100)
    uncached = generate(model, prompt, 100, use_cache=False)
    # bf16 matmuls round differently for one row (a cached step) and for many (a full forward),
    # and differently on CPUs with and without AVX-512 BF16; so greedy decoding may part, but
    # only where the two best logits are within that rounding of each other
    parted = (cached != uncached).any(dim=0).nonzero()
    if len(parted):
        at = int(parted[0])
        with torch.no_grad():
            logits = model(uncached[:, :at])[:, -1].float()  # the uncached choice of token `at`
        best_two = logits.topk(2).values
        gap = (best_two[:, 0] - best_two[:, 1])[cached[:, at] != uncached[:, at]]
        assert (gap / logits.std() < 0.05).all(), f"parted at token {at} without a near-tie"
    # teacher-forced: every cached step's logits against the full bf16 forward at that position
    cache = model.new_cache(2)
    with torch.no_grad():
        steps = [model(prompt, cache=cache)[:, -1]]
        steps += [model(cached[:, i:i + 1], cache=cache)[:, -1] for i in range(8, 107)]
        full = model(cached[:, :107])[:, 7:].float()
    step_logits = torch.stack(steps, dim=1).float()
    assert ((step_logits - full).abs().max() / full.std()) < 0.05
