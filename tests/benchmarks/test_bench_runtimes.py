"""Smoke run of ``benchmarks/bench_runtimes.py`` (folded files in onnxruntime and OpenVINO) in its quick
configuration, and the pieces that turn a failed fold or a wrong file into words.

Only the shape of the results is checked (every runtime has its rows, ratios are the figures they claim to
be, folded outputs match): timings are never asserted.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_runtimes, run  # noqa: E402

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return bench_runtimes.run(quick=True)


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def _by(rows: list[dict], runtime: str) -> dict[str, dict]:
    return {r["model"]: r for r in rows if r["runtime"].startswith(runtime)}


def test_the_section_is_registered_once():
    assert list(run.OTHERS.values()).count("bench_runtimes") == 1


def test_every_runtime_has_a_row_per_model_in_runtime_order(rows):
    assert [r["runtime"].split()[0] for r in rows] == ["onnxruntime"] * 2 + ["OpenVINO"] * 2
    for runtime in ("onnxruntime", "OpenVINO"):
        assert set(_by(rows, runtime)) == {"bert", "repvgg"}
    for row in rows:  # a missing figure always carries its reason
        if row.get("folded_over_baseline") is None:
            assert row["note"]


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("OpenVINO", marks=pytest.mark.skipif(
    not HAS_OPENVINO, reason="openvino not installed (the bench extra)"))])  # fmt: skip
def test_legacy_exports_fold_and_run_in_each_runtime(rows, runtime):
    by_model = _by(rows, runtime)
    repvgg, bert = by_model["repvgg"], by_model["bert"]
    assert repvgg["baseline"] == "single path" and bert["baseline"] == "original"
    for row, baseline in ((repvgg, "single_path_ms"), (bert, "original_ms")):
        for key in ("original_ms", "folded_ms", baseline, "folded_over_baseline", "spread"):
            assert _finite_positive(row[key]), (row["model"], key)
        assert row["folded_over_baseline"] == pytest.approx(row["folded_ms"] / row[baseline])
        assert row["goal_met"] is (row["folded_over_baseline"] <= row["goal"])
        assert row["max_rel_error"] <= bench_runtimes.MAX_OUTPUT_ERROR
        assert row["verified"] is True
    assert repvgg["regions"] > 0 and repvgg["goal"] == 1.02
    assert bert["goal"] == 1.00


def test_openvino_missing_is_said_in_its_rows(rows):
    if HAS_OPENVINO:
        pytest.skip("openvino is installed")
    for row in _by(rows, "OpenVINO").values():
        assert row["folded_ms"] is None and "cannot run" in row["note"]


def test_a_traceback_is_reported_by_its_root_cause():
    stderr = """Traceback (most recent call last):
  File "x.py", line 3, in load
FileNotFoundError: [Errno 2] No such file or directory: 'm.onnx.data'

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
onnx_ir.passes.PassError: An error occurred when running the pass
"""
    text = bench_runtimes.failure(1, stderr)
    assert text.startswith("fold crashed (exit 1, traceback): FileNotFoundError:")
    assert "m.onnx.data" in text
    assert bench_runtimes.failure(2, "warming up\nbranchfold: error: bad.onnx is not an ONNX model\n") == (
        "fold failed (exit 2): branchfold: error: bad.onnx is not an ONNX model"
    )


def test_a_file_the_command_refuses_becomes_a_fold_without_output(tmp_path):
    models, work = tmp_path / "models", tmp_path / "elsewhere"
    models.mkdir()
    work.mkdir()
    (models / "bad.onnx").write_bytes(b"this is not an ONNX model")
    fold = bench_runtimes.fold_file(models / "bad.onnx", tmp_path / "bad-folded.onnx", work)
    assert fold.output is None and fold.regions is None
    assert fold.error.startswith("fold failed (exit ") or fold.error.startswith("fold crashed (exit ")
    assert not (tmp_path / "bad-folded.onnx").exists()


def test_output_error_is_relative_to_the_original_scale():
    original = np.array([[2.0, -4.0]], dtype=np.float32)
    assert bench_runtimes.output_error(original.copy(), original) == 0.0
    assert bench_runtimes.output_error(original + np.float32(0.04), original) == pytest.approx(0.01, rel=1e-5)
    assert bench_runtimes.output_error(original[:, :1], original) == math.inf  # a different shape is wrong
