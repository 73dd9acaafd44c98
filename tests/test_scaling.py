"""Scaling-law fits against known laws, and the cached IsoFLOP runs."""

import numpy as np
import pytest

from labsupport import scaling
from labsupport.scaling import BESIROGLU_2024, HOFFMANN_2022, ParametricFit

CHINCHILLA_C = 6 * 70e9 * 1.4e12


def synthetic(law: ParametricFit, n: int = 60, noise: float = 0.005, seed: int = 0):
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(np.log(1e6), np.log(1e9), n))
    D = np.exp(rng.uniform(np.log(1e8), np.log(1e11), n))
    L = law.predict(N, D) * np.exp(rng.normal(0, noise, n))
    return N, D, L


def test_fit_parametric_recovers_a_known_law_from_noisy_data():
    N, D, L = synthetic(BESIROGLU_2024)
    fit = scaling.fit_parametric(N, D, L)
    assert fit.alpha == pytest.approx(BESIROGLU_2024.alpha, abs=0.04)
    assert fit.beta == pytest.approx(BESIROGLU_2024.beta, abs=0.04)
    assert fit.E == pytest.approx(BESIROGLU_2024.E, abs=0.05)
    assert fit.a == pytest.approx(BESIROGLU_2024.a, abs=0.03)
    rel = np.abs(fit.predict(N, D) / L - 1)
    assert np.median(rel) < 0.01


def test_compute_optimal_spends_the_budget_and_matches_the_published_teaching_point():
    for law, ratio in ((HOFFMANN_2022, 93), (BESIROGLU_2024, 18)):
        N, D = law.compute_optimal(CHINCHILLA_C)
        assert 6 * N * D == pytest.approx(CHINCHILLA_C)
        assert D / N == pytest.approx(ratio, rel=0.05)
    assert HOFFMANN_2022.a == pytest.approx(0.28 / 0.62)
    assert HOFFMANN_2022.a + HOFFMANN_2022.b == pytest.approx(1.0)


def test_compute_optimal_is_the_minimum_along_the_isoflop_line():
    law, C = BESIROGLU_2024, 1e21
    N_opt, _ = law.compute_optimal(C)
    Ns = N_opt * np.logspace(-1, 1, 201)
    assert Ns[np.argmin(law.predict(Ns, C / (6 * Ns)))] == pytest.approx(N_opt, rel=0.03)


def test_isoflop_minimum_and_power_law_recover_known_values():
    N = np.logspace(4, 6, 7)
    L = 3.0 + 0.2 * (np.log(N) - np.log(1e5)) ** 2
    assert scaling.isoflop_minimum(N, L) == pytest.approx(1e5, rel=1e-6)
    edge = 3.0 + 0.2 * (np.log(N) - np.log(1e3)) ** 2  # true minimum below the profile
    assert scaling.isoflop_minimum(N, edge) == pytest.approx(N.min())
    C = np.logspace(10, 14, 5)
    exponent, prefactor = scaling.fit_power_law(C, 0.1 * C**0.5)
    assert exponent == pytest.approx(0.5) and prefactor == pytest.approx(0.1)


def test_isoflop_exponent_on_a_known_law():
    law = BESIROGLU_2024
    rows = []
    for C in (1e18, 1e19, 1e20):
        N_opt, _ = law.compute_optimal(C)
        for k in np.linspace(-1, 1, 5):
            N = N_opt * 10**k
            rows.append((C, N, float(law.predict(N, C / (6 * N)))))
    C, N, L = map(np.array, zip(*rows, strict=True))
    a, minima, interior = scaling.isoflop_exponent(C, N, L)
    assert a == pytest.approx(law.a, abs=0.03) and len(minima) == 3 and all(interior.values())


@pytest.mark.parametrize("args, match", [
    (([1, 2, 3, 4, 5], [1, 2, 3, 4], [1, 2, 3, 4, 5]), "same length"),
    (([1, 2, 3, 4, -5], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]), "N must be finite and > 0"),
    (([1, 2, 3], [1, 2, 3], [1, 2, 3]), "at least 5 points"),
])
def test_bad_fit_input_is_refused(args, match):
    with pytest.raises(ValueError, match=match):
        scaling.fit_parametric(*args)


def test_bad_compute_and_grid_input_is_refused():
    with pytest.raises(ValueError, match="compute C must be > 0"):
        HOFFMANN_2022.compute_optimal(0)
    with pytest.raises(ValueError, match="budgets and ratios"):
        scaling.isoflop_specs([], [10])


def test_isoflop_specs_spend_each_budget_on_distinct_sizes():
    specs = scaling.isoflop_specs([1e11, 1e12], [4, 12, 36, 108])
    for budget in (1e11, 1e12):
        runs = [s for s in specs if s.budget == budget]
        sizes = [s.model.num_params(non_embedding=False) for s in runs]
        assert len(runs) >= 3 and len(set(sizes)) == len(sizes)
        for s, n in zip(runs, sizes, strict=True):
            assert 6 * n * s.tokens == pytest.approx(budget, rel=1e-3)


