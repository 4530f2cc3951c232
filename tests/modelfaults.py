"""Bad model versions for registry tests, built from a good one with the onnx package.

Each builder takes a good version directory ``src`` and writes a broken copy to
``dst`` (spec and metrics copied unchanged); :func:`publish_version` makes it
appear in a registry atomically, as a deploy tool would.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from scoring.registry import MODEL

Builder = Callable[[Path, Path], None]


def corrupt(src: Path, dst: Path) -> None:
    """The model file cut to its first third, as an interrupted copy leaves it."""
    shutil.copytree(src, dst)
    data = (src / MODEL).read_bytes()
    (dst / MODEL).write_bytes(data[: len(data) // 3])


def nan_model(src: Path, dst: Path) -> None:
    """Same inputs and outputs as the spec, but the last layer's bias is NaN: pctr is NaN."""
    shutil.copytree(src, dst)
    model = onnx.load(str(src / MODEL))
    for init in model.graph.initializer:
        if init.name in ("mlp.4.bias", "net.mlp.4.bias"):  # net.: a two-head export's names
            init.CopyFrom(numpy_helper.from_array(np.full(1, np.nan, np.float32), init.name))
            break
    else:
        msg = "the model has no mlp.4.bias initializer to poison"
        raise AssertionError(msg)
    onnx.save(model, str(dst / MODEL))


def renamed_inputs(src: Path, dst: Path) -> None:
    """A working model whose first input is called ``user_vector`` instead of the spec's name."""
    shutil.copytree(src, dst)
    model = onnx.load(str(src / MODEL))
    old = model.graph.input[0].name
    model.graph.input[0].name = "user_vector"
    for node in model.graph.node:
        node.input[:] = ["user_vector" if name == old else name for name in node.input]
    onnx.checker.check_model(model)
    onnx.save(model, str(dst / MODEL))


def slow_model(layers: int = 80, width: int = 512) -> Builder:
    """The same scores (the extra branch is multiplied by zero) after ``layers`` dense layers
    of ``width`` on the first input: about 0.5 ms per layer per 100 rows on one core here.
    The branch depends on an input, so ONNX Runtime cannot fold it away."""

    def build(src: Path, dst: Path) -> None:
        shutil.copytree(src, dst)
        model = onnx.load(str(src / MODEL))
        g = model.graph
        out, first = g.output[0].name, g.input[0].name
        for node in g.node:
            node.output[:] = [f"{o}_fast" if o == out else o for o in node.output]
        rng = np.random.default_rng(0)
        dim = g.input[0].type.tensor_type.shape.dim[1].dim_value
        wa = (rng.standard_normal((dim, width)) / 8).astype(np.float32)
        wb = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        g.initializer.extend(
            [
                numpy_helper.from_array(wa, "slow_wa"),
                numpy_helper.from_array(wb, "slow_wb"),
                numpy_helper.from_array(np.zeros((), np.float32), "slow_zero"),
            ]
        )
        g.node.append(helper.make_node("MatMul", [first, "slow_wa"], ["slow_y0"]))
        for i in range(layers):
            g.node.append(helper.make_node("MatMul", [f"slow_y{i}", "slow_wb"], [f"slow_m{i}"]))
            g.node.append(helper.make_node("Tanh", [f"slow_m{i}"], [f"slow_y{i + 1}"]))
        last = f"slow_y{layers}"
        g.node.append(helper.make_node("ReduceMean", [last], ["slow_s"], axes=[1], keepdims=1))
        g.node.append(helper.make_node("Mul", ["slow_s", "slow_zero"], ["slow_z"]))
        g.node.append(helper.make_node("Add", [f"{out}_fast", "slow_z"], [out]))
        onnx.save(model, str(dst / MODEL))

    return build


def publish_version(root: Path, version: str, build: Builder, src: Path) -> None:
    """Write under a hidden temporary name, then rename: a poll never sees half a model."""
    tmp = root / f".{version}.tmp"
    build(src, tmp)
    tmp.rename(root / version)
