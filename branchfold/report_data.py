"""What the report says about each op, in words a person uses, and where in the model it sits.

The walk's ops carry their affine maps, so a label such as ``Conv 3x3 s1 64→64``, ``BN 64`` or
``LoRA A r=8`` is read off the map itself rather than off a name. Places come from the graph's own
records of the module that wrote each node (FX ``nn_module_stack``, the ONNX exporters' node names and
name scopes), so identical regions of a model's blocks can be grouped ("× 12, blocks 0–11").

Graph nodes are duck-typed (``fx.Node`` and ``onnx_ir.Node`` both have a ``name``), so this module
imports no frontend.
"""

from __future__ import annotations

import ast
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from branchfold.rewriter.affine import AffineMap, Conv, Dense, Diagonal, Lookup
from branchfold.rewriter.region import Op, SplitSource

LOW_RANK = 4  # a linear at least this many times narrower than its neighbours reads as a LoRA factor

_DIAGONAL_WORDS = {
    "batch_norm": "BN", "identity": "identity", "dropout": "identity", "scale": "× const",
    "shift": "+ const", "neg": "−x", "layer_norm": "LayerNorm γ,β",
}  # fmt: skip
_MODULE_WORDS = {"Identity": "identity", "Dropout": "identity", "LayerNorm": "LayerNorm γ,β"}
# FX call targets and node names that compute nothing on tensors (the report's op counts skip them too)
_BOOKKEEPING = ("getitem", "getattr", "_guards_fn", "size", "dim", "sym_size", "sym_numel", "sym_stride",
                "_log_api_usage_once", "_assert", "output", "placeholder", "get_attr")  # fmt: skip


@dataclass
class Step:
    """One original op of a folded region, as drawn: its label and which steps feed it (-1: the source)."""

    label: str
    op: str  # "affine", "add" or "sub"
    inputs: list[int] = field(default_factory=list)


def name_of(key: Hashable) -> str:
    """A graph node's own name (FX and onnx_ir nodes both have one), else its text."""
    name = getattr(key, "name", None)
    return name if isinstance(name, str) else str(key)


def _kernel(c: Conv) -> str:
    k = "x".join(str(n) for n in c.kernel)
    stride = c.stride[0] if len(set(c.stride)) == 1 else "x".join(str(s) for s in c.stride)
    groups = ""
    if c.groups > 1:
        groups = " dw" if c.groups == c.in_channels == c.out_channels else f" g{c.groups}"
    return f"{k} s{stride}{groups} {c.in_channels}→{c.out_channels}"


def describe_map(m: AffineMap | None, label: str = "") -> str:
    """A map as a person names the op: ``Linear 768→768``, ``Conv 3x3 s2 64→128``, ``BN 64``."""
    if isinstance(m, Dense):
        return f"Linear {m.in_features}→{m.out_features}"
    if isinstance(m, Lookup):
        return f"Embedding {m.rows}×{m.width}"
    if isinstance(m, Conv):
        return f"{'AvgPool' if label.lower() in ('avg_pool', 'avgpool2d', 'avgpool1d') else 'Conv'} {_kernel(m)}"
    if isinstance(m, Diagonal):
        word = _DIAGONAL_WORDS.get(label) or _MODULE_WORDS.get(label)
        if word is None and label.startswith("BatchNorm"):
            word = "BN"
        word = word or (label or "per-channel")
        channels = m.channels
        return f"{word} {channels}" if channels and word not in ("identity", "−x") else word
    return label


def describe_op(op: Op) -> str:
    if op.kind == "add":
        return "+"
    if op.kind == "sub":
        return "−"
    return describe_map(op.map, op.label)


def steps_of(parts: Sequence[Op]) -> list[Step]:
    """The region's ops as a small graph: each step's inputs among the others, ``-1`` for the source."""
    index = {op.output: i for i, op in enumerate(parts) if op.output is not None}
    steps = [
        Step(describe_op(op), op.kind, [index.get(v, -1) for v in op.inputs]) for op in parts
    ]
    _name_low_rank(parts, steps)
    for op, step in zip(parts, steps):  # a shift right after a linear op is its bias (ONNX MatMul + Add)
        if op.label == "shift" and step.inputs[0] >= 0 and isinstance(parts[step.inputs[0]].map, (Dense, Conv)):
            step.label = step.label.replace("+ const", "+ bias")
    return steps


