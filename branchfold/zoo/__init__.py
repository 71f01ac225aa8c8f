"""Reference models: multi-branch, structurally reparameterizable PyTorch models, each paired with a
hand-written single-path equivalent.

The single-path models are written by hand, sharing no code with the compiler, so they are an independent
oracle: tests check the compiler's output against them and benchmarks time them as the attainable limit.
``ZOO`` lists them for the demo, tests and benchmarks; every builder is deterministic (seed 0) and returns a
train-mode model whose BatchNorms carry random statistics, so that BN folding is really exercised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn

from ._common import ConvNet, randomize_bn_stats
from .acnet import ACBlock, acnet_net, single_path_acnet
from .dbb import DiverseBranchBlock, dbb_net, single_path_dbb
from .grouped_mlp import GroupedMLPNet, grouped_mlp_net, single_path_grouped_mlp
from .mobileone import MobileOneBlock, mobileone_net, mobileone_unit, single_path_mobileone
from .repvgg import RepVGGBlock, repvgg_net, single_path_repvgg
from .vit import BranchedLinear, SeedViT, merge_branches, seed_vit, single_path_vit


def model_example_input(model: nn.Module, batch: int = 2) -> tuple[Tensor, ...]:
    """The positional inputs of one forward call: ``(model.example_input(batch),)``."""
    return (model.example_input(batch),)  # type: ignore[operator]


@dataclass(frozen=True)
class ZooEntry:
    """A multi-branch model family: how to build one, its hand-written single path, and example inputs."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    single_path: Callable[[nn.Module], nn.Module]
    example_input: Callable[[nn.Module, int], tuple[Tensor, ...]] = model_example_input


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("seed-vit", "ViT, every block linear = 4 summed parallel linears (depth 3)",
                 partial(seed_vit, depth=3, branches=4), single_path_vit),  # type: ignore[arg-type]
        ZooEntry("seed-vit-k2", "ViT, every block linear = 2 summed parallel linears (depth 3)",
                 partial(seed_vit, depth=3, branches=2), single_path_vit),  # type: ignore[arg-type]
        ZooEntry("repvgg", "RepVGG: 3x3+BN, 1x1+BN, identity BN (grouped and strided blocks)",
                 repvgg_net, single_path_repvgg),
        ZooEntry("acnet", "ACNet: 3x3+BN, 1x3+BN, 3x1+BN", acnet_net, single_path_acnet),
        ZooEntry("mobileone", "MobileOne: K depthwise 3x3+BN, 1x1 scale, identity; K pointwise 1x1+BN",
                 mobileone_net, single_path_mobileone),
        ZooEntry("dbb", "Diverse Branch Block: 3x3, 1x1, 1x1->avgpool, 1x1->3x3, each +BN",
                 dbb_net, single_path_dbb),
        ZooEntry("grouped-mlp", "transformer stack, one branched MLP shared per group of 2 blocks",
                 grouped_mlp_net, single_path_grouped_mlp),  # type: ignore[arg-type]
    ]
}

__all__ = [
    "ZOO",
    "ACBlock",
    "BranchedLinear",
    "ConvNet",
    "DiverseBranchBlock",
    "GroupedMLPNet",
    "MobileOneBlock",
    "RepVGGBlock",
    "SeedViT",
    "ZooEntry",
    "acnet_net",
    "dbb_net",
    "grouped_mlp_net",
    "merge_branches",
    "mobileone_net",
    "mobileone_unit",
    "model_example_input",
    "randomize_bn_stats",
    "repvgg_net",
    "seed_vit",
    "single_path_acnet",
    "single_path_dbb",
    "single_path_grouped_mlp",
    "single_path_mobileone",
    "single_path_repvgg",
    "single_path_vit",
]
