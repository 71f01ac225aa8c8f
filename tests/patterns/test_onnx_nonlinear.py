"""Decomposed nonlinearities (GELU, SiLU, hard-swish, Mish, LayerNorm, RMSNorm, the attention scale), as
both torch exporters write them, survive a fold untouched while their linear neighbours still fold, and
onnxruntime still fuses them afterwards (a fold never costs a runtime fusion)."""

from __future__ import annotations

import io
import math
import os
import tempfile
import warnings
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

import branchfold
from branchfold.passes.onnx import fold_passes
from branchfold.patterns import onnx_ops
from branchfold.patterns.onnx_nonlinear import Nonlinearity, find_nonlinearities
from branchfold.patterns.onnx_ops import OnnxContext

D = 8
EXPORTERS = ("legacy17", "dynamo18")
# ops a head computes only inside its nonlinearity (Add is also the parallel sum and the biases)
KEPT_OPS = {"Erf", "Tanh", "Sigmoid", "Softplus", "Mish", "Clip", "Pow", "Sqrt", "Reciprocal", "ReduceMean", "Softmax",
            "Cast", "Mul", "Div", "Sub"}  # fmt: skip
# onnxruntime's fused ops by what they compute: a norm fused with the residual Add before it (Skip...) is
# still the norm fused (folding a parallel sum in front of a norm leaves no Add to fuse with it)
FUSED = {"Gelu": "gelu", "BiasGelu": "gelu", "FastGelu": "fast_gelu", "QuickGelu": "quick_gelu",
         "LayerNormalization": "layer_norm", "SkipLayerNormalization": "layer_norm",
         "SimplifiedLayerNormalization": "rms_norm", "SkipSimplifiedLayerNormalization": "rms_norm"}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# the nonlinearities, written as torch code and Hugging Face write them


class NewGELU(nn.Module):
    """Hugging Face's ``NewGELUActivation`` (GPT-2's tanh form, with ``Pow``)."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class FastGELU(nn.Module):
    """Hugging Face's ``FastGELUActivation`` (the tanh form with ``x * x``)."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


class Fn(nn.Module):
    def __init__(self, f) -> None:
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


class LayerNormByHand(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(D) + 0.5), nn.Parameter(torch.randn(D))

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return self.weight * ((x - u) / torch.sqrt(s + 1e-5)) + self.bias


class LlamaRMSNorm(nn.Module):
    """As Hugging Face's Llama writes it (computed in float32, cast back, then the weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, h):
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dtype)


class Attention(nn.Module):
    """BERT-style scores ``q kᵀ / √d → softmax`` (``sdpa``: torch's fused attention, which the dynamo
    exporter writes with q and kᵀ each scaled by the fourth root of 1/d)."""

    def __init__(self, sdpa: bool) -> None:
        super().__init__()
        self.k, self.v, self.sdpa = nn.Linear(D, D), nn.Linear(D, D), sdpa

    def forward(self, q, x):
        k, v = self.k(x), self.v(x)
        if self.sdpa:
            return F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1) @ v


ACTIVATIONS = {
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "new_gelu": NewGELU(),
    "fast_gelu": FastGELU(),
    "silu": nn.SiLU(),
    "quick_gelu": Fn(lambda x: x * torch.sigmoid(1.702 * x)),
    "hardswish": Fn(lambda x: x * F.relu6(x + 3.0) / 6.0),
    "hardsigmoid": Fn(lambda x: F.relu6(x + 3.0) / 6.0),
    "mish": nn.Mish(),
    "layer_norm": LayerNormByHand(),
    "rms_norm": LlamaRMSNorm(),
    "attention": Attention(sdpa=False),
    "sdpa": Attention(sdpa=True),
}
KIND = {"new_gelu": "gelu_tanh", "fast_gelu": "gelu_tanh", "attention": "attention_scale", "sdpa": "attention_scale"}
SINGLE_OP = {("mish", "dynamo18"): "Mish"}  # opset 18 has the op: nothing decomposed to keep whole


class Head(nn.Module):
    """``act(fc_a(x) + fc_b(x)) → fc``: a parallel sum that must still fold before the nonlinearity."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.fc_a, self.fc_b, self.act, self.fc = nn.Linear(D, D), nn.Linear(D, D), act, nn.Linear(D, D)

    def forward(self, x):
        h = self.fc_a(x) + self.fc_b(x)
        return self.fc(self.act(h, x) if isinstance(self.act, Attention) else self.act(h))


