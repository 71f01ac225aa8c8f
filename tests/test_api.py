"""The public entry point: dispatch by model kind and clear errors for bad options."""

import subprocess
import sys
import warnings

import onnx
import pytest
import torch

import branchfold
from branchfold.api import quiet_torch
from branchfold.errors import InputError


def test_a_misspelt_option_is_an_error_naming_the_known_ones():
    m = torch.nn.Linear(4, 4).eval()
    with pytest.raises(InputError, match=r"unknown option\(s\) captur .*known options: capture, verify"):
        branchfold.fold(m, (torch.randn(2, 4),), captur="export")


def test_a_bad_horizontal_mode_is_an_error():
    m = torch.nn.Linear(4, 4).eval()
    with pytest.raises(InputError, match="auto, on, off"):
        branchfold.fold(m, (torch.randn(2, 4),), horizontal="sideways")


def test_an_unsupported_object_is_an_error():
    with pytest.raises(InputError, match="cannot fold a dict"):
        branchfold.fold({"not": "a model"})


def test_an_onnx_model_takes_no_example_inputs():
    with pytest.raises(InputError, match="takes no example inputs"):
        branchfold.fold(onnx.ModelProto(), (torch.randn(1),))


def test_options_reach_the_module_pipeline():
    class Branches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.a(x) + self.b(x))

    r = branchfold.fold_with_report(Branches().eval(), (torch.randn(2, 4),), capture="symbolic_trace", verify=False)
    assert r.report.counts_by_kind() == {"parallel-sum": 1}
    assert r.report.max_error is None  # verify=False reached the pipeline


def _linear():
    return torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
def test_no_example_inputs_get_one_message_saying_how_to_pass_them(capture):
    with pytest.raises(InputError, match=r"no example inputs .*pass example inputs as a tuple: fold\(model, \(x,\)\)"):
        branchfold.fold(_linear(), capture=capture)


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
def test_a_bare_tensor_is_an_error_asking_for_a_tuple(capture):
    with pytest.raises(InputError, match=r"must be a tuple, not a Tensor: pass example inputs as a tuple"):
        branchfold.fold(_linear(), torch.randn(2, 4), capture=capture)


def test_too_many_inputs_name_the_forward_signature():
    with pytest.raises(InputError, match=r"Sequential.forward\(input\) cannot be called with 2 positional input"):
        branchfold.fold(_linear(), (torch.randn(2, 4), torch.randn(2, 4)))


def test_a_training_mode_model_warns_naming_eval():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.warns(UserWarning, match=r"training mode.*call model.eval\(\)"):
        branchfold.fold(m, (torch.randn(3, 4),))


def test_an_eval_model_folds_without_any_warning():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own LeafSpec FutureWarning included
        folded = branchfold.fold(m, (torch.randn(3, 4),))
    assert not any(isinstance(s, torch.nn.BatchNorm1d) for s in folded.modules())


def test_torch_deprecation_notices_are_hidden_only_inside_our_calls():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_torch():
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
    assert len(seen) == 1


def test_importing_branchfold_and_its_help_import_no_torch():
    code = (
        "import sys, branchfold, branchfold.cli\n"
        "try:\n    branchfold.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_the_lazy_public_names_resolve():
    from branchfold import FoldReport, fold

    assert fold is branchfold.api.fold and FoldReport is branchfold.report.FoldReport
    assert set(branchfold.__all__) <= set(dir(branchfold))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        branchfold.nothing  # noqa: B018
