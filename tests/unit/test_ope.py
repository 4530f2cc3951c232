"""Off-policy evaluation against a bandit world whose true answer is known exactly."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adpulse.cli import main
from adpulse.commands.evaluate import (
    POLICY_HELP,
    read_csv,
    read_jsonl,
    read_log,
    write_csv,
    write_jsonl,
)
from adpulse.core.errors import InputError
from scoring import ope
from scoring.ope import LoggedRound, MeanReward, evaluate, make_policy

K, SEGMENTS, N = 4, 10, 20_000
ACTIONS = tuple(f"ad{a}" for a in range(K))


def _world(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """True CTR [K, SEGMENTS] (each ad best for some segments) and a noisy model's pCTR."""
    rng = np.random.default_rng(seed)
    seg = np.arange(SEGMENTS)
    centres = np.array([1.0, 4.0, 6.0, 9.0])
    ctr = 0.03 + 0.3 * np.exp(-(((seg[None, :] - centres[:, None]) / 2.5) ** 2))
    pctr = np.clip(ctr + rng.normal(0, 0.06, ctr.shape), 0.001, 0.999)
    return ctr, pctr


def _log(n: int = N, seed: int = 11) -> tuple[list[LoggedRound], np.ndarray]:
    """n rounds under a uniformly random logging policy (propensity 1/K)."""
    ctr, pctr = _world()
    rng = np.random.default_rng(seed)
    segs = rng.integers(SEGMENTS, size=n)
    picks = rng.integers(K, size=n)
    clicks = rng.random(n) < ctr[picks, segs]
    rounds = [
        LoggedRound(
            context={"segment": int(s), "pctr": [round(float(x), 4) for x in pctr[:, s]]},
            actions=ACTIONS,
            action=ACTIONS[a],
            reward=float(c),
            propensity=1.0 / K,
        )
        for s, a, c in zip(segs, picks, clicks, strict=True)
    ]
    return rounds, ctr


def _true_value(policy_spec: str, ctr: np.ndarray) -> float:
    """Exact expected CTR of a policy in the world: segments are uniform."""
    _, pctr = _world()
    policy = make_policy(policy_spec)
    total = 0.0
    for s in range(SEGMENTS):
        ctx = {"segment": s, "pctr": [round(float(x), 4) for x in pctr[:, s]]}
        probs = policy(LoggedRound(ctx, ACTIONS, ACTIONS[0], 0.0, 1.0))
        total += float(probs @ ctr[:, s])
    return total / SEGMENTS


@pytest.fixture(scope="module")
def logged() -> tuple[list[LoggedRound], np.ndarray]:
    return _log()


@pytest.mark.parametrize("spec", ["greedy-feature:pctr", "epsilon-greedy:0.2:pctr", "uniform"])
def test_each_estimator_interval_covers_the_true_ctr(
    spec: str, logged: tuple[list[LoggedRound], np.ndarray]
) -> None:
    rounds, ctr = logged
    truth = _true_value(spec, ctr)
    report = evaluate(rounds, make_policy(spec), MeanReward.fit(rounds, by="segment"))
    for name, e in report.estimators():
        assert e.lo <= truth <= e.hi, f"{name} {e} misses the true CTR {truth:.4f}"


def test_greedy_target_beats_uniform_logging_by_a_margin(
    logged: tuple[list[LoggedRound], np.ndarray],
) -> None:
    rounds, ctr = logged
    assert _true_value("greedy-feature:pctr", ctr) > ctr.mean() + 0.05  # the test has teeth
    report = evaluate(rounds, make_policy("greedy-feature:pctr"))
    assert report.ips.lo > report.logged_mean


def test_snips_and_dr_intervals_are_no_wider_than_ips(
    logged: tuple[list[LoggedRound], np.ndarray],
) -> None:
    rounds, _ = logged
    report = evaluate(
        rounds, make_policy("greedy-feature:pctr"), MeanReward.fit(rounds, by="segment")
    )
    ips_width = report.ips.hi - report.ips.lo
    assert report.snips.hi - report.snips.lo <= 1.05 * ips_width
    assert report.dr.hi - report.dr.lo <= 1.05 * ips_width


