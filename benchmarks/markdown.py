"""RESULTS.md from the benchmark rows: plain tables, and a goals section that says met or not met."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from benchmarks.deploy import GOAL
from benchmarks.pass_speed import LINEARITY_GOAL, VIT_B_GOAL_S


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: n/a for missing, 3 significant digits for floats, thousands separators for ints."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def generic_table(rows: list[dict]) -> list[str]:
    """Rows from another engineer's module: every key that appears, in order of first appearance."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    return table(keys, ([row.get(k) for k in keys] for row in rows))


def _ratio_cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"  # 3 decimals: 1.02 vs 1.023 decides the goal


def _of(rows: list[dict], section: str, **match: Any) -> list[dict]:
    return [r for r in rows if r.get("section") == section and all(r.get(k) == v for k, v in match.items())]


# ------------------------------------------------------------------------------------------------
# goals


def deploy_goal(rows: list[dict], backend: str) -> tuple[str, str]:
    measured = [r for r in _of(rows, "deploy", backend=backend) if r.get("folded_over_limit") is not None]
    hf = [r for r in _of(rows, "deploy", backend=backend)
          if r.get("limit_ms") is None and r.get("folded_over_original") is not None]
    if not measured:
        return "not measured", "n/a"
    failed = [f"{r['model']} {r['folded_over_limit']:.3f}" for r in measured if not r["goal_met"]]
    worst = max(r["folded_over_limit"] for r in measured)
    text = f"{len(measured) - len(failed)} of {len(measured)} models within {GOAL} (worst {worst:.3f})"
    if failed:
        text += "; over: " + ", ".join(failed)
    if hf:
        text += "; HF models folded/original: " + ", ".join(
            f"{r['model']} {r['folded_over_original']:.2f}" for r in hf
        )
    return text, "yes" if not failed else "**no**"


def linearity(rows: list[dict], frontend: str) -> tuple[float | None, dict | None, dict | None]:
    speed = sorted((r for r in _of(rows, "pass_speed", frontend=frontend) if "us_per_node" in r),
                   key=lambda r: r["nodes"])
    if len(speed) < 2:
        return None, None, None
    return speed[-1]["us_per_node"] / speed[0]["us_per_node"], speed[0], speed[-1]


def goals(rows: list[dict]) -> list[str]:
    out = []
    for backend in ("eager", "inductor", "onnxruntime"):
        text, met = deploy_goal(rows, backend)
        out.append((f"deploy, {backend}: folded / limit <= {GOAL}", text, met))
        if backend == "inductor":
            extra = [r for r in _of(rows, "deploy", backend=backend) if r.get("fold_then_compile_over_limit")]
            if extra:
                ok = [r for r in extra if r["fold_then_compile_over_limit"] <= GOAL]
                worst = max(r["fold_then_compile_over_limit"] for r in extra)
                out.append((f"deploy, inductor, `torch.compile(branchfold.fold(m))`: folded / limit <= {GOAL}",
                            f"{len(ok)} of {len(extra)} models within {GOAL} (worst {worst:.3f})",
                            "yes" if len(ok) == len(extra) else "**no**"))
    for frontend in ("fx", "onnx"):
        r, small, large = linearity(rows, frontend)
        if r is None:
            out.append((f"pass speed linear ({frontend})", "not measured", "n/a"))
            continue
        text = (f"{large['us_per_node']:.0f} us/node at {large['nodes']:,} nodes vs {small['us_per_node']:.0f} "
                f"at {small['nodes']:,}: ratio {r:.2f}")
        out.append((f"pass speed linear ({frontend}): per-node time ratio <= {LINEARITY_GOAL}", text,
                    "yes" if r <= LINEARITY_GOAL else "**no**"))
    for r in _of(rows, "vit_b"):
        if "fold_s" in r:
            out.append((f"{r['model']} folds in < {VIT_B_GOAL_S:g} s (FX pass)",
                        f"{r['fold_s']:.3f} s for {r['nodes']:,} nodes, {r['regions']} regions",
                        "yes" if r["goal_met"] else "**no**"))
        else:
            out.append((f"{r['model']} folds in < {VIT_B_GOAL_S:g} s", r.get("note", ""), "n/a"))
    return table(["goal", "measured", "met"], out)


# ------------------------------------------------------------------------------------------------
# sections


