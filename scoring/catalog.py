"""The ad catalog as arrays: which ads a request may see, and their campaigns' budgets.

Built from ``ad-catalog`` records (the worker rebuilds it when the catalog
table changes; 1,000 ads take a few milliseconds). Targeting is matched per
distinct request context (placement, device, country, page category): those
are low-cardinality, so each context's eligibility mask is computed once and
cached, and a request costs one dictionary lookup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from scoring.featurespec import AdIndex, FeatureSpec

Mask = npt.NDArray[np.bool_]
Context = tuple[str, str | None, str | None, int | None]  # placement, device, country, page cat


class Catalog:
    """Active ads, their targeting and campaigns, indexed for per-request gathers."""

    def __init__(self, ads: Sequence[Mapping[str, Any]], spec: FeatureSpec) -> None:
        active = [a for a in ads if a.get("active", True)]
        self.index = AdIndex.build(active, spec)
        self.ads = active
        self.campaign = [str(a["campaign_id"]) for a in active]
        # cpm: charged pCTR x bid when decided; cpc: bid when a click is joined (streams/join.py)
        self.billing = [str(a.get("billing", "cpm")) for a in active]
        # cpa: bid per conversion, ranked on pCTR x pCVR x bid, charged at conversion
        self.cpa = np.array([b == "cpa" for b in self.billing], dtype=np.bool_)
        self.daily_budget: dict[str, float] = {}
        for a in active:  # a campaign's budget: the largest its ads state (they should agree)
            c = str(a["campaign_id"])
            self.daily_budget[c] = max(self.daily_budget.get(c, 0.0), float(a["daily_budget"]))
        self.campaigns = sorted(self.daily_budget)  # campaign number -> id (pacing's order)
        number = {c: i for i, c in enumerate(self.campaigns)}
        self.campaign_code = np.array([number[c] for c in self.campaign], dtype=np.intp)
        self._targeting = [a.get("targeting") or {} for a in active]
        self._masks: dict[Context, Mask] = {}

    def __len__(self) -> int:
        return len(self.ads)

    def eligible(self, ctx: Context) -> Mask:
        """Ads whose targeting admits this context (absent list = no restriction)."""
        mask = self._masks.get(ctx)
        if mask is None:
            mask = np.fromiter(
                (_admits(t, ctx) for t in self._targeting), dtype=np.bool_, count=len(self.ads)
            )
            if len(self._masks) > 10_000:  # contexts are low-cardinality; bound it anyway
                self._masks.clear()
            self._masks[ctx] = mask
        return mask

    def candidate_rows(
        self, candidates: Sequence[str] | None, ctx: Context
    ) -> npt.NDArray[np.int64]:
        """Rows of the ads a request may get: its own list (known, active, targeted) or all."""
        mask = self.eligible(ctx)
        if candidates is None:
            return np.flatnonzero(mask).astype(np.int64)
        rows = self.index.rows(candidates)
        return rows[mask[rows]] if len(rows) else rows


def _admits(t: Mapping[str, Any], ctx: Context) -> bool:
    placement, device, country, page_category = ctx
    if "placements" in t and placement not in t["placements"]:
        return False
    if "devices" in t and device not in t["devices"]:
        return False
    if "countries" in t and country not in t["countries"]:
        return False
    return not ("categories" in t and page_category not in t["categories"])
