"""Walking the command line as a user does, for the end-to-end tests: ``branchfold fold`` as a subprocess from
an unrelated folder, the output opened by onnxruntime from a third, compared with the input, and the input's
files unchanged. ``walk`` returns what it saw; the assertions on the files are ``assert_output_is_input_elsewhere``."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

BRANCHFOLD = [sys.executable, "-m", "branchfold"]


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@dataclass
class Walk:
    code: int
    stdout: str
    stderr: str
    output: Path


def run_cli(*argv: str | os.PathLike, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")  # this checkout's branchfold
    return subprocess.run([*BRANCHFOLD, *map(str, argv)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def walk(src: Path, work: Path, *options: str, absolute: bool = False) -> Walk:
    """Fold ``src`` from ``work/elsewhere`` into ``work/out``; paths relative to the working folder unless
    ``absolute``. The input's folder must be left byte for byte as it was."""
    elsewhere, out_dir = work / "elsewhere", work / "out"
    elsewhere.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    before = hashes(src.parent)
    out = out_dir / f"folded-{src.name}"
    if absolute:
        argv = [src.resolve(), "-o", out.resolve()]
    else:
        argv = [os.path.relpath(src, elsewhere), "-o", os.path.relpath(out, elsewhere)]
    done = run_cli("fold", *argv, *options, cwd=elsewhere)
    assert hashes(src.parent) == before, "the input's files changed"
    return Walk(done.returncode, done.stdout, done.stderr, out)


def feeds(session: ort.InferenceSession, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Two random input sets of the declared shapes (free dims at 2 and 3: a dynamic export must run at both)."""
    rng = np.random.default_rng(seed)
    sets = []
    for free in (2, 3):
        feed = {}
        for i in session.get_inputs():
            shape = [d if isinstance(d, int) else free for d in i.shape]
            if "int" in i.type:
                feed[i.name] = rng.integers(0, 64, shape).astype(np.int64)  # token ids below the smallest vocabulary
            else:
                feed[i.name] = rng.standard_normal(shape).astype(np.float32)
        sets.append(feed)
    return sets


def _session(path: Path, optimized: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def assert_output_is_input_elsewhere(src: Path, out: Path, third: Path, tolerance: float = 1e-5) -> None:
    """Open the output from a third folder (copied there with its data files, so nothing can be read from the
    folder it was written in) and compare it with the input, both in onnxruntime; then check that the
    written model adds nothing the input did not have outside what the fold rewrote."""
    third.mkdir(parents=True, exist_ok=True)
    moved = third / out.name
    for f in out.parent.iterdir():
        if f.name.startswith(out.name):
            shutil.copy(f, third / f.name)
    here = os.getcwd()
    os.chdir(third.parent)
    try:
        reference, folded = _session(src.resolve(), optimized=False), _session(moved, optimized=False)
        for feed in feeds(reference):
            want = reference.run(None, feed)
            got = folded.run(None, feed)
            for w, g in zip(want, got):
                scale = max(float(np.max(np.abs(w))), 1e-30)
                assert float(np.max(np.abs(np.asarray(g, np.float64) - w))) / scale <= tolerance
    finally:
        os.chdir(here)
    assert_nothing_added(src, out)


def references(out: Path) -> set[str]:
    model = onnx.load(out, load_external_data=False)
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


def assert_nothing_added(src: Path, out: Path) -> None:
    """Outside the rewritten regions the output is the input: model fields, graph inputs and outputs (with their
    dynamic dims), no value_info the input did not declare, untouched nodes and initializers as they were."""
    a, b = onnx.load(src, load_external_data=False), onnx.load(out, load_external_data=False)
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string",
                  "metadata_props", "functions"):  # fmt: skip
        assert getattr(a, field) == getattr(b, field), field
    assert {(o.domain, o.version) for o in a.opset_import} == {(o.domain, o.version) for o in b.opset_import}
    assert list(a.graph.input) == list(b.graph.input)
    assert list(a.graph.output) == list(b.graph.output)
    declared = {v.name: v for v in a.graph.value_info}
    for v in b.graph.value_info:
        assert v.name in declared and declared[v.name] == v, f"value_info {v.name} added or changed"
    old_nodes = {n.name: n for n in a.graph.node if n.name}
    values = {v for n in b.graph.node for v in n.output} | {v.name for v in b.graph.input} | {t.name for t in b.graph.initializer}
    for n in b.graph.node:
        old = old_nodes.get(n.name)
        if old is None or n.op_type != old.op_type:
            continue  # a node the fold wrote
        assert (n.domain, list(n.output), list(n.attribute)) == (old.domain, list(old.output), list(old.attribute)), n.name
        for was, now in zip(old.input, n.input, strict=True):  # a reader of a rewritten value reads its replacement
            assert now == was or was not in values, f"node {n.name} reads {now} instead of {was}, which still exists"
    old = {t.name: t for t in onnx.load(src).graph.initializer}
    for t in onnx.load(out).graph.initializer:
        if t.name in old:
            assert onnx.numpy_helper.to_array(t).tobytes() == onnx.numpy_helper.to_array(old[t.name]).tobytes(), t.name


def normalized(path: Path) -> onnx.ModelProto:
    """The model without where its tensors' bytes lie (external data or inline): what a no-op fold must equal."""
    model = onnx.load(path, load_external_data=False)
    for t in model.graph.initializer:
        del t.external_data[:]
        t.ClearField("data_location")
        t.ClearField("raw_data")
    for o in model.opset_import:
        if not o.domain:
            o.ClearField("domain")
    return model
