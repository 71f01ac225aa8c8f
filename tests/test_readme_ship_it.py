"""The README's "Ship it" section, run block by block: every way it says works is checked here."""

from __future__ import annotations

import re
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from branchfold.zoo import ZOO

README = Path(__file__).resolve().parents[1] / "README.md"


def ship_it_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("### Ship it", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> dict:
    """The namespace after running every block in order, in a fresh directory, on a RepVGG-style CNN."""
    entry = ZOO["repvgg"]
    model = entry.build().eval()
    (x,) = entry.example_input(model, 2)
    namespace = {"model": model, "x": x}
    cwd = Path.cwd()
    directory = tmp_path_factory.mktemp("ship")
    try:
        import os

        os.chdir(directory)
        for block in ship_it_blocks():
            exec(compile(block, "README.md (Ship it)", "exec"), namespace)
    finally:
        os.chdir(cwd)
    namespace["directory"] = directory
    return namespace


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-5 * b.abs().max())


def test_the_section_has_a_block_per_way_to_ship():
    assert len(ship_it_blocks()) == 4


def test_the_loaded_module_is_the_folded_function_at_any_batch(shipped):
    model, x = shipped["model"], shipped["x"]
    loaded = torch.load(shipped["directory"] / "folded.pt", weights_only=False)
    assert isinstance(loaded, torch.fx.GraphModule) and not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())
    with torch.no_grad():
        for batch in (x, torch.cat([x, x[:1]])):
            assert _close(loaded(batch), model(batch))
    with pytest.raises(AssertionError, match="Guard failed"):  # its input checks survive the round trip
        loaded(torch.randn(2, 5, *x.shape[2:]))


def test_the_re_exported_program_runs_at_another_batch_after_load(shipped):
    model, x = shipped["model"], shipped["x"]
    six = torch.cat([x, x, x])
    assert shipped["y"].shape[0] == 6
    with torch.no_grad():
        assert _close(shipped["y"], model(six))
        assert _close(shipped["ep"].module()(x[:1]), model(x[:1]))


def test_the_folded_program_is_saved_and_keeps_its_free_batch(shipped):
    model, x = shipped["model"], shipped["x"]
    loaded = torch.export.load(shipped["directory"] / "folded_program.pt2")
    five = torch.cat([x, x, x[:1]])
    with torch.no_grad():
        assert _close(loaded.module()(five), model(five))
    assert len(loaded.graph_signature.parameters) < len(shipped["program"].graph_signature.parameters)


def test_the_onnx_file_runs_at_another_batch_in_onnxruntime(shipped):
    model, x = shipped["model"], shipped["x"]
    session = ort.InferenceSession(str(shipped["directory"] / "folded.onnx"))
    three = torch.cat([x, x[:1]])
    (got,) = session.run(None, {session.get_inputs()[0].name: three.numpy()})
    with torch.no_grad():
        assert _close(torch.from_numpy(got), model(three))