def _name_low_rank(parts: Sequence[Op], steps: list[Step]) -> None:
    """``Linear 768→8`` feeding ``Linear 8→768`` is a LoRA adapter: say so, with its rank."""
    for j, op in enumerate(parts):
        if not isinstance(op.map, Dense) or len(steps[j].inputs) != 1 or steps[j].inputs[0] < 0:
            continue
        i = steps[j].inputs[0]
        a = parts[i].map
        if isinstance(a, Dense) and a.out_features * LOW_RANK <= min(a.in_features, op.map.out_features):
            r = a.out_features
            steps[i].label = f"LoRA A r={r} ({a.in_features}→{r})"
            steps[j].label = f"LoRA B r={r} ({r}→{op.map.out_features})"


def became(m: AffineMap, source: Hashable) -> str:
    """What a region was written as: the fused op, after a plain LayerNorm where γ, β were folded in."""
    fused = describe_map(m, "scale" if isinstance(m, Diagonal) else "")
    return f"LayerNorm → {fused}" if isinstance(source, SplitSource) else fused


def place_of(key: Hashable) -> str:
    """The module path that wrote a node (``blocks.3.attn``), or "" where the graph does not record it."""
    meta = getattr(key, "meta", None)
    if isinstance(meta, dict):  # an FX node
        stack = meta.get("nn_module_stack") or {}
        if stack:
            return _clean(str(list(stack.values())[-1][0]))
        target = getattr(key, "target", None)
        return target if getattr(key, "op", "") == "call_module" and isinstance(target, str) else ""
    props = getattr(key, "metadata_props", None)
    if props:  # an onnx_ir node from torch's dynamo exporter: its module scopes
        scopes = props.get("pkg.torch.onnx.name_scopes")
        if scopes:
            try:
                names = ast.literal_eval(scopes)
            except (ValueError, SyntaxError):
                names = []
            if len(names) >= 2:  # each scope is a full module path; the last names the op itself
                return _clean(str(names[-2]))
    name = name_of(key)
    if name.startswith("/"):  # the TorchScript exporter: "/blocks/blocks.3/attn/qkv/MatMul"
        path = ""
        for part in (p for p in name.split("/")[1:-1] if p):
            path = part if path and part.startswith(path + ".") else (f"{path}.{part}" if path else part)
        return path
    return ""


def _clean(path: str) -> str:
    """``L['self'].blocks[3].attn`` (dynamo's spelling) -> ``blocks.3.attn``."""
    for prefix in ("L['self'].", "L['self']", "self."):
        if path.startswith(prefix):
            path = path[len(prefix) :]
    return path.replace("[", ".").replace("]", "").replace("'", "").strip(".")


def common_place(places: Iterable[str]) -> str:
    """The longest dotted prefix shared by ``places`` (empty ones ignored)."""
    parts = [p.split(".") for p in places if p]
    if not parts:
        return ""
    common = parts[0]
    for p in parts[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return ".".join(common)


def op_type(node) -> str:
    """A node's kind in a word: the ONNX op type, the FX target's name (``linear``, ``relu``)."""
    kind = getattr(node, "op_type", None)
    if isinstance(kind, str):
        return kind
    if getattr(node, "op", "") == "call_module":
        stack = (getattr(node, "meta", None) or {}).get("nn_module_stack") or {}
        if stack:
            t = list(stack.values())[-1][1]
            return getattr(t, "__name__", str(t).rsplit(".", 1)[-1].strip("'>"))
        return str(node.target).rsplit(".", 1)[-1]
    target = getattr(node, "target", "")
    return getattr(target, "__name__", str(target)).split(".")[0]


def _alias(node) -> str:
    """The other name a report may give a node: an ONNX node's first output, an FX module call's target."""
    outputs = getattr(node, "outputs", None)
    if outputs:
        return getattr(outputs[0], "name", None) or ""
    target = getattr(node, "target", None)
    return target if getattr(node, "op", "") == "call_module" and isinstance(target, str) else ""


def op_strip(nodes: Iterable) -> list[list[str]]:
    """The graph's ops in execution order as ``[name, type, place, alias]``, for the report's strip of the
    model (FX placeholders, outputs and bookkeeping left out, as the report's op counts leave them out);
    ``alias`` is the value or module name a report entry may use instead of the node's (``_alias``)."""
    strip = []
    for node in nodes:
        fx_op = getattr(node, "op", None)
        if isinstance(fx_op, str) and fx_op not in ("call_function", "call_method", "call_module"):
            continue
        kind = op_type(node)
        target = getattr(node, "target", "")
        target = getattr(target, "__name__", str(target))
        if isinstance(fx_op, str) and (kind.startswith(_BOOKKEEPING) or target.startswith(_BOOKKEEPING)):
            continue
        strip.append([name_of(node), kind, place_of(node), _alias(node)])
    return strip
