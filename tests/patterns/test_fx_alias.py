"""``patterns/fx_alias.py``: what an FX op writes, aliases, and whether it draws random numbers, read from
ATen's schemas and tags; the in-place pass and the constant folder both ask it."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from branchfold.patterns.fx_alias import alias_parents, is_random, written

aten = torch.ops.aten


def _node(target, *args, op: str = "call_function", **kwargs) -> tuple[fx.Node, list[fx.Node]]:
    graph = fx.Graph()
    inputs = [graph.placeholder(f"x{i}") for i in range(3)]
    real = [inputs[a] if isinstance(a, int) and not isinstance(a, bool) else a for a in args]
    node = graph.create_node(op, target, tuple(real), kwargs)
    return node, inputs


def _helper_that_draws(x):
    return x * torch.rand_like(x)


def _helper_that_does_not(x):
    return F.normalize(x) * 2


def test_random_ops_are_found_from_tags_whatever_the_dialect():
    for target in (aten.dropout.default, aten.randn_like.default, torch.rand_like, F.dropout, F.dropout2d,
                   F.rrelu, _helper_that_draws):  # fmt: skip
        assert is_random(_node(target, 0)[0]), target
    assert is_random(_node("bernoulli_", 0, op="call_method")[0])
    assert is_random(_node("uniform_", 0, op="call_method")[0])


def test_deterministic_ops_are_not_random():
    for target in (aten.add.Tensor, torch.add, F.normalize, F.linear, operator.add, _helper_that_does_not):
        assert not is_random(_node(target, 0, 1)[0]), target
    assert not is_random(_node("transpose", 0, op="call_method")[0])


def test_writes_from_schemas_names_and_training_flags():
    node, (x, y, _) = _node(aten.add_.Tensor, 0, 1)
    assert written(node) == (x,)
    node, (x, y, _) = _node(operator.iadd, 0, 1)
    assert written(node) == (x,)
    node, (x, y, _) = _node("mul_", 0, 1, op="call_method")
    assert written(node) == (x,)
    node, (x, mean, var) = _node(F.batch_norm, 0, 1, 2, None, None, True)
    assert set(written(node)) == {mean, var}  # training mode updates the running statistics
    node, _ = _node(F.batch_norm, 0, 1, 2, None, None, False)
    assert written(node) == ()
    node, (x, y, _) = _node(torch.add, 0, 1)
    assert written(node) == ()


def test_views_alias_their_input_and_fresh_results_do_not():
    node, (x, _, _) = _node(aten.t.default, 0)
    assert alias_parents(node) == (x,)
    node, _ = _node(torch.add, 0, 1)
    assert alias_parents(node) == ()
    node, inputs = _node(_helper_that_does_not, 0)
    assert alias_parents(node) == (inputs[0],)  # user code: may alias what it reads
