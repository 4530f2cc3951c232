"""Ground truth for the closed-loop simulator (``adpulse simulate``): who clicks what, and why.

The world is fitted to the real Taobao UserBehavior sample (``fit_taobao``):
its most frequent categories (real category ids) and their popularity, how
concentrated one user's interest is (mean share of a user's top category:
0.29 in the sample; top three: 0.53), and the mix of event kinds. Then, from a
seed:

* **users** have a latent interest theta_u, a distribution over the world's K
  categories, drawn from Dirichlet(c * popularity) with c fitted so that the
  mean top-category share matches the sample's; their browse/cart/fav/purchase
  events are drawn from theta_u, so the engine's interest vectors form from them;
* **ads** sit in a category (``ads_per_category`` each) on one item of it, all
  with the same bid (the objective is clicks, so every policy's value is its
  CTR), and carry a **quality** multiplier q_a, log-normal with mean 1, which
  nothing the model sees reveals (creative quality: the realistic reason a
  model trained elsewhere leaves room for online learning);
* **true CTR** of ad a for user u, shown in placement s for the (n+1)-th time:

      p = min(max_ctr, base_ctr * q_a * (K * theta_u[cat_a]) ** affinity_power
                       * position[s] * fatigue ** n)

  affinity is the user's interest in the ad's category relative to a uniform
  interest; ``position`` is the slot's prominence; ``fatigue`` the drop per
  earlier impression of the same ad to the same user;
* **drift**: from the drift point on, every user's interest is rotated over
  the categories (theta'[c] = theta[perm[c]], one fixed permutation): what each
  user likes changes, and so does which ads are popular overall; their events
  follow the new interest, so their interest vectors move too;
* a click converts (a purchase of the ad's item) with probability
  ``cvr_base + cvr_affinity * theta_u[cat_a] / max(theta_u)``.

Everything is a pure function of the seed and the counts passed in.

>>> world = make_world(WorldParams(users=50, categories=6, ads_per_category=2), seed=3)
>>> p = world.ctr(0, np.arange(world.n_ads), "feed", np.zeros(world.n_ads), drifted=False)
>>> p.shape, bool((p > 0).all() and (p <= world.params.max_ctr).all())
((12,), True)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
KINDS = ("browse", "cart", "fav", "purchase")  # what simulated users do besides clicking ads
ITEMS_PER_CATEGORY = 1000  # item ids are category * 1000 + rank


@dataclass(frozen=True)
class TaobaoFit:
    """What the world takes from the real sample; the defaults are its figures (4,321 events)."""

    categories: tuple[int, ...] = (
        3607361, 4145813, 4756105, 2355072, 982926, 1575622, 1320293, 3002561, 4801426,
        2096639, 2520377, 1080785, 2735466, 4640311, 4181361, 154040, 149192, 2885642,
        3898483, 2640118, 570735, 2920476, 4339722, 1051370, 1061857, 2465336, 846990,
        1299190, 4806751, 4170419,
    )  # fmt: skip
    counts: tuple[int, ...] = (
        444, 287, 214, 132, 127, 118, 86, 84, 68, 57, 55, 54, 47, 45, 43, 41, 40, 37,
        35, 34, 34, 30, 30, 29, 29, 27, 27, 26, 26, 26,
    )  # fmt: skip
    top1_share: float = 0.2864  # mean share of a user's events in their top category
    kind_p: tuple[float, ...] = (0.9086, 0.0440, 0.0296, 0.0178)  # KINDS order, sample's


def fit_taobao(rows: Iterable[tuple[str, int, str]], categories: int = 30) -> TaobaoFit:
    """Fit from (user_id, category_id, kind) rows, kinds as in user-events."""
    per_user: dict[str, Counter[int]] = {}
    cats: Counter[int] = Counter()
    kinds: Counter[str] = Counter()
    for user, cat, kind in rows:
        per_user.setdefault(user, Counter())[cat] += 1
        cats[cat] += 1
        kinds[kind] += 1
    if not per_user:
        msg = "no events to fit the world to"
        raise ValueError(msg)
    top = cats.most_common(categories)
    shares = [max(c.values()) / sum(c.values()) for c in per_user.values()]
    total = sum(kinds[k] for k in KINDS) or 1
    return TaobaoFit(
        categories=tuple(c for c, _ in top),
        counts=tuple(n for _, n in top),
        top1_share=float(np.mean(shares)),
        kind_p=tuple(kinds[k] / total for k in KINDS),
    )


@dataclass(frozen=True)
class WorldParams:
    users: int = 2000
    categories: int = 30  # K: the sample's K most frequent categories
    ads_per_category: int = 4
    base_ctr: float = 0.02  # CTR of an average-quality ad at uniform interest, first showing
    quality_sd: float = 0.9  # log-normal sd of the ad-quality multiplier (mean 1)
    affinity_power: float = 0.5
    fatigue: float = 0.7  # CTR multiplier per earlier impression of the ad to the user
    max_ctr: float = 0.5
    position: tuple[tuple[str, float], ...] = (
        ("search.top", 1.4), ("home_banner", 1.15), ("feed", 1.0), ("sidebar", 0.6),
    )  # fmt: skip
    placement_p: tuple[float, ...] = (0.2, 0.3, 0.4, 0.1)
    cvr_base: float = 0.05
    cvr_affinity: float = 0.15
    bid: float = 1.0

    def __post_init__(self) -> None:
        if self.users < 1 or self.categories < 2 or self.ads_per_category < 1:
            msg = f"world needs users >= 1, categories >= 2, ads_per_category >= 1: {self}"
            raise ValueError(msg)
        if not 0 < self.fatigue <= 1 or not 0 < self.base_ctr < self.max_ctr <= 1:
            msg = f"world needs 0 < fatigue <= 1 and 0 < base_ctr < max_ctr <= 1: {self}"
            raise ValueError(msg)


@dataclass
class World:
    params: WorldParams
    fit: TaobaoFit
    category_ids: I64  # [K] real Taobao category ids
    popularity: F64  # [K]
    concentration: float  # c of Dirichlet(c * popularity)
    theta: F64  # [U, K] latent interest before the drift
    perm: I64  # [K] the drift's rotation
    ad_cat: I64  # [A] category index (into category_ids)
    ad_item: I64  # [A] item id
    quality: F64  # [A]
    item_p: F64 = field(repr=False)  # Zipf over a category's items for browsing

    @property
    def n_ads(self) -> int:
        return len(self.ad_cat)

    @property
    def n_users(self) -> int:
        return len(self.theta)

    def interest(self, user: int, drifted: bool) -> F64:
        th: F64 = self.theta[user]
        return th[self.perm] if drifted else th

    def ctr(
        self, user: int, ads: I64, placement: str, shown_before: npt.ArrayLike, drifted: bool
    ) -> F64:
        """True click probability of each of ``ads`` for this user, slot and history."""
        p = self.params
        th = self.interest(user, drifted)
        affinity = (len(th) * th[self.ad_cat[ads]]) ** p.affinity_power
        pos = dict(p.position).get(placement, 1.0)
        n = np.asarray(shown_before, dtype=np.float64)
        raw = p.base_ctr * self.quality[ads] * affinity * pos * p.fatigue**n
        return np.asarray(np.minimum(p.max_ctr, raw), dtype=np.float64)

    def cvr(self, user: int, ad: int, drifted: bool) -> float:
        th = self.interest(user, drifted)
        rel = th[self.ad_cat[ad]] / th.max()
        return float(self.params.cvr_base + self.params.cvr_affinity * rel)

    def events(
        self, user: int, n: int, drifted: bool, rng: np.random.Generator
    ) -> list[tuple[str, int, int]]:
        """``n`` (kind, item_id, category_id) the user does next, drawn from their interest."""
        cats = rng.choice(len(self.category_ids), n, p=self.interest(user, drifted))
        kinds = rng.choice(len(KINDS), n, p=np.asarray(self.fit.kind_p) / sum(self.fit.kind_p))
        ranks = rng.choice(len(self.item_p), n, p=self.item_p)
        out = []
        for c, k, r in zip(cats.tolist(), kinds.tolist(), ranks.tolist(), strict=True):
            cid = int(self.category_ids[c])
            out.append((KINDS[k], cid * ITEMS_PER_CATEGORY + r, cid))
        return out

    def catalog(self, campaigns: int = 20) -> list[dict[str, Any]]:
        """ad-catalog records: same bid everywhere, budgets that never bind."""
        return [
            {
                "ad_id": f"sim-ad-{a}",
                "campaign_id": f"sim-camp-{a % campaigns}",
                "category_id": int(self.category_ids[self.ad_cat[a]]),
                "item_id": int(self.ad_item[a]),
                "bid": self.params.bid,
                "daily_budget": 1e9,
                "targeting": {},
            }
            for a in range(self.n_ads)
        ]

    def placement(self, rng: np.random.Generator) -> str:
        names = [n for n, _ in self.params.position]
        return names[int(rng.choice(len(names), p=np.asarray(self.params.placement_p)))]


def fit_concentration(popularity: F64, top1_share: float, seed: int = 0, n: int = 4000) -> float:
    """c such that Dirichlet(c * popularity) draws have mean top share ``top1_share``.

    Bisection on log c, each step on draws from the same seed, so the answer is
    deterministic (the mean top share falls as c grows).
    """

    def mean_top(c: float) -> float:
        draws = np.random.default_rng(seed).dirichlet(np.maximum(c * popularity, 1e-3), n)
        return float(draws.max(axis=1).mean())

    lo, hi = np.log(1e-2), np.log(1e4)
    for _ in range(30):
        mid = (lo + hi) / 2
        if mean_top(float(np.exp(mid))) > top1_share:
            lo = mid
        else:
            hi = mid
    return float(np.exp((lo + hi) / 2))


def make_world(params: WorldParams, seed: int, fit: TaobaoFit | None = None) -> World:
    fit = fit or TaobaoFit()
    k = min(params.categories, len(fit.categories))
    if k < 2:
        msg = f"the fit has {len(fit.categories)} categories; the world needs at least 2"
        raise ValueError(msg)
    params = params if k == params.categories else _with(params, categories=k)
    rng = np.random.default_rng(seed)
    pop = np.asarray(fit.counts[:k], dtype=np.float64)
    pop /= pop.sum()
    c = fit_concentration(pop, fit.top1_share, seed)
    theta = rng.dirichlet(np.maximum(c * pop, 1e-3), params.users)
    theta = np.maximum(theta, 1e-6)
    theta /= theta.sum(axis=1, keepdims=True)
    perm = _derangement(k, rng)
    ad_cat = np.repeat(np.arange(k), params.ads_per_category)
    item_rank = rng.integers(0, 50, len(ad_cat))
    cat_ids = np.asarray(fit.categories[:k], dtype=np.int64)
    sd = params.quality_sd
    quality = np.exp(rng.normal(-sd * sd / 2, sd, len(ad_cat)))
    item_p = np.arange(1, 51, dtype=np.float64) ** -0.35
    return World(
        params=params,
        fit=fit,
        category_ids=cat_ids,
        popularity=pop,
        concentration=c,
        theta=theta,
        perm=perm,
        ad_cat=ad_cat,
        ad_item=cat_ids[ad_cat] * ITEMS_PER_CATEGORY + item_rank,
        quality=quality,
        item_p=item_p / item_p.sum(),
    )


def _with(p: WorldParams, **changes: Any) -> WorldParams:
    import dataclasses  # noqa: PLC0415

    return dataclasses.replace(p, **changes)


def _derangement(k: int, rng: np.random.Generator) -> I64:
    """A permutation with no fixed point: after the drift no category keeps its fans."""
    while True:
        perm = rng.permutation(k)
        if not np.any(perm == np.arange(k)):
            return perm.astype(np.int64)


def oracle_regret(best: Sequence[float], chosen: Sequence[float]) -> F64:
    """Cumulative expected regret: sum of (best eligible true CTR - chosen ad's true CTR)."""
    return np.cumsum(np.asarray(best, dtype=np.float64) - np.asarray(chosen, dtype=np.float64))
