"""A ground-truth click model that writes ``ctr-feedback`` records, from a seed.

Real click logs with interest vectors are not public, so the default model is
trained on a world we can regenerate exactly and whose answer we know:

* categories and items live in the hashed embedding space the engine uses;
* each user truly likes 1-3 categories (Dirichlet weights); their true interest
  is the normalised weighted sum of those category embeddings, and their
  *observed* interest vector is what ``scoring.features`` would compute from
  5-40 decayed events (80% in liked categories, 20% noise); 15% of users are
  cold (no history, empty vector);
* ads have a category, a campaign (with a small quality effect), a bid, and
  usually an item;
* a logging policy shows a random ad (65%) or one from a liked category (35%),
  and records the exact propensity of its choice;
* P(click) = sigmoid(bias + alpha * cos(true interest, ad) + placement + device
  + hour-of-day + campaign effects), about 3% overall;
* with ``conversions=True``, a click converts (a purchase after it) with
  P = sigmoid(-3 + 2.5 * cos + device + campaign effects of their own), about
  20% of clicks, and the joiner's second record (``converted: 1``) follows its
  label; drawn from a generator of its own, so the click records are the same
  with or without it.

Decision times increase through one simulated week, so the training time split
is meaningful. ``generate(n, seed)`` gives the same records on every machine.

>>> recs = generate(50, seed=1, world=make_world(1, n_users=20, n_ads=10))
>>> len(recs), recs[0]["features"]["placement"] in PLACEMENTS
(50, True)
>>> all(a["decision_ts"] <= b["decision_ts"] for a, b in zip(recs, recs[1:]))
True
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from adpulse.core.errors import InputError
from scoring.embeddings import HashedEmbeddings, event_embeddings
from scoring.featurespec import FeatureSpec, _unit

START_MS = 1_717_200_000_000  # 2024-06-01T00:00:00Z
WEEK_MS = 7 * 24 * 3600 * 1000
WINDOW_MS = 30 * 60 * 1000  # attribution window
PLACEMENTS = {"home_banner": 0.3, "search.top": 0.6, "feed": 0.0, "sidebar": -0.5}
DEVICES = {"mobile": 0.2, "desktop": 0.0, "tablet": 0.1, "tv": -0.6, "other": -0.3}
KIND_WEIGHTS = (1.0, 2.0, 4.0, 3.0, 6.0)  # browse, click, cart, fav, purchase
BIAS, ALPHA, EXPLORE = -5.0, 3.0, 0.65
CVR_BIAS, CVR_ALPHA = -3.0, 2.5
CVR_DEVICES = {"mobile": -0.3, "desktop": 0.5, "tablet": 0.0, "tv": -1.0, "other": -0.5}


@dataclass(frozen=True)
class World:
    """Users, ads and effects of one seed; ``ads`` are ad-catalog records."""

    spec: FeatureSpec
    user_cats: npt.NDArray[np.int64]  # [U, 3] liked categories (ids)
    user_w: npt.NDArray[np.float64]  # [U, 3] their weights (0 = unused slot)
    user_true: npt.NDArray[np.float32]  # [U, D] unit
    user_interest: list[list[float]]  # observed decayed vector per user ([] = cold)
    ads: list[dict[str, Any]]
    ad_vec: npt.NDArray[np.float32]  # [A, D] unit, as AdIndex builds it
    ad_cat: npt.NDArray[np.int64]
    campaign_effect: npt.NDArray[np.float64]  # per ad
    # Each user's events as [item_id, category_id], newest first (the behaviour sequence).
    user_seq: list[list[list[int]]] | None = None


def make_world(
    seed: int,
    spec: FeatureSpec | None = None,
    *,
    n_users: int = 5000,
    n_ads: int = 1000,
    n_categories: int = 300,
    n_campaigns: int = 100,
) -> World:
    spec = spec or FeatureSpec()
    rng = np.random.default_rng(seed)
    table = HashedEmbeddings(spec.dim, spec.embedding_seed)
    categories = rng.choice(np.arange(1_000, 5_000_000), n_categories, replace=False)

    k = rng.integers(1, 4, n_users)
    user_cats = rng.choice(categories, (n_users, 3))
    user_w = rng.dirichlet(np.ones(3), n_users) * (np.arange(3)[None, :] < k[:, None])
    user_w /= user_w.sum(axis=1, keepdims=True)
    cat_vecs = table.categories(user_cats.ravel()).reshape(n_users, 3, spec.dim)
    user_true = _unit(np.einsum("uk,ukd->ud", user_w, cat_vecs).astype(np.float32))

    # Observed interest: decayed sum over a few synthetic events (scoring.features' formula).
    n_ev = np.where(rng.random(n_users) < 0.15, 0, rng.integers(5, 41, n_users))
    owner = np.repeat(np.arange(n_users), n_ev)
    slot = _pick_slot(rng, user_w[owner])
    ev_cat = np.where(
        rng.random(len(owner)) < 0.8, user_cats[owner, slot], rng.choice(categories, len(owner))
    )
    ev_item = ev_cat * 1000 + rng.integers(0, 50, len(owner))
    kind = rng.choice(5, len(owner), p=[0.8, 0.08, 0.05, 0.04, 0.03])
    age_h = rng.exponential(24.0, len(owner))
    w = np.asarray(KIND_WEIGHTS)[kind] * np.exp(-age_h * np.log(2) / 24.0)
    e = event_embeddings(table, ev_item, ev_cat, spec.category_mix) * w[:, None].astype(np.float32)
    vec = np.zeros((n_users, spec.dim), dtype=np.float64)
    np.add.at(vec, owner, e)
    interest = [vec[u].round(6).tolist() if n_ev[u] else [] for u in range(n_users)]
    newest = np.lexsort((age_h, owner))  # by user, then youngest first
    pairs = np.stack([ev_item, ev_cat], axis=1)[newest].tolist()
    at = np.r_[0, np.cumsum(n_ev)].tolist()
    user_seq = [pairs[at[u] : at[u + 1]] for u in range(n_users)]

    ad_cat = rng.choice(categories, n_ads)
    has_item = rng.random(n_ads) < 0.7
    ad_item = ad_cat * 1000 + rng.integers(0, 50, n_ads)
    campaign = rng.integers(0, n_campaigns, n_ads)
    camp_q = rng.normal(0.0, 0.3, n_campaigns)
    bid = np.round(np.exp(rng.normal(0.0, 0.5, n_ads)), 2) + 0.01
    ads: list[dict[str, Any]] = []
    for a in range(n_ads):
        ad: dict[str, Any] = {
            "ad_id": f"ad-{a}",
            "campaign_id": f"camp-{campaign[a]}",
            "category_id": int(ad_cat[a]),
            "bid": float(bid[a]),
            "daily_budget": 1000.0,
            "targeting": {},
        }
        if has_item[a]:
            ad["item_id"] = int(ad_item[a])
        ads.append(ad)
    ad_vec = table.categories(ad_cat)
    ad_vec[has_item] = event_embeddings(
        table, ad_item[has_item], ad_cat[has_item], spec.category_mix
    )
    return World(
        spec, user_cats, user_w, user_true, interest, ads, _unit(ad_vec), ad_cat,
        camp_q[campaign], user_seq,
    )  # fmt: skip


def _pick_slot(rng: np.random.Generator, w: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """One column per row of ``w``, drawn with the row's weights."""
    u = rng.random(len(w))[:, None]
    out: npt.NDArray[np.int64] = np.minimum(
        (u > np.cumsum(w, axis=1)).sum(axis=1), w.shape[1] - 1
    ).astype(np.int64)
    return out


