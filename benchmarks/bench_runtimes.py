"""Do no harm in two runtimes: ONNX files folded by the ``branchfold fold`` command, timed in onnxruntime
and in OpenVINO against what they replace.

A folded file is only worth shipping if it runs at least as fast as the original wherever ONNX files
run, not only in the runtime branchfold checks against. Each model is exported to a file the way users
get one (legacy exporter at opset 17; the dynamo exporter's default, weights in ``<name>.onnx.data``),
folded by the command line in a child process from an unrelated working directory, as a user would:

    cd elsewhere && branchfold fold ../models/NAME.onnx -o ../folded/NAME.onnx --json

and every file (original, folded, the zoo's hand-written single path) is opened by each runtime from its
own path, so external data is resolved the way a deployment resolves it. Hugging Face BERT, GPT-2 and
Llama (small configs, random weights): folded / original, goal <= 1.00. Zoo models: folded /
hand-written single path, goal <= 1.02. A fold that fails, a file a runtime cannot open or run, or a
folded output that differs from the original is a row that says so in words: a finding, never skipped.

Runtimes: onnxruntime (CPU, ``ORT_ENABLE_ALL``, one intra-op thread) and OpenVINO (CPU device,
``INFERENCE_PRECISION_HINT`` f32, ``INFERENCE_NUM_THREADS`` 1, compiled from the ONNX file). All sides
of a model in both runtimes are timed in the same interleaved rounds (``benchmarks.timing``); the
figure is the median of the rounds.

    python -m benchmarks.bench_runtimes [--quick] [--only bert-legacy]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

import branchfold
from benchmarks.bench_ort_harm import (
    FULL,
    HF_GOAL,
    QUICK,
    ZOO_GOAL,
    Size,
    _quiet_onnxscript,
    hf_model,
    text_inputs,
)
from benchmarks.deploy import quiet, reason
from benchmarks.timing import interleaved, ratio

EXPORTERS = ("legacy", "dynamo")
FAMILIES = ("bert", "gpt2", "llama")
ZOO_MODELS = ("repvgg", "acnet", "mobileone", "dbb", "seed-vit")
MAX_OUTPUT_ERROR = 1e-4  # folded vs original in the same runtime: max |difference| / max |original|
FOLD_TIMEOUT_S = 600
# bench_ort_harm's model sizes; more, shorter rounds: a median of 15 shrugs off the bursts of a busy machine
# that decided a median of 7 (the zoo CNNs at batch 1 take 0.1-1 ms a call)
FULL_SIZE = dataclasses.replace(FULL, rounds=15, min_round_s=0.1)


# ------------------------------------------------------------------------------------------------
# files: export, fold with the command line


def export_file(model: nn.Module, inputs: Mapping[str, torch.Tensor], exporter: str, path: Path) -> None:
    """``path`` as ``torch.onnx.export`` writes it: legacy at opset 17, or dynamo with its defaults
    (weights in ``<path>.data`` next to it)."""
    args = tuple(inputs.values())
    with quiet(), _quiet_onnxscript():
        if exporter == "dynamo":
            torch.onnx.export(model, args, str(path), dynamo=True, verbose=False, input_names=list(inputs))
        else:
            torch.onnx.export(
                model, args, str(path), dynamo=False, opset_version=17, input_names=list(inputs)
            )


@dataclass(frozen=True)
class Fold:
    """What ``branchfold fold`` did to one file: the output (None when it failed) and its report."""

    output: Path | None
    seconds: float
    regions: int | None
    verified: bool | None
    error: str


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*:")


def failure(returncode: int, stderr: str) -> str:
    """One line for a failed fold: the first exception of a traceback (its root cause), or the command's
    own last line when it failed cleanly."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in stderr:
        causes = [line for line in lines if _EXCEPTION_LINE.match(line)]
        return f"fold crashed (exit {returncode}, traceback): {(causes or lines)[0][:160]}"
    return f"fold failed (exit {returncode}): {lines[-1][:160] if lines else 'no message'}"


def _command() -> list[str]:
    script = Path(sys.executable).with_name("branchfold")
    return [str(script)] if script.exists() else [sys.executable, "-m", "branchfold"]


