"""The simulator's ground truth (scoring/simulation.py): deterministic, fitted, as documented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from schemas import first_error
from scoring.simulation import (
    KINDS,
    TaobaoFit,
    WorldParams,
    fit_concentration,
    fit_taobao,
    make_world,
)

SMALL = WorldParams(users=400, categories=10, ads_per_category=3)


def test_the_same_seed_gives_the_same_world_and_another_seed_another() -> None:
    a, b, c = make_world(SMALL, 5), make_world(SMALL, 5), make_world(SMALL, 6)
    for name in ("theta", "quality", "perm", "ad_cat", "ad_item"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.theta, c.theta) and not np.array_equal(a.quality, c.quality)
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    assert a.events(3, 20, False, rng_a) == b.events(3, 20, False, rng_b)


def test_interests_are_distributions_fitted_to_the_sample_concentration() -> None:
    w = make_world(WorldParams(users=3000), 1)
    np.testing.assert_allclose(w.theta.sum(axis=1), 1.0)
    # Mean share of a user's top category: the sample's 0.2864, up to sampling noise.
    assert w.theta.max(axis=1).mean() == pytest.approx(TaobaoFit().top1_share, abs=0.02)
    # Ad quality is log-normal with mean 1: the model's prior is unbiased on average.
    big = make_world(WorldParams(users=1, ads_per_category=400), 2)
    assert big.quality.mean() == pytest.approx(1.0, abs=0.05)


def test_fit_concentration_hits_the_target_top_share() -> None:
    pop = np.array([0.4, 0.3, 0.2, 0.1])
    for target in (0.4, 0.6, 0.9):
        c = fit_concentration(pop, target)
        draws = np.random.default_rng(11).dirichlet(c * pop, 20_000)
        assert draws.max(axis=1).mean() == pytest.approx(target, abs=0.02)


def test_true_ctr_follows_the_documented_formula() -> None:
    w = make_world(SMALL, 3)
    p = w.params
    ads = np.arange(w.n_ads)
    got = w.ctr(7, ads, "sidebar", np.zeros(w.n_ads), drifted=False)
    th = w.theta[7]
    expected = p.base_ctr * w.quality * (len(th) * th[w.ad_cat]) ** p.affinity_power * 0.6
    np.testing.assert_allclose(got, np.minimum(p.max_ctr, expected))
    # Fatigue: each earlier impression of the same ad multiplies by `fatigue`.
    again = w.ctr(7, ads, "sidebar", np.full(w.n_ads, 2), drifted=False)
    unclipped = got < p.max_ctr
    np.testing.assert_allclose(again[unclipped], got[unclipped] * p.fatigue**2)
    # Position: a more prominent slot, a higher CTR for the same ad and user.
    top = w.ctr(7, ads, "search.top", np.zeros(w.n_ads), drifted=False)
    assert (top[unclipped] > got[unclipped]).all()


def test_drift_rotates_every_users_interest_to_other_categories() -> None:
    w = make_world(SMALL, 4)
    assert not np.any(w.perm == np.arange(len(w.perm)))  # no category keeps its fans
    for u in range(5):
        np.testing.assert_array_equal(w.interest(u, True), w.theta[u][w.perm])
    before = w.ctr(0, np.arange(w.n_ads), "feed", np.zeros(w.n_ads), drifted=False)
    after = w.ctr(0, np.arange(w.n_ads), "feed", np.zeros(w.n_ads), drifted=True)
    assert not np.allclose(before, after)


@pytest.mark.parametrize("drifted", [False, True])
def test_events_are_drawn_from_the_current_interest(drifted: bool) -> None:
    w = make_world(SMALL, 8)
    rng = np.random.default_rng(0)
    events = w.events(11, 20_000, drifted, rng)
    cats = np.array([w.category_ids.tolist().index(c) for _, _, c in events])
    freq = np.bincount(cats, minlength=len(w.category_ids)) / len(cats)
    np.testing.assert_allclose(freq, w.interest(11, drifted), atol=0.015)
    kinds = {k for k, _, _ in events}
    assert kinds <= set(KINDS) and "browse" in kinds
    assert all(item // 1000 == cat for _, item, cat in events)


def test_catalog_records_are_valid_and_bids_equal() -> None:
    w = make_world(SMALL, 1)
    ads = w.catalog()
    assert len(ads) == w.n_ads == 30
    assert all(first_error("ad-catalog", a) is None for a in ads)
    assert {a["bid"] for a in ads} == {1.0}


def test_fit_reads_categories_shares_and_kinds() -> None:
    rows = [("u1", 5, "browse")] * 6 + [("u1", 6, "cart")] * 2 + [("u2", 6, "purchase")] * 2
    fit = fit_taobao(rows, categories=2)
    assert fit.categories == (5, 6) and fit.counts == (6, 4)
    assert fit.top1_share == pytest.approx((6 / 8 + 1.0) / 2)
    assert fit.kind_p == pytest.approx((0.6, 0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="no events"):
        fit_taobao([])


def test_the_recorded_fit_is_the_real_samples(taobao: Path) -> None:
    from adpulse.replay import read_taobao

    fit = fit_taobao((e.user_id, e.category_id, e.kind) for e in read_taobao(taobao))
    recorded = TaobaoFit()
    assert fit.categories == recorded.categories and fit.counts == recorded.counts
    assert fit.top1_share == pytest.approx(recorded.top1_share, abs=1e-4)
    assert fit.kind_p == pytest.approx(recorded.kind_p, abs=1e-4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--drift-at", "1.5"], "--drift-at 1.5"),
        (["--decisions", "10"], "--decisions 10"),
        (["--rate", "0"], "--rate 0"),
    ],
)
def test_simulate_refuses_bad_options_in_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    from adpulse.cli import main
    from adpulse.core.errors import ConfigError

    assert main(["simulate", *args]) == ConfigError.exit_code
    err = capsys.readouterr().err.strip()
    assert err.startswith("adpulse: error: ") and message in err and "\n" not in err
