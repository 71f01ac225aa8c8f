"""The README's adapter example, run as written: three lines that fold a PEFT DoRA model in torch and its
unmerged ONNX export, on a small BERT built from a config (random weights, no downloads)."""

from __future__ import annotations

import copy
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

import branchfold

peft = pytest.importorskip("peft")
onnx = pytest.importorskip("onnx")
T = pytest.importorskip("transformers")

from adapter_models import Hidden, randomized  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def adapter_block() -> str:
    section = README.read_text().split("### Adapters: LoRA, DoRA and their kin", 1)[1].split("\n### ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


def _matmuls(proto) -> int:
    return sum(n.op_type in ("MatMul", "Gemm") for n in proto.graph.node)


def _export(model: torch.nn.Module, ids: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Hidden(model).eval(), (ids,), str(path), dynamo=False, opset_version=17)


def test_the_readme_adapter_example_folds_like_the_merge(tmp_path):
    torch.manual_seed(0)
    base = randomized(T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, vocab_size=64))).eval()  # fmt: skip
    input_ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    # the file the example's last line reads: the same adapted model, exported unmerged
    config = peft.LoraConfig(target_modules="all-linear", use_dora=True)
    twin = peft.get_peft_model(copy.deepcopy(base), config).eval()
    _export(twin, input_ids, tmp_path / "adapted.onnx")
    _export(copy.deepcopy(twin).merge_and_unload().eval(), input_ids, tmp_path / "merged.onnx")
    namespace = {"peft": peft, "branchfold": branchfold, "onnx": onnx, "base": base, "input_ids": input_ids}
    here = Path.cwd()
    os.chdir(tmp_path)
    try:
        exec(compile(adapter_block(), "README.md (Adapters)", "exec"), namespace)
    finally:
        os.chdir(here)
    model, folded, onnx_folded = namespace["model"], namespace["folded"], namespace["onnx_folded"]
    merged = branchfold.fold(copy.deepcopy(model).merge_and_unload().eval(), (input_ids,))
    linear = lambda gm: sum("linear" in str(n.target) for n in gm.graph.nodes if n.op == "call_function")  # noqa: E731
    assert linear(folded) == linear(merged)
    with torch.no_grad():
        want, got = model(input_ids).last_hidden_state, folded(input_ids).last_hidden_state
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    proto = onnx_folded if hasattr(onnx_folded, "graph") and hasattr(onnx_folded.graph, "node") else None
    assert proto is not None and _matmuls(proto) == _matmuls(onnx.load(str(tmp_path / "merged.onnx")))
    assert _matmuls(proto) < _matmuls(onnx.load(str(tmp_path / "adapted.onnx")))
