"""The big ONNX files of the "big models" benchmark, written once into a cache folder.

GPT-2 124M with its LM head (legacy and dynamo exporters), BERT-base and ViT-B/16, each built by Hugging Face
``transformers`` from its published config with seeded random weights (nothing is downloaded), exported
by ``torch.onnx.export``. Exporting takes a minute or more per model, so the files are kept between runs
in ``build/bench-models`` (``BRANCHFOLD_BENCH_MODELS`` to move it) and rebuilt only when missing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

CACHE = Path(os.environ.get("BRANCHFOLD_BENCH_MODELS", Path(__file__).resolve().parents[1] / "build" / "bench-models"))


class _Text(nn.Module):
    """``input_ids, attention_mask →`` GPT-2's logits (with its tied LM head, as people export it) or BERT's
    last hidden state; position ids made inside for GPT-2."""

    def __init__(self, model: nn.Module, positions: bool) -> None:
        super().__init__()
        self.model, self.positions = model, positions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        extra = {"position_ids": torch.arange(input_ids.shape[1]).unsqueeze(0), "use_cache": False} if self.positions else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


class _Vision(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state


def _gpt2() -> tuple[nn.Module, tuple, dict]:
    import transformers as tf

    model = _Text(tf.GPT2LMHeadModel(tf.GPT2Config(attn_implementation="eager")), positions=True)
    ids = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1))
    return model, (ids, torch.ones_like(ids)), {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def _bert() -> tuple[nn.Module, tuple, dict]:
    import transformers as tf

    model = _Text(tf.BertModel(tf.BertConfig(attn_implementation="eager"), add_pooling_layer=False), positions=False)
    ids = torch.randint(0, 30522, (1, 16), generator=torch.Generator().manual_seed(1))
    return model, (ids, torch.ones_like(ids)), {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def _vit() -> tuple[nn.Module, tuple, dict]:
    import transformers as tf

    model = _Vision(tf.ViTModel(tf.ViTConfig(attn_implementation="eager"), add_pooling_layer=False))
    return model, (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)),), {"pixel_values": {0: "batch"}}


# name → (builder, exporter)
MODELS: dict[str, tuple[Callable[[], tuple[nn.Module, tuple, dict]], str]] = {
    "gpt2-124m-legacy": (_gpt2, "legacy"),
    "gpt2-124m-dynamo": (_gpt2, "dynamo"),
    "bert-base-legacy": (_bert, "legacy"),
    "vit-b16-legacy": (_vit, "legacy"),
}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    logger = logging.getLogger("onnxscript")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def model_file(name: str, folder: Path = CACHE) -> Path:
    """The path of one benchmark model, exported now if it is not in ``folder`` yet."""
    path = folder / f"{name}.onnx"
    if path.exists():
        return path
    build, exporter = MODELS[name]
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, args, axes = build()
    model.eval()
    names = list(axes)
    tmp = path.with_name(f".{path.name}.tmp")
    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            program = torch.onnx.export(model, args, dynamo=True, verbose=False, input_names=names,
                                        dynamic_shapes={k: {i: torch.export.Dim.AUTO for i in v} for k, v in axes.items()})
            program.save(str(tmp))
        else:
            torch.onnx.export(model, args, str(tmp), dynamo=False, opset_version=17, input_names=names,
                              output_names=["output"], dynamic_axes=axes)
    os.replace(tmp, path)
    return path
