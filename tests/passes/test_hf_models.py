"""Hugging Face vision models nobody here wrote, built from small configs with random weights (no
downloads): each folds exactly (torch.export capture) and what folds in each is pinned down.

Norm parameters, BN statistics and LayerScale are randomized first, so no fold is exact by accident.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import randomize_bn, rel_err
from torch import nn

import branchfold

T = pytest.importorskip("transformers")


def randomize(model: nn.Module) -> nn.Module:
    randomize_bn(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.LayerNorm) or "lambda" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if not name.endswith("bias") else
                        torch.randn(p.shape, generator=g) * 0.3)  # fmt: skip
    return model.eval()


def img(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


MODELS = {  # name: (build, input size, {op-label tuple: regions}, ops before, ops after)
    "vit": (lambda: T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, image_size=32, patch_size=8)), 32,
            {("layer_norm", "linear"): 8, ("linear", "dropout"): 4}, 77, 54),  # a constant mask (6 ops) computed at fold time; dead size arithmetic dropped
    "levit": (lambda: T.LevitModel(T.LevitConfig(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2],
                                                 depths=[1, 1, 1], key_dim=[8, 8, 8], patch_size=16,
                                                 down_ops=[["Subsample", 8, 1, 4, 2, 2], ["Subsample", 8, 2, 4, 2, 2]])),
              64, {("linear", "batch_norm"): 22, ("conv", "batch_norm"): 4}, 200, 125),  # 5 bias gathers constant
    "resnet": (lambda: T.ResNetModel(T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                                    layer_type="bottleneck")), 32, {("conv", "batch_norm"): 8}, 27, 19),
    "convnext": (lambda: T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                                          layer_scale_init_value=0.5)), 32,
                 {("layer_norm", "linear"): 2, ("linear", "scale"): 2}, 28, 26),
    "mobilevit": (lambda: T.MobileViTModel(T.MobileViTConfig(image_size=64, hidden_sizes=[32, 48, 64],
                                                             neck_hidden_sizes=[8, 16, 24, 32, 48, 64, 80],
                                                             num_attention_heads=2)), 64,
                  {("layer_norm", "linear"): 36, ("conv", "batch_norm"): 30, ("linear", "dropout"): 18,
                   ("batch_norm", "conv", "batch_norm"): 1}, 380, 330),  # the cheapest cut of a refused chain
    "swin": (lambda: T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                              window_size=4)), 32,
             {("linear", "dropout"): 4, ("layer_norm", "linear"): 3, ("layer_norm", "dropout"): 1}, 107, 97),  # relative-position bias gathers constant
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hf_model_folds_exactly(name):
    build, size, expected, ops_before, ops_after = MODELS[name]
    torch.manual_seed(0)
    m, x = randomize(build()), img(size)
    r = branchfold.fold_with_report(m, (x,), horizontal="off")  # vertical folds only: Q/K/V fusion is tested apart
    rep = r.report
    assert rep.verified and rep.max_error <= 1e-5
    assert Counter(tuple(f.ops) for f in rep.folded) == expected
    assert "failed-check" not in rep.skipped_by_reason()
    assert (rep.before.ops, rep.after.ops) == (ops_before, ops_after)
    # weight-only results stored once (relative-position bias gathers) may hold more elements than they read
    stored = sum(b.numel() for n, b in r.model.named_buffers() if n.startswith("branchfold_constant_"))
    assert rep.after.params <= rep.before.params + stored and rep.after.macs <= rep.before.macs
    with torch.no_grad():
        assert rel_err(m(img(size) * 2), r.model(img(size) * 2)) <= 1e-5


def test_hf_model_symbolic_trace_error_suggests_export():
    m = T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])).eval()
    with pytest.raises(branchfold.CaptureError, match="capture='export'"):
        branchfold.fold(m, (img(32),), capture="symbolic_trace")
