"""Quantization: RTN error bounds, exact storage, GPTQ against RTN, torch's int8, the kernels."""

import copy
import math
import warnings

import pytest
import torch
from conftest import tiny_model

from labsupport import measure, quant
from labsupport.model import generate


def _weight(rows=48, cols=128, seed=0, scale=1.0):
    return scale * torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _group_scales(qt):
    return qt.scales.float().repeat_interleave(qt.group_size, dim=1)  # (O, I)


@pytest.mark.parametrize("bits", quant.SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [None, 32, 128])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_rtn_error_is_at_most_half_a_step(bits, group_size, scale):
    w = _weight(scale=scale)
    w[3] = 0.0  # an all-zero row must not divide by zero
    qt = quant.quantize_rtn(w, bits, group_size)
    err = (w - qt.dequantize()).abs()
    half_step = _group_scales(qt) / 2
    assert (err <= half_step * (1 + 1e-5)).all(), f"max error/half-step {(err / half_step).max()}"
    codes = qt.codes()
    assert codes.abs().max() <= quant.qmax(bits)
    assert (codes[3] == 0).all() and (qt.dequantize()[3] == 0).all()


@pytest.mark.parametrize("bits", quant.SUPPORTED_BITS)
@pytest.mark.parametrize("shape,group_size", [((48, 128), None), ((48, 128), 32), ((7, 96), 32)])
def test_nbytes_is_packed_codes_plus_fp16_scales(bits, shape, group_size):
    qt = quant.quantize_rtn(torch.randn(*shape), bits, group_size)
    rows, cols = shape
    groups = cols // (group_size or cols)
    assert qt.packed.dtype == torch.uint8
    assert qt.packed.numel() == math.ceil(rows * cols * bits / 8)
    assert qt.nbytes == math.ceil(rows * cols * bits / 8) + 2 * rows * groups
    if bits == 4:
        assert qt.packed.numel() == rows * cols // 2  # two codes per byte


@pytest.mark.parametrize("bits", quant.SUPPORTED_BITS)
@pytest.mark.parametrize("n", [1, 7, 8, 1001])
def test_pack_unpack_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(n))
    packed = quant.pack_codes(codes, bits)
    assert torch.equal(quant.unpack_codes(packed, bits, n), codes.to(torch.uint8))


def test_four_bit_codes_share_a_byte_low_nibble_first():
    packed = quant.pack_codes(torch.tensor([3, 12, 15, 0]), 4)
    assert packed.tolist() == [3 | 12 << 4, 15]