def test_logging_policy_on_itself_has_full_ess_and_ips_equals_mean_reward(
    logged: tuple[list[LoggedRound], np.ndarray],
) -> None:
    rounds, _ = logged
    report = evaluate(rounds, make_policy("logged"))
    mean = float(np.mean([r.reward for r in rounds]))
    assert report.ess == pytest.approx(N, rel=1e-12)
    assert report.ips.value == pytest.approx(mean, abs=1e-12)
    assert report.snips.value == pytest.approx(mean, abs=1e-12)
    assert report.logged_mean == pytest.approx(mean, abs=1e-12)
    assert report.flags == ()


def test_deterministic_target_on_uniform_log_has_ess_near_n_over_k(
    logged: tuple[list[LoggedRound], np.ndarray],
) -> None:
    rounds, _ = logged
    report = evaluate(rounds, make_policy("greedy-feature:pctr"))
    assert report.ess == pytest.approx(N / K, rel=0.05)
    assert report.max_weight == K


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 5),  # candidates
            st.floats(0.01, 1.0),  # propensity of the chosen one
            st.sampled_from([0.0, 1.0, 0.25, 3.5]),  # reward
        ),
        min_size=1,
        max_size=40,
    )
)
def test_ips_of_the_logging_policy_is_the_mean_reward_exactly(
    rows: list[tuple[int, float, float]],
) -> None:
    rounds = [
        LoggedRound({}, tuple(f"a{j}" for j in range(k)), "a0", r, p if k > 1 else 1.0)
        for k, p, r in rows
    ]
    report = evaluate(rounds, make_policy("logged"))
    mean = float(np.mean([r.reward for r in rounds]))
    assert report.ips.value == pytest.approx(mean, rel=1e-9, abs=1e-12)
    assert report.snips.value == pytest.approx(mean, rel=1e-9, abs=1e-12)
    assert report.ess == pytest.approx(len(rounds), rel=1e-9)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_propensities_outside_0_1_are_refused(bad: float) -> None:
    rounds = [LoggedRound({}, ("a", "b"), "a", 1.0, 0.5), LoggedRound({}, ("a", "b"), "b", 0, bad)]
    with pytest.raises(ValueError, match=r"round 2: propensity .* must be in \(0, 1\]"):
        evaluate(rounds, make_policy("uniform"))


def test_target_mass_on_rarely_logged_actions_is_flagged() -> None:
    rounds = [
        LoggedRound({"s": [1, 0]}, ("a", "b"), "a", 1.0, 0.995, propensities=(0.995, 0.005)),
        LoggedRound({"s": [0, 1]}, ("a", "b"), "b", 1.0, 0.005, propensities=(0.995, 0.005)),
    ]
    flags = evaluate(rounds, make_policy("greedy-feature:s")).flags
    assert any("propensity < 0.01" in f for f in flags)
    assert any("of its mass on actions" in f for f in flags)


def test_unknown_policy_and_bad_feature_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="choose one of uniform"):
        make_policy("thompson")
    rnd = LoggedRound({"pctr": [0.1]}, ("a", "b"), "a", 0.0, 0.5)
    with pytest.raises(ValueError, match="one number per candidate"):
        evaluate([rnd], make_policy("greedy-feature:pctr"))


def test_cli_policy_help_names_every_registered_policy() -> None:
    assert POLICY_HELP == ope.POLICY_HELP
    assert all(name in POLICY_HELP for name in ope.POLICIES)


def test_docstring_examples_hold() -> None:
    result = doctest.testmod(ope)
    assert result.failed == 0
    assert result.attempted > 0


# --- formats ---------------------------------------------------------------------------------


