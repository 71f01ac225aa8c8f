"""One job of the big-models benchmark, in a fresh interpreter: ``python -m benchmarks._big_child JOB IN OUT``.

A fresh process per job, so that each job's peak resident memory is its own (a peak never goes
down) and no job profits from another's warm caches or imports. The job's imports happen first and are
not timed: the time printed runs from after the imports to after the output file is written. The last
line of stdout is ``RESULT_MARK`` followed by JSON: ``seconds``, ``peak_kib`` (peak resident memory of
the process), ``imports_peak_kib`` (the same, read before the job started), ``ru_maxrss_kib`` and
``out_bytes`` (the output files' size). A failed job exits non-zero with its error on stderr.

The peak is the kernel's high-water mark of this process's own memory (``VmHWM`` in /proc/self/status).
``getrusage(RUSAGE_SELF).ru_maxrss`` is not: Linux carries the parent's peak at fork over the exec, so a
child of a benchmark process that holds gigabytes would report gigabytes. It is printed for reference,
and used only where /proc is missing.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULT_MARK = "BIG_CHILD_RESULT "

# job → the modules it uses, imported before the clock starts (branchfold.cli imports its pipeline lazily)
IMPORTS: dict[str, tuple[str, ...]] = {
    "onnx_ir": ("onnx_ir",),
    "branchfold": ("branchfold.cli", "branchfold.storage.onnx_io", "branchfold.passes.onnx_pipeline", "onnxruntime"),
    "branchfold_verified": ("branchfold.cli", "branchfold.storage.onnx_io", "branchfold.passes.onnx_pipeline", "onnxruntime"),
    "onnxslim": ("onnxslim", "onnx"),
    "onnxscript": ("onnx_ir", "onnxscript.optimizer"),
}


def _external(model) -> bool:  # an onnx_ir.Model
    import onnx_ir as ir

    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def _ir_save(model, src_external: bool, dst: Path) -> None:
    import onnx_ir as ir

    # a model read with external data is written with it, as every tool here does
    ir.save(model, dst, external_data=f"{dst.name}.data" if src_external else None)


def onnx_ir_load_save(src: Path, dst: Path) -> None:
    """The limit: read the model and write it back, nothing else."""
    import onnx_ir as ir

    model = ir.load(src)
    _ir_save(model, _external(model), dst)


def _branchfold(src: Path, dst: Path, *extra: str) -> None:
    from branchfold.cli import main

    with contextlib.redirect_stdout(sys.stderr):  # the report table must not be taken for our result line
        code = main(["fold", str(src), "-o", str(dst), "--progress", "never", *extra])
    if code != 0:  # its one-line error is already on stderr: leave it as the last line
        raise SystemExit(code)


def branchfold_unverified(src: Path, dst: Path) -> None:
    _branchfold(src, dst, "--no-verify")


def branchfold_verified(src: Path, dst: Path) -> None:
    _branchfold(src, dst)


def onnxslim_job(src: Path, dst: Path) -> None:
    import onnx
    import onnxslim

    header = onnx.load(str(src), load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    del header
    with contextlib.redirect_stdout(sys.stderr):
        onnxslim.slim(str(src), str(dst), save_as_external_data=external)


def onnxscript_job(src: Path, dst: Path) -> None:
    import onnx_ir as ir
    from onnxscript import optimizer

    model = ir.load(src)
    external = _external(model)
    optimizer.optimize(model)  # in place on an onnx_ir model
    _ir_save(model, external, dst)


JOBS: dict[str, Callable[[Path, Path], None]] = {
    "onnx_ir": onnx_ir_load_save,
    "branchfold": branchfold_unverified,
    "branchfold_verified": branchfold_verified,
    "onnxslim": onnxslim_job,
    "onnxscript": onnxscript_job,
}


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kib() -> int:
    """This process's peak resident memory in KiB: VmHWM, not inherited from the parent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return _maxrss_kib()


def main(argv: list[str]) -> int:
    job, src, dst = argv
    for module in IMPORTS[job]:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:  # a module renamed since: the job imports what it needs itself
            if e.name != module:
                raise
    imports_kib = _peak_kib()
    out = Path(dst)
    start = time.perf_counter()
    JOBS[job](Path(src), out)
    seconds = time.perf_counter() - start
    out_bytes = sum(p.stat().st_size for p in out.parent.iterdir() if p.name.startswith(out.name))
    result = {"seconds": seconds, "peak_kib": _peak_kib(), "imports_peak_kib": imports_kib,
              "ru_maxrss_kib": _maxrss_kib(), "out_bytes": out_bytes}
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
