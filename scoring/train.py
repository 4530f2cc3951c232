"""Train the CTR model on logged ctr-feedback, evaluate it, publish a registry version.

The split is by time (first 80% of decision_ts to train, last 20% held out), as
a served model only ever predicts the future. Held-out metrics: AUC, log loss
(with the constant-prior log loss beside it for scale) and calibration by
decile of predicted CTR. The version is exported to ONNX, verified against
PyTorch, and written to ``<out>/<version>/`` atomically (temp dir + rename),
with the PyTorch weights beside it (``model.pt``) for ``adpulse trainer``.

With at least ``MIN_CONVERSIONS`` conversions (``converted: 1`` records of the
joiner) among the training decisions, the model also gets its pCVR head
(scoring/model.py, ESMM loss) and the metrics a ``cvr`` part: AUC, log loss and
calibration of pCVR on the held-out *clicked* decisions (what pCVR predicts),
and the AUC of pCTR x pCVR for a conversion over all held-out decisions.
Without them the model has one head, as before, and ``cvr`` is null.

Regenerate the shipped default model (CPU, about a minute)::

    python -m scoring.train --generate 200000 --seed 7 --epochs 3 --sequence 50 --out scoring/models
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from adpulse.core.errors import ConfigError, InputError
from scoring.featurespec import FeatureSpec, Inputs, from_feedback
from scoring.registry import CHECKPOINT, METRICS, MODEL, SPEC
from scoring.synthetic import generate as generate_records
from scoring.synthetic import read_jsonl

log = logging.getLogger(__name__)
SEQUENCE_HELP = (
    "give the model target attention over the last N behaviours of each record "
    "(features.sequence; 0, the default: no attention block)"
)
ATTENTION_HELP = (
    "width of the attention block's hidden layer (default: the block's own, "
    "scoring/attention.py); its cost per candidate and behaviour is proportional to it"
)
F64 = npt.NDArray[np.float64]
MIN_CONVERSIONS = 20  # fewer in the training split: no CVR head (its AUC would be noise)


def load_records(path: Path | str) -> list[dict[str, Any]]:
    """ctr-feedback records from JSONL (or Parquet when pyarrow is installed)."""
    p = Path(path)
    if p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # noqa: PLC0415
        except ImportError:
            msg = f"{p}: reading Parquet needs pyarrow (pip install pyarrow), or convert to JSONL"
            raise InputError(msg) from None
        rows: list[dict[str, Any]] = pq.read_table(p).to_pylist()
        for i, r in enumerate(rows, 1):
            _check(r, f"{p}: row {i}")
        return rows
    out = []
    for i, r in enumerate(read_jsonl(p), 1):
        _check(r, f"{p}:{i}")
        out.append(r)
    if not out:
        msg = f"{p}: no records; expected ctr-feedback objects, one per line"
        raise InputError(msg)
    return out


def _check(r: Mapping[str, Any], where: str) -> None:
    f = r.get("features")
    ok = (
        r.get("clicked") in (0, 1)
        and isinstance(r.get("decision_ts"), int)
        and isinstance(f, dict)
        and isinstance(f.get("interest"), list)
    )
    if not ok:
        msg = f"{where}: not a ctr-feedback record (needs clicked, decision_ts, features.interest)"
        raise InputError(msg)


def once_per_decision(
    records: Sequence[Mapping[str, Any]],
) -> tuple[list[Mapping[str, Any]], int]:
    """One training row per decision id, and how many records were left out.

    A label's identity is its ``decision_id``. The joiner may send a decision's
    label twice (its one duplicate window, docs/guarantees.md), and a clicked
    decision that converts gets a second record (``converted: 1``, same snapshot);
    either would weigh that decision twice and count its click twice. The first
    label of each decision id is kept; a conversion stands in for its label only
    when the label is absent. Records without a decision id are kept as they are.

    >>> rows, dropped = once_per_decision([
    ...     {"decision_id": "a", "clicked": 1}, {"decision_id": "b", "clicked": 0},
    ...     {"decision_id": "a", "clicked": 1, "converted": 1}, {"decision_id": "b", "clicked": 0}])
    >>> [r["decision_id"] for r in rows], dropped
    (['a', 'b'], 2)
    """
    labels: dict[str, int] = {}  # decision id -> index of its row in ``out``
    out: list[Mapping[str, Any]] = []
    conversions: list[Mapping[str, Any]] = []
    for r in records:
        did = r.get("decision_id")
        if not isinstance(did, str):
            out.append(r)
        elif r.get("converted") == 1:
            conversions.append(r)
        elif did not in labels:
            labels[did] = len(out)
            out.append(r)
    for r in conversions:
        did = r["decision_id"]
        if did not in labels:
            labels[did] = len(out)
            out.append(r)
    return out, len(records) - len(out)


def converted_ids(records: Sequence[Mapping[str, Any]]) -> set[str]:
    """Decision ids with a conversion record (``converted: 1``): the pCVR head's positives."""
    return {
        did
        for r in records
        if r.get("converted") == 1 and isinstance(did := r.get("decision_id"), str)
    }


