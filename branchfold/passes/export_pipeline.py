"""``fold`` for a ``torch.export.ExportedProgram``: ExportedProgram in, valid ExportedProgram out.

The lifted ATen graph is folded where it stands, with the parameter, buffer and constant placeholders
treated as constants, instead of folding ``ep.module()`` and exporting again: that keeps the program's
dynamic shapes, range constraints, module call graph and input/output names, and needs no re-trace.
Folded weights become new parameters with fresh names (``branchfold_<n>_<hint>``); weights no user op
reads any more are dropped from the graph, the signature and the state dict; the user's program, its
state dict and tensors are never modified. The result is checked against the original (example and
random inputs) and settled as every fold is (``passes.settle``): regions that fail are undone, and the
original program comes back when the rest fail together.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument
from torch.utils import _pytree as pytree

from branchfold import compat
from branchfold.adapters.fx import FxFoldResult
from branchfold.errors import InputError
from branchfold.passes import settle
from branchfold.passes import verify as verification
from branchfold.passes.fx import FoldBranchesPass, lift_folded_weights
from branchfold.passes.pipeline import FoldResult, build_report, region_name, seeded_run
from branchfold.passes.settle import Selection
from branchfold.rewriter.region import Region

LIFTED = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


@dataclass
class _Attempt:
    """One fold of a fresh copy of the program's graph, rebuilt as a program."""

    program: ExportedProgram
    result: FxFoldResult
    speed_rewrites = False  # no horizontal fusion here: the program keeps its ops' layout

    @property
    def regions(self) -> list[Region]:
        return self.result.regions

    def name(self, region: Region) -> str:
        return region_name(region.value)


def fold_exported_program(
    ep: ExportedProgram,
    args: Sequence = (),
    kwargs: dict | None = None,
    verify: bool = True,
    *,
    random_checks: int = 2,
    tolerance: float | None = None,
    seed: int = 0,
) -> FoldResult:
    """Fold ``ep``; ``FoldResult.model`` is a new ExportedProgram.

    Example inputs come from ``args``/``kwargs``, else from ``ep.example_inputs``, else are synthesized
    from the placeholders' shapes.
    """
    if not isinstance(ep, ExportedProgram):
        raise InputError(f"expected a torch.export.ExportedProgram, got {type(ep).__name__}")
    args, kwargs = example_inputs(ep, args, kwargs)
    constants = lifted_tensors(ep)
    reference = ep.module()
    input_sets = [(args, kwargs)]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(random_checks):
        input_sets.append((tuple(verification.random_inputs(args, generator)), kwargs))
    ref_outputs = [seeded_run(reference, a, k, seed) for a, k in input_sets] if verify else None

    def attempt(sel: Selection) -> _Attempt:
        gm = fx.GraphModule(ep.graph_module, copy.deepcopy(ep.graph), class_name="BranchfoldProgram")
        fold = FoldBranchesPass(constants, sel.select())
        with torch.no_grad():
            fold.call(gm)
        return _Attempt(rebuild(ep, gm), fold.result)

    def check(candidate: _Attempt) -> verification.Check:
        return verification.check(reference, candidate.program.module(), input_sets, tolerance, ref_outputs)

    checks = [settle.verification(check)] if verify else []
    settled = settle.settle(attempt, checks)
    folded, result = settled.candidate.program, settled.candidate.result
    outcome = settled.outcome(checks[0]).outcome if checks else None
    report = build_report(reference, folded.module(), result, settled.undone, args, kwargs, outcome, False)
    return FoldResult(folded, report)


def lifted_tensors(ep: ExportedProgram) -> dict[str, torch.Tensor]:
    """Placeholder name -> value, for every parameter, buffer and lifted constant tensor."""
    found = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind not in LIFTED or not isinstance(spec.arg, TensorArgument):
            continue
        value = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
        if isinstance(value, torch.Tensor):
            found[spec.arg.name] = value
    return found


