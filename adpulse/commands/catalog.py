"""``adpulse catalog publish|synth|remove`` (the ad-catalog topic) and ``adpulse train``."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from adpulse.commands import Subparsers, add_bootstrap, add_command, add_group
from adpulse.core.errors import ConfigError, InputError
from adpulse.core.settings import Settings


def cmd_catalog_publish(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse import catalogtool  # noqa: PLC0415

    ads = catalogtool.read_catalog(Path(args.path))  # every line checked before any is sent
    if not ads:
        msg = f"{args.path}: no ads in the file"
        raise InputError(msg)
    topic = _ready(settings, "ad-catalog")
    n = catalogtool.publish(settings, topic, ads)
    print(f"published {n} ads from {args.path} to {topic} at {settings.bootstrap_or_default}")
    return 0


def cmd_catalog_synth(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse import catalogtool, replay  # noqa: PLC0415

    if args.ads < 1:
        msg = f"--ads {args.ads}: must be at least 1"
        raise InputError(msg)
    # Every event's category, repeated as often as it occurs: ads follow real interest.
    categories = [e.category_id for e in replay.read_taobao(Path(args.categories_from))]
    ads = catalogtool.synthetic_ads(args.ads, categories, seed=args.seed)
    topic = _ready(settings, "ad-catalog")
    n = catalogtool.publish(settings, topic, ads)
    print(
        f"published {n} synthetic ads (categories drawn from the {len(set(categories))} in "
        f"{args.categories_from}) to {topic} at {settings.bootstrap_or_default}"
    )
    return 0


def cmd_catalog_remove(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse import catalogtool  # noqa: PLC0415

    topic = _ready(settings, "ad-catalog")
    catalogtool.remove(settings, topic, args.ad_ids)
    print(f"sent {len(args.ad_ids)} tombstone(s) to {topic}: {' '.join(args.ad_ids)}")
    return 0


def _ready(settings: Settings, topic: str) -> str:
    """The full topic name, once the broker answers (else one-line BrokerUnavailable)."""
    from adpulse.core.probe import wait_for_broker  # noqa: PLC0415

    wait_for_broker(settings, timeout=5)
    return settings.topic(topic)


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    try:
        import torch  # noqa: F401, PLC0415 - only to give a clear message when it is missing
    except ImportError:
        msg = "training needs PyTorch: pip install torch==2.13.0 (or make venv)"
        raise ConfigError(msg) from None
    from scoring import train  # noqa: PLC0415

    sources = [args.input is not None, bool(args.generate), args.from_topic]
    if sum(sources) > 1:
        msg = "give one of an input file, --generate N or --from-topic"
        raise InputError(msg)
    out = Path(args.out or settings.model_dir or "var/models")
    if args.input is not None and not Path(args.input).is_file():
        msg = f"{args.input}: no such file"
        raise InputError(msg)
    with tempfile.TemporaryDirectory(prefix="adpulse-train-") as tmp:
        source = args.input
        if args.from_topic:
            source = str(Path(tmp) / "ctr-feedback.jsonl")
            n = _dump_feedback(settings, Path(source))
            print(f"read {n} ctr-feedback records from {settings.topic('ctr-feedback')}")
        m = train.run_train(source, args.generate, out, seed=args.seed, epochs=args.epochs,
                            sequence=args.sequence,
                            attention_hidden=args.attention_hidden)  # fmt: skip
    print(train.summary(m))
    print(f"version directory: {m['path']}")
    return 0


def _dump_feedback(settings: Settings, path: Path) -> int:
    """The ctr-feedback topic, from the beginning, as JSONL (what training reads)."""
    from adpulse.core.probe import wait_for_broker  # noqa: PLC0415
    from adpulse.inspect import read_topic  # noqa: PLC0415

    wait_for_broker(settings, timeout=5)
    records = read_topic(settings, settings.topic("ctr-feedback"))
    if not records:
        msg = f"topic {settings.topic('ctr-feedback')} has no records to train on"
        raise InputError(msg)
    with path.open("wb") as fh:
        for r in records:
            if r.value:
                fh.write(r.value.rstrip(b"\n") + b"\n")
    return len(records)


def register(sub: Subparsers) -> None:
    catalog = add_group(
        sub,
        "catalog",
        dest="catalog_command",
        metavar="ACTION",
        help="publish, generate or remove ads on the ad-catalog topic",
        description="Manage the ad catalog every worker holds (the compacted ad-catalog topic, "
        "keyed by ad_id: the latest record per ad wins, a tombstone removes it). Workers pick "
        "changes up within about a second.",
    )
    p = add_command(
        catalog,
        "publish",
        cmd_catalog_publish,
        help="check a JSONL file of ads against the ad-catalog schema, then publish it",
        description="Read PATH (one ad-catalog record per line), check every line against "
        "schemas/ad-catalog.schema.json, and only then send the ads keyed by ad_id. A bad "
        "line stops the command with its line number and nothing is sent.",
    )
    p.add_argument("path", metavar="PATH.jsonl", help="ads, one JSON object per line")
    add_bootstrap(p)
    p = add_command(
        catalog,
        "synth",
        cmd_catalog_synth,
        help="publish N synthetic ads over the categories of the Taobao sample",
        description="Generate N valid ads (ad-0 ... ad-N-1, 50 campaigns, log-normal bids) "
        "whose categories follow how often each category occurs in a Taobao UserBehavior "
        "CSV, and publish them. Same --seed, same ads.",
    )
    p.add_argument("--ads", type=int, required=True, metavar="N", help="how many ads to make")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--categories-from",
        default="../shared/data/taobao_userbehavior_sample.csv",
        metavar="CSV",
        help="Taobao CSV whose categories the ads promote "
        "(default ../shared/data/taobao_userbehavior_sample.csv)",
    )
    add_bootstrap(p)
    p = add_command(
        catalog,
        "remove",
        cmd_catalog_remove,
        help="remove ads from every worker's catalog (tombstones)",
        description="Send a tombstone (null value) for each AD_ID: the ad stops being served "
        "and compaction later drops it from the topic.",
    )
    p.add_argument("ad_ids", nargs="+", metavar="AD_ID", help="ad ids to remove")
    add_bootstrap(p)

    p = add_command(
        sub,
        "train",
        cmd_train,
        help="train the CTR model and write a new model version (needs PyTorch)",
        description=(
            "Train the CTR model on logged ctr-feedback records (the topic, or a JSONL or "
            "Parquet file) or on N synthetic ones, report held-out AUC, log loss and "
            "calibration on the last 20% by time, export ONNX (checked against PyTorch) and "
            "write a new version directory under --out. The default --out is "
            "$ADPULSE_MODEL_DIR, else ./var/models, never the shipped scoring/models, so a "
            "run cannot replace the default model by accident. A worker whose "
            "ADPULSE_MODEL_DIR is that folder hot-swaps to the new version once it passes "
            "validation."
        ),
    )
    p.add_argument(
        "--input", metavar="PATH.jsonl", help="ctr-feedback records to train on (JSONL/Parquet)"
    )
    p.add_argument("--generate", type=int, metavar="N", help="train on N synthetic records")
    p.add_argument(
        "--from-topic",
        action="store_true",
        help="train on the ctr-feedback topic, read from the beginning (--bootstrap)",
    )
    p.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the data (default 3)")
    p.add_argument(
        "--sequence",
        type=int,
        default=0,
        metavar="N",
        help="give the model target attention over each record's last N behaviours "
        "(features.sequence; with --generate, synthetic ones); 0, the default: none",
    )
    p.add_argument(
        "--attention-hidden",
        type=int,
        metavar="H",
        help="with --sequence: the attention block's hidden width (default: the block's own, "
        "scoring/attention.py); its cost per candidate and behaviour is proportional to it",
    )
    p.add_argument(
        "--out", metavar="DIR", help="model registry folder ($ADPULSE_MODEL_DIR, else var/models)"
    )
    add_bootstrap(p)
