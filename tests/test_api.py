"""The public entry point: dispatch by model kind and clear errors for bad options."""

import onnx
import pytest
import torch

import branchfold
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