def auc(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties averaged."""
    yv, pv = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    order = np.argsort(pv, kind="mergesort")
    ranks = np.empty(len(pv), dtype=np.float64)
    sp = pv[order]
    starts = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]])
    ends = np.r_[starts[1:], len(sp)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    pos = yv.sum()
    neg = len(yv) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    return float((ranks[yv == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def logloss(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    yv = np.asarray(y, dtype=np.float64)
    pv = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(yv * np.log(pv) + (1 - yv) * np.log(1 - pv)))


def calibration(y: npt.ArrayLike, p: npt.ArrayLike, bins: int = 10) -> list[dict[str, float]]:
    """Mean predicted vs observed CTR per decile of prediction (lowest first)."""
    yv, pv = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    order = np.argsort(pv, kind="mergesort")
    return [
        {
            "decile": i + 1,
            "n": len(idx),
            "predicted": round(float(pv[idx].mean()), 6),
            "observed": round(float(yv[idx].mean()), 6),
        }
        for i, idx in enumerate(np.array_split(order, bins))
        if len(idx)
    ]


def _check_width(attention_hidden: int | None) -> None:
    if attention_hidden is not None and attention_hidden < 1:
        msg = (
            "--attention-hidden: the attention block's width must be 1 or more, "
            f"not {attention_hidden}"
        )
        raise ConfigError(msg)


def _take(x: Inputs, idx: npt.NDArray[np.int64]) -> Inputs:
    return {k: v[idx] for k, v in x.items()}


def train(
    records: Sequence[Mapping[str, Any]] | Path | str,
    out_dir: Path | str,
    *,
    epochs: int = 3,
    seed: int = 7,
    spec: FeatureSpec | None = None,
    batch_size: int = 512,
    lr: float = 2e-3,
    threads: int | None = None,
    version: str | None = None,
    cvr: bool | None = None,
    sequence: int = 0,
    attention_hidden: int | None = None,
) -> dict[str, Any]:
    """Train, evaluate on the held-out time split, export and publish; returns the metrics.

    ``cvr``: train the pCVR head (None: when the training split has ``MIN_CONVERSIONS``).
    ``sequence`` > 0 gives the net the target-attention block over the records' last
    ``sequence`` behaviours (``features.sequence``; scoring/attention.py), its hidden layer
    ``attention_hidden`` wide (None: the block's default; its cost per candidate and
    behaviour is proportional to the width).
    """
    import torch  # noqa: PLC0415 (training-only dependency)

    from scoring.model import CtrNet, export_onnx  # noqa: PLC0415
    from scoring.online import arch_of, save_weights  # noqa: PLC0415

    _check_width(attention_hidden)
    spec = spec or FeatureSpec()
    if sequence:
        spec = replace(spec, sequence=sequence)
    everything = load_records(records) if isinstance(records, Path | str) else list(records)
    conv_ids = converted_ids(everything)
    recs, dropped = once_per_decision(everything)
    if dropped:
        log.info("%d repeated or conversion records left out: one row per decision id", dropped)
    if len(recs) < 100:
        msg = f"only {len(recs)} records: need at least 100 to train and hold out 20%"
        raise InputError(msg)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    ts = np.array([int(r["decision_ts"]) for r in recs], dtype=np.int64)
    order = np.argsort(ts, kind="stable")
    y_all = np.array([int(r["clicked"]) for r in recs], dtype=np.float32)
    c_all = np.array([r.get("decision_id") in conv_ids for r in recs], dtype=np.float32) * y_all
    try:
        x_all = from_feedback(recs, spec)
    except (KeyError, ValueError, TypeError) as exc:
        msg = f"cannot build features from the records: {exc}"
        raise InputError(msg) from None
    cut = int(len(recs) * 0.8)
    tr, te = order[:cut], order[cut:]
    xtr, ytr, xte, yte = _take(x_all, tr), y_all[tr], _take(x_all, te), y_all[te]
    ctr_, cte = c_all[tr], c_all[te]
    with_cvr = bool(ctr_.sum() >= MIN_CONVERSIONS) if cvr is None else cvr

    model = (
        CtrNet(spec, cvr_head=with_cvr)
        if attention_hidden is None
        else CtrNet(spec, cvr_head=with_cvr, attention_hidden=attention_hidden)
    )
    base = float(np.clip(ytr.mean(), 1e-4, 1 - 1e-4))
    model.start_at(base)
    base_cvr = float(np.clip(ctr_.sum() / max(ytr.sum(), 1.0), 1e-4, 1 - 1e-4))
    if with_cvr:
        model.start_cvr_at(base_cvr)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    tens = {k: torch.from_numpy(v) for k, v in xtr.items()}
    yt = torch.from_numpy(ytr).reshape(-1, 1)
    ct = torch.from_numpy(ctr_).reshape(-1, 1)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(ytr), generator=gen)
        total = 0.0
        for start in range(0, len(perm), batch_size):
            b = perm[start : start + batch_size]
            opt.zero_grad()
            xb = tuple(tens[k][b] for k in spec.input_names)
            if with_cvr:
                ctr_logit, cvr_logit = model.head_logits(*xb)
                loss = loss_fn(ctr_logit, yt[b]) + esmm_loss(ctr_logit, cvr_logit, ct[b])
            else:
                loss = loss_fn(model.logits(*xb), yt[b])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        log.info("epoch %d/%d: train log loss %.4f", epoch + 1, epochs, total / len(perm))

    model.eval()
    xt = [torch.from_numpy(xte[k]) for k in spec.input_names]
    with torch.no_grad():
        p = model(*xt).numpy().reshape(-1).astype(np.float64)
        q = model.heads(*xt)[1].numpy().reshape(-1).astype(np.float64) if with_cvr else None
    version = version or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(out_dir)
    tmp = out / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    diff = export_onnx(model, tmp / MODEL, spec)
    save_weights(model, tmp / CHECKPOINT)  # the online trainer's warm start (adpulse trainer)
    metrics: dict[str, Any] = {
        "version": version,
        "auc": round(auc(yte, p), 6),
        "logloss": round(logloss(yte, p), 6),
        "logloss_prior": round(logloss(yte, np.full(len(yte), base)), 6),
        "calibration": calibration(yte, p),
        "n_train": len(tr),
        "n_test": len(te),
        "train_ctr": round(base, 6),
        "test_ctr": round(float(yte.mean()), 6),
        "epochs": epochs,
        "seed": seed,
        "heads": 2 if with_cvr else 1,
        "cvr": None if q is None else cvr_metrics(yte, cte, p, q, base_cvr),
        "sequence": spec.sequence,
        "attention_hidden": arch_of(model)["attention_hidden"],
        "onnx_max_abs_diff": diff,
        "train_seconds": round(time.perf_counter() - t0, 2),
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (tmp / SPEC).write_text(spec.to_json() + "\n", encoding="utf-8")
    (tmp / METRICS).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    final = out / version
    if final.exists():
        msg = f"{final} already exists: pick another --version"
        raise InputError(msg)
    tmp.rename(final)
    metrics["path"] = str(final)
    return metrics


def esmm_loss(ctr_logit: Any, cvr_logit: Any, converted: Any) -> Any:
    """Log loss of pCTR x pCVR against "converted" over every impression (ESMM, Ma et al.
    SIGIR 2018), in log space: log p = logsigmoid(a) + logsigmoid(b)."""
    import torch  # noqa: PLC0415

    log_p = torch.nn.functional.logsigmoid(ctr_logit) + torch.nn.functional.logsigmoid(cvr_logit)
    log_q = torch.log1p(-torch.exp(log_p).clamp(max=1.0 - 1e-6))
    return -(converted * log_p + (1.0 - converted) * log_q).mean()


def cvr_metrics(
    clicked: npt.ArrayLike, converted: npt.ArrayLike, pctr: F64, pcvr: F64, train_cvr: float
) -> dict[str, Any]:
    """The pCVR head on held-out rows: on clicked ones (pCVR's question: does a click
    convert?) AUC, log loss (prior beside it) and calibration; over all rows, the AUC
    of pCTR x pCVR for a conversion (the value a cpa ad is ranked on)."""
    y, c = np.asarray(clicked, dtype=np.float64), np.asarray(converted, dtype=np.float64)
    k = y == 1
    return {
        "auc": round(auc(c[k], pcvr[k]), 6),
        "logloss": round(logloss(c[k], pcvr[k]), 6),
        "logloss_prior": round(logloss(c[k], np.full(int(k.sum()), train_cvr)), 6),
        "calibration": calibration(c[k], pcvr[k]),
        "ctcvr_auc": round(auc(c, pctr * pcvr), 6),
        "n_test_clicks": int(k.sum()),
        "n_test_conversions": int(c.sum()),
        "train_cvr": round(train_cvr, 6),
        "test_cvr": round(float(c[k].mean()), 6) if k.any() else None,
    }


def run_train(
    input_path: Path | str | None,
    generate: int | None,
    out_dir: Path | str,
    seed: int = 7,
    epochs: int = 3,
    *,
    threads: int | None = None,
    version: str | None = None,
    sequence: int = 0,
    attention_hidden: int | None = None,
) -> dict[str, Any]:
    """``adpulse train``: from a file, or from ``generate`` synthetic records when no file."""
    _check_width(attention_hidden)  # before minutes of generating records
    if input_path is None and not generate:
        msg = "give an input file of ctr-feedback records, or --generate N for synthetic ones"
        raise InputError(msg)
    records: Sequence[Mapping[str, Any]] | Path | str = (
        input_path
        if input_path is not None
        else generate_records(int(generate or 0), seed, conversions=True, sequence=sequence)
    )
    return train(
        records, out_dir, epochs=epochs, seed=seed, threads=threads, version=version,
        sequence=sequence, attention_hidden=attention_hidden,
    )  # fmt: skip


def summary(m: Mapping[str, Any]) -> str:
    """One line for a terminal (two with the pCVR head)."""
    line = (
        f"model {m['version']}: held-out AUC {m['auc']:.3f}, log loss {m['logloss']:.4f} "
        f"(prior {m['logloss_prior']:.4f}), {m['n_train']} train / {m['n_test']} test rows, "
        f"written to {m.get('path', '?')}"
    )
    c = m.get("cvr")
    if not c:
        return line
    return line + (
        f"\npCVR head: AUC {c['auc']:.3f} on {c['n_test_clicks']} held-out clicks, log loss "
        f"{c['logloss']:.4f} (prior {c['logloss_prior']:.4f}); pCTR x pCVR AUC "
        f"{c['ctcvr_auc']:.3f} ({c['n_test_conversions']} conversions)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scoring.train", description=__doc__.split("\n")[0])
    ap.add_argument("input", nargs="?", help="ctr-feedback JSONL (or Parquet with pyarrow)")
    ap.add_argument("--generate", type=int, help="train on N synthetic records instead")
    ap.add_argument("--out", default="var/models", help="registry directory")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--version", help="version name (default: UTC timestamp)")
    ap.add_argument("--sequence", type=int, default=0, help=SEQUENCE_HELP)
    ap.add_argument("--attention-hidden", type=int, metavar="H", help=ATTENTION_HELP)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        m = run_train(
            a.input, a.generate, a.out, a.seed, a.epochs, threads=a.threads, version=a.version,
            sequence=a.sequence, attention_hidden=a.attention_hidden,
        )  # fmt: skip
    except (InputError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(summary(m))
    print(json.dumps(m["calibration"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
