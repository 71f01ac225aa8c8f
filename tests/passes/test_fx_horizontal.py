"""HorizontalFusionPass on every FX dialect, the contiguity of its split outputs, and must-not-fuse cases."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn

from branchfold.errors import InputError
from branchfold.passes.fx_horizontal import HorizontalFusionPass
from branchfold.patterns.horizontal import Policy

aten = torch.ops.aten
LINEARS = {nn.functional.linear, aten.linear.default, torch._C._nn.linear}


class Qkv(nn.Module):
    """Three projections of one input, different widths, one without bias; consumers call ``.view``."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 8)
        self.k = nn.Linear(16, 8, bias=False)
        self.v = nn.Linear(16, 12)

    def forward(self, x):
        b = x.shape[0]
        q = self.q(x).view(b, -1)  # merges the split axis with the token axis: needs contiguous memory
        k = self.k(x).view(b, -1)
        v = torch.relu(self.v(x))
        return q * k, v


class Convs(nn.Module):
    def __init__(self, second: nn.Conv2d | None = None) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, padding=1)
        self.b = second if second is not None else nn.Conv2d(4, 2, 3, padding=1, bias=False)

    def forward(self, x):
        return self.a(x).view(x.shape[0], -1).sum(-1), self.b(x)


def _linears(gm: fx.GraphModule) -> int:
    def is_linear(n: fx.Node) -> bool:
        if n.op == "call_module":
            return isinstance(gm.get_submodule(n.target), nn.Linear)
        return n.op == "call_function" and n.target in LINEARS

    return sum(1 for n in gm.graph.nodes if is_linear(n))


def _close(a, b):
    for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def _export(model, x) -> fx.GraphModule:
    return torch.export.export(model, (x,), strict=False).module()


def _dynamo(model, x) -> tuple[fx.GraphModule, list, dict]:
    captured = {}

    def backend(gm, example_inputs):
        captured["gm"], captured["inputs"] = gm, list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(x)
    gm, inputs = captured["gm"], captured["inputs"]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params = {id(p) for p in model.parameters()}
    constants = {n.name: t for n, t in zip(placeholders, inputs) if id(t) in params}
    return gm, inputs, constants


def test_split_view_would_crash_without_the_contiguity_fix():
    # the premise of the next tests: a last-axis split chunk cannot be viewed across the split axis
    chunk = torch.randn(2, 3, 20).split([8, 12], -1)[0]
    with pytest.raises(RuntimeError, match="view"):
        chunk.view(2, -1)


@pytest.mark.parametrize("dialect", ["symbolic_trace", "export", "dynamo"])
def test_qkv_fuses_to_one_linear_in_every_dialect(dialect):
    torch.manual_seed(0)
    model = Qkv().eval()
    x = torch.randn(2, 3, 16)
    before = [p.detach().clone() for p in model.parameters()]
    ref = model(x)
    constants, inputs = {}, [x]
    if dialect == "symbolic_trace":
        gm = fx.symbolic_trace(model)
    elif dialect == "export":
        gm = _export(model, x)
    else:
        gm, inputs, constants = _dynamo(model, x)
    assert _linears(gm) == 3
    p = HorizontalFusionPass("on", constants=constants)
    assert p.call(gm).modified
    assert _linears(gm) == 1
    (group,) = p.result.fused
    assert group.sizes == (8, 8, 12) and group.kind == "dense"
    _close(gm(*inputs), ref)
    for old, new in zip(before, model.parameters()):
        assert torch.equal(old, new)  # the user's weights are untouched


def test_graph_output_chunk_is_contiguous():
    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            return self.a(x), self.b(x)

    model = TwoOut().eval()
    gm = fx.symbolic_trace(model)
    HorizontalFusionPass("on").call(gm)
    x = torch.randn(3, 8)
    outs = gm(x)
    assert _linears(gm) == 1 and all(o.is_contiguous() for o in outs)
    outs[0].view(-1)  # what a caller may do with a returned tensor
    _close(outs, model(x))