def deploy_section(rows: list[dict]) -> list[str]:
    out = [
        "## 1. Deploy speed",
        "",
        "Latency of one forward call (ms, median of the rounds; the sides of each row are timed in the same",
        "rounds, interleaved, in rotating order). *original*: the multi-branch model; *folded*: `branchfold.fold`",
        "(eager), `torch.compile(backend=\"branchfold\")` (Inductor) or branchfold's ONNX fold of the exported model",
        "(onnxruntime); *limit*: the zoo's hand-written single-path model, run the same way (`torch.compile`",
        "default for Inductor, its own ONNX export for onnxruntime). Inductor's *original* is `torch.compile`",
        "default on the multi-branch model, onnxruntime's is `ORT_ENABLE_ALL` on the multi-branch export: what",
        "the other tools make of a multi-branch model on their own. HF models have no hand-written limit:",
        "for them read folded / original. *spread* is (max - min) / median over the rounds of the noisiest",
        "side: a spread above ~0.1 means the machine was busy and a ratio within that band is noise.",
        "",
    ]
    for backend in ("eager", "inductor", "onnxruntime"):
        sel = _of(rows, "deploy", backend=backend)
        out += [f"### {backend}", ""]
        if not sel:
            out += ["not measured in this run", ""]
            continue
        if backend == "eager":
            out += ["*captured*: the `torch.export` graph the fold starts from, unfolded, so that folded / captured",
                    "isolates the fold from the change of runtime (an exported GraphModule instead of Python modules).",
                    ""]
            out += table(
                ["model", "original ms", "captured ms", "folded ms", "limit ms", "folded / limit", f"<= {GOAL}",
                 "folded / captured", "folded / original", "spread", "note"],
                ([r["model"], r.get("original_ms"), r.get("captured_ms"), r.get("folded_ms"), r.get("limit_ms"),
                  _ratio_cell(r.get("folded_over_limit")), r.get("goal_met"),
                  _ratio_cell(r.get("folded_over_captured")), _ratio_cell(r.get("folded_over_original")),
                  r.get("spread"), r.get("note", "")] for r in sel),
            )
            continue
        if backend == "inductor":
            out += ["*fold() then compile*: `torch.compile` (default) of the model `branchfold.fold` returned: the",
                    "same fold without the backend's per-call runtime (stale-weight guard, folded weights as inputs).",
                    ""]
            out += table(
                ["model", "original ms", "folded (backend) ms", "fold() then compile ms", "limit ms",
                 "folded / limit", f"<= {GOAL}", "fold() then compile / limit", "folded / original", "spread",
                 "note"],
                ([r["model"], r.get("original_ms"), r.get("folded_ms"), r.get("fold_then_compile_ms"),
                  r.get("limit_ms"), _ratio_cell(r.get("folded_over_limit")), r.get("goal_met"),
                  _ratio_cell(r.get("fold_then_compile_over_limit") or r.get("fold_then_compile_over_original")),
                  _ratio_cell(r.get("folded_over_original")), r.get("spread"), r.get("note", "")] for r in sel),
            )
            continue
        out += table(
            ["model", "original ms", "folded ms", "limit ms", "folded / limit", f"<= {GOAL}",
             "folded / original", "spread", "note"],
            ([r["model"], r.get("original_ms"), r.get("folded_ms"), r.get("limit_ms"),
              _ratio_cell(r.get("folded_over_limit")), r.get("goal_met"),
              _ratio_cell(r.get("folded_over_original")), r.get("spread"), r.get("note", "")] for r in sel),
        )
    return out


def size_section(rows: list[dict]) -> list[str]:
    sel = _of(rows, "size")
    out = ["## 2. Size", "",
           "Floating-point parameters and buffers (BatchNorm statistics included) and multiply-adds of one forward",
           "call (`torch.utils.flop_counter`), before -> after folding, next to the hand-written limit; ops are",
           "graph calls of the captured model. *verified*: the folded model matched the original (max relative",
           "error to output scale shown).", ""]
    if not sel:
        return out + ["not measured in this run", ""]
    return out + table(
        ["model", "params before", "params after", "params limit", "MACs before", "MACs after", "MACs limit",
         "ops before -> after", "regions", "verified (max err)"],
        ([r["model"], r["params_before"], r["params_after"], r.get("params_limit"), r["macs_before"],
          r["macs_after"], r.get("macs_limit"), f"{r['ops_before']} -> {r['ops_after']}", r["regions"],
          f"{fmt(r['verified'])} ({fmt(r.get('max_error'), 2)})"] for r in sel),
    )


