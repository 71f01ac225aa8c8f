"""Adapter models through the command line, as a user has them: a PEFT LoRA or DoRA model exported unmerged
by either torch exporter, with its weights in an external data file, folded by ``python -m branchfold fold``
run from another folder. The file written must have the merged export's MatMul/Gemm count, give the input's
outputs when opened from a third folder, and add nothing outside the rewritten regions."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
onnx = pytest.importorskip("onnx")

from adapter_models import Hidden, adapted, ids  # noqa: E402
from cli_walk import assert_output_is_input_elsewhere, walk  # noqa: E402


def _export(model: torch.nn.Module, dynamo: bool, folder: Path, name: str) -> Path:
    """The exporter's file with its weights in ``<name>.onnx.data`` (the dynamo exporter writes it so; the
    legacy exporter's file is saved again that way, as users do past 2 GB)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Hidden(model).eval(), (ids(),), str(path), dynamo=dynamo, input_names=["ids"],
                          **({} if dynamo else {"opset_version": 17}))  # fmt: skip
    if not dynamo:
        proto = onnx.load(str(path))
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{name}.onnx.data", size_threshold=0)  # fmt: skip
    assert (folder / f"{name}.onnx.data").exists()
    return path


def _matmuls(path: Path) -> int:
    return sum(n.op_type in ("MatMul", "Gemm") for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize(
    ("name", "dora", "dynamo"),
    [("llama", False, True), ("bert", True, False)],
    ids=["llama-lora-dynamo", "bert-dora-legacy"],
)
def test_cli_folds_an_exported_adapter_model_to_the_merged_exports_matmuls(name, dora, dynamo, tmp_path):
    model = adapted(name, dora, subset=True)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    src = _export(model, dynamo, tmp_path / "models", "adapted")
    reference = _export(merged, dynamo, tmp_path / "merged", "merged")
    assert _matmuls(src) > _matmuls(reference)
    done = walk(src, tmp_path)
    assert done.code == 0, done.stderr
    assert "read back byte for byte" in done.stdout and not done.stderr.strip()  # the written file was checked
    assert _matmuls(done.output) == _matmuls(reference)
    assert_output_is_input_elsewhere(src, done.output, tmp_path / "third")
