"""In-place arithmetic folds like its out-of-place form, in every FX dialect and through ``fold``.

Models are written the way reparameterizable code writes them (MobileOne's ``out += rc(x)`` from a sum
that may start at the integer 0, RepVGG's ``x += identity``, ``y.add_(b(x))``, FastViT's RepMixer) and
must fold to exactly the op count of their hand-written single-path model. The must-not-fold cases
check that a write the caller (or a later reader) can see is never folded away.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from helpers import DIALECTS, capture, count_kind, fold_in, fresh, randomize_bn, rel_err
from torch import fx, nn

import branchfold
from branchfold.passes.fx import FoldBranchesPass, ShapePropPass
from branchfold.passes.fx_horizontal import HorizontalFusionPass
from branchfold.passes.fx_inplace import FunctionalizeInPlacePass
from branchfold.passes.pipeline import count_ops

ALL = pytest.mark.parametrize("dialect", DIALECTS)
C = 4


def conv_bn(c_in: int, c_out: int, k: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)
    )


class MobileOneBlock(nn.Module):
    """timm/apple MobileOne: ``scale_out``/``identity_out`` may be the integer 0, branches added in place."""

    def __init__(self, scale: bool, identity: bool, k: int = 3) -> None:
        super().__init__()
        self.rbr_scale = conv_bn(C, C, 1) if scale else None
        self.rbr_skip = nn.BatchNorm2d(C) if identity else None
        self.rbr_conv = nn.ModuleList(conv_bn(C, C, 3) for _ in range(k))

    def forward(self, x):
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for rc in self.rbr_conv:
            out += rc(x)
        return torch.relu(out)


class RepVGGBlock(nn.Module):
    """RepVGG as written upstream: ``identity = self.bn(x)`` first, then ``x += identity``."""

    def __init__(self) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(C)
        self.conv_kxk = conv_bn(C, C, 3)
        self.conv_1x1 = conv_bn(C, C, 1)

    def forward(self, x):
        identity = self.identity(x)
        x = self.conv_1x1(x) + self.conv_kxk(x)
        x += identity
        return torch.relu(x)


class SinglePathConv(nn.Module):
    """The hand-reparameterized block: one conv (+ an optional activation)."""

    def __init__(self, groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1, groups=groups)
        self.act = act

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y) if self.act else y


class RepMixer(nn.Module):
    """FastViT's RepMixer: ``x + layer_scale * (mixer(x) - norm(x))``, depthwise conv+BN mixer, BN norm."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(C)
        self.mixer = conv_bn(C, C, 3, groups=C)
        self.layer_scale = nn.Parameter(torch.rand(C, 1, 1) + 0.5)

    def forward(self, x):
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


