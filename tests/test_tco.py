"""The ownership-cost model of lab 42: hand-computed cases, monotonicity, break-even, bad input."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

from labsupport import cost, measure, tco
from labsupport.model import Transformer

BASE = tco.Scenario()


def test_api_price_of_a_request_and_a_month_by_hand():
    s = BASE.with_(prompt_tokens=300, rag_tokens=2000, output_tokens=300, api="GPT-4o (Aug 2024)")
    assert tco.api_usd_per_request(s) == pytest.approx((2300 * 2.5 + 300 * 10.0) / 1e6)
    s = s.with_(users=10_000, requests_per_day=20, days_per_month=21.7)
    month = tco.api(s)
    assert month["usd per month"] == pytest.approx(10_000 * 20 * 21.7 * 0.00875)
    assert month["usd per user-month"] == pytest.approx(20 * 21.7 * 0.00875)
    assert month["usd per million tokens"] == pytest.approx(0.00875 / 2600 * 1e6)


def test_owned_server_month_by_hand():
    s = BASE.with_(server_usd=300_000, years=4, support_per_year=0.1, server_kw=10.0,
                   idle_power=0.3, pue=1.5, usd_per_kwh=0.10, colo_usd_per_kw_month=200)
    items = tco.server_usd_per_month(s, utilisation=0.5)
    hours = 24 * 365.25 / 12
    assert items["hardware"] == pytest.approx(300_000 / 48)
    assert items["support"] == pytest.approx(2_500)
    assert items["power"] == pytest.approx(10.0 * (0.3 + 0.7 * 0.5) * 1.5 * hours * 0.10)
    assert items["hosting"] == pytest.approx(2_000)


def test_a_70b_model_in_bf16_needs_four_h100s_for_64_requests_of_2600_tokens():
    cfg = cost.MODELS["Llama-3.1-70B"]
    assert cfg.num_params(non_embedding=False) == pytest.approx(70.55e9, rel=1e-3)
    assert cfg.kv_bytes_per_token(2) == 2 * 80 * 8 * 128 * 2  # GQA-8: 320 KiB per token
    s = BASE.with_(prompt_tokens=300, rag_tokens=2000, output_tokens=300, max_batch=64)
    # weights 141 GB + 64 x 2600 x 327,680 B = 54.5 GB: over 2 x 72 GB usable, under 4 x 72
    assert tco.replica(s) == (4, 64)
    # in FP8 the weights halve, and two GPUs hold them with the same batch
    assert tco.replica(s.with_(precision="fp8")) == (2, 64)
    # a batch that fits nowhere is cut to what eight GPUs hold
    g, batch = tco.replica(s.with_(max_batch=10_000))
    free = 8 * 80e9 * 0.9 - cfg.num_params(non_embedding=False) * 2
    assert g == 8 and batch == int(free // (2600 * cfg.kv_bytes_per_token(2)))


def test_decode_is_memory_bound_at_batch_one_and_compute_bound_at_large_batch():
    s = BASE.with_(roof_fraction=1.0, prompt_tokens=100, rag_tokens=0, output_tokens=100)
    step, bound = tco.decode_step_seconds(s, batch=1, gpus=4)
    cfg, hw = cost.MODELS[s.model], cost.hardware("H100")
    read = cfg.num_params(non_embedding=False) * 2 + cfg.kv_bytes_per_token(2) * 150
    assert bound == "memory" and step == pytest.approx(read / (4 * hw.mem_bandwidth))
    step, bound = tco.decode_step_seconds(s, batch=4096, gpus=4)
    flops = 4096 * measure.flops_per_token(cfg, 150)
    assert bound == "compute" and step == pytest.approx(flops / (4 * hw.peak_flops))
    # a lower fraction of the roof slows every step in proportion
    half, _ = tco.decode_step_seconds(s.with_(roof_fraction=0.5), batch=4096, gpus=4)
    assert half == pytest.approx(2 * step)


def test_implied_roof_fraction_recovers_the_fraction_that_made_a_throughput():
    s = BASE.with_(precision="fp8", prompt_tokens=1000, rag_tokens=0, output_tokens=1000,
                   max_batch=512, roof_fraction=0.37, gpus_per_server=2)
    made = tco.server_capacity(s, gpus=2)["output tokens/s"]
    assert tco.implied_roof_fraction(s, made, gpus=2) == pytest.approx(0.37)


def test_more_utilisation_never_raises_the_cost_per_token():
    costs = [tco.owned_usd_per_mtok(BASE, u) for u in (0.01, 0.05, 0.1, 0.3, 0.6, 0.9, 1.0)]
    assert all(a > b for a, b in zip(costs[:-1], costs[1:], strict=True))
    # nor does a faster serving stack, or cheaper power
    faster = [tco.on_prem(BASE.with_(roof_fraction=f))["usd per month"] for f in (0.2, 0.5, 0.9)]
    assert faster[0] >= faster[1] >= faster[2]
    assert (tco.on_prem(BASE.with_(usd_per_kwh=0.05))["usd per month"]
            < tco.on_prem(BASE.with_(usd_per_kwh=0.20))["usd per month"])


def test_owned_cost_grows_with_users_one_server_at_a_time():
    months = [tco.on_prem(BASE.with_(users=u)) for u in (1_000, 5_000, 20_000, 100_000)]
    totals = [m["usd per month"] for m in months]
    assert all(a <= b for a, b in zip(totals[:-1], totals[1:], strict=True))
    assert [m["servers"] for m in months] == sorted(m["servers"] for m in months)
    assert months[0]["servers"] == 1 and months[-1]["servers"] > 1
    # per user, owning gets cheaper with volume, the API does not
    assert months[-1]["usd per user-month"] < months[0]["usd per user-month"]
    apis = [tco.api(BASE.with_(users=u))["usd per user-month"] for u in (1_000, 100_000)]
    assert apis[0] == pytest.approx(apis[1])


def test_break_even_is_where_owning_stops_costing_more_than_the_api():
    for price in ("GPT-4 (Mar 2023)", "GPT-4o (Aug 2024)"):
        s = BASE.with_(api=price)
        users = tco.break_even_users(s)
        at, below = s.with_(users=users), s.with_(users=0.99 * users)
        assert tco.on_prem(at)["usd per month"] <= tco.api(at)["usd per month"] * (1 + 1e-9)
        assert tco.on_prem(below)["usd per month"] > tco.api(below)["usd per month"]
    # with whole servers the API can be cheaper again past a server's capacity: the lasting
    # break-even is where owning stays cheaper at every larger volume
    s = BASE.with_(api="GPT-4.1 (Apr 2025)")
    first, lasting = tco.break_even_users(s), tco.break_even_users(s, for_good=True)
    assert first < lasting
    between = [u for u in range(int(first) + 1, int(lasting)) if
               tco.on_prem(s.with_(users=u))["usd per month"] > tco.api(s.with_(users=u))[
                   "usd per month"]]
    assert between, "the API should be cheaper again somewhere between the two"
    for u in lasting * (1.0 + np.geomspace(1e-6, 10, 40)):
        x = s.with_(users=float(u))
        assert tco.on_prem(x)["usd per month"] <= tco.api(x)["usd per month"] * (1 + 1e-9)
    # a dearer API breaks even at fewer users
    assert (tco.break_even_users(BASE.with_(api="GPT-4 (Mar 2023)"))
            < tco.break_even_users(BASE.with_(api="GPT-4.1 (Apr 2025)")))
    # an API cheaper than a full server's cost per user never breaks even
    assert math.isnan(tco.break_even_users(BASE.with_(server_usd=5e6)))


def test_break_even_utilisation_is_where_the_owned_cost_per_token_meets_the_price():
    price = tco.owned_usd_per_mtok(BASE, 0.3)
    assert tco.break_even_utilisation(BASE, price) == pytest.approx(0.3, rel=1e-6)
    assert math.isnan(tco.break_even_utilisation(BASE, 0.5 * tco.owned_usd_per_mtok(BASE, 1.0)))
    with pytest.raises(ValueError, match="usd_per_mtok"):
        tco.break_even_utilisation(BASE, -1.0)


@pytest.mark.parametrize("name, value", [
    ("server_usd", -1.0), ("usd_per_kwh", -0.1), ("cloud_usd_per_gpu_hour", 0.0),
    ("roof_fraction", 0.0), ("roof_fraction", 1.5), ("peak_load", 2.0), ("pue", 0.9),
    ("staff_usd_per_year", -5.0), ("users", 0), ("busy_hours", 30), ("max_batch", 2.5),
    ("idle_power", 1.2), ("years", float("nan")), ("output_tokens", "300")])
def test_bad_assumptions_raise_naming_the_parameter(name, value):
    with pytest.raises(ValueError, match=name):
        BASE.with_(**{name: value})


def test_bad_choices_and_utilisation_raise():
    with pytest.raises(ValueError, match="utilisation"):
        tco.server_usd_per_month(BASE, 0.0)
    with pytest.raises(ValueError, match="utilisation"):
        tco.owned_usd_per_mtok(BASE, 1.01)
    with pytest.raises(ValueError, match="gpu"):
        BASE.with_(gpu="B200")
    with pytest.raises(ValueError, match="fp8"):
        BASE.with_(gpu="A100", precision="fp8")
    with pytest.raises(ValueError, match="api"):
        BASE.with_(api="GPT-5")
    with pytest.raises(ValueError, match="unknown assumption"):
        BASE.with_(server_price=1)
    with pytest.raises(ValueError, match="does not fit"):
        tco.replica(BASE.with_(gpu="V100", gpus_per_server=4))


def test_every_assumption_has_a_source_and_every_api_price_a_date():
    names = {f for f in tco.Scenario.__dataclass_fields__}
    assert set(tco.SOURCES) == names
    rows = tco.assumptions(BASE)
    assert all(r["source"] for r in rows)
    assert all(p.date[:4].isdigit() and p.usd_per_m_output > p.usd_per_m_input > 0
               for p in tco.API_PRICES.values())


def test_decode_step_fn_repeats_one_step_without_filling_the_cache():
    model = Transformer(tiny_config()).eval()
    step = measure.decode_step_fn(model, batch=3, context_len=10)
    for _ in range(4):  # the cache holds 11 positions: a second step would overflow unrewound
        step()
    with pytest.raises(ValueError, match="context_len"):
        measure.decode_step_fn(model, batch=1, context_len=model.cfg.max_seq_len)
    with pytest.raises(ValueError, match="batch"):
        measure.decode_step_fn(model, batch=0, context_len=4)
    assert torch.is_grad_enabled()