def test_jsonl_and_csv_round_trip(tmp_path: Path) -> None:
    rounds, _ = _log(50)
    rounds[0] = LoggedRound(
        rounds[0].context, ACTIONS, ACTIONS[2], 0.5, 0.25, position=2, propensities=(0.25,) * 4
    )
    write_jsonl(rounds, tmp_path / "log.jsonl")
    write_csv(rounds, tmp_path / "log.csv")
    assert read_jsonl(tmp_path / "log.jsonl") == rounds
    assert read_csv(tmp_path / "log.csv") == rounds


def test_csv_context_from_x_columns(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text(
        "x_segment,x_pctr,actions,action,reward,propensity\n"
        '3,"[0.1, 0.4]","[""a"", ""b""]",b,1,0.5\n'
    )
    (rnd,) = read_log(path)
    assert rnd.context == {"segment": 3.0, "pctr": [0.1, 0.4]}
    assert (rnd.actions, rnd.action, rnd.reward, rnd.propensity) == (("a", "b"), "b", 1.0, 0.5)


def test_ctr_feedback_log_uses_ads_per_placement_as_candidates(tmp_path: Path) -> None:
    recs = [
        {"decision_id": f"d{i}", "ad_id": ad, "user_id": "u", "clicked": c, "decision_ts": 0,
         "label_ts": 0, "features": {"interest": [], "placement": pl}, "propensity": 0.5}
        for i, (ad, pl, c) in enumerate(
            [("ad-1", "feed", 1), ("ad-2", "feed", 0), ("ad-3", "home", 1)]
        )
    ]  # fmt: skip
    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    rounds = read_log(path)
    assert [r.actions for r in rounds] == [("ad-1", "ad-2"), ("ad-1", "ad-2"), ("ad-3",)]
    assert evaluate(rounds, make_policy("logged")).ips.value == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"actions": ["a"], "action": "a", "reward": 1, "propensity": 0}', "propensity 0.0"),
        ('{"actions": ["a"], "action": "b", "reward": 1, "propensity": 1}', "not among actions"),
        ('{"actions": ["a"], "action": "a", "reward": 1}', "missing field(s) propensity"),
        ("{not json", "Expecting property name"),
    ],
)
def test_bad_line_is_named_by_file_and_line(tmp_path: Path, line: str, why: str) -> None:
    path = tmp_path / "log.jsonl"
    good = '{"actions": ["a"], "action": "a", "reward": 1, "propensity": 1}'
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(InputError) as info:
        read_log(path)
    assert str(info.value).startswith(f"{path}:2: ")
    assert why in str(info.value)


# --- command line ----------------------------------------------------------------------------


def test_cli_prints_all_three_estimators_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rounds, ctr = _log(5_000, seed=3)
    write_jsonl(rounds, tmp_path / "log.jsonl")
    out_json = tmp_path / "ope.json"
    spec = "greedy-feature:pctr"
    code = main(
        ["evaluate", str(tmp_path / "log.jsonl"), "--policy", spec, "--json", str(out_json)]
    )
    out = capsys.readouterr().out
    assert code == 0
    for name in ("IPS", "SNIPS", "DR", "effective sample size", "5000 logged rounds"):
        assert name in out
    result = json.loads(out_json.read_text())
    assert set(result["estimators"]) == {"IPS", "SNIPS", "DR"}
    lo, hi = result["estimators"]["IPS"]["ci95"]
    assert lo <= _true_value(spec, ctr) <= hi


def test_cli_bad_input_is_one_line_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "log.csv"
    path.write_text('actions,action,reward,propensity\n"[""a""]",a,1,1.5\n')
    assert main(["evaluate", str(path), "--policy", "uniform"]) == 4
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(f"adpulse: error: {path}:2: propensity 1.5 must be in (0, 1]")
    assert main(["evaluate", str(path), "--policy", "nope"]) == 4
    assert "choose one of" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.jsonl"), "--policy", "uniform"]) == 4
