"""Profiles, cached tensors, timing and byte/FLOP accounting."""

import pytest
import torch
from conftest import tiny_config, tiny_model

from labsupport import measure, runtime
from labsupport.model import Transformer


def test_unknown_profile_lists_the_valid_ones(monkeypatch):
    monkeypatch.setenv("LABS_PROFILE", "fast")
    with pytest.raises(ValueError, match="'smoke'.*'cpu'.*'gpu'"):
        runtime.profile()
    monkeypatch.setenv("LABS_PROFILE", "smoke")
    assert runtime.profile() == "smoke"
    assert runtime.by_profile(smoke=1, cpu=2, gpu=3) == 1
    with pytest.raises(ValueError, match="missing"):
        runtime.by_profile(smoke=1, cpu=2)


def test_default_profile_follows_cuda(monkeypatch):
    monkeypatch.delenv("LABS_PROFILE", raising=False)
    assert runtime.profile() == ("gpu" if torch.cuda.is_available() else "cpu")


def test_cached_tensors_builds_once_and_rebuilds_damage(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"x": torch.arange(10)}, {"n": 10}

    path = tmp_path / "t.safetensors"
    t, meta = runtime.cached_tensors(path, build)
    t2, _ = runtime.cached_tensors(path, build)
    assert len(calls) == 1 and meta == {"n": 10} and torch.equal(t["x"], t2["x"])
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning):
        runtime.cached_tensors(path, build)
    assert len(calls) == 2


def test_time_fn_reports_median_of_the_repeats():
    calls = []
    timing = measure.time_fn(lambda: calls.append(1), warmup=2, repeats=7)
    assert len(calls) == 9 and len(timing.times_s) == 7
    assert timing.min_s <= timing.median_s <= timing.max_s
    fixed = measure.Timing([1.0, 2.0, 3.0, 100.0, 2.5])
    assert fixed.median_s == 2.5 and fixed.iqr_s == pytest.approx(1.0)
    with pytest.raises(ValueError, match="repeats"):
        measure.time_fn(lambda: None, repeats=0)


@pytest.mark.parametrize("tie", [False, True])
def test_weight_bytes_counts_each_tensor_once(tie):
    model = tiny_model(tie_embeddings=tie)
    assert measure.weight_bytes(model) == 4 * model.cfg.num_params(non_embedding=False)
    assert measure.weight_bytes(model.to(torch.bfloat16)) == 2 * model.cfg.num_params(False)


def test_flops_per_token_is_2n_forward_and_6n_training_at_short_context():
    cfg = tiny_config(vocab_size=1000)
    n_matmul = sum(p.numel() for n, p in Transformer(cfg).named_parameters()
                   if p.dim() == 2 and "embed_tokens" not in n)
    assert measure.flops_per_token(cfg, context_len=0) == 2 * n_matmul
    assert measure.flops_per_token(cfg, 0, training=True) == 6 * n_matmul
    extra = measure.flops_per_token(cfg, 100) - measure.flops_per_token(cfg, 0)
    assert extra == 4 * cfg.n_layers * 100 * cfg.d_model  # QK^T and AV over 100 keys


def test_machine_limits_are_measured_and_plausible():
    flops = measure.matmul_flops_per_s(n=512, repeats=3)
    bandwidth = measure.memory_bandwidth_bytes_per_s(repeats=3)
    assert 1e8 < flops < 1e16 and 1e8 < bandwidth < 1e13


def test_sysfs_cache_sizes_parse():
    assert runtime._parse_size("32768K") == 32 * 2**20
    assert runtime._parse_size("1M\n") == 2**20 and runtime._parse_size("512") == 512


