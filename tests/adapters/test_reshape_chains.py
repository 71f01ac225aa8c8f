"""A last-axis map between a flatten of the leading dims and the reshape back folds like the map of the
unflattened value: LeViT's ``bn(linear(x).flatten(0, 1)).reshape_as(linear(x))``, on ONNX from both torch
exporters and on FX under a dynamic batch; reshapes that move the last axis are left alone.

The single-path model is written by hand (each BatchNorm folded into the linear or conv before it), so
"folded" is measured against what a person would deploy, not against another run of the folder.
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import count_kind, fold_in, randomize_bn, rel_err
from torch import nn

import branchfold
from branchfold.passes.fx import FoldBranchesPass
from branchfold.patterns.reshapes import INFER, read_through

C, HEADS = 16, 2


class LinearBN(nn.Module):
    """LeViT's MLPLayerWithBN."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out)

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


def linear_bn(d_in: int, d_out: int, plain: bool) -> nn.Module:
    return nn.Linear(d_in, d_out) if plain else LinearBN(d_in, d_out)


class Block(nn.Module):
    def __init__(self, plain: bool = False) -> None:
        super().__init__()
        self.qkv, self.proj = linear_bn(C, 3 * C, plain), linear_bn(C, C, plain)
        self.fc1, self.fc2 = linear_bn(C, 2 * C, plain), linear_bn(2 * C, C, plain)
        self.act = nn.Hardswish()

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q @ k.transpose(-2, -1) * (c // HEADS) ** -0.5).softmax(-1)
        x = x + self.proj(self.act((a @ v).transpose(1, 2).reshape(b, t, c)))
        return x + self.fc2(self.act(self.fc1(x)))


class LeViTish(nn.Module):
    def __init__(self, plain: bool = False) -> None:
        super().__init__()
        conv = nn.Conv2d(3, C, 3, 2, 1, bias=plain)
        self.stem = nn.Sequential(conv, *(() if plain else (nn.BatchNorm2d(C),)), nn.Hardswish())
        self.blocks = nn.Sequential(Block(plain), Block(plain))

    def forward(self, x):
        return self.blocks(self.stem(x).flatten(2).transpose(1, 2)).mean(1)


def _bn_factors(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def reparameterized(model: LeViTish) -> LeViTish:
    """The single-path model, by hand: every BatchNorm folded into the op before it."""
    plain = LeViTish(plain=True).eval()
    with torch.no_grad():
        scale, shift = _bn_factors(model.stem[1])
        plain.stem[0].weight.copy_(model.stem[0].weight.double() * scale[:, None, None, None])
        plain.stem[0].bias.copy_(shift)
        for mine, theirs in zip(plain.blocks, model.blocks):
            for name in ("qkv", "proj", "fc1", "fc2"):
                src, dst = getattr(theirs, name), getattr(mine, name)
                scale, shift = _bn_factors(src.bn)
                dst.weight.copy_(src.linear.weight.double() * scale[:, None])
                dst.bias.copy_(shift)
    return plain


def levit() -> LeViTish:
    torch.manual_seed(0)
    return randomize_bn(LeViTish()).eval()


def image(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))


def test_the_hand_written_single_path_model_is_the_same_function():
    m = levit()
    with torch.no_grad():
        assert rel_err(m(image()), reparameterized(m)(image())) <= 1e-5


# -- the rule, on neutral shapes ------------------------------------------------------------------


def test_the_rule_reads_symbolic_leading_dims_and_needs_the_last_axis_kept():
    b = "batch"  # any hashable names a symbolic size
    assert read_through(-1, (b, 64, 96), (None, 96), 96, (b, 64, 96)) == "exact"
    assert read_through(-1, (b, 64, 96), (None, 96), 32, (INFER, 64, 32)) == "exact"  # a linear 96 -> 32
    assert read_through(None, (b, 64, 96), (None, 96), None, (b, 64, 96)) == "exact"  # a scalar map
    assert read_through(-1, (b, 64, 96), (None, 96), 96, (b, 64, 3, 2, 16)) == "flat-order"
    assert read_through(-1, (b, 64, 96), (None, 96), 96, (64, b, 96)) == "flat-order"  # not x's leading dims
    assert read_through(-1, (b, 64, 96), (None, 96), 96, (None, 64, 96)) == "flat-order"  # unknown: unproven
    assert read_through(-1, (b, 64, 96), (b, None), 96, (b, 64, 96)) is None  # flatten(1, 2): last axis moves
    assert read_through(-1, (b, 64, 96), (None, 2), 2, (b, 64, 96)) is None  # reshape(-1, 2)
    assert read_through(-2, (b, 64, 96), (None, 96), 96, (b, 64, 96)) is None  # a map on another axis
    assert read_through(-1, (b, 64, 96), (None, 96), 96, (INFER, INFER, 96)) == "flat-order"  # two -1


# -- ONNX -----------------------------------------------------------------------------------------

ORT_OPTIONS = ort.SessionOptions()
ORT_OPTIONS.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def export(model: nn.Module, exporter: str, dynamic: bool) -> onnx.ModelProto:
    f = io.BytesIO()
    x = image()
    if exporter == "legacy":
        axes = {"x": {0: "batch"}} if dynamic else None
        torch.onnx.export(model, (x,), f, dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes=axes)  # fmt: skip
    else:
        shapes = ({0: torch.export.Dim.AUTO},) if dynamic else None
        torch.onnx.export(model, (x,), f, dynamo=True, dynamic_shapes=shapes, verbose=False)
    return onnx.load_from_string(f.getvalue())


def run_onnx(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), ORT_OPTIONS, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def onnx_kinds(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def onnx_rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


# The dynamo exporter takes ~10 s a model here: its static form (constant targets such as [128, 96]) is the
# dynamic one's ([-1, 96]) read the same way, so only the dynamic one runs.
@pytest.mark.parametrize("exporter,dynamic", [("legacy", False), ("legacy", True), ("dynamo", True)])
def test_onnx_levit_style_export_folds_to_the_hand_written_single_path(exporter, dynamic):
    m = levit()
    original, plain = export(m, exporter, dynamic), export(reparameterized(m), exporter, dynamic)
    before = onnx_kinds(original)
    assert before["BatchNormalization"] == 8  # the exporter folded the stem's BN, none of the linears'
    folded = branchfold.fold(original)
    kinds, single = onnx_kinds(folded), onnx_kinds(plain)
    assert kinds["BatchNormalization"] == 0 and kinds["Flatten"] == 0
    assert kinds["MatMul"] + kinds["Gemm"] == single["MatMul"] + single["Gemm"]
    assert kinds["Conv"] == single["Conv"] and kinds["Reshape"] == single["Reshape"]
    assert sum(kinds.values()) <= sum(single.values())
    for batch in (2, 5) if dynamic else (2,):
        x = image(batch)
        assert onnx_rel_err(run_onnx(original, x), run_onnx(folded, x)) <= 1e-5
        assert onnx_rel_err(run_onnx(plain, x), run_onnx(folded, x)) <= 1e-5


def test_onnx_flatten_and_computed_shape_forms_fold(make_onnx):
    """The legacy exporter's forms, written by hand: ``Flatten(axis=2)``, and a reshape back to a shape
    computed by ``Shape → Gather → Unsqueeze → Concat`` of another value with x's leading dims."""
    from onnx import helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    scale, bias = rng.random(4).astype(np.float32) + 0.5, rng.standard_normal(4).astype(np.float32)
    mean, var = rng.standard_normal(4).astype(np.float32), rng.random(4).astype(np.float32) + 0.5
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("Flatten", ["y"], ["flat"], axis=2),
        helper.make_node("BatchNormalization", ["flat", "scale", "bias", "mean", "var"], ["bn"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["b"], axis=0),
        helper.make_node("Gather", ["shape", "one"], ["t"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
        helper.make_node("Unsqueeze", ["t", "axes"], ["t1"]),
        helper.make_node("Concat", ["b1", "t1", "c"], ["target"], axis=0),
        helper.make_node("Reshape", ["bn", "target"], ["back"]),
        helper.make_node("Tanh", ["back"], ["out"]),
    ]
    ints = {"zero": 0, "one": 1, "axes": [0], "c": [4]}
    inits = {"w": w, "scale": scale, "bias": bias, "mean": mean, "var": var}
    inits.update({k: np.array(v, np.int64) for k, v in ints.items()})
    model = make_onnx(nodes, [("x", ["batch", "seq", 4])], [("out", ["batch", "seq", 4])], inits, opset=17)
    folded = branchfold.fold(model)
    kinds = onnx_kinds(folded)
    assert kinds["BatchNormalization"] == 0 and kinds["Reshape"] == 0 and kinds["MatMul"] == 1
    x = torch.randn(3, 5, 4)
    assert onnx_rel_err(run_onnx(model, x), run_onnx(folded, x)) <= 1e-5


class Reshaped(nn.Module):
    """A linear, then a map between two reshapes that ``how`` names."""

    def __init__(self, how: str, b: int = 2, t: int = 3, c: int = 4) -> None:
        super().__init__()
        self.how, self.shape = how, (b, t, c)
        self.linear = nn.Linear(c, c, bias=False)
        self.bn = nn.BatchNorm1d(2 if how == "pairs" else c)
        self.wide = nn.Linear(t * c, t * c)

    def forward(self, x):
        b, t, c = self.shape
        y = self.linear(x)
        if self.how == "pairs":  # [B, T, C] -> [B*T*C/2, 2]: the channel pairs move off the last axis
            return torch.tanh(self.bn(y.reshape(-1, 2)).reshape_as(y))
        if self.how == "flatten12":  # [B, T*C]: the map mixes the sequence
            return torch.tanh(self.wide(y.flatten(1, 2)).view(b, t, c))
        return torch.tanh(self.bn(y.flatten(0, 1)).reshape(t, b, c))  # not x's leading dims


@pytest.mark.parametrize("exporter,how", [("legacy", "pairs"), ("legacy", "flatten12"), ("dynamo", "pairs")])
def test_onnx_reshape_that_moves_the_last_axis_is_left_alone(exporter, how):
    m = randomize_bn(Reshaped(how)).eval()
    x = torch.randn(2, 3, 4)
    f = io.BytesIO()
    dynamo = exporter == "dynamo"
    torch.onnx.export(m, (x,), f, dynamo=dynamo, opset_version=None if dynamo else 17)
    original = onnx.load_from_string(f.getvalue())
    folded = branchfold.fold(original)
    before, after = onnx_kinds(original), onnx_kinds(folded)
    for kind in ("BatchNormalization", "MatMul", "Gemm"):
        assert after[kind] == before[kind], kind
    assert onnx_rel_err(run_onnx(original, x), run_onnx(folded, x)) <= 1e-5


def test_onnx_reshape_back_elsewhere_reads_the_map_in_row_major_order():
    """``reshape(t, b, c)`` does not restore x's leading dims, but it reads only the row-major order of the
    map's output, which the unflattened map has too: the BN folds into the linear, the reshape stays."""
    m = randomize_bn(Reshaped("elsewhere")).eval()
    x = torch.randn(2, 3, 4)
    f = io.BytesIO()
    torch.onnx.export(m, (x,), f, dynamo=False, opset_version=17)
    original = onnx.load_from_string(f.getvalue())
    folded = branchfold.fold(original)
    after = onnx_kinds(folded)
    assert after["BatchNormalization"] == 0 and after["MatMul"] == 1 and after["Reshape"] == 1
    assert onnx_rel_err(run_onnx(original, x), run_onnx(folded, x)) <= 1e-5


def test_onnx_reshape_back_that_copies_an_input_dim_is_left_alone(make_onnx):
    """A ``0`` in the reshape back copies a dim of its input, which the unflattened map would change."""
    from onnx import helper

    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("Reshape", ["y", "flat_shape"], ["flat"]),
        helper.make_node("BatchNormalization", ["flat", "scale", "bias", "mean", "var"], ["bn"]),
        helper.make_node("Reshape", ["bn", "copy_shape"], ["out"]),
    ]
    inits = {"w": rng.standard_normal((4, 4)).astype(np.float32), "scale": np.full(4, 2.0, np.float32),
             "bias": np.ones(4, np.float32), "mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32),
             "flat_shape": np.array([-1, 4], np.int64), "copy_shape": np.array([0, 4], np.int64)}  # fmt: skip
    model = make_onnx(nodes, [("x", [2, 3, 4])], [("out", [6, 4])], inits, opset=17)
    folded = branchfold.fold(model)
    assert onnx_kinds(folded)["BatchNormalization"] == 1
    x = torch.randn(2, 3, 4)
    assert onnx_rel_err(run_onnx(model, x), run_onnx(folded, x)) <= 1e-5


# -- FX under a dynamic batch ----------------------------------------------------------------------


def export_dynamic(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
    return ep.module()


def test_fx_dynamic_batch_levit_folds_every_batchnorm_and_runs_at_any_batch():
    m = levit()
    gm = export_dynamic(m, image())
    assert count_kind(gm, "bn") == 9 and count_kind(gm, "linear") == 8
    p = FoldBranchesPass()
    p.call(gm)
    assert count_kind(gm, "bn") == 0 and count_kind(gm, "linear") == 8 and count_kind(gm, "conv") == 1
    assert len(p.result.regions) == 9
    plain = reparameterized(m)
    with torch.no_grad():
        for batch in (1, 2, 5):
            x = image(batch)
            assert rel_err(m(x), gm(x)) <= 1e-5 and rel_err(plain(x), gm(x)) <= 1e-5


def test_fx_symbolic_trace_method_form_folds():
    """``y.flatten(0, 1)`` and ``.reshape_as(y)`` as ``call_method`` nodes."""
    f = fold_in("symbolic_trace", levit(), (image(),))
    assert f.count("bn") == 0 and f.count("linear") == 8 and len(f.regions) == 9


@pytest.mark.parametrize("how", ["pairs", "flatten12", "elsewhere"])
@pytest.mark.parametrize("capture", ["export", "dynamic"])
def test_fx_reshape_that_moves_the_last_axis_or_goes_elsewhere_is_left_alone(how, capture):
    m = randomize_bn(Reshaped(how)).eval()
    x = torch.randn(2, 3, 4)
    if capture == "export":
        f = fold_in("export", m, (x,))
        assert f.count("bn") == f.before["bn"] and f.count("linear") == f.before["linear"]
        return
    gm = export_dynamic(m, x)
    before = (count_kind(gm, "bn"), count_kind(gm, "linear"))
    FoldBranchesPass().call(gm)
    assert (count_kind(gm, "bn"), count_kind(gm, "linear")) == before
    with torch.no_grad():
        assert rel_err(m(x), gm(x)) <= 1e-5
