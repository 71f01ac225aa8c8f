"""Smoke run of the benchmark code in its ``--quick`` configuration, so that it cannot rot.

Only the shape of the results is checked (rows well formed, ratios finite, folds that shrink the model):
timings are never asserted.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import run  # noqa: E402
from benchmarks.pass_speed import fx_stack, onnx_stack  # noqa: E402
from benchmarks.timing import interleaved, interleaved_fresh, ratio  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench") / "RESULTS.md"
    code = run.main(["--quick", "--out", str(out), "--only", "deploy", "--only", "pass"], log=lambda s: None)
    assert code == 0
    return out, json.loads(out.with_name("results.json").read_text())


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_quick_run_writes_markdown_chart_and_json(quick):
    out, raw = quick
    text = out.read_text()
    assert text.startswith("# branchfold benchmarks")
    for heading in ("## Environment", "## Goals", "## 1. Deploy speed", "## 2. Size", "## 3. Pass speed"):
        assert heading in text
    assert "torch.set_num_threads(1)" in text
    assert "not run in this invocation" in text  # the other modules' sections say why they are empty
    png = out.with_name("results.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert raw["environment"]["torch"] != "not installed"


def test_deploy_rows_are_well_formed(quick):
    _, raw = quick
    deploy = [r for r in raw["rows"] if r["section"] == "deploy"]
    assert {r["backend"] for r in deploy} == {"eager", "onnxruntime"}
    eager = next(r for r in deploy if r["backend"] == "eager")
    assert eager["note"] == ""
    for key in ("original_ms", "captured_ms", "folded_ms", "limit_ms", "folded_over_limit",
                "folded_over_original", "folded_over_captured"):
        assert _finite_positive(eager[key]), key
    assert eager["folded_over_limit"] == pytest.approx(eager["folded_ms"] / eager["limit_ms"])
    assert isinstance(eager["goal_met"], bool)
    for row in deploy:  # a missing side must carry a reason, never a silent gap
        if row["folded_ms"] is None:
            assert "not available" in row["note"]
        else:
            assert _finite_positive(row["folded_over_original"])


def test_size_rows_show_the_fold(quick):
    _, raw = quick
    (size,) = [r for r in raw["rows"] if r["section"] == "size"]
    assert size["verified"] is True
    assert size["regions"] > 0
    assert size["params_after"] < size["params_before"]
    assert size["macs_after"] < size["macs_before"]
    assert size["macs_after"] == size["macs_limit"]  # the folded model does the single path's work


def test_pass_speed_rows_fold_every_block(quick):
    _, raw = quick
    speed = [r for r in raw["rows"] if r["section"] == "pass_speed"]
    assert {r["frontend"] for r in speed} == {"fx", "onnx"}
    for row in speed:
        assert row["regions"] == row["blocks"]
        assert _finite_positive(row["median_s"]) and _finite_positive(row["us_per_node"])
        assert row["peak_mib"] > 0
    smallest = min(r["blocks"] for r in speed)
    tools = {r["tool"]: r for r in raw["rows"] if r["section"] == "onnx_tools" and r["blocks"] == smallest}
    assert {"branchfold pass", "onnxscript optimize", "onnxslim"} <= set(tools)
    assert tools["branchfold pass"]["nodes_after"] < tools["branchfold pass"]["nodes"]


def test_stacks_grow_linearly_in_nodes():
    assert len(fx_stack(4).graph.nodes) == 2 * len(fx_stack(2).graph.nodes) - 2  # input and output once
    assert len(onnx_stack(4).graph.node) == 2 * len(onnx_stack(2).graph.node)


def test_interleaved_rotates_order_and_takes_medians():
    calls: list[str] = []
    sides = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    result = interleaved(sides, rounds=3, warmup=0, min_round_s=0.0, max_calls=1)
    timed = calls[3:]  # the first three calls size the rounds
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    for t in result.values():
        assert len(t.samples) == 3 and t.calls_per_round == 1
        assert t.median == sorted(t.samples)[1]


def test_interleaved_fresh_prepares_untimed_input_every_round():
    made: list[int] = []
    seen: list[int] = []

    def prepare() -> int:
        made.append(len(made))
        return made[-1]

    result = interleaved_fresh({"x": (prepare, seen.append), "y": (prepare, seen.append)}, rounds=2)
    assert seen == made == [0, 1, 2, 3]  # every run got its own fresh input
    assert set(result) == {"x", "y"}
    assert ratio(None, 1.0) is None and ratio(2.0, 4.0) == 0.5


def test_rerender_rewrites_the_same_tables_from_json(quick, tmp_path):
    out, _ = quick
    copy = tmp_path / "RESULTS.md"
    copy.write_text("stale")
    (tmp_path / "results.json").write_text(out.with_name("results.json").read_text())
    assert run.main(["--rerender", "--out", str(copy)], log=lambda s: None) == 0
    assert copy.read_text() == out.read_text()
    assert run.main(["--rerender", "--out", str(tmp_path / "none" / "R.md")], log=lambda s: None) == 2


FUZZ_LOG = """fuzz: FUZZ_SEED=7 FUZZ_N=40 workers=2 (ONNX on 50% of models, its dynamo exporter on 2% of those, fold's own verify on 15%)
fuzz: 40 models in 95 s (0.61 graphs/s, 3 folds skipped: the exporter or the original could not run the model); by path: {}
fuzz: 58 graphs (FX 40, ONNX 18), 0 mismatches
"""


def test_a_fuzz_campaign_log_becomes_its_own_section(quick, tmp_path):
    out, _ = quick
    log = tmp_path / "campaign.log"
    log.write_text(FUZZ_LOG)
    assert run.main(["--out", str(out), "--fuzz-log", str(log)], log=lambda s: None) == 0
    text = out.read_text()
    assert "## " in text and run.FUZZ_TITLE in text and "fuzz: 58 graphs (FX 40, ONNX 18), 0 mismatches" in text
    row = json.loads(out.with_name("results.json").read_text())["others"][run.FUZZ_TITLE][1][0]
    assert (row["models"], row["graphs"], row["mismatches"], row["minutes"], row["workers"]) == (40, 58, 0, 1.6, 2)
    log.write_text(FUZZ_LOG.splitlines()[0])  # a campaign still running (or killed) has no result
    assert run.main(["--out", str(out), "--fuzz-log", str(log)], log=lambda s: None) == 2


def test_fold_time_rows_carry_ratios_and_stages():
    from benchmarks import fold_time

    (row,) = fold_time.run(quick=True)
    assert _finite_positive(row["export_s"]) and _finite_positive(row["forward_s"])
    base = row["export_s"] + row["forward_s"]
    assert math.isclose(row["verified_ratio"], row["fold_verified_s"] / base)
    assert row["verified"] is True and "capture" in row["stages (verified, s)"]
    assert "verify" not in row["stages (unverified, s)"]
    assert _finite_positive(row["free_batch_export_s"]) and _finite_positive(row["fold_unverified_static_s"])
    assert math.isclose(row["unverified_static_ratio"], row["fold_unverified_static_s"] / base)
    assert "fold_time" in run.OTHERS.values()


def test_a_re_measured_section_replaces_its_rows_and_its_own_earlier_date(quick, tmp_path, monkeypatch):
    out, _ = quick
    copy = tmp_path / "RESULTS.md"
    (tmp_path / "results.json").write_text(out.with_name("results.json").read_text())
    rows = iter([[{"case": "first"}], [{"case": "second"}]])
    monkeypatch.setattr(run, "other_rows", lambda module, quick: next(rows))
    for _ in range(2):
        assert run.main(["--out", str(copy), "--section", "fold_time"], log=lambda s: None) == 0
    raw = json.loads((tmp_path / "results.json").read_text())
    title = next(t for t, m in run.OTHERS.items() if m == "fold_time")
    assert raw["others"][title][1] == [{"case": "second"}]
    assert sum("`fold_time` re-measured" in line for line in raw["header"]) == 1
    assert "`fold_time` re-measured" in copy.read_text()