def test_runs_are_cached_and_a_damaged_result_is_retrained():
    cfg = scaling.ladder_config(16, 1, vocab_size=512, max_seq_len=32)
    spec = scaling.RunSpec(cfg, tokens=4 * 8 * 32, batch_size=8, seq_len=32)
    first = scaling.run(spec)
    assert not first["cached"] and first["steps"] == 4 and first["val_loss"] > 0
    again = scaling.run(spec)
    assert again["cached"] and again["val_loss"] == first["val_loss"]
    path = next((scaling.cache_dir() / "scaling").glob(f"run-{spec.key()}.json"))
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert not scaling.run(spec)["cached"]


def test_bootstrap_resamples_within_groups():
    groups = np.array([0, 0, 0, 1, 1, 1])
    seen = scaling.bootstrap(lambda idx: tuple(sorted(groups[idx])), 6, n_boot=20, groups=groups)
    assert all(tuple(v) == (0, 0, 0, 1, 1, 1) for v in seen)


def test_fit_parametric_converges():
    """Refitting from the result must not find a noticeably better optimum."""
    N, D, L = synthetic(HOFFMANN_2022, n=15, noise=0.01, seed=3)
    fit = scaling.fit_parametric(N, D, L)
    theta = [np.log(fit.A), np.log(fit.B), np.log(fit.E), fit.alpha, fit.beta]
    args = (np.log(N), np.log(D), np.log(L), 1e-3)
    refit = scaling.fit_parametric(N, D, L, starts=[theta])
    assert scaling._objective(
        [np.log(refit.A), np.log(refit.B), np.log(refit.E), refit.alpha, refit.beta], *args
    )[0] >= scaling._objective(theta, *args)[0] * (1 - 1e-6)


def test_refining_the_best_grid_starts_finds_the_full_grids_optimum():
    N, D, L = synthetic(BESIROGLU_2024, n=20, noise=0.01, seed=5)
    args = (np.log(N), np.log(D), np.log(L), 1e-3)

    def objective(f):
        return scaling._objective([np.log(f.A), np.log(f.B), np.log(f.E), f.alpha, f.beta],
                                  *args)[0]

    quick, full = scaling.fit_parametric(N, D, L), scaling.fit_parametric(N, D, L, refine=192)
    assert objective(quick) <= objective(full) * (1 + 1e-6)
    assert quick.a == pytest.approx(full.a, abs=1e-3)
    with pytest.raises(ValueError, match="refine"):
        scaling.fit_parametric(N, D, L, refine=0)


def test_pooled_seed_std_pools_only_repeated_runs():
    groups = ["a", "a", "b", "b", "c"]
    losses = [1.0, 1.2, 2.0, 2.0, 9.0]  # 'c' has one seed: no information about noise
    std, dof = scaling.pooled_seed_std(groups, losses)
    assert dof == 2 and std == pytest.approx(np.sqrt(0.02 / 2))
    with pytest.raises(ValueError, match="two or more seeds"):
        scaling.pooled_seed_std(["a", "b"], [1.0, 2.0])


def test_noise_bootstrap_spreads_by_sigma_and_keeps_every_point():
    losses = np.linspace(3.0, 4.0, 12)
    means = scaling.noise_bootstrap(np.mean, losses, sigma=0.1, n_boot=400)
    assert len(means) == 400
    assert np.std(means) == pytest.approx(0.1 / np.sqrt(12), rel=0.15)
    sizes = scaling.noise_bootstrap(len, losses, sigma=0.1, n_boot=5)
    assert set(sizes) == {12}
    assert np.all(scaling.noise_bootstrap(np.mean, losses, 0.0, n_boot=3) == np.mean(losses))
    with pytest.raises(ValueError, match="sigma"):
        scaling.noise_bootstrap(np.mean, losses, sigma=-1.0)
    # one sigma per loss: only the noisy half moves
    per_point = np.r_[np.zeros(6), np.full(6, 0.1)]
    firsts = scaling.noise_bootstrap(lambda v: v[:6].sum(), losses, per_point, n_boot=20)
    assert np.allclose(firsts, losses[:6].sum())


def test_run_all_matches_run_in_parallel_and_reads_the_cache():
    cfg = scaling.ladder_config(16, 1, vocab_size=512, max_seq_len=32)
    specs = [scaling.RunSpec(cfg, tokens=3 * 8 * 32, batch_size=8, seq_len=32, seed=s)
             for s in range(3)]
    results = scaling.run_all(specs, workers=2, progress=False)
    assert [r["cached"] for r in results] == [False] * 3
    assert len({r["val_loss"] for r in results}) == 3  # the seeds differ
    again = scaling.run_all(specs, workers=2, progress=False)
    assert all(r["cached"] for r in again)
    assert [r["val_loss"] for r in again] == [r["val_loss"] for r in results]
    with pytest.raises(ValueError, match="workers"):
        scaling.run_all(specs, workers=0)