def fold_file(source: Path, output: Path, workdir: Path) -> Fold:
    """``branchfold fold`` on ``source`` in a child process whose working directory is ``workdir``, paths
    given relative to it; the command folds with the ``branchfold`` this process imports."""
    env = dict(os.environ)
    package_root = str(Path(branchfold.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    args = [
        os.path.relpath(source, workdir),
        "-o",
        os.path.relpath(output, workdir),
        "--json",
        "--progress",
        "never",
    ]
    start = time.perf_counter()
    done = subprocess.run([*_command(), "fold", *args], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=FOLD_TIMEOUT_S)  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return Fold(None, seconds, None, None, failure(done.returncode, done.stderr))
    if not output.exists():
        return Fold(None, seconds, None, None, "fold exited 0 but wrote no file")
    try:
        report = json.loads(done.stdout)
    except ValueError:
        return Fold(output, seconds, None, None, "")
    return Fold(output, seconds, len(report.get("folded", [])), report.get("verified"), "")


# ------------------------------------------------------------------------------------------------
# runtimes: a side is (timed call, first output) for one file


Side = tuple[Callable[[], object], np.ndarray]


def _bind(names: list[str], feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feed by the file's own input names: by name where they match, else in order."""
    if all(n in feed for n in names):
        return {n: feed[n] for n in names}
    return dict(zip(names, feed.values()))


def ort_side(path: Path, feed: Mapping[str, np.ndarray]) -> Side:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    bound = _bind([i.name for i in session.get_inputs()], feed)
    first = np.asarray(session.run(None, bound)[0])
    return (lambda: session.run(None, bound)), first


OPENVINO_CONFIG = {
    "INFERENCE_PRECISION_HINT": "f32",
    "INFERENCE_NUM_THREADS": "1",
    "PERFORMANCE_HINT": "LATENCY",
}


def openvino_side(path: Path, feed: Mapping[str, np.ndarray]) -> Side:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", OPENVINO_CONFIG)
    bound = _bind([port.get_any_name() for port in compiled.inputs], feed)
    request = compiled.create_infer_request()
    request.infer(bound)
    first = np.array(request.get_output_tensor(0).data)
    return (lambda: request.infer(bound, share_inputs=True, share_outputs=True)), first


RUNTIMES: dict[str, tuple[str, Callable[[Path, Mapping[str, np.ndarray]], Side]]] = {
    "onnxruntime": ("onnxruntime", ort_side),
    "OpenVINO": ("openvino", openvino_side),
}


def _runtime_label(runtime: str) -> str:
    try:
        return f"{runtime} {metadata.version(RUNTIMES[runtime][0])}"
    except metadata.PackageNotFoundError:
        return runtime


def output_error(folded: np.ndarray, original: np.ndarray) -> float:
    """max |folded - original| / max |original| (inf when the shapes differ or the scale is zero)."""
    if folded.shape != original.shape:
        return float("inf")
    scale = float(np.abs(original).max()) if original.size else 0.0
    diff = (
        float(np.abs(folded.astype(np.float64) - original.astype(np.float64)).max()) if original.size else 0.0
    )
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


# ------------------------------------------------------------------------------------------------
# one model: fold its file, open every file in every runtime, time all sides in the same rounds


def measure(
    name: str,
    exporter: str,
    files: Mapping[str, Path],
    feed: Mapping[str, np.ndarray],
    size: Size,
    workdir: Path,
    folded_dir: Path,
) -> list[dict]:
    """One row per runtime. ``files``: "original" and (zoo) "single_path" files of one model."""
    fold = fold_file(files["original"], folded_dir / files["original"].name, workdir)
    paths = dict(files)
    if fold.output is not None:
        paths["folded"] = fold.output
    sides: dict[str, Callable[[], object]] = {}
    firsts: dict[tuple[str, str], np.ndarray] = {}
    notes: dict[str, list[str]] = {runtime: [] for runtime in RUNTIMES}
    for runtime, (_, open_side) in RUNTIMES.items():
        for side, path in paths.items():
            try:
                call, first = open_side(path, feed)
            except Exception as e:  # a file a runtime cannot open or run is a finding, reported in its row
                notes[runtime].append(f"cannot run the {side.replace('_', ' ')} file ({reason(e)})")
                continue
            sides[f"{runtime}/{side}"], firsts[runtime, side] = call, first
    times = interleaved(sides, rounds=size.rounds, min_round_s=size.min_round_s) if sides else {}
    baseline = "single_path" if "single_path" in files else "original"
    goal = ZOO_GOAL if baseline == "single_path" else HF_GOAL
    rows = []
    for runtime in RUNTIMES:
        ms = {side: times[f"{runtime}/{side}"].ms if f"{runtime}/{side}" in times else None
              for side in ("original", "single_path", "folded")}  # fmt: skip
        error = None
        if (runtime, "folded") in firsts and (runtime, "original") in firsts:
            error = output_error(firsts[runtime, "folded"], firsts[runtime, "original"])
        over = ratio(ms["folded"], ms[baseline])
        note = ([fold.error] if fold.error else []) + notes[runtime]
        if error is not None and error > MAX_OUTPUT_ERROR:
            note.append(f"folded output differs from the original's (max relative error {error:.2e})")
        elif fold.regions == 0 and over is not None:
            note.append("nothing folded: any difference from the original comes from the file written")
        spreads = [times[k].spread for k in times if k.startswith(f"{runtime}/")]
        rows.append(
            {
                "runtime": _runtime_label(runtime),
                "model": name,
                "exporter": exporter,
                "baseline": baseline.replace("_", " "),
                "original_ms": ms["original"],
                "single_path_ms": ms["single_path"],
                "folded_ms": ms["folded"],
                "folded_over_baseline": over,
                "goal": goal,
                "goal_met": None
                if over is None or (error is not None and error > MAX_OUTPUT_ERROR)
                else over <= goal,
                "spread": max(spreads) if spreads else None,
                "max_rel_error": error,
                "regions": fold.regions,
                "verified": fold.verified,
                "fold_s": fold.seconds,
                "note": "; ".join(note),
            }
        )
    return rows


def _missing(name: str, exporter: str, e: BaseException) -> list[dict]:
    return [{"runtime": _runtime_label(r), "model": name, "exporter": exporter, "note": f"not available ({reason(e)})"}
            for r in RUNTIMES]  # fmt: skip


def _numpy(inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in inputs.items()}


def hf_rows(
    size: Size, families: tuple[str, ...], exporters: tuple[str, ...], root: Path, log: Callable[[str], None]
) -> list[dict]:
    rows = []
    for family in families:
        inputs = text_inputs(size)
        try:
            model = hf_model(family, size)
        except Exception as e:  # transformers missing or changed: rows saying so
            rows += [row for x in exporters for row in _missing(family, x, e)]
            continue
        for exporter in exporters:
            log(f"bench_runtimes: {family} ({exporter})")
            try:
                original = root / "models" / f"{family}-{exporter}.onnx"
                export_file(model, inputs, exporter, original)
                rows += measure(family, exporter, {"original": original}, _numpy(inputs), size,
                                root / "elsewhere", root / "folded")  # fmt: skip
            except Exception as e:  # one export failing must not lose the other rows
                rows += _missing(family, exporter, e)
    return rows


def zoo_rows(
    size: Size, names: tuple[str, ...], exporters: tuple[str, ...], root: Path, log: Callable[[str], None]
) -> list[dict]:
    from branchfold.zoo import ZOO

    rows = []
    for name in names:
        entry = ZOO[name]
        model = entry.build().eval()
        (x,) = entry.example_input(model, 1)
        single = entry.single_path(model).eval()
        inputs = {"x": x}
        for exporter in exporters:
            log(f"bench_runtimes: {name} ({exporter})")
            try:
                files = {"original": root / "models" / f"{name}-{exporter}.onnx",
                         "single_path": root / "models" / f"{name}-{exporter}-single-path.onnx"}  # fmt: skip
                export_file(model, inputs, exporter, files["original"])
                export_file(single, inputs, exporter, files["single_path"])
                rows += measure(
                    name, exporter, files, _numpy(inputs), size, root / "elsewhere", root / "folded"
                )
            except Exception as e:  # one export failing must not lose the other rows
                rows += _missing(name, exporter, e)
    return rows


def run(
    quick: bool = False, only: str | None = None, log: Callable[[str], None] = lambda s: None
) -> list[dict]:
    """Every row, onnxruntime's first, then OpenVINO's (``folded_over_baseline``: folded / original for HF
    models, folded / hand-written single path for the zoo).

    ``quick``: BERT and RepVGG, legacy exporter, tiny sizes, 2 short rounds (figures meaningless).
    ``only``: one "model-exporter" pair, e.g. "bert-legacy" or "seed-vit-dynamo".
    """
    size = QUICK if quick else FULL_SIZE
    families, zoo, exporters = FAMILIES, ZOO_MODELS, EXPORTERS
    if quick and only is None:
        families, zoo, exporters = ("bert",), ("repvgg",), ("legacy",)
    if only is not None:
        model, _, exporter = only.rpartition("-")
        families = tuple(f for f in families if f == model)
        zoo = tuple(z for z in zoo if z == model)
        exporters = (exporter,)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_runtimes-") as tmp:
            root = Path(tmp)
            for folder in ("models", "folded", "elsewhere"):
                (root / folder).mkdir()
            rows = hf_rows(size, families, exporters, root, log) + zoo_rows(size, zoo, exporters, root, log)
    finally:
        torch.set_num_threads(previous)
    order = list(map(_runtime_label, RUNTIMES))
    return sorted(rows, key=lambda r: order.index(r["runtime"]))  # stable: models keep their order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_runtimes", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (figures meaningless)")
    parser.add_argument("--only", help='one "model-exporter" pair, e.g. bert-legacy or repvgg-dynamo')
    args = parser.parse_args(argv)
    rows = run(quick=args.quick, only=args.only, log=lambda s: print(s, file=sys.stderr, flush=True))
    for r in rows:
        over = r.get("folded_over_baseline")
        figure = f"folded/{r['baseline']} {over:.3f} (goal {r['goal']})" if over is not None else "no ratio"
        print(f"{r['runtime']:22s} {r['model']:10s} {r['exporter']:7s} {figure}  {r.get('note', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