def generate(
    n: int,
    seed: int,
    world: World | None = None,
    *,
    conversions: bool = False,
    sequence: int = 0,
) -> list[dict[str, Any]]:
    """``n`` ctr-feedback labels of ``world`` (default: ``make_world(seed)``), in time order;
    ``conversions`` adds a ``converted: 1`` record after each converting click's label;
    with ``sequence`` > 0 each carries the user's last ``sequence`` behaviours, as a
    sequence model's decisions log them (``features.sequence``)."""
    world = world or make_world(seed)
    rng = np.random.default_rng(seed + 1)
    n_users, n_ads = len(world.user_interest), len(world.ads)
    ts = START_MS + np.sort(rng.integers(0, WEEK_MS, n))
    user = rng.integers(0, n_users, n)

    # Logging policy: uniform with prob EXPLORE, else a liked category's ads.
    by_cat: dict[int, npt.NDArray[np.int64]] = {}
    for a, c in enumerate(world.ad_cat):
        by_cat.setdefault(int(c), np.empty(0, np.int64))
        by_cat[int(c)] = np.append(by_cat[int(c)], a)
    n_in = np.array([[len(by_cat.get(int(c), ())) for c in row] for row in world.user_cats])
    ad = rng.integers(0, n_ads, n)
    targeted = np.flatnonzero(rng.random(n) >= EXPLORE)
    slot = _pick_slot(rng, world.user_w[user[targeted]])
    for j, s in zip(targeted, slot, strict=True):
        pool = by_cat.get(int(world.user_cats[user[j], s]))
        if pool is not None:
            ad[j] = pool[rng.integers(0, len(pool))]
    uw, uc, un = world.user_w[user], world.user_cats[user], n_in[user]
    match = uc == world.ad_cat[ad][:, None]
    p_target = (uw * match / np.maximum(un, 1)).sum(axis=1) + (uw * (un == 0)).sum(axis=1) / n_ads
    propensity = EXPLORE / n_ads + (1 - EXPLORE) * p_target

    placement = rng.choice(list(PLACEMENTS), n, p=[0.3, 0.2, 0.4, 0.1])
    device = rng.choice(list(DEVICES), n, p=[0.6, 0.3, 0.06, 0.02, 0.02])
    hour = ((ts % (24 * 3600 * 1000)) // (3600 * 1000)).astype(np.int64)
    cos = np.einsum("nd,nd->n", world.user_true[user], world.ad_vec[ad])
    logit = (
        BIAS
        + ALPHA * cos
        + np.vectorize(PLACEMENTS.__getitem__)(placement)
        + np.vectorize(DEVICES.__getitem__)(device)
        + 0.4 * np.sin(2 * np.pi * (hour - 14) / 24)
        + world.campaign_effect[ad]
    )
    clicked = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    delay = rng.integers(1_000, WINDOW_MS, n)
    converts = _conversions(world, seed, ad, cos, device) & clicked if conversions else None

    out = []
    for i in range(n):
        a = world.ads[ad[i]]
        f: dict[str, Any] = {
            "interest": world.user_interest[user[i]],
            "placement": str(placement[i]),
            "device": str(device[i]),
            "hour": int(hour[i]),
            "category_id": a["category_id"],
            "campaign_id": a["campaign_id"],
        }
        if "item_id" in a:
            f["item_id"] = a["item_id"]
        if sequence and world.user_seq is not None:
            f["sequence"] = world.user_seq[user[i]][:sequence]
        rec: dict[str, Any] = {
            "decision_id": f"syn{seed}-{i}",
            "ad_id": a["ad_id"],
            "user_id": f"u-{user[i]}",
            "clicked": int(clicked[i]),
            "decision_ts": int(ts[i]),
            "label_ts": int(ts[i] + (delay[i] if clicked[i] else WINDOW_MS)),
            "features": f,
            "propensity": float(propensity[i]),
            "policy": "synthetic-mixture",
            "reason": "click" if clicked[i] else "window_expired",
        }
        if clicked[i]:
            rec["click_ts"] = int(ts[i] + delay[i])
        out.append(rec)
        if converts is not None and converts[i]:
            out.append({**rec, "converted": 1, "label_ts": rec["click_ts"] + 60_000,
                        "reason": "conversion"})  # fmt: skip
    return out


def _conversions(
    world: World,
    seed: int,
    ad: npt.NDArray[np.int64],
    cos: npt.NDArray[np.float64],
    device: npt.NDArray[np.str_],
) -> npt.NDArray[np.bool_]:
    """Whether each impression would convert if clicked (its own generator: see above)."""
    rng = np.random.default_rng(seed + 2)
    camp = np.array([int(a["campaign_id"].rsplit("-", 1)[1]) for a in world.ads])
    camp_q = rng.normal(0.0, 0.5, int(camp.max()) + 1)[camp]
    logit = CVR_BIAS + CVR_ALPHA * cos + np.vectorize(CVR_DEVICES.__getitem__)(device) + camp_q[ad]
    out: npt.NDArray[np.bool_] = rng.random(len(ad)) < 1.0 / (1.0 + np.exp(-logit))
    return out


def write_jsonl(records: Iterable[dict[str, Any]], path: Path | str) -> int:
    """Write one JSON object per line; returns the count."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, separators=(",", ":")))
            fh.write("\n")
            n += 1
    return n


def read_jsonl(path: Path | str) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file; a bad line raises InputError naming file and line."""
    p = Path(path)
    try:
        fh = p.open(encoding="utf-8")
    except OSError as exc:
        msg = f"{p}: cannot read ({exc.strerror})"
        raise InputError(msg) from None
    lineno = 0
    try:
        with fh:
            for lineno, line in enumerate(fh, 1):
                rec = _parse(p, lineno, line)
                if rec is not None:
                    yield rec
    except UnicodeDecodeError:
        msg = f"{p}:{lineno + 1}: not UTF-8 text; expected JSONL"
        raise InputError(msg) from None


def _parse(p: Path, lineno: int, line: str) -> dict[str, Any] | None:
    """One JSONL line as a dict (None if blank); InputError naming file and line otherwise."""
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        msg = f"{p}:{lineno}: not JSON ({exc.msg}); expected one ctr-feedback object per line"
        raise InputError(msg) from None
    if not isinstance(rec, dict):
        msg = f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}"
        raise InputError(msg)
    return rec
