"""Cost arithmetic against the published figures it must reproduce, and the claim table."""

import json

import pytest

from labsupport import cost
from labsupport.claims import ClaimCheck


def test_gpt3_training_compute_and_lambda_gpu_years():
    flops = cost.training_flops(175e9, 300e9)
    assert flops == pytest.approx(3.15e23)
    v100_years = cost.gpu_hours(3.14e23, peak_flops=28e12) / cost.HOURS_PER_YEAR
    assert v100_years == pytest.approx(355, rel=0.01)  # Lambda: "355 GPU-years"


def test_energy_from_gpu_hours_power_and_pue():
    assert cost.energy_kwh(1000, watts=300, pue=1.1) == pytest.approx(330.0)
    assert cost.co2_tonnes(1_287_000, 0.429) == pytest.approx(552, rel=0.001)


def test_semianalysis_fleet_cost_and_cost_per_query():
    per_day = cost.fleet_usd_per_day(28_936, 1.00)
    assert per_day == pytest.approx(694_464)
    assert cost.usd_per_query(per_day, 13e6, 15) == pytest.approx(0.00356, rel=0.01)


def test_per_token_prices_and_energy():
    assert cost.usd_per_mtok(tokens_per_s=1000, usd_per_hour=3.6) == pytest.approx(1.0)
    assert cost.joules_per_token(watts=30, tokens_per_s=300) == pytest.approx(0.1)
    h100 = cost.hardware("H100")
    assert cost.decode_tokens_per_s_roofline(14e9, h100.mem_bandwidth) == pytest.approx(239, 0.01)
    assert h100.ridge_flops_per_byte == pytest.approx(295, rel=0.01)


def test_training_cost_uses_the_table_price_unless_told():
    a100 = cost.hardware("A100")
    flops = a100.peak_flops * 3600 * 10  # ten GPU-hours at full utilisation
    assert cost.training_cost_usd(flops, a100, 1.0) == pytest.approx(10 * a100.usd_per_hour)
    assert cost.training_cost_usd(flops, a100, 0.5, usd_per_hour=1.0) == pytest.approx(20.0)


@pytest.mark.parametrize("call, match", [
    (lambda: cost.hardware("TPUv9"), "unknown hardware 'TPUv9'"),
    (lambda: cost.gpu_hours(1e20, 1e12, utilization=1.5), "utilization"),
    (lambda: cost.training_flops(-1, 10), "n_params must be > 0"),
    (lambda: cost.energy_kwh(10, 300, pue=0.9), "pue"),
])
def test_bad_cost_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_every_hardware_row_has_a_source_and_sane_numbers():
    assert {"V100", "A100", "H100", "H200"} <= set(cost.HARDWARE)
    for hw in cost.HARDWARE.values():
        assert hw.source and hw.price_date
        assert 1e13 < hw.peak_flops < 1e16 and 1e11 < hw.mem_bandwidth < 1e13


def test_claim_check_validates_verdicts_and_saves_json(private_cache):
    check = ClaimCheck("99_test")
    rule = "does not hold if doubling n multiplies the time by at most 8.5"
    check.add("KV caching avoids exponential growth", "source", "cubic fit", "does not hold",
              "polynomial", rule=rule)
    with pytest.raises(ValueError, match="verdict must be one of"):
        check.add("x", "y", "z", "mostly", rule=rule)
    with pytest.raises(ValueError, match="rule must say"):
        check.add("x", "y", "z", "holds", rule="  ")
    with pytest.raises(TypeError, match="rule"):
        check.add("x", "y", "z", "holds")  # a verdict without its rule is not accepted
    html = check.show().to_html()
    saved = json.loads((private_cache / "claims" / "99_test.json").read_text())
    assert saved["claims"][0]["verdict"] == "does not hold"
    assert saved["claims"][0]["rule"] == rule
    assert saved["machine"]["profile"] in ("smoke", "cpu", "gpu")
    assert saved["machine"]["cpu_last_level_cache"]
    # the rendered table shows the rule and wraps its cells instead of scrolling sideways
    assert rule in html and "rule for the verdict" in html
    assert "table-layout: fixed" in html and "white-space: normal" in html


def test_decode_roofline_takes_the_lower_roof():
    memory_only = cost.decode_tokens_per_s_roofline(1e6, 1e10, batch=8)
    assert memory_only == pytest.approx(8e4)
    both = cost.decode_tokens_per_s_roofline(1e6, 1e10, batch=8, flops_per_token=1e6,
                                             peak_flops=5e10)
    assert both == pytest.approx(5e4)  # compute-bound: 5e10 / 1e6
    with pytest.raises(ValueError, match="flops_per_token"):
        cost.decode_tokens_per_s_roofline(1e6, 1e10, flops_per_token=0, peak_flops=1e10)


def test_price_here_is_the_gpu_row_or_the_assumed_cpu_vm():
    assert cost.usd_per_hour_here(None)[0] == cost.CPU_VM_USD_PER_HOUR
    assert cost.usd_per_hour_here("NVIDIA H200 SXM")[0] == cost.hardware("H200").usd_per_hour
    price, what = cost.usd_per_hour_here("Tesla T4")  # not in the table: priced as an H100
    assert price == cost.hardware("H100").usd_per_hour and "H100" in what


def _notebook(path, code):
    path.write_text(json.dumps({"cells": [{"cell_type": "code", "source": code,
                                           "outputs": [], "execution_count": None,
                                           "metadata": {}}]}))


def test_collect_takes_only_records_of_the_current_notebook_at_the_profile(
        private_cache, tmp_path, monkeypatch):
    from labsupport import claims, runtime

    monkeypatch.chdir(tmp_path)
    _notebook(tmp_path / "98_a.ipynb", "x = 1")
    _notebook(tmp_path / "99_b.ipynb", "y = 2")
    for lab in ("98_a", "99_b"):
        check = ClaimCheck(lab)
        check.add("claim", "source", "measured", "holds", rule="holds if it does")
        check.save()
    profile = runtime.profile()
    records = claims.collect(tmp_path, ["98_a", "99_b"], profile)
    assert [r["notebook"] for r in records] == ["98_a", "99_b"]
    assert records[0]["source_hash"] == claims.source_hash(tmp_path / "98_a.ipynb")
    # a changed notebook, another profile, a missing lab: each is named, none is used
    _notebook(tmp_path / "99_b.ipynb", "y = 3")
    with pytest.raises(RuntimeError, match="99_b: recorded by another version"):
        claims.collect(tmp_path, ["98_a", "99_b"], profile)
    other = next(p for p in ("smoke", "cpu", "gpu") if p != profile)
    with pytest.raises(RuntimeError, match=f"98_a: recorded at profile '{profile}', not '{other}'"):
        claims.collect(tmp_path, ["98_a"], other)
    with pytest.raises(RuntimeError, match="97_c: no record"):
        claims.collect(tmp_path, ["97_c"], profile)


def test_labs_in_toc_lists_the_lab_notebooks_in_order(tmp_path):
    from labsupport import claims

    toc = tmp_path / "_toc.yml"
    toc.write_text("root: book/intro\nparts:\n  - caption: A\n    chapters:\n"
                   "      - file: notebooks/00_x\n      - file: book/part\n"
                   "      - file: notebooks/41_y\n  - caption: Reference\n    chapters:\n"
                   "      - file: notebooks/90_claims\n")
    assert claims.labs_in_toc(toc) == ["00_x", "41_y"]
