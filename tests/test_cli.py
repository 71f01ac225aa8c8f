"""The command line: fold a file, report, JSON, and every bad-input path (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import branchfold
from branchfold import cli
from branchfold.storage import onnx_io

R = np.random.default_rng(0)


@pytest.fixture
def model_file(tmp_path, make_onnx) -> Path:
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"]), helper.make_node("MatMul", ["x", "w1"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]  # fmt: skip
    inits = {"w0": R.standard_normal((64, 64)).astype(np.float32), "w1": R.standard_normal((64, 64)).astype(np.float32)}
    path = tmp_path / "in.onnx"
    onnx.save(make_onnx(nodes, [("x", ["N", 64])], [("y", ["N", 64])], inits), path)
    return path


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def test_fold_writes_output_and_prints_the_table(model_file, tmp_path, capsys):
    before = model_file.read_bytes()
    out = tmp_path / "out.onnx"
    assert run("fold", model_file, "-o", out) == 0
    text = capsys.readouterr().out
    assert "folded regions: 1" in text and "ops" in text and "max relative error" in text
    folded = onnx.load(out)
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node] == ["MatMul"]
    assert model_file.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".branchfold-")]  # no temp files left


def test_json_and_no_verify(model_file, tmp_path, capsys):
    assert run("fold", model_file, "-o", tmp_path / "o.onnx", "--json", "--no-verify") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts_by_kind"] == {"parallel-sum": 1} and report["max_error"] is None
    assert report["before"]["ops"] == 3 and report["after"]["ops"] == 1


def test_output_equal_to_input_needs_in_place(model_file, capsys):
    before = model_file.read_bytes()
    assert run("fold", model_file, "-o", model_file) == 2
    assert "--in-place" in capsys.readouterr().err and model_file.read_bytes() == before
    assert run("fold", model_file, "--in-place") == 0
    assert [n.op_type for n in onnx.load(model_file).graph.node] == ["MatMul"]


def _bad_inputs(tmp_path: Path, model_file: Path, make_onnx) -> dict[str, Path]:
    text = tmp_path / "text.onnx"
    text.write_text("hello, not a model\n")
    truncated = tmp_path / "trunc.onnx"
    truncated.write_bytes(model_file.read_bytes()[:300])
    custom = tmp_path / "custom.onnx"
    m = make_onnx([helper.make_node("Foo", ["x"], ["y"], domain="acme")], [("x", [2])], [("y", [2])])
    m.opset_import.append(helper.make_opsetid("acme", 1))
    onnx.save(m, custom)
    return {"missing": tmp_path / "nope.onnx", "text": text, "truncated": truncated, "custom": custom}


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "custom"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, model_file, tmp_path, make_onnx, capsys):
    src = _bad_inputs(tmp_path, model_file, make_onnx)[case]
    out = tmp_path / "existing.onnx"
    out.write_bytes(b"keep me")
    assert run("fold", src, "-o", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("branchfold: error:") and "Traceback" not in err
    assert out.read_bytes() == b"keep me"


def test_external_data_is_read_and_written(model_file, tmp_path):
    src_dir = tmp_path / "ext"
    src_dir.mkdir()
    m = onnx.load(model_file)
    onnx.save(m, src_dir / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    out = tmp_path / "o.onnx"
    assert run("fold", src_dir / "m.onnx", "-o", out) == 0
    assert (tmp_path / "o.onnx.data").is_file()  # external in, external out
    folded = onnx.load(out)
    assert folded.graph.initializer[0].dims == [64, 64]


def test_external_data_outside_the_model_folder_is_refused(model_file, tmp_path, capsys):
    (tmp_path / "inner").mkdir()
    m = onnx.load(model_file)
    onnx.save(m, tmp_path / "inner" / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    m2 = onnx.load(tmp_path / "inner" / "m.onnx", load_external_data=False)
    os.replace(tmp_path / "inner" / "m.data", tmp_path / "m.data")
    for t in m2.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../m.data"
    onnx.save(m2, tmp_path / "inner" / "m.onnx")
    assert run("fold", tmp_path / "inner" / "m.onnx", "-o", tmp_path / "o.onnx") == 2
    assert "outside the model's folder" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_large_models_are_written_with_external_data(model_file, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 1000)  # stands in for 2 GB
    monkeypatch.setattr(onnx_io.save_model, "__kwdefaults__", {"external_data": None, "limit": 1000})
    assert run("fold", model_file, "-o", tmp_path / "big.onnx", "--no-verify") == 0
    assert (tmp_path / "big.onnx.data").stat().st_size == 64 * 64 * 4
    assert onnx.load(tmp_path / "big.onnx").graph.initializer[0].dims == [64, 64]


def test_demo_subcommand_is_passed_on(monkeypatch):
    seen = []
    fake = types.SimpleNamespace(main=lambda argv: seen.append(argv) or 0)
    monkeypatch.setitem(sys.modules, "branchfold.demo", fake)
    monkeypatch.setattr(branchfold, "demo", fake, raising=False)  # the package attribute, once demo was imported
    assert run("demo", "--quick", "x") == 0 and seen == [["--quick", "x"]]


def test_python_dash_m_entry_point(model_file, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "branchfold", "fold", str(model_file), "-o", str(tmp_path / "o.onnx"), "--json"],
        capture_output=True, text=True, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verified"] is True


def test_horizontal_switch_forces_sibling_fusion(tmp_path, make_onnx, capsys):
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("Mul", ["q", "k"], ["y"])]  # fmt: skip
    inits = {n: R.standard_normal((16, 16)).astype(np.float32) for n in ("wq", "wk")}
    src = tmp_path / "qk.onnx"
    onnx.save(make_onnx(nodes, [("x", ["N", 16])], [("y", ["N", 16])], inits), src)
    assert run("fold", src, "-o", tmp_path / "off.onnx", "--horizontal", "off") == 0
    assert run("fold", src, "-o", tmp_path / "on.onnx", "--horizontal", "on") == 0
    ops = {m: [n.op_type for n in onnx.load(tmp_path / f"{m}.onnx").graph.node] for m in ("off", "on")}
    assert ops["off"].count("MatMul") + ops["off"].count("Gemm") == 2
    assert ops["on"].count("MatMul") + ops["on"].count("Gemm") == 1 and "Split" in ops["on"]
    with pytest.raises(SystemExit) as bad:  # argparse's own usage error
        run("fold", src, "-o", tmp_path / "x.onnx", "--horizontal", "sideways")
    assert bad.value.code == 2 and not (tmp_path / "x.onnx").exists()


def test_progress_names_each_stage_on_a_log_and_nothing_when_off(model_file, tmp_path, capsys):
    assert run("fold", model_file, "-o", tmp_path / "o.onnx", "--progress", "always") == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("branchfold: ")]
    stages = [ln.split("...")[0].removeprefix("branchfold: ") for ln in lines]
    for stage in ("reading the model", "inferring shapes", "running the original with onnxruntime", "folding",
                  "verifying with onnxruntime", "writing the report", "writing the folded model"):  # fmt: skip
        assert stage in stages
    assert stages.index("folding") < stages.index("verifying with onnxruntime") < stages.index("writing the folded model")
    assert all(ln.rstrip().endswith(" s)") for ln in lines)  # seconds so far: long stages show where time goes
    for mode in ("never", "auto"):  # auto: a small model folds silently
        assert run("fold", model_file, "-o", tmp_path / "o.onnx", "--progress", mode) == 0
        assert not [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("branchfold: ")]


def test_progress_auto_shows_for_big_files(model_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "LARGE_MODEL_BYTES", model_file.stat().st_size)
    assert run("fold", model_file, "-o", tmp_path / "o.onnx") == 0
    assert "branchfold: folding..." in capsys.readouterr().err


def test_html_writes_the_report_page(model_file, tmp_path, capsys):
    page = tmp_path / "report.html"
    assert run("fold", model_file, "-o", tmp_path / "o.onnx", "--html", page, "--json") == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout stays the JSON; where the page went is said on stderr
    assert f"report page written to {page}" in captured.err
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and 'data-count="1"' in html
    assert report["folded"][0]["became"] == "Linear 64→64" and "Linear 64→64" in html
    assert report["stages"] and "folding" in report["stages"]


def test_html_into_a_missing_folder_is_one_line_and_nothing_written(model_file, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert run("fold", model_file, "-o", out, "--html", tmp_path / "no" / "page.html") == 2
    assert "its folder does not exist" in capsys.readouterr().err and not out.exists()
