"""``expand`` / ``merge`` / ``fold``: the training side of reparameterization.

expand is exact at initialisation (fp32 and float64), its branches differ, the user's model is untouched,
selection works by type, name and predicate; merge is exact and keeps training working; and
``fold(expand(m))`` is ``fold(m)`` again: same op and parameter counts, same outputs.
"""

from __future__ import annotations

import re
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn, rel_err, snapshot
from torch import nn

import branchfold
from branchfold.passes.pipeline import count_ops, count_params
from branchfold.training import BranchedConv, BranchedLinear
from branchfold.training.modules import pad_centred
from branchfold.zoo import ZOO, grouped_mlp_net, seed_vit


def run(model: nn.Module, *xs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(*xs)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def only_child(model: nn.Module) -> nn.Module:
    (child,) = model.children()
    return child


# ------------------------------------------------------------------------------------------------
# expand: exact, branches differ, nothing of the user's modified


def test_linear_expansion_is_exact_with_differing_branches() -> None:
    model = nn.Sequential(nn.Linear(24, 40))
    model[0].bias.requires_grad_(False)
    x = torch.randn(8, 24, generator=gen())
    expanded = branchfold.expand(model, branches=4)
    block = only_child(expanded)
    assert isinstance(block, BranchedLinear) and len(block.branches) == 4
    assert (block.in_features, block.out_features) == (24, 40)
    assert rel_err(run(model, x), run(expanded, x)) <= 1e-6
    weights = [b.weight.detach() for b in block.branches]
    assert all(not torch.allclose(weights[i], weights[j], atol=1e-3) for i in range(4) for j in range(i))
    assert all(b.weight.requires_grad and not b.bias.requires_grad for b in block.branches)
    assert torch.allclose(block.weight, model[0].weight, atol=1e-6)  # the summed-weight property
    assert torch.allclose(block.bias, model[0].bias, atol=1e-6)


CONVS = {  # name: (conv, input shape)
    "3x3": (lambda: nn.Conv2d(8, 8, 3, padding=1), (2, 8, 10, 10)),
    "grouped": (lambda: nn.Conv2d(8, 12, 3, padding=1, groups=4), (2, 8, 9, 9)),
    "depthwise": (lambda: nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False), (2, 8, 9, 9)),
    "strided": (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1), (2, 8, 11, 11)),
    "dilated": (lambda: nn.Conv2d(8, 16, 3, padding=2, dilation=2), (2, 8, 12, 12)),
    "same": (lambda: nn.Conv2d(8, 8, (3, 5), padding="same"), (2, 8, 9, 9)),
    "conv1d": (lambda: nn.Conv1d(6, 6, 3, padding=1), (2, 6, 20)),
}
KERNELS = {  # (style, conv) -> the branch kernels expand writes, "+id" when an identity branch is added
    ("repvgg", "3x3"): [(3, 3), (1, 1), "+id"], ("repvgg", "grouped"): [(3, 3), (1, 1)],
    ("repvgg", "depthwise"): [(5, 5), (1, 1), "+id"], ("repvgg", "strided"): [(3, 3), (1, 1)],
    ("repvgg", "dilated"): [(3, 3), (1, 1)], ("repvgg", "same"): [(3, 5), (1, 1), "+id"],
    ("repvgg", "conv1d"): [(3,), (1,), "+id"],
    ("acnet", "3x3"): [(3, 3), (3, 1), (1, 3)], ("acnet", "grouped"): [(3, 3), (3, 1), (1, 3)],
    ("acnet", "depthwise"): [(5, 5), (5, 1), (1, 5)], ("acnet", "strided"): [(3, 3), (3, 1), (1, 3)],
    ("acnet", "dilated"): [(3, 3), (3, 1), (1, 3)], ("acnet", "same"): [(3, 5), (3, 1), (1, 5)],
}  # fmt: skip


