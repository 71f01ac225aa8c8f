"""What the report says of each folded op: labels read off the maps (``Conv 3x3 s1``, ``BN``, ``LoRA r=8``),
the region drawn as a small graph, the module each region sits in, and the graph's ops in execution order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from branchfold import fold_with_report
from branchfold.patterns import canonical
from branchfold.report_data import describe_map, place_of
from branchfold.rewriter.affine import Diagonal


class LoRALinear(nn.Module):
    def __init__(self, d: int = 64, r: int = 8) -> None:
        super().__init__()
        self.base, self.down, self.up = nn.Linear(d, d), nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)

    def forward(self, x):
        return torch.relu(self.base(x) + self.up(self.down(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.one = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + self.one(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())

    def forward(self, x):
        return self.blocks(x)


def test_a_lora_adapter_is_named_with_its_rank():
    report = fold_with_report(LoRALinear().eval(), (torch.randn(4, 64),)).report
    (region,) = report.folded
    labels = [s.label for s in region.steps]
    assert "LoRA A r=8 (64→8)" in labels and "LoRA B r=8 (8→64)" in labels and "Linear 64→64" in labels
    assert region.became == "Linear 64→64"
    down = labels.index("LoRA A r=8 (64→8)")
    assert region.steps[labels.index("LoRA B r=8 (8→64)")].inputs == [down]  # the drawing's wiring


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
def test_regions_know_their_block_and_the_strip_lists_the_ops_in_order(capture):
    model = Net().eval()
    report = fold_with_report(model, (torch.randn(2, 8, 6, 6),), capture=capture).report
    assert [r.place for r in report.folded] == ["blocks.0", "blocks.1"]
    first = report.folded[0]
    assert [s.label for s in first.steps] == ["Conv 3x3 s1 8→8", "BN 8", "Conv 1x1 s1 8→8", "+"]
    assert [s.inputs for s in first.steps] == [[-1], [0], [-1], [1, 2]]
    assert first.became == "Conv 3x3 s1 8→8"
    names = [entry[0] for entry in report.graph]
    assert all(n in names for r in report.folded for n in r.nodes)
    kinds = [entry[1].lower() for entry in report.graph]
    assert sum("relu" in k for k in kinds) == 2 and not any(k.startswith(("getitem", "_assert")) for k in kinds)
    assert report.graph[0][2] == "blocks.0.conv"
    assert report.checked_inputs.startswith(f"{1 + 1} input sets")  # the example, random ones at another batch
    assert report.graph[0][3] == ("blocks.0.conv" if capture == "symbolic_trace" else "")


def test_describe_map_names_convs_pools_and_channel_maps():
    dw = canonical.conv(torch.ones(16, 1, 3, 3), None, 2, 1, 1, 16)
    assert describe_map(dw, "conv") == "Conv 3x3 s2 dw 16→16"
    grouped = canonical.conv(torch.ones(16, 4, 5, 5), None, 1, 2, 1, 2)
    assert describe_map(grouped, "Conv2d") == "Conv 5x5 s1 g2 8→16"
    assert describe_map(dw, "avg_pool").startswith("AvgPool 3x3")
    bn = Diagonal(torch.ones(32), torch.zeros(32), axis=-3)
    assert describe_map(bn, "batch_norm") == "BN 32" == describe_map(bn, "BatchNorm2d")
    assert describe_map(canonical.channel_constant(1.0, None), "identity") == "identity"
    assert describe_map(canonical.linear(torch.ones(3, 5), None), "linear") == "Linear 5→3"


def test_places_of_onnx_nodes_from_both_exporters():
    class Node:
        def __init__(self, name, props=None):
            self.name, self.metadata_props = name, props or {}

    assert place_of(Node("/blocks/blocks.3/attn/qkv/MatMul")) == "blocks.3.attn.qkv"
    scopes = "['', 'blocks.3', 'blocks.3.attn', 'blocks.3.attn.qkv', 'linear_7']"
    assert place_of(Node("node_linear_7", {"pkg.torch.onnx.name_scopes": scopes})) == "blocks.3.attn.qkv"
    assert place_of(Node("MatMul_12")) == ""
