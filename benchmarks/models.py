"""The models the deploy benchmark measures: the zoo's multi-branch families (with their hand-written
single-path equivalents as the attainable limit) and small Hugging Face models built from configs with
random weights (no limit exists for those: the original is the baseline).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from benchmarks.levit import levit_inputs, levit_style, single_path_levit
from branchfold.zoo import ZOO, seed_vit, single_path_vit


@dataclass(frozen=True)
class Case:
    """One model of the deploy benchmark."""

    name: str
    description: str
    build: Callable[[], nn.Module]  # returns the model in eval mode
    inputs: Callable[[nn.Module, int], tuple[Tensor, ...]]
    limit: Callable[[nn.Module], nn.Module] | None  # hand-written single path; None for HF models
    inductor: bool = True  # compiled under Inductor too (each compile costs tens of seconds on 2 cores)


def _zoo(name: str, description: str | None = None) -> Case:
    entry = ZOO[name]
    return Case(
        name, description or entry.description, lambda: entry.build().eval(), entry.example_input,
        entry.single_path,
    )


def _images(size: int) -> Callable[[nn.Module, int], tuple[Tensor, ...]]:
    def make(model: nn.Module, batch: int) -> tuple[Tensor, ...]:
        generator = torch.Generator().manual_seed(1)
        return (torch.randn(batch, 3, size, size, generator=generator),)

    return make


def _hf(kind: str) -> nn.Module:
    """A small randomly initialised Hugging Face vision model (seeded), eval mode."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "vit":
        config = tf.ViTConfig(
            hidden_size=192, num_hidden_layers=3, num_attention_heads=3, intermediate_size=768,
            image_size=32, patch_size=4,
        )
        model = tf.ViTModel(config, add_pooling_layer=False)
    elif kind == "resnet":
        config = tf.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1])
        model = tf.ResNetModel(config)
    elif kind == "convnext":
        config = tf.ConvNextConfig(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1])
        model = tf.ConvNextModel(config)
    else:
        raise ValueError(kind)
    _randomize_norms(model)
    return model.eval()


@torch.no_grad()
def _randomize_norms(model: nn.Module) -> None:
    """Fresh HF models have BN statistics (0, 1) and LayerScale 1e-6: give folds something real to do."""
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
        for name in ("layer_scale_parameter", "lambda1"):
            p = getattr(m, name, None)
            if isinstance(p, nn.Parameter):
                p.copy_(0.1 + 0.1 * torch.rand(p.shape, generator=g))


def cases(quick: bool = False) -> list[Case]:
    """The models of the deploy table; ``quick`` keeps one small one for the smoke test."""
    if quick:
        return [_zoo("repvgg")]
    return [
        _zoo("seed-vit-k2", "seed ViT, depth 3, K = 2 parallel linears per linear"),
        _zoo("seed-vit", "seed ViT, depth 3, K = 4 parallel linears per linear"),
        Case("seed-vit-d6", "seed ViT, depth 6, K = 4 parallel linears per linear",
             lambda: seed_vit(depth=6, branches=4).eval(), ZOO["seed-vit"].example_input, single_path_vit),
        _zoo("repvgg"),
        _zoo("mobileone"),
        _zoo("dbb"),
        _zoo("acnet"),
        _zoo("grouped-mlp"),
        Case("levit-style", "LeViT-style attention, bias gathered from a table and cached in eval mode (2 blocks)",
             levit_style, levit_inputs, single_path_levit, inductor=False),
        Case("hf-vit", "transformers ViTModel, 3 layers, width 192, 32x32 images (random weights)",
             partial(_hf, "vit"), _images(32), None, inductor=False),
        Case("hf-resnet", "transformers ResNetModel, widths 32-256, one block per stage (random weights)",
             partial(_hf, "resnet"), _images(64), None),
        Case("hf-convnext", "transformers ConvNextModel, widths 32-256, depths 1-1-2-1 (random weights)",
             partial(_hf, "convnext"), _images(64), None, inductor=False),
    ]