def kernels(block: BranchedConv) -> list:
    return [tuple(b.kernel_size) for b in block.branches] + (["+id"] if block.identity is not None else [])


@pytest.mark.parametrize("style", ["repvgg", "acnet", "parallel"])
@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_expansion_is_exact_for_every_style_and_geometry(style: str, name: str) -> None:
    build, shape = CONVS[name]
    torch.manual_seed(0)
    model = nn.Sequential(build())
    x = torch.randn(shape, generator=gen())
    if style == "acnet" and name == "conv1d":  # a 1-d kernel has no smaller 1xK / Kx1 branch
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert isinstance(only_child(branchfold.expand(model, conv_style=style)), nn.Conv1d)
        return
    block = only_child(branchfold.expand(model, branches=3, conv_style=style))
    assert isinstance(block, BranchedConv)
    assert kernels(block) == KERNELS.get((style, name), [model[0].kernel_size] * 3)
    assert rel_err(run(model, x), run(block, x)) <= 1e-6
    main, other = block.branches[0].weight, pad_centred(block.branches[1].weight, block.kernel_size)
    overlap = other != 0
    assert not torch.allclose(main[overlap], other[overlap], atol=1e-3)  # the branches differ where both act
    assert torch.allclose(block.weight, model[0].weight, atol=1e-6)
    geometry = ("stride", "padding", "dilation", "groups", "in_channels", "out_channels", "kernel_size")
    assert all(getattr(block, g) == getattr(model[0], g) for g in geometry)
    # float64: the split itself adds nothing beyond float64 rounding
    model64 = model.double()
    expanded64 = branchfold.expand(model64, branches=3, conv_style=style)
    assert rel_err(run(model64, x.double()), run(expanded64, x.double())) <= 1e-12


def test_expand_leaves_the_users_model_alone_and_is_deterministic() -> None:
    model = randomize_bn(ZOO["repvgg"].single_path(ZOO["repvgg"].build()))
    before, structure, params = snapshot(model), repr(model), [id(p) for p in model.parameters()]
    a = branchfold.expand(model, branches=3)
    b = branchfold.expand(model, branches=3)
    c = branchfold.expand(model, branches=3, generator=gen(1))
    after = snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert repr(model) == structure and [id(p) for p in model.parameters()] == params
    assert not {id(p) for p in a.parameters()} & set(params)  # fresh parameters only
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert a.training == model.training


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.patch = nn.Conv2d(8, 8, 2, stride=2)  # even kernel: no RepVGG/ACNet form
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(torch.relu(self.stem(x))).mean((2, 3))
        return self.block(self.fc2(torch.relu(self.fc1(x))))


def expanded_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (BranchedLinear, BranchedConv))}


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (None, None, {"stem", "fc1", "fc2", "block.0", "block.1"}),
        (nn.Linear, "block", {"fc1", "fc2"}),
        ("fc*", "fc2", {"fc1"}),
        ("*.1", None, {"block.1"}),
        (re.compile(r"fc\d"), None, {"fc1", "fc2"}),
        (lambda name, m: isinstance(m, nn.Linear) and m.out_features == 16, None, {"fc1"}),
        ([nn.Conv2d, "fc2"], ["patch"], {"stem", "fc2"}),
        ("block", None, {"block.0", "block.1"}),  # a pattern that matches an ancestor selects its layers
        (None, re.compile("bl.*k"), {"stem", "fc1", "fc2"}),
    ],
)
def test_selection_by_type_name_and_predicate(include, exclude, expected) -> None:
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expanded = branchfold.expand(model, branches=2, include=include, exclude=exclude)
    assert expanded_names(expanded) == expected
    x = torch.randn(2, 3, 8, 8, generator=gen())
    assert rel_err(run(model, x), run(expanded, x)) <= 1e-6