def example_inputs(ep: ExportedProgram, args: Sequence, kwargs: dict | None) -> tuple[tuple, dict]:
    """The user's inputs, else the program's recorded ones, else random tensors of the recorded shapes."""
    if args or kwargs:
        return tuple(args), dict(kwargs or {})
    if ep.example_inputs is not None:
        a, k = ep.example_inputs
        return tuple(a), dict(k)
    user = set(ep.graph_signature.user_inputs)
    flat = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise InputError(
                f"the program's input {node.name!r} is not a tensor: pass example inputs, fold(ep, args, kwargs)"
            )
        shape = [_hint(d) for d in val.shape]
        if val.is_floating_point():
            flat.append(torch.randn(shape, dtype=val.dtype, device=val.device))
        else:
            flat.append(torch.zeros(shape, dtype=val.dtype, device=val.device))
    a, k = pytree.tree_unflatten(flat, ep.call_spec.in_spec)
    return tuple(a), dict(k)


def _hint(d) -> int:
    if isinstance(d, int):
        return d
    try:
        return int(compat.guarding_hint_or_throw(d))
    except Exception:  # a dimension with no recorded example value: any valid size will do
        return 2


# ----------------------------------------------------------------------------------------------
# a valid ExportedProgram around the folded graph


def rebuild(ep: ExportedProgram, gm: fx.GraphModule) -> ExportedProgram:
    """A new program for ``ep``'s folded graph ``gm``: lift the folded weights, drop unused ones, fix specs."""
    sig = ep.graph_signature
    params = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name in sig.inputs_to_parameters]
    taken = set(ep.state_dict) | set(ep.constants)
    new = lift_folded_weights(gm, params[-1] if params else None, "p_", taken)
    state_dict = dict(ep.state_dict)
    constants = dict(ep.constants)
    fresh = {}
    for name, node, value in new:
        state_dict[name] = torch.nn.Parameter(value, requires_grad=False)
        fresh[node.name] = InputSpec(InputKind.PARAMETER, TensorArgument(node.name), name)

    old = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
    kept_targets = {s.target for s in sig.output_specs if s.target is not None}
    input_specs = []
    for node in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        spec = fresh.get(node.name) or old[node.name]
        if spec.kind in LIFTED and not node.users and node.name not in fresh and spec.target not in kept_targets:
            gm.graph.erase_node(node)  # a weight only the folded ops read
            state_dict.pop(spec.target, None)
            constants.pop(spec.target, None)
            continue
        input_specs.append(spec)
    output_specs = _renamed_outputs(gm, sig)
    _fill_meta(gm, [node for _, node, _ in new], [value for _, _, value in new])
    gm.graph.lint()
    gm.recompile()
    return ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=ExportGraphSignature(input_specs, output_specs),
        state_dict=state_dict,
        range_constraints=copy.deepcopy(ep.range_constraints),
        module_call_graph=copy.deepcopy(ep.module_call_graph),
        example_inputs=ep.example_inputs,
        constants=constants,
        verifiers=ep.verifiers,
    )


def _renamed_outputs(gm: fx.GraphModule, sig: ExportGraphSignature) -> list:
    """Output specs naming the nodes the output now returns (a folded output is a new node)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    returned = pytree.tree_leaves(output.args[0])
    specs = []
    for spec, value in zip(sig.output_specs, returned):
        if isinstance(spec.arg, TensorArgument) and isinstance(value, fx.Node):
            spec = dataclasses.replace(spec, arg=TensorArgument(value.name))
        specs.append(spec)
    return specs


def _fill_meta(gm: fx.GraphModule, placeholders: list[fx.Node], values: list[torch.Tensor]) -> None:
    """Fake-tensor ``val`` for the new placeholders and ops: serialization and later passes read it."""
    vals = [n.meta["val"] for n in gm.graph.nodes if "val" in n.meta]
    fake_mode = compat.detect_fake_mode(vals)
    if fake_mode is None:
        fake_mode = compat.FakeTensorMode()
    for node, value in zip(placeholders, values):
        node.meta.pop("example_value", None)
        node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
    for node in gm.graph.nodes:
        if node.op == "call_function" and "val" not in node.meta:
            fn_args = fx.node.map_arg(node.args, lambda n: n.meta["val"])
            fn_kwargs = fx.node.map_arg(node.kwargs, lambda n: n.meta["val"])
            with fake_mode:
                node.meta["val"] = node.target(*fn_args, **fn_kwargs)