def test_convs_of_identical_geometry_fuse_on_the_channel_axis():
    model = Convs().eval()
    x = torch.randn(2, 4, 5, 5)
    gm = _export(model, x)
    p = HorizontalFusionPass("on")
    assert p.call(gm).modified
    convs = [n for n in gm.graph.nodes if n.target is aten.conv2d.default]
    splits = [n for n in gm.graph.nodes if n.target is aten.split_with_sizes.default]
    assert len(convs) == 1 and splits[0].args[1:] == ([6, 2], -3)
    _close(gm(x), model(x))


@pytest.mark.parametrize(
    "second",
    [
        nn.Conv2d(4, 2, 3, padding=1, stride=2),
        nn.Conv2d(4, 2, 3, padding=0),
        nn.Conv2d(4, 2, 1),
        nn.Conv2d(4, 2, 3, padding=1, dilation=1, groups=2),
        nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect"),
    ],
    ids=["stride", "padding", "kernel", "groups", "padding-mode"],
)
def test_conv_geometry_differences_do_not_fuse(second):
    model = Convs(second).eval()
    gm = fx.symbolic_trace(model)
    assert not HorizontalFusionPass("on").call(gm).modified


def test_different_inputs_and_computed_weights_do_not_fuse():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x, y, w):
            return self.a(x), self.b(y), nn.functional.linear(x, w), nn.functional.linear(x, w * 2)

    gm = fx.symbolic_trace(M().eval())
    p = HorizontalFusionPass("on")
    assert not p.call(gm).modified and p.result.groups == []


def test_off_and_auto_policy():
    model = Qkv().eval()
    gm = fx.symbolic_trace(model)
    assert not HorizontalFusionPass("off").call(gm).modified
    tight = HorizontalFusionPass("auto", policy=Policy(max_macs_per_row=16))
    assert not tight.call(gm).modified
    assert tight.result.groups and not tight.result.groups[0].fused
    assert HorizontalFusionPass("auto").call(gm).modified  # small QKV: measured to pay
    with pytest.raises(InputError):
        HorizontalFusionPass("always")  # type: ignore[arg-type]


def test_split_getitems_follow_graph_order():
    gm = fx.symbolic_trace(Qkv().eval())
    HorizontalFusionPass("on").call(gm)
    items = [n for n in gm.graph.nodes if n.target is operator.getitem and n.args[0].target is torch.split]
    assert [n.args[1] for n in items] == [0, 1, 2]


def test_composes_with_parallel_sum_fold_on_seed_vit():
    import branchfold
    from branchfold.zoo import ZOO

    entry = ZOO["seed-vit"]
    model = entry.build().eval()
    x = entry.example_input(model, 2)
    folded = branchfold.fold(model, x, horizontal="off")
    before = _linears(folded)
    p = HorizontalFusionPass("on")
    p.call(folded)
    layers = len(model.blocks)
    assert len(p.result.fused) == layers  # K-branch Q, K, V → one Q, K, V → one QKV per layer
    assert _linears(folded) == before - 2 * layers
    _close(folded(*x), model(*x))


def test_fold_fuses_qkv_by_default_and_reports_it():
    import branchfold
    from branchfold.zoo import ZOO

    entry = ZOO["seed-vit"]
    model = entry.build().eval()
    x = entry.example_input(model, 2)
    on = branchfold.fold_with_report(model, x)
    off = branchfold.fold_with_report(model, x, horizontal="off")
    layers = len(model.blocks)
    assert on.report.counts_by_kind() == {"parallel-sum": 6 * layers, "horizontal": layers}
    assert "horizontal" not in off.report.counts_by_kind()
    assert _linears(on.model) == _linears(off.model) - 2 * layers
    _close(on.model(*x), model(*x))


def test_hugging_face_vit_gets_one_qkv_gemm_per_layer():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=16, patch_size=4, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ViTModel(config).eval()
    x = torch.randn(2, 3, 16, 16)
    gm = _export(model, x)
    before = _linears(gm)
    p = HorizontalFusionPass("auto")
    p.call(gm)
    assert [g.sizes for g in p.result.fused] == [(64, 64, 64)] * 2
    assert _linears(gm) == before - 4
    torch.testing.assert_close(gm(x).last_hidden_state, model(x).last_hidden_state, rtol=1e-5, atol=1e-5)
