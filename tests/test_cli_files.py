"""The command line on ONNX files as users have them, walked from the outside: both torch exporters' files
(legacy opset 17 inline; the dynamo exporter's default with ``<name>.onnx.data``; a free batch and length) and
an Optimum-named data file, for small Hugging Face BERT, GPT-2 and Llama configs and zoo models. Each is folded
by ``python -m branchfold fold`` from an unrelated folder with relative or absolute paths into another folder,
opened by onnxruntime from a third, compared with its input, and checked for anything added; the input's files
stay as they were. The full product of models and exporters runs with ``-m slow``; ``make test`` runs a cover
in which every model and every exporter appears."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from cli_walk import assert_output_is_input_elsewhere, normalized, references, walk
from onnx_files import EXPORTERS, MODELS, export

pytest.importorskip("transformers")

COVER = {
    ("bert", "legacy"), ("bert", "dynamo"), ("gpt2", "dynamic"), ("gpt2", "legacy"), ("llama", "dynamo"),
    ("llama", "optimum"), ("seed-vit", "dynamo"), ("seed-vit", "legacy"), ("repvgg", "dynamic"), ("repvgg", "optimum"),
}  # fmt: skip
CASES = [
    pytest.param(m, e, id=f"{m}-{e}", marks=() if (m, e) in COVER else pytest.mark.slow)
    for m in MODELS
    for e in EXPORTERS
]
FOLDS = {"seed-vit", "repvgg"}  # multi-branch: regions fold on every exporter's file


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    cache: dict[tuple[str, str], Path] = {}

    def get(model: str, exporter: str) -> Path:
        if (model, exporter) not in cache:
            cache[model, exporter] = export(model, exporter, tmp_path_factory.mktemp(f"{model}-{exporter}"))
        return cache[model, exporter]

    return get


@pytest.mark.parametrize(("model", "exporter"), CASES)
def test_fold_from_another_folder_and_open_from_a_third(files, tmp_path, model, exporter):
    src = files(model, exporter)
    absolute = (model, exporter) in {("bert", "dynamo"), ("seed-vit", "legacy"), ("repvgg", "dynamic")}
    done = walk(src, tmp_path, absolute=absolute)
    assert done.code == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert f"-> {done.output.resolve() if absolute else ''}" in done.stdout or "->" in done.stdout
    inputs = sorted(p.name for p in src.parent.iterdir())
    written = sorted(p.name for p in done.output.parent.iterdir())
    name = done.output.name
    if len(inputs) == 1:
        assert written == [name] and references(done.output) == set()
    else:  # the data file is named after the output, in the input's convention
        suffix = inputs[1][len(inputs[0]):]
        assert written == [name, name + suffix] and references(done.output) == {name + suffix}
    if model in FOLDS:
        assert "folded regions: 0" not in done.stdout, done.stdout
    assert_output_is_input_elsewhere(src, done.output, tmp_path / "third")


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_fold_that_rewrites_nothing_writes_the_input(files, tmp_path, exporter):
    """BERT folds nothing here (the runtime guard keeps every fusion): the written graph equals the input's,
    where its bytes lie aside. A legacy BERT given inferred value_info ran 11-24% slower in onnxruntime."""
    src = files("bert", exporter)
    done = walk(src, tmp_path, "--no-verify")
    assert done.code == 0, done.stderr
    if "folded regions: 0" not in done.stdout:
        pytest.skip("regions folded on this file; the no-op case needs none")
    assert normalized(done.output) == normalized(src)
    assert len(onnx.load(done.output, load_external_data=False).graph.value_info) == len(
        onnx.load(src, load_external_data=False).graph.value_info
    )
