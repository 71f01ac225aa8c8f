"""ONNX files as users have them: written by both torch exporters (and re-saved the way other tools name
their data files) from small Hugging Face configs and the zoo, with random weights and no download.

``export(name, exporter, folder)`` writes one model file (and its data file, where the exporter writes one)
into ``folder`` and returns its path:

- ``legacy``: ``torch.onnx.export(..., dynamo=False, opset_version=17)``, weights inline;
- ``dynamo``: the default exporter since torch 2.9, weights in ``<name>.onnx.data``;
- ``dynamic``: the same with a free batch (and sequence length for token inputs);
- ``optimum``: the legacy export re-saved as Hugging Face Optimum names its data, ``model.onnx_data``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from torch import nn

EXPORTERS = ("legacy", "dynamo", "dynamic", "optimum")


class _Tokens(nn.Module):
    """A Hugging Face model called with ``input_ids`` only, returning its first output tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # an explicit mask: the legacy exporter cannot export the mask transformers builds without one
        # (aten::diff); use_cache=False: no cache tensors among the outputs
        extra = {"use_cache": False} if "use_cache" in self.model.config.to_dict() else {}
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **extra)[0]


def _hf(kind: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    small = dict(vocab_size=128, num_attention_heads=2)
    if kind == "bert":
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                         max_position_embeddings=32, **small)  # fmt: skip
        model = transformers.BertModel(config, add_pooling_layer=False)
    elif kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_positions=32, n_head=2, vocab_size=128)
        model = transformers.GPT2Model(config)
    else:
        config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                          num_key_value_heads=2, max_position_embeddings=32, **small)  # fmt: skip
        model = transformers.LlamaModel(config)
    with torch.no_grad():  # LayerNorm / RMSNorm weights away from 1, so that folding them matters
        for m in model.modules():
            if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 1:
                m.weight.uniform_(0.5, 1.5)
    return _Tokens(model.eval()).eval()


def _zoo(name: str) -> nn.Module:
    from branchfold.zoo import ZOO

    return ZOO[name].build().eval()


MODELS: dict[str, Callable[[], nn.Module]] = {
    "bert": lambda: _hf("bert"),
    "gpt2": lambda: _hf("gpt2"),
    "llama": lambda: _hf("llama"),
    "seed-vit": lambda: _zoo("seed-vit"),
    "repvgg": lambda: _zoo("repvgg"),
}
TOKEN_MODELS = {"bert", "gpt2", "llama"}


def example(name: str, model: nn.Module) -> tuple[torch.Tensor, ...]:
    if name in TOKEN_MODELS:
        return (torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0)),)
    from branchfold.zoo import ZOO

    return ZOO[name].example_input(model, 2)


@contextlib.contextmanager
def _quiet():
    """The exporters' progress lines and warnings are not this test's subject."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(level)


def export(name: str, exporter: str, folder: Path) -> Path:
    """Write model ``name`` with ``exporter`` into ``folder`` (created); returns the model file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    model = MODELS[name]()
    args = example(name, model)
    input_name = "input_ids" if name in TOKEN_MODELS else "x"
    path = folder / f"{name}.onnx"
    with _quiet(), torch.no_grad():
        if exporter in ("legacy", "optimum"):
            torch.onnx.export(model, args, path, dynamo=False, opset_version=17, input_names=[input_name],
                              output_names=["y"])  # fmt: skip
        else:
            dims = None
            if exporter == "dynamic":
                free = {0: torch.export.Dim("batch", max=64)}
                if name in TOKEN_MODELS:
                    free[1] = torch.export.Dim("length", max=32)
                dims = (free,)
            torch.onnx.export(model, args, path, dynamo=True, input_names=[input_name], output_names=["y"],
                              dynamic_shapes=dims)  # fmt: skip
    if exporter == "optimum":
        proto = onnx.load(str(path))
        path.unlink()
        path = folder / "model.onnx"
        onnx.save(proto, str(path), save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    return path