class AddInPlaceLinears(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        y = self.a(x)
        y.add_(self.b(x))
        return y


class SinglePathLinear(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(x)


def image() -> tuple[torch.Tensor]:
    return (torch.randn(2, C, 6, 6),)


def assert_single_path(model: nn.Module, hand: nn.Module, inputs, dialect: str) -> None:
    """Folded in ``dialect``: exactly the hand-written model's conv/linear/bn and total op counts; equal."""
    f = fold_in(dialect, model, inputs)
    hand_gm, _, _ = capture(hand.eval(), inputs, dialect)
    for kind in ("conv", "linear", "bn"):
        assert f.count(kind) == count_kind(hand_gm, kind), (kind, f.gm.graph)
    assert f.ops_after == count_ops(hand_gm), f.gm.graph
    with torch.no_grad():
        again = fresh(inputs)
        assert rel_err(model(*again), f.run(*again)) <= 1e-5
    assert not [n for n in f.not_folded if n.category == "in-place"]


@ALL
@pytest.mark.parametrize("scale,identity", [(True, True), (True, False), (False, True), (False, False)])
def test_mobileone_block_folds_to_one_conv(dialect, scale, identity):
    model = randomize_bn(MobileOneBlock(scale, identity)).eval()
    assert_single_path(model, SinglePathConv(), image(), dialect)


@ALL
def test_repvgg_identity_added_in_place_folds(dialect):
    assert_single_path(randomize_bn(RepVGGBlock()).eval(), SinglePathConv(), image(), dialect)


@ALL
def test_fastvit_repmixer_folds_to_one_depthwise_conv(dialect):
    model = randomize_bn(RepMixer()).eval()
    assert_single_path(model, SinglePathConv(groups=C, act=False), image(), dialect)


@ALL
def test_add_in_place_of_linears_folds_to_one_linear(dialect):
    assert_single_path(AddInPlaceLinears().eval(), SinglePathLinear(), (torch.randn(3, 8),), dialect)


def test_fold_keeps_in_place_sums_single_path_without_horizontal_split():
    """Through ``fold`` (branch fold, then horizontal fusion in ``on`` mode): one linear, no split, no add."""
    model = AddInPlaceLinears().eval()
    x = torch.randn(3, 8)
    result = branchfold.fold_with_report(model, (x,), horizontal="on")
    gm = result.model
    assert count_kind(gm, "linear") == 1 and count_ops(gm) == 1
    assert not [r for r in result.report.folded if r.kind == "horizontal"]
    assert result.report.verified and rel_err(model(x), gm(x)) <= 1e-5


@pytest.mark.parametrize("scale,identity", [(True, True), (False, False)])
def test_fold_mobileone_block(scale, identity):
    model = randomize_bn(MobileOneBlock(scale, identity)).eval()
    result = branchfold.fold_with_report(model, image())
    hand = capture(SinglePathConv().eval(), image(), "export")[0]
    assert count_ops(result.model) == count_ops(hand) and count_kind(result.model, "conv") == 1
    assert count_kind(result.model, "bn") == 0 and result.report.verified


# ----------------------------------------------------------------------------------------------
# careful semantics: writes that someone else can see


class ReadBeforeWrite(nn.Module):
    """``a`` is read (by ``a * 1``) before it is written in place: that reader must keep the old value."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(C, C, 3), conv_bn(C, C, 3)

    def forward(self, x):
        a = self.a(x)
        s = a * 1
        a += self.b(x)
        return a, s


class ViewReadAfterWrite(nn.Module):
    """A view of ``a`` taken before the write and read after it sees the write: not rewritten, reported."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(C, C, 3), conv_bn(C, C, 3)

    def forward(self, x):
        a = self.a(x)
        t = a.transpose(2, 3)
        a.add_(self.b(x))
        return a, t * 2


class WriteIntoView(nn.Module):
    """``v = a[:, :2]; v += b``: the write lands in ``a``, which is returned."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(C, C, 3), conv_bn(C, 2, 1)

    def forward(self, x):
        a = self.a(x)
        v = a[:, :2]
        v.add_(self.b(x))
        return a


@ALL
def test_value_read_before_the_write_keeps_its_old_value(dialect):
    f = fold_in(dialect, randomize_bn(ReadBeforeWrite()).eval(), image())
    assert f.regions  # conv→BN chains still fold
    assert not [n for n in f.not_folded if n.category == "in-place"]


@ALL
@pytest.mark.parametrize("model_type", [ViewReadAfterWrite, WriteIntoView])
def test_write_seen_through_a_view_is_left_alone_and_reported(dialect, model_type):
    model = randomize_bn(model_type()).eval()
    f = fold_in(dialect, model, image())  # exact against eager, on the example and fresh inputs
    assert_writes_remain(f.gm)
    refused = [n for n in f.not_folded if n.category == "in-place"]
    assert len(refused) == 1 and "shares memory" in refused[0].detail
    with torch.no_grad():
        again = fresh(image())
        assert rel_err(model(*again), f.run(*again)) <= 1e-5


def assert_writes_remain(gm: fx.GraphModule) -> None:
    names = {getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes}
    assert names & {"add_", "iadd", "add_.Tensor"}, gm.graph


class WritesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = (
            nn.Conv2d(C, C, 3, padding=1),
            nn.Conv2d(C, C, 3, padding=1),
            nn.BatchNorm2d(C),
        )

    def forward(self, x):
        x += 1
        return self.a(x) + self.b(x) + self.bn(x)


@ALL
def test_write_to_a_graph_input_stays_and_the_rest_folds(dialect):
    model = randomize_bn(WritesItsInput()).eval()
    x = image()[0]
    gm, constants, run = capture(model, (x.clone(),), dialect)
    if dialect == "symbolic_trace":
        ShapePropPass((x.clone(),)).call(gm)
    p = FoldBranchesPass(constants=constants)
    p.call(gm)
    assert count_kind(gm, "conv") == 1 and count_kind(gm, "bn") == 0
    for xs in (x, fresh((x,))[0]):
        eager_in, folded_in = xs.clone(), xs.clone()
        with torch.no_grad():
            assert rel_err(model(eager_in), run(folded_in)) <= 1e-5
        if dialect != "symbolic_trace":  # symbolic_trace itself records ``x += 1`` as ``x = x + 1``
            assert torch.equal(eager_in, folded_in)  # the caller's tensor is written exactly as eagerly
    if dialect != "symbolic_trace":
        assert_writes_remain(gm)
        assert [n for n in p.result.not_folded if n.category == "in-place" and "graph input" in n.detail]


class CountsCalls(nn.Module):
    """A buffer written in forward is not a constant: ``fc(x) * step`` must not fold into the linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(C, C)
        self.register_buffer("step", torch.ones(C))

    def forward(self, x):
        self.step.add_(1)
        return self.fc(x) * self.step


class ScalesItsParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(C, C)
        self.gain = nn.Parameter(torch.ones(C))

    def forward(self, x):
        with torch.no_grad():
            self.gain.mul_(1.5)
        return self.fc(x) * self.gain


@pytest.mark.parametrize("dialect", ("dynamo", "export"))  # symbolic_trace runs the write while tracing
@pytest.mark.parametrize("model_type", [CountsCalls, ScalesItsParameter])
def test_stored_tensor_written_in_forward_is_not_a_constant(dialect, model_type):
    model = model_type().eval()
    x = torch.randn(3, C)
    captured = copy.deepcopy(model)
    gm, constants, run = capture(captured, (x,), dialect)
    reference = copy.deepcopy(captured)  # the same state as the captured copy (dynamo ran it once)
    p = FoldBranchesPass(constants=constants)
    p.call(gm)
    assert not p.result.regions and count_kind(gm, "linear") == 1
    assert [n for n in p.result.not_folded if n.category == "in-place"]
    with torch.no_grad():
        for _ in range(3):  # every call writes again: each must match eager's
            assert rel_err(reference(x), run(x)) <= 1e-6


# ----------------------------------------------------------------------------------------------
# the pass itself, and horizontal fusion never wrapping a sum


def test_functionalize_rewrites_every_spelling_and_nothing_else():
    class Spellings(nn.Module):
        def forward(self, x):
            a = x * 2
            a.add_(x)
            a.sub_(1)
            a.mul_(3)
            a.div_(2)
            return a

    gm = fx.symbolic_trace(Spellings())
    x = torch.randn(2, 3)
    ShapePropPass((x,)).call(gm)
    p = FunctionalizeInPlacePass()
    assert p.call(gm).modified and len(p.rewritten) == 4 and not p.refused
    assert [n.target for n in gm.graph.nodes if n.op == "call_method"] == ["add", "sub", "mul", "div"]
    assert torch.equal(gm(x), Spellings()(x))


def test_integer_write_is_left_alone():
    class Ints(nn.Module):
        def forward(self, x):
            i = x.long() * 2
            i.add_(1)
            return i

    gm = fx.symbolic_trace(Ints())
    x = torch.randn(2, 3) * 5
    ShapePropPass((x,)).call(gm)
    p = FunctionalizeInPlacePass()
    p.call(gm)
    assert not p.rewritten and "torch.int64" in p.refused[0].detail


class SummedPair(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a, self.b, self.c, self.e = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return self.a(x) + self.b(x), torch.relu(self.c(x)), self.e(x) * 2


@ALL
def test_horizontal_fusion_alone_leaves_parallel_sums(dialect):
    model = SummedPair().eval()
    x = torch.randn(3, 8)
    gm, constants, run = capture(model, (x,), dialect)
    if dialect == "symbolic_trace":
        ShapePropPass((x,)).call(gm)
    p = HorizontalFusionPass("on", constants=constants)
    p.call(gm)
    assert [len(g.ops) for g in p.result.fused] == [2]  # c and e, not the summed a and b
    assert count_kind(gm, "linear") == 3
    assert rel_err(model(x), run(x)) <= 1e-5


def test_horizontal_fusion_alone_sees_in_place_sum():
    model = AddInPlaceLinears().eval()
    x = torch.randn(3, 8)
    gm = fx.symbolic_trace(model)
    ShapePropPass((x,)).call(gm)
    p = HorizontalFusionPass("on")
    p.call(gm)
    assert not p.result.groups and count_kind(gm, "linear") == 2
    assert not [n for n in gm.graph.nodes if n.target is operator.getitem]
    assert rel_err(model(x), gm(x)) <= 1e-6


def test_onnx_horizontal_fusion_leaves_parallel_sums(make_onnx):
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import helper

    from branchfold.passes.onnx_horizontal import HorizontalFusionPass as OnnxHorizontal

    rng = np.random.default_rng(0)
    weights = {n: rng.standard_normal((8, 8)).astype(np.float32) for n in ("wa", "wb", "wc", "wd")}
    nodes = [helper.make_node("MatMul", ["x", w], [f"m{w[1]}"]) for w in weights]
    nodes.append(helper.make_node("Add", ["ma", "mb"], ["sum"]))
    proto = make_onnx(nodes, [("x", [3, 8])], [("sum", [3, 8]), ("mc", [3, 8]), ("md", [3, 8])], weights)
    model = ir.from_proto(proto)
    p = OnnxHorizontal("on")
    p(model)
    assert [g.ops for g in p.result.fused] == [["MatMul"] * 2] and len(p.result.groups) == 1
    out = ir.to_proto(model)
    assert sum(n.op_type == "MatMul" for n in out.graph.node) == 3
    x = rng.standard_normal((3, 8)).astype(np.float32)
    run = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (proto, out)
    ]
    for a, b in zip(*(s.run(None, {"x": x}) for s in run)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


class ReadsAroundAWrite(nn.Module):
    """``x`` is read, written in place, read again: a fold or fusion must not move a read across the write."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm1d(8), nn.BatchNorm1d(8)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        y = self.bn1(x) * 2
        q = self.a(x)
        x.add_(1)
        return y + self.bn2(x), q, self.b(x)


@ALL
def test_no_read_moves_across_a_write_that_stays(dialect):
    model = randomize_bn(ReadsAroundAWrite()).eval()
    x = torch.randn(3, 8)
    gm, constants, run = capture(model, (x.clone(),), dialect)
    if dialect == "symbolic_trace":
        ShapePropPass((x.clone(),)).call(gm)
    fold = FoldBranchesPass(constants=constants)
    fold.call(gm)
    fuse = HorizontalFusionPass("on", constants=constants)
    fuse.call(gm)
    assert not fuse.result.fused  # ``a`` reads x before the write, ``b`` after it
    for xs in (x, fresh((x,))[0]):
        eager_in, folded_in = xs.clone(), xs.clone()
        with torch.no_grad():
            assert rel_err(model(eager_in), run(folded_in)) <= 1e-5
        assert torch.equal(eager_in, folded_in)
    if dialect == "symbolic_trace":  # the one dialect where later reads name the written node itself
        assert [n for n in fold.result.not_folded if "move a read" in n.detail]


def test_exported_program_with_in_place_sums_folds_and_stays_valid(tmp_path):
    model = randomize_bn(MobileOneBlock(True, True)).eval()
    x = image()[0]
    ep = torch.export.export(model, (x,), strict=False)
    result = branchfold.fold_with_report(ep)
    folded = result.model
    assert isinstance(folded, torch.export.ExportedProgram) and result.report.verified
    assert count_kind(folded.module(), "conv") == 1 and count_kind(folded.module(), "bn") == 0
    torch.export.save(folded, tmp_path / "folded.pt2")
    loaded = torch.export.load(tmp_path / "folded.pt2")
    again = fresh((x,))[0]
    assert rel_err(model(again), loaded.module()(again)) <= 1e-5


def test_report_names_the_write_it_left_alone():
    model = randomize_bn(WriteIntoView()).eval()
    result = branchfold.fold_with_report(model, image())
    lines = [s for s in result.report.not_folded if s.reason == "in-place"]
    assert len(lines) == 1 and "shares memory" in lines[0].detail and lines[0].at
    assert result.report.verified
    assert "in-place" in result.report.render()


def test_add_with_alpha_is_reported_not_silent():
    class Alpha(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return torch.add(self.a(x), self.b(x), alpha=0.5)

    model = Alpha().eval()
    x = torch.randn(3, 8)
    f = fold_in("symbolic_trace", model, (x,))
    assert [n.detail for n in f.not_folded if n.category == "unsupported-args"] == ["add with alpha=0.5"]