def test_a_selected_module_that_cannot_be_expanded_is_named_in_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"patch \(even kernel\)"):
        expanded = branchfold.expand(Net(), include=nn.Conv2d)
    assert expanded_names(expanded) == {"stem"}
    assert expanded_names(branchfold.expand(Net(), include=nn.Conv2d, conv_style="parallel")) == {"stem", "patch"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing named when the default selection skips the patch conv
        assert "patch" not in expanded_names(branchfold.expand(Net()))


def test_tied_weights_stay_tied_and_shared_modules_stay_shared() -> None:
    shared = nn.Linear(8, 8)
    tied_a, tied_b = nn.Linear(8, 8), nn.Linear(8, 8)
    tied_b.weight = tied_a.weight
    model = nn.Sequential(shared, nn.ReLU(), shared, tied_a, tied_b)
    expanded = branchfold.expand(model, branches=2)
    assert isinstance(expanded[0], BranchedLinear) and expanded[0] is expanded[2]
    assert type(expanded[3]) is nn.Linear and expanded[3].weight is expanded[4].weight
    x = torch.randn(3, 8, generator=gen())
    assert rel_err(run(model, x), run(expanded, x)) <= 1e-6
    report = branchfold.merge(expanded, branches=1)
    assert len(report) == 1 and type(expanded[0]) is nn.Linear and expanded[0] is expanded[2]


def test_an_already_expanded_model_is_not_expanded_again() -> None:
    once = branchfold.expand(nn.Sequential(nn.Linear(4, 4)), branches=2)
    twice = branchfold.expand(once, branches=3)
    assert [len(m.branches) for m in twice.modules() if isinstance(m, BranchedLinear)] == [2]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="branches must be >= 2"):
        branchfold.expand(nn.Linear(2, 2), branches=1)
    with pytest.raises(ValueError, match="conv_style"):
        branchfold.expand(nn.Linear(2, 2), conv_style="dbb")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="branches must be >= 1"):
        branchfold.merge(nn.Linear(2, 2), branches=0)


# ------------------------------------------------------------------------------------------------
# merge


@pytest.mark.parametrize(
    ("style", "target", "expected"),
    [
        ("parallel", 2, [(3, 3), (3, 3)]),
        ("repvgg", 2, [(3, 3), (1, 1)]),  # the identity goes into the 1x1
        ("repvgg", 1, [(3, 3)]),
        ("acnet", 2, [(3, 3), (3, 1)]),  # the 1x3 goes into the 3x3
    ],
)
def test_merge_is_exact_and_style_consistent(style: str, target: int, expected: list) -> None:
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Linear(10, 6))
    expanded = branchfold.expand(model, branches=4, conv_style=style).train()
    x = torch.randn(4, 8, 10, 10, generator=gen())
    before = run(expanded, x)  # training mode: BatchNorm uses batch statistics, merge must not care
    report = branchfold.merge(expanded, branches=target)
    assert rel_err(before, run(expanded, x)) <= 1e-6
    conv = expanded[0]
    got = [tuple(conv.kernel_size)] if isinstance(conv, nn.Conv2d) else kernels(conv)
    assert got == expected
    assert len(expanded[3].branches) == target if target > 1 else type(expanded[3]) is nn.Linear
    assert {r.module for r in report.replaced} == {"0", "3"}
    assert all(p.requires_grad for p in report.new_parameters)
    names = set(dict(expanded.named_parameters()))
    assert all(n in names for r in report.replaced for n in r.new)


def test_merge_consolidates_the_zoo_seed_vit() -> None:
    """The zoo's seed ViT is built of the same BranchedLinear: merge reduces it, merge(1) is its single path."""
    model = seed_vit(depth=1, branches=4, dim=32, heads=2).eval()
    x = model.example_input(2)
    ref, single = run(model, x), ZOO["seed-vit"].single_path(model)
    report = branchfold.merge(model, branches=2)
    assert len(report) == 6 and rel_err(ref, run(model, x)) <= 1e-6
    branchfold.merge(model, branches=1)
    assert repr(model).replace("SeedViT", "") == repr(single).replace("SeedViT", "")
    assert rel_err(run(single, x), run(model, x)) <= 1e-6


