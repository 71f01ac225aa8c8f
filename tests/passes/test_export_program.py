"""``branchfold.fold(exported_program)``: a valid ExportedProgram comes back, and the input is untouched."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.export.graph_signature import InputKind

import branchfold
from branchfold.errors import InputError
from branchfold.passes import verify
from branchfold.passes.export_pipeline import fold_exported_program
from branchfold.zoo import ZOO, seed_vit


def small_vit() -> nn.Module:
    return seed_vit(depth=1, branches=4, dim=32, heads=2, mlp_ratio=2, image_size=8, patch=4).eval()


def exported(model: nn.Module, batch: int = 2, **kw) -> tuple[torch.export.ExportedProgram, tuple]:
    args = (model.example_input(batch),)
    with torch.no_grad():
        return torch.export.export(model, args, **kw), args


def round_trip(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    return torch.export.load(buf)


def assert_consistent(ep: torch.export.ExportedProgram) -> None:
    """Signature and graph agree; every lifted weight is in the state dict or constants."""
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    specs = ep.graph_signature.input_specs
    assert [s.arg.name for s in specs] == [n.name for n in placeholders]
    output = next(n for n in ep.graph.nodes if n.op == "output")
    assert [s.arg.name for s in ep.graph_signature.output_specs] == [a.name for a in output.args[0]]
    for spec in specs:
        if spec.kind == InputKind.PARAMETER:
            assert isinstance(ep.state_dict[spec.target], nn.Parameter)
        elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            assert spec.target in ep.state_dict or spec.target in ep.constants
    targets = {s.target for s in specs if s.target is not None}
    assert set(ep.state_dict) <= targets  # nothing left over
    ep.validate()


@pytest.mark.parametrize("name", ["small-vit", "repvgg", "grouped-mlp"])
def test_folded_program_is_valid_saves_loads_and_decomposes(name):
    model = small_vit() if name == "small-vit" else ZOO[name].build().eval()
    args = (model.example_input(2),)
    with torch.no_grad():
        ep = torch.export.export(model, args)
        ref = model(*args)
    result = branchfold.fold_with_report(ep)
    new = result.model
    assert isinstance(new, torch.export.ExportedProgram) and new is not ep
    assert result.report.verified and result.report.folded
    assert_consistent(new)

    fresh = [t for t in new.state_dict if t not in ep.state_dict]
    assert fresh and all(t.startswith("branchfold_") for t in fresh)
    assert len(new.state_dict) < len(ep.state_dict)  # branch weights no op reads any more are gone
    assert result.report.after.params < result.report.before.params

    with torch.no_grad():
        assert verify.relative_error(ref, new.module()(*args)) <= 1e-5
        assert verify.relative_error(ref, round_trip(new).module()(*args)) <= 1e-5
        assert verify.relative_error(ref, new.run_decompositions().module()(*args)) <= 1e-5
    before = sum(1 for n in ep.graph.nodes if n.op == "call_function")
    assert sum(1 for n in new.graph.nodes if n.op == "call_function") < before


def test_the_input_program_is_not_modified():
    ep, args = exported(small_vit())
    code, names = ep.graph_module.code, list(ep.state_dict)
    values = {k: v.clone() for k, v in ep.state_dict.items()}
    specs = list(ep.graph_signature.input_specs)
    fold_exported_program(ep)
    assert ep.graph_module.code == code and list(ep.state_dict) == names
    assert all(torch.equal(values[k], v) for k, v in ep.state_dict.items())
    assert list(ep.graph_signature.input_specs) == specs


def test_dynamic_batch_survives_folding_and_save_load():
    model = small_vit()
    batch = torch.export.Dim("batch", min=1, max=32)
    ep, _ = exported(model, dynamic_shapes=({0: batch},))
    new = round_trip(branchfold.fold(ep))
    assert [str(v) for v in new.range_constraints.values()] == [str(v) for v in ep.range_constraints.values()]
    with torch.no_grad():
        for b in (1, 5, 17):
            x = model.example_input(b)
            assert verify.relative_error(model(x), new.module()(x)) <= 1e-5


def test_example_inputs_are_synthesized_when_the_program_has_none():
    ep, _ = exported(small_vit())
    ep.example_inputs = None
    result = fold_exported_program(ep)
    assert result.report.verified and result.report.folded


def test_fresh_names_never_collide_with_existing_weights():
    class Clash(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
            self.branchfold_1_weight = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return torch.relu(self.a(x) + self.b(x)) * self.branchfold_1_weight

    model = Clash().eval()
    x = torch.randn(3, 6)
    ep = torch.export.export(model, (x,))
    new = branchfold.fold(ep)
    assert_consistent(new)
    assert torch.equal(new.state_dict["branchfold_1_weight"], model.branchfold_1_weight)
    assert any(t.startswith("branchfold_1_weight_") for t in new.state_dict)
    with torch.no_grad():
        assert verify.relative_error(model(x), new.module()(x)) <= 1e-5


def test_a_weight_still_read_elsewhere_stays():
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            return torch.relu(self.a(x) + self.b(x)) + self.a.weight.sum()

    model = Reused().eval()
    x = torch.randn(3, 6)
    ep = torch.export.export(model, (x,))
    new = branchfold.fold(ep)
    assert_consistent(new)
    assert "a.weight" in new.state_dict and "b.weight" not in new.state_dict
    with torch.no_grad():
        assert verify.relative_error(model(x), new.module()(x)) <= 1e-5


def test_not_an_exported_program_is_an_input_error():
    with pytest.raises(InputError, match="ExportedProgram"):
        fold_exported_program(nn.Linear(2, 2))