class Heads(nn.Module):
    """Every case in one model, one output each, so that each exporter runs once."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = nn.ModuleDict({name: Head(act) for name, act in ACTIVATIONS.items()})

    def forward(self, x):
        return tuple(head(x) for head in self.heads.values())


def export(model: nn.Module, x: torch.Tensor, exporter: str, names: list[str]) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy17":
            f = io.BytesIO()
            torch.onnx.export(model, (x,), f, dynamo=False, opset_version=17, input_names=["x"], output_names=names)
            return onnx.load_from_string(f.getvalue())
        return torch.onnx.export(model, (x,), dynamo=True, opset_version=18, verbose=False, input_names=["x"],
                                 output_names=names).model_proto  # fmt: skip


@pytest.fixture(scope="module")
def heads():
    """For the all-cases model, made once per exporter: the original, the fold passes' output (the rule
    alone, without the pipeline's check and undo), ``branchfold.fold``'s result, and the original's
    nonlinearities."""
    made: dict[str, tuple] = {}

    def get(exporter: str):
        if exporter not in made:
            proto = export(Heads().eval(), torch.randn(2, 3, D), exporter, [f"y_{name}" for name in ACTIVATIONS])
            result = branchfold.fold_with_report(proto, horizontal="off")
            made[exporter] = (proto, fold_rule(proto), result, nonlinearities(proto))
        return made[exporter]

    return get


def fold_rule(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The fold passes alone (no check, no undo, no runtime guard), checked here against the original."""
    model = ir.from_proto(proto)
    fold_passes()(model)
    folded = ir.to_proto(model)
    assert_same(proto, folded)
    return folded


