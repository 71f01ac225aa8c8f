"""Big ONNX models at I/O speed: the synthetic model writer, the big-models benchmark's code path,
and the 2 GB+ model folded within the bounds.

The tests marked ``slow`` write a 2.1 GiB model with external data and fold it twice in child processes
(minutes, gigabytes of memory): ``make test`` leaves them out, ``make bench`` runs them. The other tests
run the same code on a model of kilobytes.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_big, markdown  # noqa: E402
from benchmarks.synthetic_big import ALIGNMENT, SyntheticModel, write_stacked_branches  # noqa: E402

MIN_FREE_DISK = 8e9  # the 2.2 GB model, two folded copies and onnx_ir's copy, with room to spare
MAX_RELATIVE_ERROR = 1e-4  # max |folded - original| / max |original|, float32 sums reassociated by the fold


def _linear_ops(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return sum(n.op_type in ("MatMul", "Gemm") for n in model.graph.node)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the file as written
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _check_folded(model: SyntheticModel, result: bench_big.JobResult) -> None:
    """The fold ran, halved the linears and the bytes, and computes what the original computes."""
    assert result.error is None, result.error
    assert _linear_ops(result.output) == model.linear_ops_after_fold
    assert result.out_mb * bench_big.MB < 0.6 * model.total_bytes
    x = np.random.default_rng(1).standard_normal((2, model.width), dtype=np.float32)
    expected = _run(model.path, x)  # one session at a time: at full size each holds gigabytes
    folded = _run(result.output, x)
    assert np.isfinite(expected).all()
    error = np.abs(folded - expected).max() / np.abs(expected).max()
    assert error <= MAX_RELATIVE_ERROR


def _reference(model: SyntheticModel, x: np.ndarray) -> np.ndarray:
    """The stacked blocks in numpy, from the weights as stored: what the writer promises to have written."""
    proto = onnx.load(str(model.path))  # external data read back from the data file
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            w = weights[node.input[1]]
            weights[node.output[0]] = x @ w if node.op_type == "MatMul" else x @ w.T + weights[node.input[2]]
        elif node.name.endswith(".add"):
            branches = weights[node.input[0]] + weights[node.input[1]]
        elif node.name.endswith(".residual"):
            x = np.maximum(branches + x, 0)
    return x


# ------------------------------------------------------------------------------------------------
# fast: the same code on kilobytes


def test_writer_writes_a_valid_model_with_aligned_external_data(tmp_path):
    model = write_stacked_branches(tmp_path / "tiny.onnx", blocks=4, width=32, seed=3)
    onnx.checker.check_model(str(model.path), full_check=True)
    assert model.data_path == tmp_path / "tiny.onnx.data"
    proto = onnx.load(str(model.path), load_external_data=False)
    weights = [t for t in proto.graph.initializer if t.name.endswith(".weight")]
    assert len(weights) == model.linear_ops == _linear_ops(model.path) == 8
    for t in weights:
        entry = {e.key: e.value for e in t.external_data}
        assert t.data_location == onnx.TensorProto.EXTERNAL and entry["location"] == "tiny.onnx.data"
        assert int(entry["offset"]) % ALIGNMENT == 0 and int(entry["length"]) == 32 * 32 * 4
    assert {n.op_type for n in proto.graph.node} == {"MatMul", "Gemm", "Add", "Relu"}
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = np.random.default_rng(0).standard_normal((5, 32), dtype=np.float32)
    y = _run(model.path, x)
    np.testing.assert_allclose(y, _reference(model, x), rtol=1e-5, atol=1e-6)
    assert 0.1 < np.abs(y).max() < 100  # the default scale keeps activations of the input's order


def test_writer_is_deterministic_in_its_seed(tmp_path):
    a = write_stacked_branches(tmp_path / "a.onnx", blocks=2, width=16, seed=7)
    b = write_stacked_branches(tmp_path / "b.onnx", blocks=2, width=16, seed=7)
    c = write_stacked_branches(tmp_path / "c.onnx", blocks=2, width=16, seed=8)
    assert a.data_path.read_bytes() == b.data_path.read_bytes() != c.data_path.read_bytes()


def test_folded_tiny_model_halves_the_linears_and_matches(tmp_path):
    model = write_stacked_branches(tmp_path / "tiny.onnx", blocks=3, width=64)
    result = bench_big.run_job("branchfold", model.path, tmp_path, timeout_s=300)
    _check_folded(model, result)


def test_failed_and_timed_out_jobs_become_cells(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    failed = bench_big.run_job("onnx_ir", bad, tmp_path, timeout_s=300)
    assert failed.seconds is None and failed.error.startswith("failed (exit 1)")
    slow = bench_big.run_job("onnx_ir", bad, tmp_path, timeout_s=0.05)
    assert slow.error == "timeout after 0.05 s"
    runs = bench_big.ToolRuns([bench_big.JobResult(seconds=1.0), failed])
    assert runs.time_cell() == failed.error and runs.median("seconds") is None


def test_quick_benchmark_rows():
    (row,) = bench_big.run(quick=True, log=lambda s: None)
    times = [row[f"{label} s"] for label in bench_big.TOOLS.values()]
    assert all(isinstance(t, float) and t > 0 for t in times), times  # every tool ran
    limit, fold = row["load+save s"], row["fold s"]
    assert row["fold / (2.5 load+save + 2 s)"] == pytest.approx(fold / (2.5 * limit + 2.0))
    assert row["fold within time bound"] is (fold <= 2.5 * limit + 2.0)
    assert row["verified faster than onnxslim"] is (row["fold verified s"] < row["onnxslim s"])
    assert row["peak bound MB (1.5 size + 300)"] == pytest.approx(1.5 * row["MB"] + 300)
    assert row["fold peak within bound"] is (row["peak MB fold"] <= row["peak bound MB (1.5 size + 300)"])
    assert 0 < row["peak MB after imports (fold)"] <= row["peak MB fold"]
    assert 0 < row["fold output MB"] < 0.6 * row["MB"]  # the fold halved the weights
    assert row["fold process s (with start + imports)"] > fold
    lines = markdown.other_section("Big ONNX models at I/O speed", "bench_big", [row])
    assert any(line.startswith(f"| {row['model']} |") for line in lines)


# ------------------------------------------------------------------------------------------------
# slow: the 2 GB+ model


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> SyntheticModel:
    folder = tmp_path_factory.mktemp("big")
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_DISK:
        pytest.skip(f"the 2 GB+ model needs {MIN_FREE_DISK / 1e9:.0f} GB free disk in {folder}; {free / 1e9:.1f} GB free")
    model = write_stacked_branches(folder / "big.onnx", *bench_big.SYNTHETIC)
    assert model.total_bytes > 2**31  # over the protobuf limit: external data is the only way
    return model


@pytest.fixture(scope="module")
def limit_s(big) -> float:
    """onnx_ir load + save of the same file, in the same test session: the time bound's base."""
    result = bench_big.run_job_isolated("onnx_ir", big.path, bench_big.FULL.timeout_s)
    assert result.error is None, result.error
    return result.seconds


