"""``adpulse trainer``: learn the CTR model online from ctr-feedback (docs/training.md)."""

from __future__ import annotations

import argparse
import logging

from adpulse.commands import Subparsers, add_bootstrap, add_command
from adpulse.core.errors import ConfigError
from adpulse.core.settings import Settings


def cmd_trainer(args: argparse.Namespace, settings: Settings) -> int:
    try:
        import torch  # noqa: F401, PLC0415 - only to give a clear message when it is missing
    except ImportError:
        msg = "the online trainer needs PyTorch: pip install torch==2.13.0 (or make venv)"
        raise ConfigError(msg) from None
    from adpulse.trainer import run  # noqa: PLC0415

    return run(_configured(args, settings, "trainer_port"))


def _configured(args: argparse.Namespace, settings: Settings, port_setting: str) -> Settings:
    """The long-running process's settings with its flags applied, and its logging set up."""
    changes = {"model_dir": args.model_dir, port_setting: args.port}
    logging.basicConfig(level=getattr(logging, args.loglevel.upper()),
                        format="%(asctime)s %(levelname)s %(message)s")  # fmt: skip
    return settings.with_(**{k: v for k, v in changes.items() if v is not None})


def register(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "trainer",
        cmd_trainer,
        help="learn the CTR model online from ctr-feedback; export candidate versions",
        description="Run the online trainer (one per deployment): warm-starts from the serving "
        "version's PyTorch weights, learns each new batch of ctr-feedback labels after scoring "
        "it (progressive validation, on /metrics), and every ADPULSE_TRAIN_INTERVAL_S exports "
        "a candidate to MODEL_DIR/candidates/ (not served). Its checkpoint holds the consumed "
        "offsets, so a restart, even after kill -9, learns each label once. Needs the train "
        "extra (PyTorch). Stops cleanly on SIGTERM/Ctrl-C.",
    )
    add_bootstrap(p)
    p.add_argument("--model-dir", help="model registry directory ($ADPULSE_MODEL_DIR; required)")
    p.add_argument("--port", type=int, help="metrics port ($ADPULSE_TRAINER_PORT, default 6067)")
    p.add_argument(
        "--loglevel",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default: info)",
    )


def cmd_promoter(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.promoter import run  # noqa: PLC0415

    return run(_configured(args, settings, "promoter_port"))


def register_promoter(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "promoter",
        cmd_promoter,
        help="guarded promotion: candidates -> canary arm -> promoted or rolled back",
        description="Run the promoter (one per deployment): validates the newest candidate in "
        "MODEL_DIR/candidates/ (registry checks, ONNX against PyTorch, held-back AUC against "
        "the serving version), serves it to ADPULSE_CANARY_SHARE of users through "
        "MODEL_DIR/promotion.json, then promotes or rolls it back on the live CTR and "
        "calibration of each version's ctr-feedback labels. Every transition is a model-events "
        "record. Stops on SIGTERM/Ctrl-C.",
    )
    add_bootstrap(p)
    p.add_argument("--model-dir", help="model registry directory ($ADPULSE_MODEL_DIR; required)")
    p.add_argument("--port", type=int, help="metrics port ($ADPULSE_PROMOTER_PORT, default 6068)")
    p.add_argument(
        "--loglevel",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default: info)",
    )