def test_parallel_merge_sums_contiguous_groups() -> None:
    expanded = branchfold.expand(nn.Sequential(nn.Linear(6, 6)), branches=5)
    old = [b.weight.detach().double() for b in expanded[0].branches]
    report = branchfold.merge(expanded, branches=2)
    new = [b.weight.detach().double() for b in expanded[0].branches]
    # groups of near-equal size: 5 -> [0, 1] + [2, 3, 4]... whichever split, each new branch is a contiguous sum
    sums = {(i, j): sum(old[i:j]) for i in range(5) for j in range(i + 1, 6)}
    spans = [next(k for k, s in sums.items() if torch.allclose(s, w, atol=1e-6)) for w in new]
    assert sorted(spans) == [(0, 2), (2, 5)] or sorted(spans) == [(0, 3), (3, 5)]
    assert len(report.old_parameters) == 10 and len(report.new_parameters) == 4


def test_update_optimizer_swaps_parameters_and_keeps_other_state() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    expanded = branchfold.expand(model, branches=4, include="0")
    opt = torch.optim.Adam([{"params": list(expanded[0].parameters()), "lr": 1e-2},
                            {"params": list(expanded[2].parameters()), "lr": 1e-3}])  # fmt: skip
    expanded(torch.randn(3, 4)).sum().backward()
    opt.step()
    kept_state = {id(p): opt.state[p]["exp_avg"].clone() for p in expanded[2].parameters()}
    report = branchfold.merge(expanded, branches=2)
    assert report.update_optimizer(opt) is opt
    assert [set(map(id, g["params"])) for g in opt.param_groups] == [
        {id(p) for p in expanded[0].parameters()}, {id(p) for p in expanded[2].parameters()}]  # fmt: skip
    assert not any(id(p) in {id(q) for q in opt.state} for p in report.old_parameters)
    assert all(torch.equal(opt.state[p]["exp_avg"], kept_state[id(p)]) for p in expanded[2].parameters())
    opt.zero_grad()
    expanded(torch.randn(3, 4)).sum().backward()
    opt.step()  # the new parameters train


# ------------------------------------------------------------------------------------------------
# fold(expand(m)) == fold(m)


def assert_round_trip(model: nn.Module, inputs: tuple, style: str = "repvgg", capture: str = "export") -> None:
    model = model.eval()
    expanded = branchfold.expand(model, branches=3, conv_style=style).eval()
    plain = branchfold.fold_with_report(model, inputs, capture=capture, verify=False)
    deploy = branchfold.fold_with_report(expanded, inputs, capture=capture, verify=False)
    assert expanded_names(expanded)
    assert deploy.report.before.ops > plain.report.before.ops  # the branches were really there
    assert deploy.report.after.ops == plain.report.after.ops
    assert deploy.report.after.params == plain.report.after.params
    assert count_params(deploy.model) == count_params(plain.model)
    new = tuple(torch.randn(x.shape, generator=gen(7)) for x in inputs)
    ref = run(model, *new)
    assert rel_err(ref, run(deploy.model, *new)) <= 1e-5
    assert rel_err(ref, run(expanded, *new)) <= 1e-5


SMALL_ZOO = {  # the zoo's single-path models, at test size where the zoo's default is larger
    "seed-vit": partial(seed_vit, depth=1, branches=2, dim=32, heads=2),
    "grouped-mlp": partial(grouped_mlp_net, depth=2, dim=32),
}


@pytest.mark.parametrize("name", sorted(set(ZOO) - {"seed-vit-k2"}))  # same single path as seed-vit
def test_round_trip_on_the_zoo_single_paths(name: str) -> None:
    entry = ZOO[name]
    model = entry.single_path(SMALL_ZOO.get(name, entry.build)())
    style = {"acnet": "acnet", "dbb": "parallel"}.get(name, "repvgg")
    assert_round_trip(model, entry.example_input(model, 2), style)


