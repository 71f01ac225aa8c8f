"""The command line: ``branchfold fold IN.onnx -o OUT.onnx`` and ``branchfold demo``.

User errors print one line and exit with status 2; nothing is written unless the fold succeeded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from branchfold.errors import BranchfoldError, InputError
from branchfold.stages import StageClock

LARGE_MODEL_BYTES = 50 * 2**20  # show progress for files at least this big


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="branchfold", description="Fold parallel linear branches and chains.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fold", help="fold an ONNX model and write the result")
    f.add_argument("input", help="the ONNX model to read (never changed unless --in-place)")
    target = f.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "-o", "--output",
        help="where to write the folded model (its weights go to a data file beside it, named after it, "
             "when the input had one)",
    )  # fmt: skip
    target.add_argument("--in-place", action="store_true", help="write over the input file instead")
    f.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    f.add_argument("--html", metavar="PAGE.html", help="also write the report as a self-contained HTML page")
    f.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check against the original")
    f.add_argument("--tolerance", type=float, default=None, help="largest relative error accepted")
    f.add_argument("--seed", type=int, default=0, help="seed of the random check inputs")
    f.add_argument("--progress", choices=("auto", "always", "never"), default="auto")
    f.add_argument(
        "--horizontal", choices=("auto", "on", "off"), default="auto",
        help="fuse MatMul/Gemm/Conv siblings into one op + Split: auto (where measured faster), on, off",
    )  # fmt: skip
    f.add_argument(
        "--no-runtime-guard", action="store_true",
        help="keep rewrites even where onnxruntime's optimizer then fuses less than on the original",
    )  # fmt: skip
    f.add_argument(
        "--transformer-model-type", metavar="TYPE", default=None,
        help="also keep every fusion onnxruntime's transformer optimizer makes for this model type (bert, gpt2, ...)",
    )  # fmt: skip
    d = sub.add_parser("demo", help="run the demo (remaining arguments go to it)", add_help=False)
    d.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from branchfold import demo

        return int(demo.main(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    try:
        return _fold(args)
    except BranchfoldError as e:
        print(f"branchfold: error: {e}", file=sys.stderr)
        return 2


def _fold(args: argparse.Namespace) -> int:
    from branchfold.passes.onnx_pipeline import fold_onnx
    from branchfold.storage import onnx_io

    src = Path(args.input)
    out = Path(args.output) if args.output else src
    if src.exists() and onnx_io.same_file(src, out) and not args.in_place:
        raise InputError(f"the output {out} is the input file; pass --in-place to overwrite it")
    if out.is_dir():
        raise InputError(f"output path {out} is a folder")
    if not out.parent.is_dir():
        raise InputError(f"output folder {out.parent} does not exist")
    if src.is_file() and not args.in_place:
        _refuse_overwriting_input_data(src, out)
    page = Path(args.html) if args.html else None
    if page is not None and (page.is_dir() or not page.parent.is_dir()):
        raise InputError(f"cannot write the HTML report to {page}: its folder does not exist or it is a folder")
    with _progress(args, src) as say:
        say = StageClock(say)
        result = fold_onnx(
            src, verify=not args.no_verify, tolerance=args.tolerance, seed=args.seed, progress=say,
            horizontal=args.horizontal, runtime_guard=not args.no_runtime_guard,
            transformer_guard=args.transformer_model_type, output=out,
        )  # fmt: skip
        result.report.stages = say.finish()
    title = f"branchfold: {args.input} -> {args.output or args.input}"
    if page is not None:
        page.write_text(result.report.to_html(title=title), encoding="utf-8")
        print(f"branchfold: report page written to {page}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.report.to_dict(), indent=2))
    else:
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
        print(result.report.render(title=title, width=width))
    return 0


def _refuse_overwriting_input_data(src: Path, out: Path) -> None:
    """The output's data file must not replace one the input reads (``-o b.onnx`` beside an ``a.onnx`` whose
    weights are in ``b.onnx.data``): the input would be changed."""
    from branchfold.storage import onnx_io

    try:
        locations = onnx_io.external_locations(src)
    except Exception:  # an unreadable input is reported by the fold itself, in one line
        return
    data = out.with_name(onnx_io.data_file_name(out, locations, src.name))
    for location in set(locations):
        if onnx_io.same_file(src.parent / location, data):
            raise InputError(
                f"the output's data file {data} is the data file of the input ({location}); choose another "
                "output name or folder"
            )


class _Say:
    """Progress on stderr for large models (or when asked): a rich status line on a terminal, one plain
    line per stage with the seconds spent so far elsewhere (a CI log, a file), so long work is never silent."""

    def __init__(self, enabled: bool) -> None:
        self.status = None
        self.enabled = enabled
        self.message = ""
        self.started = time.perf_counter()
        self.shown = False

    def show(self) -> None:
        if self.shown:
            return
        self.shown = True
        if sys.stderr.isatty():
            from rich.console import Console

            self.status = Console(stderr=True).status(f"branchfold: {self.message}...")
            self.status.start()
        else:
            self._line()

    def _line(self) -> None:
        print(f"branchfold: {self.message}... ({time.perf_counter() - self.started:.1f} s)", file=sys.stderr, flush=True)

    def __call__(self, message: str) -> None:
        self.message = message
        if self.enabled and not self.shown:
            self.show()
        elif self.status is not None:
            self.status.update(f"branchfold: {message}...")
        elif self.shown:
            self._line()

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()


@contextlib.contextmanager
def _progress(args: argparse.Namespace, src: Path):
    big = src.is_file() and src.stat().st_size >= LARGE_MODEL_BYTES
    say = _Say(args.progress == "always" or (args.progress == "auto" and big))
    say.enabled = say.enabled and args.progress != "never"
    if args.progress == "never":
        say.show = lambda: None  # type: ignore[method-assign]
    try:
        yield say
    finally:
        say.stop()