def _torch_int8_per_channel(weight):
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    layer = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    layer[0].weight.data.copy_(weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(layer, {torch.nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)[0].weight()


def test_int8_agrees_with_torch_within_one_step():
    w = _weight(rows=64, cols=96, seed=3)
    ours, theirs = quant.quantize_rtn(w, 8), _torch_int8_per_channel(w)
    steps = (ours.dequantize() - theirs.dequantize()).abs() / ours.scales.float()
    assert steps.max() <= 1.0 + 1e-4, f"differs from torch.ao by {steps.max():.3f} steps"
    # Torch divides max|w| by 127.5, we by 127; given our scales, torch rounds exactly as we do.
    same_scales = torch.quantize_per_channel(w, ours.scales[:, 0].double(),
                                             torch.zeros(64, dtype=torch.long), 0, torch.qint8)
    assert torch.equal(same_scales.int_repr(), ours.codes())


def _correlated_inputs(n=2048, cols=128, rank=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(rank, cols, generator=gen)
    return torch.randn(n, rank, generator=gen) @ mix + 0.05 * torch.randn(n, cols, generator=gen)


@pytest.mark.parametrize("bits,group_size", [(3, None), (4, None), (4, 32), (8, None)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size):
    w, x = _weight(), _correlated_inputs()
    ref = x @ w.T

    def output_error(qt):
        return ((x @ qt.dequantize().T - ref) ** 2).mean().item()

    rtn = output_error(quant.quantize_rtn(w, bits, group_size))
    gptq = output_error(quant.gptq(w, x, bits, group_size))
    assert gptq < 0.5 * rtn, f"GPTQ output MSE {gptq:.3g} is not well below RTN's {rtn:.3g}"


def test_gptq_codes_stay_on_the_grid_and_handle_dead_inputs():
    w, x = _weight(), _correlated_inputs()
    x[:, 5] = 0.0  # an input that never fires
    qt = quant.gptq(w, x, 4, 32)
    assert qt.codes().abs().max() <= quant.qmax(4)
    assert (qt.codes()[:, 5] == 0).all()
    assert torch.isfinite(qt.dequantize()).all()


@pytest.mark.parametrize("call,match", [
    (lambda: quant.quantize_rtn(torch.randn(4, 8), 5), "bits must be one of"),
    (lambda: quant.quantize_rtn(torch.randn(4, 8), 16), "bits must be one of"),
    (lambda: quant.quantize_rtn(torch.randn(4, 96), 4, 64), "group_size must be None"),
    (lambda: quant.quantize_rtn(torch.randn(4, 96), 4, 0), "group_size must be None"),
    (lambda: quant.quantize_rtn(torch.randn(8), 4), "2-D float tensor"),
    (lambda: quant.quantize_rtn(torch.ones(4, 8, dtype=torch.long), 4), "2-D float tensor"),
    (lambda: quant.gptq(torch.randn(4, 8), torch.randn(10, 9), 4), r"inputs must have shape"),
    (lambda: quant.gptq_from_hessian(torch.randn(4, 8), torch.eye(7), 4), "H must have shape"),
    (lambda: quant.gptq(torch.randn(4, 8), torch.randn(10, 8), 4, damp=-1), "damp must be"),
    (lambda: quant.quantize_model(tiny_model(), 4, method="awq"), "method must be"),
    (lambda: quant.quantize_model(tiny_model(), 4, method="gptq"), "needs calibration"),
    (lambda: quant.quantize_model(tiny_model(tie_embeddings=True), 4), "tied embeddings"),
])
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_quantized_model_is_close_small_and_still_generates():
    model = tiny_model(seed=2)
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(idx)
        q8 = quant.quantize_model(model, 8)
        rel = ((q8(idx) - ref).norm() / ref.norm()).item()
    assert rel < 0.02, f"int8 logits off by {rel:.3f} (relative)"
    fp16_bytes = quant.saved_bytes(model.half())
    q4 = quant.quantize_model(model.float(), 4, group_size=32)
    assert quant.saved_bytes(q4) <= 0.30 * fp16_bytes
    assert quant.saved_bytes(q8) <= 0.55 * fp16_bytes
    cached = generate(q4, idx[:, :5], 10)
    assert torch.equal(cached, generate(q4, idx[:, :5], 10, use_cache=False))


def test_gptq_model_keeps_skipped_layers_and_quantizes_the_rest():
    model = tiny_model(seed=4)
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    q = quant.quantize_model(model, 4, 32, method="gptq", calibration=calib, skip=("lm_head",))
    assert isinstance(q.lm_head, torch.nn.Linear)
    assert torch.equal(q.lm_head.weight, model.lm_head.weight)
    assert isinstance(q.layers[1].mlp.down_proj, quant.QuantizedLinear)
    assert isinstance(q.embed_tokens, quant.QuantizedEmbedding)
    assert measure.weight_bytes(q) < 0.5 * measure.weight_bytes(model)


def test_skip_dtype_keeps_the_embedding_and_head_in_16_bits():
    model = tiny_model(seed=5)
    ends = ("embed_tokens", "lm_head")
    q = quant.quantize_model(model, 4, 32, skip=ends, skip_dtype=torch.float16)
    assert q.lm_head.weight.dtype == q.embed_tokens.weight.dtype == torch.float16
    assert isinstance(q.layers[0].self_attn.q_proj, quant.QuantizedLinear)
    # the same as quantizing the blocks of a model whose ends were rounded to float16
    rounded = copy.deepcopy(model)
    for m in (rounded.embed_tokens, rounded.lm_head):
        m.weight.data = m.weight.data.half().float()
    ref = quant.quantize_model(rounded, 4, 32, skip=ends)
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(q(idx), ref(idx), rtol=1e-5, atol=1e-5)
    # the saved file holds the ends in 2 bytes per weight instead of 4
    end_weights = model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    saving = quant.saved_bytes(ref) - quant.saved_bytes(q)
    assert abs(saving - 2 * end_weights) < 1024, saving
    fast = quant.with_kernels(q)  # the 16-bit ends follow the kernels' compute dtype
    assert fast.lm_head.weight.dtype == torch.bfloat16
    assert generate(fast, idx[:, :4], 6).shape == (2, 10)


@pytest.mark.parametrize("kwargs,match", [
    ({"skip": ("lm_head",), "skip_dtype": torch.int8}, "skip_dtype"),
    ({"skip": ("layers.0.mlp.nope",)}, "skip names no Linear"),
])
def test_quantize_model_refuses_bad_skips(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quant.quantize_model(tiny_model(), 4, 32, **kwargs)


@pytest.mark.parametrize("bits,group_size,kernel", [(8, None, quant.Int8Linear),
                                                    (4, 32, quant.Int4Linear)])
def test_kernels_match_the_dequantized_reference(bits, group_size, kernel):
    w = _weight(rows=64, cols=128)
    qt = quant.quantize_rtn(w, bits, group_size)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(9))
    ref = x @ qt.dequantize().T
    out = kernel(qt)(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, f"{kernel.__name__} differs from x @ dequantized weight by {rel:.2e} (bf16)"


def test_with_kernels_swaps_layers_and_refuses_three_bit():
    model = tiny_model(seed=5, d_model=64, d_ff=128)
    fast = quant.with_kernels(quant.quantize_model(model, 4, 32))
    assert isinstance(fast.layers[0].self_attn.q_proj, quant.Int4Linear)
    assert fast.norm.weight.dtype == torch.bfloat16
    idx = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(fast(idx).float()).all()
    with pytest.raises(ValueError, match="no integer kernel for 3-bit"):
        quant.with_kernels(quant.quantize_model(model, 3, 32))


def test_outlier_features_preserve_the_function():
    model = tiny_model(seed=6)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    big = quant.add_outlier_features(model, [1, 7], 50.0)
    with torch.no_grad():
        diff = (big(idx) - model(idx)).abs().max().item()
    assert diff < 1e-4, f"outlier injection changed logits by {diff:.2e}"
    gain, old = big.layers[0].input_layernorm.weight, model.layers[0].input_layernorm.weight
    assert gain[7] == 50.0 * old[7] and gain[6] == old[6]


def test_one_scale_per_tensor_suffers_from_outliers_one_per_feature_does_not():
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    x[:, 5] *= 100.0  # an outlier feature

    def error_on_ordinary_features(granularity):
        err = (quant.fake_quantize(x, 8, granularity) - x)[:, torch.arange(64) != 5]
        return err.norm().item() / x[:, torch.arange(64) != 5].norm().item()

    errors = {g: error_on_ordinary_features(g) for g in quant.GRANULARITIES}
    assert errors["tensor"] > 10 * errors["feature"]
    assert errors["token"] > 10 * errors["feature"]
    assert errors["group"] < errors["token"]
    assert errors["mixed"] <= errors["token"] / 10
    with pytest.raises(ValueError, match="granularity must be one of"):
        quant.fake_quantize(x, 8, "channel")


def test_capture_inputs_are_what_the_layer_multiplies():
    model = tiny_model(seed=7)
    idx = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    x = quant.capture_inputs(model, "lm_head", idx)
    assert x.shape == (30, model.cfg.d_model)
    with torch.no_grad():
        logits = model(idx).reshape(30, -1)
    assert torch.allclose(x @ model.lm_head.weight.T, logits, atol=1e-5)


def test_out_of_range_input_is_refused():
    with pytest.raises(ValueError, match="codes must lie in"):
        quant.pack_codes(torch.tensor([0, 16]), 4)
    with pytest.raises(ValueError, match="float16's maximum"):
        quant.quantize_rtn(torch.tensor([[1e5, 1.0]]), 2)
    with pytest.raises(ValueError, match="finite"):
        quant.quantize_rtn(torch.tensor([[float("nan"), 1.0]]), 8)
    with pytest.raises(ValueError, match="Int8Linear needs"):
        quant.Int8Linear(quant.quantize_rtn(_weight(), 8, 32))
    with pytest.raises(ValueError, match="Int4Linear needs"):
        quant.Int4Linear(quant.quantize_rtn(_weight(), 3, 32))


@pytest.mark.parametrize("group_size", [None, 32])
def test_gptq_with_uncorrelated_inputs_is_rtn(group_size):
    """With H proportional to I no column can absorb another's error: GPTQ reduces to RTN."""
    w = _weight()
    qt = quant.gptq_from_hessian(w, 3.0 * torch.eye(128), 4, group_size)
    assert torch.equal(qt.codes(), quant.quantize_rtn(w, 4, group_size).codes())


@pytest.mark.parametrize("group_size", [None, 64])
def test_gptq_lazy_blocks_do_not_change_the_result(group_size):
    w, x = _weight(), _correlated_inputs()
    small = quant.gptq(w, x, 4, group_size, block_size=32)  # groups of 64 span two blocks
    large = quant.gptq(w, x, 4, group_size, block_size=128)
    same = (small.codes() == large.codes()).float().mean().item()
    assert same > 0.995, f"only {same:.2%} of codes agree across block sizes"


def test_quantized_embedding_looks_up_dequantized_rows():
    qt = quant.quantize_rtn(_weight(rows=50, cols=64), 4, 32)
    emb = quant.QuantizedEmbedding(qt)
    idx = torch.tensor([[0, 7, 49], [3, 3, 1]])
    assert torch.equal(emb(idx), qt.dequantize()[idx])


def test_saved_bytes_is_the_packed_storage_plus_the_rest():
    model = tiny_model(seed=8)
    q = quant.quantize_model(model, 4, 32)
    packed = sum(m.qtensor.nbytes for m in q.modules() if isinstance(m, quant.QuantizedLinear))
    rest = sum(p.numel() * p.element_size() for p in q.parameters())  # the norm gains
    overhead = quant.saved_bytes(q) - packed - rest
    assert 0 < overhead < 8192, f"{overhead} bytes beyond the tensors (the safetensors header)"


def test_activation_quantization_alone_is_nearly_lossless_without_outliers():
    model = tiny_model(seed=9)
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(idx)
        for granularity in quant.GRANULARITIES:
            out = quant.quantize_activations(model, granularity, weight_bits=None)(idx)
            rel = ((out - ref).norm() / ref.norm()).item()
            assert rel < 0.02, f"{granularity}: int8 activations moved logits by {rel:.3f}"


def test_kernel_available_answers_for_the_formats_the_kernels_take():
    assert quant.kernel_available(8, None, "cpu") and quant.kernel_available(4, 128, "cpu")
    for bits, group_size in ((3, 128), (4, 48), (4, None), (8, 32), (2, 32)):
        assert not quant.kernel_available(bits, group_size, "cpu"), (bits, group_size)


def test_kernel_available_is_false_where_the_kernel_fails(monkeypatch):
    quant.kernels._probe.cache_clear()
    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no kernel for this device")
    monkeypatch.setattr(torch, "_weight_int8pack_mm", no_kernel)
    try:
        assert not quant.kernel_available(8, None, "cpu")
        assert quant.kernel_available(4, 32, "cpu")
    finally:
        quant.kernels._probe.cache_clear()


def test_torchao_is_used_only_where_it_has_the_fast_kernel():
    assert quant.torchao_config("w8a8", "cpu") is None
    assert quant.torchao_config("int4", "cpu") is None
    with pytest.raises(ValueError, match="torchao has no fast 'w8a8' kernel on cpu"):
        quant.torchao_quantized(tiny_model(), "w8a8")
    with pytest.raises(ValueError, match="scheme must be one of"):
        quant.torchao_config("int3", "cuda")


def test_torchao_w8a8_computes_what_the_float_model_computes():
    pytest.importorskip("torchao")
    from labsupport.quant.kernels import _apply_torchao, _torchao_config

    model = tiny_model(seed=3)
    fast = _apply_torchao(model, _torchao_config("w8a8", 128), skip=("embed_tokens",))
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(idx), fast(idx).float()
    assert type(fast.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    assert type(fast.embed_tokens.weight).__name__ == "Parameter"  # skipped
    assert (out - ref).norm() / ref.norm() < 0.05
    # its bytes are the int8 codes and scales, not the logical bf16 shape
    linear_weights = sum(m.weight.numel() for m in model.modules()
                         if isinstance(m, torch.nn.Linear))
    embedding = measure.tensor_bytes(fast.embed_tokens.weight)
    norms = sum(measure.tensor_bytes(p) for n, p in fast.named_parameters() if "norm" in n)
    assert linear_weights <= measure.weight_bytes(fast) - embedding - norms < 1.1 * linear_weights