def test_bandwidth_probe_reads_four_times_the_last_level_cache(monkeypatch):
    monkeypatch.setattr(runtime, "last_level_cache_bytes", lambda device=None: 480 * 2**20)
    assert measure.bandwidth_probe_bytes("cpu") == 4 * 480 * 2**20
    monkeypatch.setattr(runtime, "last_level_cache_bytes", lambda device=None: 2**20)
    assert measure.bandwidth_probe_bytes("cpu") == 2**28  # never below 256 MiB on a CPU
    monkeypatch.setattr(runtime, "last_level_cache_bytes", lambda device=None: 2**24)
    sizes = []
    real_ones = torch.ones
    monkeypatch.setattr(torch, "ones", lambda n, **k: sizes.append(4 * n) or real_ones(8, **k))
    measure.memory_bandwidth_bytes_per_s(repeats=1)
    assert sizes == [2**28]
    with pytest.warns(UserWarning, match="measures the cache"):
        measure.memory_bandwidth_bytes_per_s(nbytes=2**20, repeats=1)
    with pytest.raises(ValueError, match="nbytes"):
        measure.memory_bandwidth_bytes_per_s(nbytes=2, repeats=1)


def test_machine_line_names_the_last_level_cache(monkeypatch):
    monkeypatch.setattr(runtime, "_cpu_last_level_cache", lambda: (3, 480 * 2**20))
    assert "L3 480 MiB" in runtime.machine_line()
    monkeypatch.setattr(runtime, "_cpu_last_level_cache", lambda: None)
    assert "last-level cache unknown" in runtime.machine_line()


@pytest.mark.parametrize("flags, lanes, per_cycle", [
    ({"avx512f", "avx2", "fma"}, 16, 64), ({"avx2", "fma"}, 8, 32), ({"sse2"}, 4, 8)])
def test_cpu_peak_is_cores_times_clock_times_flops_per_cycle(monkeypatch, flags, lanes,
                                                              per_cycle):
    monkeypatch.setattr(measure, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(measure, "_cpu_ghz", lambda: 2.5)
    peak = measure.cpu_peak_flops(cores=4)
    assert peak.fp32_lanes == lanes and peak.flops_per_cycle == per_cycle
    assert peak.flops_per_s == pytest.approx(4 * 2.5e9 * per_cycle)
    monkeypatch.setattr(measure, "_cpu_flags", set)
    assert measure.cpu_peak_flops() is None


def test_peak_memory_sees_a_large_allocation():
    peak = measure.peak_memory_bytes(lambda: torch.ones(50_000_000).add_(1).sum())
    assert peak >= 100e6, peak  # 200 MB tensor


def test_time_interleaved_alternates_the_variants():
    order = []
    timings = measure.time_interleaved({"a": lambda: order.append("a"),
                                        "b": lambda: order.append("b")}, warmup=1, repeats=3)
    assert order == ["a", "b"] * 4
    assert set(timings) == {"a", "b"} and len(timings["a"].times_s) == 3
    with pytest.raises(ValueError, match="at least one"):
        measure.time_interleaved({})


def test_atomic_path_never_leaves_a_half_written_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), runtime.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with runtime.atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


def test_decode_reads_every_weight_but_the_input_embedding():
    untied, tied = tiny_model(), tiny_model(tie_embeddings=True)
    emb = 4 * untied.cfg.vocab_size * untied.cfg.d_model
    assert measure.decode_weight_bytes(untied) == measure.weight_bytes(untied) - emb
    assert measure.decode_weight_bytes(tied) == measure.weight_bytes(tied)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hf_conversion_keeps_the_device():
    from labsupport.model import from_hf, to_hf

    model = tiny_model().cuda()
    hf = to_hf(model)
    assert hf.device.type == "cuda" and from_hf(hf).embed_tokens.weight.is_cuda