class _Folds:
    """Each fold of the big model runs once, its output kept for the checks that follow."""

    def __init__(self, big: SyntheticModel, factory: pytest.TempPathFactory) -> None:
        self.big, self.factory, self.results = big, factory, {}

    def __call__(self, job: str) -> bench_big.JobResult:
        if job not in self.results:
            out = self.factory.mktemp(job)
            self.results[job] = bench_big.run_job(job, self.big.path, out, bench_big.FULL.timeout_s)
        return self.results[job]


@pytest.fixture(scope="module")
def fold_big(big, tmp_path_factory) -> _Folds:
    return _Folds(big, tmp_path_factory)


def _peak_bound_mb(big: SyntheticModel) -> float:
    return bench_big.RSS_FACTOR * big.total_bytes / bench_big.MB + bench_big.RSS_SLACK_MB


@pytest.mark.slow
def test_big_unverified_fold_is_correct(big, fold_big):
    _check_folded(big, fold_big("branchfold"))


@pytest.mark.slow
def test_big_unverified_fold_within_memory_bound(big, fold_big):
    result = fold_big("branchfold")
    assert result.error is None, result.error
    bound = _peak_bound_mb(big)
    assert result.peak_mb <= bound, f"peak {result.peak_mb:.0f} MB > {bound:.0f} MB"


@pytest.mark.slow
def test_big_unverified_fold_within_time_bound(big, fold_big, limit_s):
    result = fold_big("branchfold")
    assert result.error is None, result.error
    time_bound = bench_big.TIME_FACTOR * limit_s + bench_big.TIME_SLACK_S
    assert result.seconds <= time_bound, f"{result.seconds:.1f} s > {time_bound:.1f} s (load+save {limit_s:.1f} s)"


@pytest.mark.slow
def test_big_verified_fold_is_correct_within_memory_bound(big, fold_big):
    result = fold_big("branchfold_verified")
    _check_folded(big, result)
    bound = _peak_bound_mb(big)
    assert result.peak_mb <= bound, f"peak {result.peak_mb:.0f} MB > {bound:.0f} MB"