def pass_section(rows: list[dict]) -> list[str]:
    out = ["## 3. Pass speed and memory", "",
           "Stacks of N blocks, each K = 4 parallel `Linear(16, 16)` on one input, summed, then a nonlinearity",
           "(one region per block). FX: `symbolic_trace` + shape propagation once, then `FoldBranchesPass` timed",
           "on fresh copies of the graph. ONNX: the same stack written as the exporter writes it (MatMul by a",
           "transposed initializer + Add), `branchfold.passes.onnx.fold_passes()` (shape inference, fold, dead-node",
           "removal, initializer de-duplication, topological sort) timed on fresh `onnx_ir` models. Peak memory is",
           "the Python-heap peak of one fold (`tracemalloc`; tensor storage allocated by C++ is not counted).", ""]
    for frontend in ("fx", "onnx"):
        sel = sorted(_of(rows, "pass_speed", frontend=frontend), key=lambda r: r["nodes"])
        out += [f"### {frontend.upper()}", ""]
        if not sel:
            out += ["not measured in this run", ""]
            continue
        out += table(["blocks", "nodes", "fold s (median)", "us / node", "peak MiB", "regions", "note"],
                     ([r["blocks"], r["nodes"], r.get("median_s"), r.get("us_per_node"), r.get("peak_mib"),
                       r.get("regions"), r.get("note", "")] for r in sel))
        ratio, small, large = linearity(rows, frontend)
        if ratio is not None:
            verdict = "met" if ratio <= LINEARITY_GOAL else "NOT met"
            out += [f"Time per node at {large['nodes']:,} nodes / at {small['nodes']:,} nodes = {ratio:.2f} "
                    f"(goal <= {LINEARITY_GOAL}: {verdict}).", ""]
    vit = _of(rows, "vit_b")
    out += ["### ViT-B-sized graphs (FX pass only, graph captured with torch.export; capture not in the fold time)",
            ""]
    if vit:
        out += table(["model", "nodes", "capture s", "fold s (median)", f"< {VIT_B_GOAL_S:g} s", "regions", "note"],
                     ([r["model"], r.get("nodes"), r.get("capture_s"), r.get("fold_s"), r.get("goal_met"),
                       r.get("regions"), r.get("note", "")] for r in vit))
    else:
        out += ["not measured in this run", ""]
    tools = _of(rows, "onnx_tools")
    out += ["### The same ONNX model through other tools", "",
            "Seconds per run (median, interleaved) and the node count each tool leaves. *branchfold fold()* is the",
            "public call with `verify=False` (proto in, proto out, as for the other tools); onnxscript's optimizer",
            "and onnxslim run with their defaults. Neither merges the summed branches.", ""]
    if tools:
        out += table(["blocks", "nodes", "tool", "seconds", "nodes after", "note"],
                     ([r["blocks"], r["nodes"], r["tool"], r.get("median_s"), r.get("nodes_after"),
                       r.get("note", "")] for r in tools))
    else:
        out += ["not measured in this run", ""]
    return out


def other_section(title: str, module: str, rows: list[dict] | str) -> list[str]:
    source = (
        "From the log of a `make fuzz` campaign (`python -m benchmarks.run --fuzz-log LOG`), not run by the benchmarks."
        if module == "fuzz"
        else f"Rows from `benchmarks/{module}.py` (`run(quick)`), written by its own author."
    )
    out = [f"## {title}", "", source, ""]
    if isinstance(rows, str):
        return out + [rows, ""]
    if not rows:
        return out + ["no rows", ""]
    return out + generic_table(rows)


def render(rows: list[dict], env: dict[str, str], others: dict[str, tuple[str, list[dict] | str]],
           header: list[str]) -> str:
    lines = ["# branchfold benchmarks", "", *header, "", "## Environment", ""]
    lines += table(["", ""], env.items())
    lines += ["## Goals", ""] + goals(rows)
    lines += deploy_section(rows) + size_section(rows) + pass_section(rows)
    for number, (title, (module, other_rows)) in enumerate(others.items(), 4):
        lines += other_section(f"{number}. {title}", module, other_rows)
    return "\n".join(lines).rstrip() + "\n"
