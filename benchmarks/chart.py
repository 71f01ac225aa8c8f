"""The results chart: deploy ratios per model and backend, and fold time against graph size."""

from __future__ import annotations

from pathlib import Path

from benchmarks.deploy import GOAL

BACKENDS = ("eager", "inductor", "onnxruntime")


def draw(rows: list[dict], path: Path, title: str) -> Path:
    """Write a two-panel PNG to ``path`` (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    deploy = [r for r in rows if r.get("section") == "deploy"]
    models = list(dict.fromkeys(r["model"] for r in deploy))
    width = 0.8 / len(BACKENDS)
    for i, backend in enumerate(BACKENDS):
        values = []
        for model in models:
            row = next((r for r in deploy if r["model"] == model and r["backend"] == backend), None)
            value = None
            if row is not None:
                value = row.get("folded_over_limit") or row.get("folded_over_original")
            values.append(value if value is not None else 0.0)
        xs = [m + (i - 1) * width for m in range(len(models))]
        left.bar(xs, values, width, label=backend)
    left.axhline(GOAL, color="black", linestyle="--", linewidth=1, label=f"goal {GOAL}")
    left.axhline(1.0, color="grey", linewidth=0.5)
    left.set_xticks(range(len(models)), models, rotation=30, ha="right")
    left.set_ylabel("folded / limit latency  (HF models: folded / original)")
    left.set_title("Deploy latency relative to the single-path limit (lower is better)")
    left.legend(fontsize=8)

    for frontend, marker in (("fx", "o"), ("onnx", "s")):
        speed = sorted((r for r in rows if r.get("section") == "pass_speed" and r.get("frontend") == frontend
                        and r.get("median_s") is not None), key=lambda r: r["nodes"])
        if speed:
            right.plot([r["nodes"] for r in speed], [r["us_per_node"] for r in speed], marker=marker,
                       label=f"{frontend.upper()} fold pass")
    right.set_xscale("log")
    right.set_xlabel("graph nodes")
    right.set_ylabel("microseconds per node (flat = linear)")
    right.set_ylim(bottom=0)
    right.set_title("Fold time per node against graph size")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
