"""Each private torch API the package uses (``branchfold/compat.py``) still works on the installed torch.

A failure here names the shim that a new torch release broke, instead of a wrong fold somewhere else."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from branchfold import compat

aten = torch.ops.aten


def _broken(name: str) -> str:
    return f"torch {torch.__version__} changed what branchfold.compat.{name} reads: update the shim"


def test_overloads_and_their_schemas():
    assert compat.is_overload(aten.add_.Tensor) and not compat.is_overload(torch.add), _broken("is_overload")
    assert isinstance(aten.add, compat.OpOverloadPacket), _broken("OpOverloadPacket")
    schema = compat.schema(aten.add_.Tensor)
    assert schema.name == "aten::add_" and schema.arguments[0].alias_info.is_write, _broken("schema")
    assert compat.overload_name(aten.add_.Tensor) == "Tensor", _broken("overload_name")


def test_codegen_of_an_exported_module():
    class M(nn.Module):
        def forward(self, x):
            return x + 1

    module = torch.export.export(M(), (torch.randn(2),)).module()
    generator = compat.codegen(module.graph)
    assert isinstance(generator, compat.PyTreeCodeGen), _broken("codegen / PyTreeCodeGen")
    assert compat.in_spec(module).num_leaves == 1, _broken("in_spec")
    graph = fx.Graph()
    compat.set_codegen(graph, compat.CodeGen())
    assert type(compat.codegen(graph)) is compat.CodeGen, _broken("set_codegen")


def test_fake_mode_and_size_hints():
    ep = torch.export.export(nn.Linear(3, 3), (torch.randn(2, 3),))
    vals = [n.meta["val"] for n in ep.graph.nodes if "val" in n.meta]
    assert isinstance(compat.detect_fake_mode(vals), compat.FakeTensorMode), _broken("detect_fake_mode")
    assert compat.guarding_hint_or_throw(torch.SymInt(_sym_node(5))) == 5, _broken("guarding_hint_or_throw")


def _sym_node(value: int):
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    return env.create_symintnode(env.create_symbol(value, source=_source()), hint=value).node


def _source():
    from torch._dynamo.source import ConstantSource

    return ConstantSource("s")


def test_bindings_and_module_bases():
    assert compat.NN_BINDINGS.linear is F.linear, _broken("NN_BINDINGS")
    assert compat.VARIABLE_FUNCTIONS.conv2d is torch.conv2d, _broken("VARIABLE_FUNCTIONS")
    assert isinstance(nn.BatchNorm2d(3), compat.BatchNormBase), _broken("BatchNormBase")
    assert isinstance(nn.Dropout2d(), compat.DropoutBase), _broken("DropoutBase")


def test_child_modules_keeps_repeats():
    parent, child = nn.Module(), nn.Linear(2, 2)
    parent.a, parent.b = child, child
    parent.register_module("c", None)
    assert compat.child_modules(parent) == [("a", child), ("b", child), ("c", None)], _broken("child_modules")


def test_dynamo_source_name_of_a_parameter_placeholder():
    got: list[str] = []

    def backend(gm, example_inputs):
        got.extend(compat.dynamo_source_name(n) for n in gm.graph.nodes if n.op == "placeholder")
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(nn.BatchNorm1d(3).eval(), backend=backend)(torch.randn(2, 3))
    torch._dynamo.reset()
    assert any("running_mean" in name for name in got), _broken("dynamo_source_name")


def test_plain_tracer_clears_the_recorded_tracer():
    """What ``torch.load`` re-traces a GraphModule with (the pickling itself: tests/test_readme_ship_it.py)."""

    class M(nn.Module):
        def forward(self, x):
            return x * 2

    module = torch.export.export(M(), (torch.randn(2),)).module()
    compat.plain_tracer(module)
    assert module.graph._tracer_cls is None and module._tracer_cls is None, _broken("plain_tracer")
    assert fx.GraphModule(module, module.graph).graph._tracer_cls is None, _broken("plain_tracer")
