"""Horizontal fusion: does one wide GEMM/conv + split beat N separate ones? Measured, not assumed.

Each case is timed separate vs fused in the same interleaved rounds (``benchmarks.timing``), medians of
≥ 5 rounds, in eager torch (the FX pass on a symbolic_trace graph) and in onnxruntime (the ONNX pass on a
legacy-exporter graph, default ORT optimizations). ``ratio`` is fused / separate: below 1 is a speed-up.
The ``auto`` policy in ``branchfold.patterns.horizontal`` is read off these rows.

    .venv/bin/python -m benchmarks.bench_horizontal [--quick]
"""

from __future__ import annotations

import copy
import io
import json
import sys
import warnings
from collections.abc import Callable

import torch
from torch import fx, nn

from benchmarks.timing import interleaved
from branchfold.passes.fx_horizontal import HorizontalFusionPass

ROUNDS = 7
THREADS = 1


class Parallel(nn.Module):
    """N linears (or convs) of one input; each output feeds its own elementwise consumer."""

    def __init__(self, inp: int, widths: tuple[int, ...], conv: bool = False) -> None:
        super().__init__()
        make = (lambda w: nn.Conv2d(inp, w, 3, padding=1)) if conv else (lambda w: nn.Linear(inp, w))
        self.ops = nn.ModuleList(make(w) for w in widths)

    def forward(self, x):
        return tuple(torch.relu(op(x)) for op in self.ops)


def _fx_pair(model: nn.Module, args: tuple, capture: str = "symbolic_trace") -> tuple[Callable, Callable, int]:
    if capture == "export":
        gm = torch.export.export(model, args, strict=False).module()
    else:
        gm = fx.symbolic_trace(model)
    fused = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    p = HorizontalFusionPass("on")
    p.call(fused)
    return gm, fused, len(p.result.fused)


def _torch_row(name: str, model: nn.Module, args: tuple, capture: str = "symbolic_trace", **extra) -> dict:
    base, fused, groups = _fx_pair(model.eval(), args, capture)
    with torch.no_grad():
        t = interleaved({"separate": lambda: base(*args), "fused": lambda: fused(*args)}, rounds=ROUNDS)
    return _row(name, "torch-eager", t, groups, **extra)


def _onnx_row(name: str, model: nn.Module, args: tuple, **extra) -> dict:
    import numpy as np
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    from branchfold.passes.onnx_horizontal import HorizontalFusionPass as OnnxPass

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), args, f, dynamo=False, input_names=[f"in{i}" for i in range(len(args))])
    proto = onnx.load_from_string(f.getvalue())
    ir_model = ir.from_proto(proto)
    p = OnnxPass("on")
    p(ir_model)
    fused = ir.to_proto(ir_model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = THREADS
    sessions = {k: ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
                for k, m in (("separate", proto), ("fused", fused))}  # fmt: skip
    feed = {f"in{i}": a.numpy().astype(np.float32) for i, a in enumerate(args)}
    t = interleaved({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, rounds=ROUNDS)
    return _row(name, "onnxruntime", t, len(p.result.fused), **extra)


def _row(name: str, engine: str, t: dict, groups: int, **extra) -> dict:
    sep, fus = t["separate"].median, t["fused"].median
    return {"case": name, "engine": engine, "groups": groups, "separate_ms": sep * 1e3, "fused_ms": fus * 1e3,
            "ratio": fus / sep, "spread": max(t["separate"].spread, t["fused"].spread),
            "threads": torch.get_num_threads(), **extra}  # fmt: skip


def _sweep(quick: bool) -> list[dict]:
    rows = []
    dense = [(192, (192, 192, 192)), (64, (64, 64)), (768, (768, 768, 768)), (768, (3072, 768))]
    tokens = (1, 65, 394, 2048)
    if quick:
        dense, tokens = dense[:2], (1, 394)
    for inp, widths in dense:
        for n_rows in tokens:
            torch.manual_seed(0)
            model, x = Parallel(inp, widths), torch.randn(n_rows, inp)
            extra = {"kind": "dense", "in": inp, "widths": list(widths), "rows": n_rows,
                     "macs_per_row": inp * sum(widths)}  # fmt: skip
            name = f"linear {inp}->{'+'.join(map(str, widths))} rows={n_rows}"
            rows.append(_torch_row(name, model, (x,), **extra))
            rows.append(_onnx_row(name, model, (x,), **extra))
    convs = [(16, (16, 16), 32), (64, (64, 64, 64), 16)]
    for inp, widths, size in convs[:1] if quick else convs:
        torch.manual_seed(0)
        model, x = Parallel(inp, widths, conv=True), torch.randn(2, inp, size, size)
        extra = {"kind": "conv", "in": inp, "widths": list(widths), "rows": 2 * size * size}
        name = f"conv3x3 {inp}->{'+'.join(map(str, widths))} {size}x{size}"
        rows.append(_torch_row(name, model, (x,), **extra))
        rows.append(_onnx_row(name, model, (x,), **extra))
    return rows


def _models(quick: bool) -> list[dict]:
    import branchfold
    from branchfold.zoo import ZOO

    rows = []
    entry = ZOO["seed-vit"]
    model = entry.build().eval()
    x = entry.example_input(model, 8)
    folded = branchfold.fold(model, x)
    rows.append(_torch_row("seed-vit (folded) QKV", folded, tuple(x), kind="model"))
    try:
        import transformers
    except ImportError:
        return rows
    config = transformers.ViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3,
                                    intermediate_size=768, image_size=64, patch_size=8,
                                    attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.ViTModel(config).eval()
    img = (torch.randn(4, 3, 64, 64),)
    rows.append(_torch_row("hf-vit QKV (torch.export)", hf, img, capture="export", kind="model"))
    if not quick:
        rows.append(_onnx_row("hf-vit QKV", hf, img, kind="model"))
    return rows


def run(quick: bool = False, threads: int = 1) -> list[dict]:
    """Every case as a dict (``ratio`` = fused / separate median time; < 1 means fusion pays).

    One thread by default: on a shared 2-core machine, torch's OpenMP pool waiting for a busy core
    made eager timings swing by 3-7x (spread) and hid the effect being measured.
    """
    global THREADS
    previous, THREADS = torch.get_num_threads(), threads
    torch.set_num_threads(threads)
    try:
        return _sweep(quick) + _models(quick)
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rows = run(quick="--quick" in argv)
    for r in rows:
        print(f"{r['engine']:12s} {r['case']:45s} sep {r['separate_ms']:8.3f} ms  fused {r['fused_ms']:8.3f} ms  "
              f"ratio {r['ratio']:.2f}  spread {r['spread']:.2f}")  # fmt: skip
    if "--json" in argv:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
