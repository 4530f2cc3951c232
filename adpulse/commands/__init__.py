"""The ``adpulse`` subcommands, one module per group; :mod:`adpulse.cli` wires them up.

Each module has ``register(sub)``, which adds its parsers with ``handler=`` set.
Handlers import heavy modules (Kafka clients, Faust, ONNX Runtime, PyTorch) inside
their bodies, so ``adpulse --help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeAlias

from adpulse.core.settings import Settings

Handler: TypeAlias = Callable[[argparse.Namespace, Settings], int]
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_command(
    sub: Subparsers, name: str, handler: Handler, *, help: str, description: str
) -> argparse.ArgumentParser:
    """A subcommand parser that runs ``handler``."""
    p = sub.add_parser(name, help=help, description=description)
    p.set_defaults(handler=handler)
    return p


def add_group(
    sub: Subparsers, name: str, *, dest: str, metavar: str, help: str, description: str
) -> Subparsers:
    """A subcommand that only groups others (``adpulse topics create``): its sub-parsers."""
    p = sub.add_parser(name, help=help, description=description)
    return p.add_subparsers(dest=dest, required=True, metavar=metavar)


def add_bootstrap(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        help="Kafka bootstrap servers (default: $ADPULSE_BOOTSTRAP, else 127.0.0.1:9092)",
    )