@pytest.mark.parametrize("style", ["repvgg", "acnet", "parallel"])
def test_round_trip_with_symbolic_trace(style: str) -> None:
    model = randomize_bn(ZOO["repvgg"].single_path(ZOO["repvgg"].build()))
    assert_round_trip(model, (model.example_input(2),), style, capture="symbolic_trace")


HF = {  # name -> Hugging Face (class, config class, small config); built from random weights
    "vit": ("ViTModel", "ViTConfig", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, image_size=32, patch_size=8)),
    "resnet": ("ResNetModel", "ResNetConfig", dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                                   layer_type="bottleneck")),
    "convnext": ("ConvNextModel", "ConvNextConfig", dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                                         layer_scale_init_value=0.5)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HF))
def test_round_trip_on_hugging_face_models(name: str) -> None:
    transformers = pytest.importorskip("transformers")
    model_class, config_class, config = HF[name]
    torch.manual_seed(0)
    model = randomize_bn(getattr(transformers, model_class)(getattr(transformers, config_class)(**config)))
    g = gen(3)
    with torch.no_grad():  # Hugging Face initialises biases to zero, which folding may drop: make them count
        for p in (p for n, p in model.named_parameters() if n.endswith("bias")):
            p.normal_(std=0.1, generator=g)
    assert_round_trip(model, (torch.randn(2, 3, 32, 32, generator=gen()),), "parallel" if name == "vit" else "repvgg")


# ------------------------------------------------------------------------------------------------
# expand -> train -> merge(2) -> train -> merge(1) / fold, exact at every step


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ))  # fmt: skip


def small_vit() -> nn.Module:
    return seed_vit(depth=1, branches=1, dim=32, heads=2, image_size=16, patch=4)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = gen(seed)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(("build", "style"), [(small_cnn, "repvgg"), (small_cnn, "acnet"), (small_vit, "repvgg")])
def test_expand_train_merge_train_fold_is_exact_at_every_step(build, style: str) -> None:
    model = build()
    x = torch.randn(4, 3, 16, 16, generator=gen(5))
    expanded = branchfold.expand(model, branches=4, conv_style=style)
    assert rel_err(run(model.eval(), x), run(expanded.eval(), x)) <= 1e-5

    before = {n: p.detach().clone() for n, p in expanded.named_parameters()}
    opt = torch.optim.SGD(expanded.parameters(), lr=0.05, momentum=0.9)
    train(expanded, opt, 3, seed=1)
    assert all(not torch.equal(before[n], p) for n, p in expanded.named_parameters() if n.endswith("weight"))

    for mode in ("train", "eval"):  # merging is exact in training mode too (BatchNorm is outside the branches)
        getattr(expanded, mode)()
        ref = run(expanded, x)
        report = branchfold.merge(expanded, branches=2)
        assert rel_err(ref, run(expanded, x)) <= 1e-5
        assert mode == "eval" or len(report) > 0
    assert all(len(m.branches) <= 2 for m in expanded.modules() if isinstance(m, (BranchedLinear, BranchedConv)))

    opt = torch.optim.Adam(expanded.parameters(), lr=1e-3)
    train(expanded, opt, 3, seed=2)
    expanded.eval()
    ref = run(expanded, x)
    deploy = branchfold.fold(expanded, (x,))
    assert rel_err(ref, run(deploy, x)) <= 1e-5
    assert count_ops(deploy) == count_ops(branchfold.fold(model.eval(), (x,)))

    report = branchfold.merge(expanded, branches=1)
    report.update_optimizer(opt)
    assert not expanded_names(expanded)
    assert rel_err(ref, run(expanded, x)) <= 1e-5
    assert [type(m) for m in expanded.modules()] == [type(m) for m in model.modules()]
    train(expanded, opt, 1, seed=3)  # the consolidated model trains on with the updated optimizer