def assert_same(proto: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    """Same outputs as the original in onnxruntime with its optimizations off, on random inputs."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    run = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]) for m in (proto, folded)]
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in run[0].get_inputs()}
    for want, got in zip(*(r.run(None, feeds) for r in run)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def nonlinearities(proto: onnx.ModelProto) -> list[Nonlinearity]:
    model = ir.from_proto(proto)
    common.ShapeInferencePass(strict_mode=False)(model)
    return find_nonlinearities(OnnxContext(model.graph))


# ----------------------------------------------------------------------------------------------
# reading a ModelProto


def ancestors(proto: onnx.ModelProto, output: str) -> list[onnx.NodeProto]:
    """The nodes an output is computed from."""
    by_output = {o: n for n in proto.graph.node for o in n.output}
    seen, stack, out = set(), [output], []
    while stack:
        node = by_output.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        out.append(node)
        stack += list(node.input)
    return out


def constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    found = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute[0].name == "value":
            found[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return found


def op_counts(nodes, kinds) -> Counter:
    return Counter(n.op_type for n in nodes if n.op_type in kinds)


def linear_count(proto: onnx.ModelProto, nodes) -> int:
    """MatMul/Gemm with a constant weight (the attention's q·kᵀ and p·v read two activations)."""
    weights = constants(proto)
    return sum(1 for n in nodes if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights)


def fused(proto: onnx.ModelProto) -> Counter:
    """What onnxruntime's optimizer (extended level) fuses, counted by what the fused ops compute."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as d:
        options.optimized_model_filepath = os.path.join(d, "optimized.onnx")
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        nodes = onnx.load(options.optimized_model_filepath).graph.node
    return Counter(FUSED[n.op_type] for n in nodes if n.op_type in FUSED)


# ----------------------------------------------------------------------------------------------
# exported models


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_nonlinearity_survives_the_fold_and_its_neighbours_still_fold(heads, name, exporter):
    proto, folded, result, found = heads(exporter)
    assert result.report.verified, result.report.render()
    before = ancestors(proto, f"y_{name}")
    for model in (folded, result.model):
        after = ancestors(model, f"y_{name}")
        assert linear_count(model, after) == linear_count(proto, before) - 1  # fc_a + fc_b became one MatMul
        assert op_counts(after, KEPT_OPS) == op_counts(before, KEPT_OPS)
    if (name, exporter) in SINGLE_OP:
        assert op_counts(after, {SINGLE_OP[name, exporter]}) == {SINGLE_OP[name, exporter]: 1}
        return
    outputs = {o for n in before for o in n.output}
    mine = [nl for nl in found if nl.output.name in outputs]
    assert [nl.kind for nl in mine] == [KIND.get(name, name)]
    old, new = constants(proto), constants(folded)
    by_output = {n.output[0]: n for n in folded.graph.node}
    for node in mine[0].nodes:
        kept = by_output.get(node.outputs[0].name)
        assert kept is not None and kept.op_type == node.op_type, f"{node.op_type} of {name} was folded away"
        for was, now in zip([v.name if v is not None else "" for v in node.inputs], kept.input):
            if was in old:  # its constants (√2, 0.5, 0.044715, ε, γ, β, ...) are the same values
                np.testing.assert_array_equal(new[now], old[was])
            elif was != mine[0].input.name:  # only its input may be a new (folded) value
                assert now == was


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_runtime_fusions_are_kept(heads, exporter):
    proto, folded, result, _ = heads(exporter)
    before = fused(proto)
    assert before["fast_gelu"] >= 2 and before["quick_gelu"] >= 2  # GPT-2's tanh GELU; SiLU and QuickGELU
    assert before["layer_norm"] >= 1
    if exporter == "legacy17":  # onnxruntime fuses these forms of the legacy exporter only
        assert before["gelu"] >= 1 and before["rms_norm"] >= 1
    assert fused(folded) == before
    assert fused(result.model) == before


def test_folding_into_nonlinearities_loses_runtime_fusions(heads, monkeypatch):
    """What the rule prevents: without it, the 0.5 of GELU and the γ of the norms fold into the next
    MatMul (exactly), and onnxruntime no longer fuses them."""
    proto, _, _, _ = heads("legacy17")
    monkeypatch.setattr(onnx_ops, "protected_nodes", lambda ctx: {})
    lost = fused(proto) - fused(fold_rule(proto))
    assert lost["gelu"] >= 1 and lost["rms_norm"] >= 1 and lost["layer_norm"] >= 1


def test_report_names_the_kept_pattern(heads):
    _, _, result, _ = heads("legacy17")
    kept = [s for s in result.report.not_folded if s.reason == "fused-pattern"]
    labels = {label for s in kept for label in s.ops}
    assert {"gelu (decomposed)", "rms_norm (decomposed)", "layer_norm (decomposed)"} <= labels


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_conv_bn_gelu_keeps_gelu_and_folds_the_branches(exporter):
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.bn_a, self.bn_b, self.out = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
            for bn in (self.bn_a, self.bn_b):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2)

        def forward(self, x):
            return self.out(F.gelu(self.bn_a(self.a(x)) + self.bn_b(self.b(x))))

    torch.manual_seed(0)
    proto = export(Block().eval(), torch.randn(1, 4, 8, 8), exporter, ["y"])
    assert [nl.kind for nl in nonlinearities(proto)] == ["gelu"]
    result = branchfold.fold_with_report(proto)
    assert result.report.verified
    for folded in (fold_rule(proto), result.model):
        assert op_counts(folded.graph.node, {"Conv", "BatchNormalization"}) == {"Conv": 2}  # one conv per branch pair
        assert op_counts(folded.graph.node, KEPT_OPS) == op_counts(proto.graph.node, KEPT_OPS)
        assert fused(folded) == fused(proto)
    if exporter == "legacy17":
        assert fused(proto)["gelu"] == 1


# ----------------------------------------------------------------------------------------------
# hand-written graphs: the variants, and what is not a nonlinearity

R = np.random.default_rng(0)
S2 = np.float32(math.sqrt(2))


def _gelu_nodes(form: str, x: str = "x", y: str = "y") -> tuple[list, dict]:
    """GELU in the operand orders and groupings exporters and hand-written code produce."""
    mk = helper.make_node
    scale = mk("Div", [x, "sqrt2"], ["u"]) if "div" in form else mk("Mul", ["inv_sqrt2", x], ["u"])
    nodes = [scale, mk("Erf", ["u"], ["e"]), mk("Add", ["one", "e"] if "swap" in form else ["e", "one"], ["a"])]
    if "half_first" in form:  # 0.5·x first, then · (1 + erf)
        nodes += [mk("Mul", [x, "half"], ["hx"]), mk("Mul", ["a", "hx"], [y])]
    elif "half_last" in form:  # x · (1 + erf), then · 0.5
        nodes += [mk("Mul", ["a", x], ["m"]), mk("Mul", ["half", "m"], [y])]
    else:  # (1 + erf) · 0.5, then x · that
        nodes += [mk("Mul", ["half", "a"], ["m"]), mk("Mul", [x, "m"], [y])]
    inits = {"sqrt2": S2, "inv_sqrt2": np.float32(1 / math.sqrt(2)), "one": np.float32(1), "half": np.float32(0.5)}
    return nodes, inits


@pytest.mark.parametrize("form", ["div_half_last", "mul_half_last", "div_half_first_swap", "mul_half_first",
                                  "div_dynamo", "mul_dynamo_swap"])  # fmt: skip
def test_gelu_variants_are_recognized_and_kept(make_onnx, form):
    nodes, inits = _gelu_nodes(form, x="h", y="g")
    w1, w2 = R.standard_normal((D, D)).astype(np.float32), R.standard_normal((D, D)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), *nodes, helper.make_node("MatMul", ["g", "w2"], ["y"])]
    proto = make_onnx(nodes, [("x", [2, D])], [("y", [2, D])], inits | {"w1": w1, "w2": w2})
    assert [nl.kind for nl in nonlinearities(proto)] == ["gelu"]
    gelu = {(n.op_type, tuple(n.input), tuple(n.output)) for n in proto.graph.node if n.op_type != "MatMul"}
    assert gelu <= {(n.op_type, tuple(n.input), tuple(n.output)) for n in fold_rule(proto).graph.node}


def test_a_wrong_constant_is_not_gelu(make_onnx):
    nodes, inits = _gelu_nodes("div_half_last")
    proto = make_onnx(nodes, [("x", [2, D])], [("y", [2, D])], inits | {"sqrt2": np.float32(1.5)})
    assert nonlinearities(proto) == []


def test_diagonal_input_read_twice_is_not_composed_into_the_gelu(make_onnx):
    """``x = c ⊙ input`` feeds both GELU's Div and its final Mul: the Div may not absorb the scale (which
    would compute the scale twice and hide the GELU)."""
    nodes, inits = _gelu_nodes("div_half_last", x="h", y="y")
    nodes = [helper.make_node("Mul", ["x", "c"], ["h"]), *nodes]
    proto = make_onnx(nodes, [("x", [2, D])], [("y", [2, D])], inits | {"c": R.uniform(0.5, 2, D).astype(np.float32)})
    folded = fold_rule(proto)
    assert op_counts(folded.graph.node, {"Mul", "Div"}) == op_counts(proto.graph.node, {"Mul", "Div"})
    div = next(n for n in folded.graph.node if n.op_type == "Div")
    assert div.input[0] == "h" and constants(folded)[div.input[1]] == S2


def test_scaled_tanh_is_not_a_nonlinearity_and_still_folds(make_onnx):
    mk = helper.make_node
    nodes = [mk("Tanh", ["x"], ["t"]), mk("Mul", ["t", "three"], ["m"]), mk("Add", ["m", "one"], ["a"]),
             mk("MatMul", ["a", "w"], ["y"])]  # fmt: skip
    inits = {"three": np.float32(3), "one": np.float32(1), "w": R.standard_normal((D, D)).astype(np.float32)}
    proto = make_onnx(nodes, [("x", [2, D])], [("y", [2, D])], inits)
    assert nonlinearities(proto) == []
    folded = op_counts(fold_rule(proto).graph.node, {"Mul", "Add", "Tanh", "Gemm", "MatMul"})
    assert folded == {"Tanh": 1, "Gemm": 1}


def test_channel_first_norm_is_not_protected_and_its_affine_folds(make_onnx):
    """A norm over the channel axis (ConvNeXt's channels-first LayerNorm) is not what runtimes fuse:
    its γ, β fold into the next conv as before."""
    mk = helper.make_node
    nodes = [mk("ReduceMean", ["x"], ["m"], axes=[1]), mk("Sub", ["x", "m"], ["d"]), mk("Pow", ["d", "two"], ["p"]),
             mk("ReduceMean", ["p"], ["v"], axes=[1]), mk("Add", ["v", "eps"], ["ve"]), mk("Sqrt", ["ve"], ["s"]),
             mk("Div", ["d", "s"], ["n"]), mk("Mul", ["n", "g"], ["ng"]), mk("Add", ["ng", "b"], ["nb"]),
             mk("Conv", ["nb", "w"], ["y"], kernel_shape=[1, 1])]  # fmt: skip
    inits = {"two": np.float32(2), "eps": np.float32(1e-6), "g": R.uniform(0.5, 2, (4, 1, 1)).astype(np.float32),
             "b": R.standard_normal((4, 1, 1)).astype(np.float32), "w": R.standard_normal((4, 4, 1, 1)).astype(np.float32)}  # fmt: skip
    proto = make_onnx(nodes, [("x", [1, 4, 5, 5])], [("y", None)], inits, opset=17)
    assert nonlinearities(proto) == []
    folded = fold_rule(proto)
    assert op_counts(folded.graph.node, {"Mul", "Add"}) == {"Add": 1}  # the ε; γ and β are in the conv


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_constants_are_recognized(dtype):
    """16-bit models store √2, 0.044715, √(2/π) with 3–4 digits: still GELU."""
    cases = {"gelu": "gelu", "new_gelu": "gelu_tanh", "quick_gelu": "quick_gelu", "rms_norm": "rms_norm"}
    for name, kind in cases.items():
        model = nn.Sequential(nn.Linear(D, D), ACTIVATIONS[name], nn.Linear(D, D)).eval().to(dtype)
        proto = export(model, torch.randn(2, 3, D, dtype=dtype), "legacy17", ["y"])
        assert [nl.kind for nl in nonlinearities(proto)] == [kind]
