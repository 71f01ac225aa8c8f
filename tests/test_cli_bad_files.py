"""Every bad file, walked from the outside: ``python -m branchfold fold`` from an unrelated folder, with and
without ``--no-verify``, answers one line on stderr naming the cause, exits 2, prints no traceback, writes
nothing (an existing output stays as it was) and leaves the input's files as they were."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_walk import hashes, run_cli
from onnx import helper

R = np.random.default_rng(0)


def _model(make_onnx) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"]), helper.make_node("MatMul", ["x", "w1"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]  # fmt: skip
    inits = {f"w{i}": R.standard_normal((64, 64)).astype(np.float32) for i in range(2)}
    return make_onnx(nodes, [("x", ["N", 64])], [("y", ["N", 64])], inits)


def _external(make_onnx, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    onnx.save(_model(make_onnx), path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    return path


def _truncated_data(make_onnx, folder):
    p = _external(make_onnx, folder)
    data = folder / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:20000])
    return p, "truncated"


def _missing_data(make_onnx, folder):
    p = _external(make_onnx, folder)
    (folder / "m.onnx.data").unlink()
    return p, "missing"


def _data_outside(make_onnx, folder):
    p = _external(make_onnx, folder / "inner")
    os.replace(folder / "inner" / "m.onnx.data", folder / "m.onnx.data")
    m = onnx.load(p, load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../m.onnx.data"
    onnx.save(m, p)
    return p, "outside the model's folder"


def _truncated_model(make_onnx, folder):
    folder.mkdir(parents=True)
    p = folder / "m.onnx"
    onnx.save(_model(make_onnx), p)
    p.write_bytes(p.read_bytes()[:2000])
    return p, "not a readable ONNX model"


def _empty(make_onnx, folder):
    folder.mkdir(parents=True)
    p = folder / "m.onnx"
    p.write_bytes(b"")
    return p, "not a readable ONNX model"


def _text(make_onnx, folder):
    folder.mkdir(parents=True)
    p = folder / "m.onnx"
    p.write_text("not a model\n")
    return p, "not"


def _no_such_file(make_onnx, folder):
    folder.mkdir(parents=True)
    return folder / "nope.onnx", "no such file"


CASES = {f.__name__[1:]: f for f in (_truncated_data, _missing_data, _data_outside, _truncated_model, _empty, _text,
                                    _no_such_file)}  # fmt: skip


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "no-verify"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_file_is_one_line_exit_2_nothing_written(make_onnx, tmp_path, case, verify):
    src, cause = CASES[case](make_onnx, tmp_path / "models")
    elsewhere, out_dir = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    out_dir.mkdir()
    out = out_dir / "o.onnx"
    out.write_bytes(b"keep me")
    before = hashes(src.parent)
    done = run_cli("fold", os.path.relpath(src, elsewhere), "-o", os.path.relpath(out, elsewhere),
                   *([] if verify else ["--no-verify"]), cwd=elsewhere)  # fmt: skip
    err = done.stderr.strip()
    assert done.returncode == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("branchfold: error:"), err
    assert cause in err and "Traceback" not in err
    assert sorted(os.listdir(out_dir)) == ["o.onnx"] and out.read_bytes() == b"keep me"
    assert hashes(src.parent) == before


def test_an_output_that_would_replace_the_inputs_data_file_is_refused(make_onnx, tmp_path):
    """``-o b.onnx`` beside an ``a.onnx`` whose data file is ``b.onnx.data`` would overwrite the input's weights."""
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(_model(make_onnx), folder / "a.onnx", save_as_external_data=True, location="b.onnx.data", size_threshold=0)
    before = hashes(folder)
    done = run_cli("fold", "a.onnx", "-o", "b.onnx", cwd=folder)
    assert done.returncode == 2 and "data file of the input" in done.stderr
    assert hashes(folder) == before


def test_usage_shows_the_output_as_required_and_the_title_the_paths_as_given(make_onnx, tmp_path):
    done = run_cli("fold", "m.onnx", cwd=tmp_path)
    assert done.returncode == 2 and "(-o OUTPUT | --in-place)" in done.stderr
    src = _external(make_onnx, tmp_path / "models")
    (tmp_path / "out").mkdir()
    done = run_cli("fold", "models/m.onnx", "-o", "out/f.onnx", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "branchfold: models/m.onnx -> out/f.onnx"
    assert src.is_file()


def test_a_table_piped_to_a_file_keeps_each_row_on_one_line(make_onnx, tmp_path):
    """A value name far longer than any terminal (two sibling MatMuls the horizontal policy leaves apart read
    it): its row is one line, neither cut nor wrapped."""
    long_name = "encoder/" * 20 + "LayerNorm_output_0"
    nodes = [helper.make_node("MatMul", [long_name, "w0"], ["a"]), helper.make_node("MatMul", [long_name, "w1"], ["b"])]
    inits = {f"w{i}": R.standard_normal((16, 16)).astype(np.float32) for i in range(2)}
    onnx.save(make_onnx(nodes, [(long_name, ["N", 16])], [("a", ["N", 16]), ("b", ["N", 16])], inits), tmp_path / "m.onnx")
    done = run_cli("fold", "m.onnx", "-o", "f.onnx", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (row,) = [line for line in done.stdout.splitlines() if long_name in line]
    assert "horizontal-policy" in row and "measured not to pay" in row
    assert all("…" not in line for line in done.stdout.splitlines())