def test_measurements_default_to_the_profiles_device(monkeypatch):
    # A CUDA machine at `smoke` runs its models on the CPU, so that is what must be measured.
    monkeypatch.setenv("LABS_PROFILE", "smoke")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    def no_cuda(*args, **kwargs):
        raise AssertionError("measured CUDA although the profile runs on the CPU")
    for name in ("synchronize", "reset_peak_memory_stats", "memory_allocated",
                 "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    assert runtime.device().type == "cpu"
    assert measure.peak_memory_bytes(lambda: torch.ones(10_000_000).sum(), device="cpu") >= 0
    assert measure.peak_memory_bytes(lambda: torch.ones(10_000_000).sum()) >= 0
    created = []
    real_randn, real_ones = torch.randn, torch.ones
    monkeypatch.setattr(torch, "randn", lambda *a, **k: created.append(k["device"])
                        or real_randn(*a, **{**k, "device": "cpu"}))
    monkeypatch.setattr(torch, "ones", lambda *a, **k: created.append(k.get("device"))
                        or real_ones(*a, **{**k, "device": "cpu"}))
    monkeypatch.setattr(measure, "_sync", lambda dev=None: None)
    measure.matmul_flops_per_s(n=64, repeats=1)
    with pytest.warns(UserWarning, match="measures the cache"):
        measure.memory_bandwidth_bytes_per_s(nbytes=2**16, repeats=1)
    assert [torch.device(d).type for d in created] == ["cpu", "cpu", "cpu"]


def test_zero_dim_tensors_can_be_cached(tmp_path):
    tensors = {"step": torch.tensor(7), "loss": torch.tensor(2.5), "empty": torch.zeros(0)}
    runtime.save_tensors(tmp_path / "s.safetensors", tensors, {})
    loaded, _ = runtime.load_tensors(tmp_path / "s.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_a_read_error_is_raised_and_the_cache_kept(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    runtime.cached_tensors(path, lambda: ({"x": torch.arange(3)}, {}))
    good = path.read_bytes()
    real_read = type(path).read_bytes

    def failing_read(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(type(path), "read_bytes", failing_read)
    with pytest.raises(PermissionError):
        runtime.cached_tensors(path, lambda: pytest.fail("rebuilt a cache it could not read"))
    monkeypatch.undo()
    assert path.read_bytes() == good


def test_cached_json_gives_the_same_types_cold_and_warm(tmp_path):
    record = {"sizes": (1, 2), 3: "three", "loss": 1.5}
    cold, built = runtime.cached_json(tmp_path / "r.json", lambda: record)
    warm, built_again = runtime.cached_json(tmp_path / "r.json", lambda: record)
    assert built and not built_again
    assert cold == warm == {"sizes": [1, 2], "3": "three", "loss": 1.5}
    (tmp_path / "r.json").write_text("{not json")
    with pytest.warns(UserWarning, match="rebuilding"):
        again, rebuilt = runtime.cached_json(tmp_path / "r.json", lambda: record)
    assert rebuilt and again == cold


def test_roofline_draws_the_lower_roof_and_returns_the_ridge():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labsupport.plot import roofline

    fig, ax = plt.subplots()
    ridge = roofline(ax, 100e9, {"DRAM": 20e9, "cache": 80e9}, intensity=(0.1, 1e3))
    assert ridge == pytest.approx(5.0)
    dram, cache = ax.lines[:2]
    x, y = dram.get_data()
    assert y.max() == pytest.approx(100) and y[0] == pytest.approx(0.1 * 20)  # GFLOP/s
    assert cache.get_data()[1][0] == pytest.approx(0.1 * 80) and cache.get_linestyle() == "--"
    with pytest.raises(ValueError, match="bandwidth"):
        roofline(ax, 100e9, {})
    plt.close(fig)


def test_count_ops_counts_every_operator_call():
    x = torch.ones(4, 4)
    counts = measure.count_ops(lambda: (x @ x).relu().sum())
    assert counts["mm"] == 1 and counts["relu"] == 1 and counts["sum"] == 1
    model = tiny_model(seed=0).eval()
    idx = torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        step = measure.count_ops(lambda: model(idx))
    # one matmul per Linear: 7 per block and the head
    assert step["mm"] + step.get("bmm", 0) + step.get("addmm", 0) >= 7 * model.cfg.n_layers + 1


def test_generation_peak_memory_is_the_cache_and_grows_with_the_batch():
    cfg = tiny_config(d_model=128, n_layers=4, n_heads=4, max_seq_len=320)
    peak = {b: measure.generation_peak_memory(cfg, b, 8, 312, device="cpu") for b in (16, 32)}
    cache = cfg.kv_cache_bytes(32, 320, 4)  # 42 MB in fp32
    assert 0.8 * cache < peak[32] < 1.5 * cache
    assert 1.6 < peak[32] / peak[16] < 2.4  # the cache, and so the peak, doubles with the batch
    with pytest.raises(ValueError, match="batch"):
        measure.generation_peak_memory(cfg, 0, 8, 8)
