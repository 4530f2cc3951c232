"""Synthetic user-events shaped like the real Taobao sample, at any size.

The shipped sample is small (4,321 events, 43 users), so benchmarks draw larger
loads from distributions fitted to it: per-user activity is log-normal (the
sample's log event counts per user have mean 4.30, sd 0.82), categories follow
a Zipf law (fitted exponent 1.16 over 567 categories), items within a category
a flatter Zipf (0.35), and kinds keep the sample's mix (91% browse, 4.4% cart,
3.0% fav, 1.8% purchase). ``fit_taobao`` refits these from the CSV when it is
there; the defaults are those fits.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt

from adpulse.replay import read_taobao
from scoring.features import KINDS


@dataclass(frozen=True)
class WorkloadModel:
    log_activity_mean: float = 4.30
    log_activity_sd: float = 0.82
    category_zipf: float = 1.16
    item_zipf: float = 0.35
    kind_p: tuple[float, ...] = (0.9086, 0.0, 0.0440, 0.0296, 0.0178)  # KINDS order
    click_share: float = 0.05  # browse events turned into clicks (the sample has no clicks)

    @property
    def kind_probabilities(self) -> npt.NDArray[np.float64]:
        p = np.array(self.kind_p, dtype=np.float64)
        p[1] += p[0] * self.click_share
        p[0] *= 1 - self.click_share
        out: npt.NDArray[np.float64] = p / p.sum()
        return out


def fit_taobao(path: Path) -> WorkloadModel:
    """Refit the model's parameters from a Taobao UserBehavior CSV."""
    events = read_taobao(path)
    per_user = np.array(list(Counter(e.user_id for e in events).values()), dtype=np.float64)
    cats = np.array(sorted(Counter(e.category_id for e in events).values(), reverse=True))
    items = np.array(sorted(Counter(e.item_id for e in events).values(), reverse=True))
    kinds = Counter(e.kind for e in events)
    return WorkloadModel(
        log_activity_mean=float(np.log(per_user).mean()),
        log_activity_sd=float(np.log(per_user).std()),
        category_zipf=_zipf_exponent(cats),
        item_zipf=_zipf_exponent(items),
        kind_p=tuple(kinds[k] / len(events) for k in KINDS),
    )


def _zipf_exponent(freq_desc: npt.NDArray[np.int64]) -> float:
    ranks = np.arange(1, len(freq_desc) + 1)
    return float(-np.polyfit(np.log(ranks), np.log(freq_desc), 1)[0])


class Workload:
    """Draws events for ``users`` users over ``categories`` categories."""

    def __init__(
        self,
        model: WorkloadModel,
        users: int = 10_000,
        categories: int = 5_000,
        items_per_category: int = 200,
        seed: int = 0,
    ) -> None:
        self.rng = np.random.default_rng(seed)
        activity = self.rng.lognormal(model.log_activity_mean, model.log_activity_sd, users)
        self.user_p = activity / activity.sum()
        self.cat_p = _zipf_p(categories, model.category_zipf)
        self.item_p = _zipf_p(items_per_category, model.item_zipf)
        self.items_per_category = items_per_category
        self.kind_p = model.kind_probabilities
        self._seq = 0

    def columns(self, n: int) -> dict[str, npt.NDArray[np.int64]]:
        r = self.rng
        return {
            "user": r.choice(len(self.user_p), n, p=self.user_p),
            "category": r.choice(len(self.cat_p), n, p=self.cat_p),
            "item_rank": r.choice(len(self.item_p), n, p=self.item_p),
            "kind": r.choice(len(KINDS), n, p=self.kind_p),
        }

    def payloads(
        self, n: int, ts_ms: int, prefix: str = "w", per_second: int = 1000
    ) -> tuple[list[bytes], list[bytes]]:
        """(keys, JSON values) of ``n`` user-events, the last stamped ``ts_ms``.

        Event times go back ``1 / per_second`` s an event, as a stream of that rate
        would have them: no user comes near the per-user rate limit
        (``ADPULSE_MAX_EVENTS_PER_USER_S``, 100), as all ``n`` in one second would.
        """
        c = self.columns(n)
        enc = msgspec.json.encode
        keys, values = [], []
        first = self._seq + 1
        for u, cat, rank, kind in zip(
            c["user"].tolist(), c["category"].tolist(), c["item_rank"].tolist(),
            c["kind"].tolist(), strict=True,
        ):  # fmt: skip
            self._seq += 1
            user = f"u{u}"
            keys.append(user.encode())
            values.append(
                enc(
                    {
                        "event_id": f"{prefix}{self._seq}",
                        "user_id": user,
                        "kind": KINDS[kind],
                        "item_id": cat * self.items_per_category + rank,
                        "category_id": cat,
                        "ts": ts_ms - (n - 1 - self._seq + first) * 1000 // per_second,
                    }
                )
            )
        return keys, values


def _zipf_p(n: int, s: float) -> npt.NDArray[np.float64]:
    w = np.arange(1, n + 1, dtype=np.float64) ** -s
    out: npt.NDArray[np.float64] = w / w.sum()
    return out
