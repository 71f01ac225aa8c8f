"""The zoo's hand-written single-path models are exact, plain, and leave the multi-branch original alone."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from branchfold.zoo import (
    ZOO,
    ACBlock,
    BranchedLinear,
    DiverseBranchBlock,
    GroupedMLPNet,
    MobileOneBlock,
    RepVGGBlock,
    SeedViT,
    grouped_mlp_net,
    randomize_bn_stats,
    repvgg_net,
    seed_vit,
    single_path_vit,
)

NAMES = sorted(ZOO)
CNN_BLOCKS: dict[str, type[nn.Module]] = {
    "repvgg": RepVGGBlock,
    "acnet": ACBlock,
    "mobileone": MobileOneBlock,
    "dbb": DiverseBranchBlock,
}


@functools.cache
def built(name: str) -> tuple[nn.Module, nn.Module]:
    """(multi-branch model, its single path), both in eval mode; shared by the tests, which must not modify them."""
    model = ZOO[name].build().eval()
    return model, ZOO[name].single_path(model).eval()


def count(model: nn.Module, cls: type[nn.Module]) -> int:
    return sum(isinstance(m, cls) for m in model.modules())  # modules() visits a shared module once


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((ref - out).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("name", NAMES)
def test_single_path_matches_float32(name: str) -> None:
    model, single = built(name)
    for seed in range(2):
        inputs = tuple(x.normal_(generator=torch.Generator().manual_seed(seed)) for x in
                       ZOO[name].example_input(model, 3))
        with torch.no_grad():
            ref, out = model(*inputs), single(*inputs)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert rel_err(ref, out) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_single_path_is_exact_in_float64(name: str) -> None:
    """In float64 the difference is pure rounding: the folding math itself is exact, borders included."""
    model = ZOO[name].build().double().eval()
    single = ZOO[name].single_path(model)
    assert all(p.dtype == torch.float64 for p in single.parameters())
    inputs = ZOO[name].example_input(model, 2)
    with torch.no_grad():
        assert rel_err(model(*inputs), single(*inputs)) <= 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_original_unmodified(name: str) -> None:
    model = ZOO[name].build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure, training = repr(model), model.training
    ZOO[name].single_path(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert repr(model) == structure and model.training == training


@pytest.mark.parametrize("name", NAMES)
def test_build_is_deterministic_and_keeps_global_rng(name: str) -> None:
    state = torch.random.get_rng_state()
    a, b = ZOO[name].build(), ZOO[name].build()
    assert torch.equal(state, torch.random.get_rng_state())
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.training


@pytest.mark.parametrize("name", sorted(CNN_BLOCKS))
def test_cnn_single_path_has_one_conv_per_block(name: str) -> None:
    model, single = built(name)
    blocks = count(model, CNN_BLOCKS[name])
    assert blocks > 0 and count(single, CNN_BLOCKS[name]) == 0
    convs = [m for m in single.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == blocks
    assert all(c.bias is not None for c in convs)
    assert count(single, nn.BatchNorm2d) == 0 and count(single, nn.AvgPool2d) == 0
    assert count(single, nn.Linear) == 1
    if name != "mobileone":
        assert all(c.kernel_size == (3, 3) for c in convs)


def test_cnn_bn_statistics_are_randomized() -> None:
    model = ZOO["repvgg"].build()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert bn.running_var.min() >= 0.5 and bn.running_var.max() <= 2.0
        assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert randomize_bn_stats(model, torch.Generator().manual_seed(1)) is model


def test_repvgg_covers_identity_stride_and_groups() -> None:
    blocks = [m for m in repvgg_net().modules() if isinstance(m, RepVGGBlock)]
    assert any(b.identity is not None and b.groups > 1 for b in blocks)
    assert any(b.identity is None and b.stride == 2 for b in blocks)


def test_mobileone_single_path_kernels() -> None:
    model, single = built("mobileone")
    kernels = sorted({c.kernel_size for c in single.modules() if isinstance(c, nn.Conv2d)})
    assert kernels == [(1, 1), (3, 3)]
    assert any(isinstance(c, nn.Conv2d) and c.groups == c.in_channels > 1 for c in single.modules())


@pytest.mark.parametrize("name", ["seed-vit", "seed-vit-k2"])
def test_vit_single_path_is_the_plain_vit(name: str) -> None:
    model, single = built(name)
    assert isinstance(model, SeedViT) and isinstance(single, SeedViT)
    assert count(model, BranchedLinear) == 6 * model.depth
    assert all(len(m.branches) == model.branches for m in model.modules() if isinstance(m, BranchedLinear))
    assert count(single, BranchedLinear) == 0 and single.branches == 1
    assert count(single, nn.Linear) == 6 * model.depth + 1
    plain = seed_vit(model.depth, 1, model.dim, model.heads, model.mlp_ratio, model.image_size, model.patch)
    assert single.state_dict().keys() == plain.state_dict().keys()


def test_plain_vit_uses_nn_linear_and_folds_to_itself() -> None:
    plain = seed_vit(depth=1, branches=1, dim=32, heads=2).eval()
    assert count(plain, BranchedLinear) == 0 and count(plain, nn.Linear) == 7
    x = plain.example_input(2)
    with torch.no_grad():
        assert torch.equal(plain(x), single_path_vit(plain)(x))


def test_grouped_mlp_single_path_keeps_sharing() -> None:
    model, single = built("grouped-mlp")
    assert isinstance(model, GroupedMLPNet) and isinstance(single, GroupedMLPNet)
    for net in (model, single):
        mlps = [block.mlp for block in net.blocks]
        for i, mlp in enumerate(mlps):
            assert mlp is net.mlps[i // net.group_size]
        assert len({id(m) for m in mlps}) == len(net.mlps) == 2
    assert count(single, BranchedLinear) == 0
    assert count(single, nn.Linear) == 4 * model.depth + 2 * len(model.mlps)
    assert all(m not in set(model.modules()) for m in single.modules())


def test_grouped_mlp_odd_depth() -> None:
    model = grouped_mlp_net(depth=3, group_size=2, dim=32).eval()
    single = ZOO["grouped-mlp"].single_path(model)
    assert len(single.mlps) == 2 and single.blocks[2].mlp is single.mlps[1]
    x = model.example_input(2)
    with torch.no_grad():
        assert rel_err(model(x), single(x)) <= 1e-5
