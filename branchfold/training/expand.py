"""``expand``: a copy of a model whose selected linears and convs are trained as several summed branches.

Module replacement, not graph rewriting: the copy is an ordinary ``nn.Module`` tree that trains in eager
mode with any optimizer.  At initialisation it computes the original function (the branch weights sum to
the original weight, see ``split.py``), so a pretrained model can be expanded and fine-tuned; ``merge``
reduces the branches during training and ``branchfold.fold`` removes them for deployment.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from branchfold import compat
from branchfold.rewriter.affine import Conv, Dense, value

from .maps import branch_maps, layer_map, sum_maps
from .modules import CONV_TYPES, BranchedConv, BranchedLinear
from .split import IDENTITY, Footprint, split_weight

ConvStyle = Literal["repvgg", "acnet", "parallel"]
Selector = type[nn.Module] | str | re.Pattern[str] | Callable[[str, nn.Module], bool]
"""A module type (``isinstance``); an fnmatch pattern or a compiled regex, matched against the whole
qualified name of the module or of one of its ancestors (``"blocks.0"`` selects every layer in that
block, ``"*.fc?"`` the ``fc1``/``fc2`` layers anywhere); or a predicate ``(name, module) -> bool``, asked
about each linear and conv."""
Selection = Selector | Sequence[Selector]
_DEFAULT_TYPES = (nn.Linear, *CONV_TYPES)
_BRANCHED = (BranchedLinear, BranchedConv)


def expand(
    model: nn.Module,
    branches: int = 4,
    *,
    include: Selection | None = None,
    exclude: Selection | None = None,
    conv_style: ConvStyle = "repvgg",
    spread: float = 1.0,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """A deep copy of ``model`` in which every selected linear and conv is a sum of branches.

    - ``nn.Linear`` → ``BranchedLinear`` of ``branches`` parallel linears.
    - ``nn.Conv{1,2,3}d``, by ``conv_style``: ``"repvgg"`` KxK + 1x1 (+ a learnable per-channel identity
      where input and output channels match and the stride is 1); ``"acnet"`` KxK + a 1..K..1 kernel
      along each spatial axis (1xK and Kx1 in 2-d); ``"parallel"`` ``branches`` convs of the original
      geometry.  RepVGG and ACNet need zero padding that centres an odd kernel (``dilation * (K-1) / 2``)
      and a kernel of at least 3 along some axis; other convs (patch embeddings, even or 1x1 kernels)
      stay as they are with these styles.  ``branches`` counts the branches of linears and of
      ``"parallel"`` convs; RepVGG and ACNet convs have their own two or three.
    - Selection: by default every module of exactly these types (subclasses may compute something else);
      ``include`` / ``exclude`` take ``Selector`` s or lists of them.  A module whose weight is shared with
      another module (tied weights) is never expanded, since that would untie it; a module object used
      at several places is expanded once and stays shared.  Modules selected through ``include`` that
      cannot be expanded are named in a warning.
    - The branch weights are ``w / c + δ_i`` per tap (``c`` branches cover it) with ``Σ δ_i = 0`` and
      ``δ`` of RMS ``spread`` × the weight's RMS, from ``generator`` (seed 0 if None); biases likewise.
      Their sum is checked against the original weight in float64 before the cast to the model's dtype,
      so the copy computes the original function up to that rounding.  New parameters are trainable as
      the originals were; a BatchNorm after a conv stays after the (branched) conv.  There is no
      per-branch BatchNorm (as RepVGG trains with): it could not be exact at initialisation in training
      mode, where each branch's batch statistics differ.

    Note that parallel branches of one linear receive identical gradients: their split changes weight
    decay and the effective learning rate of the sum, not the direction of its updates.
    """
    if branches < 2:
        raise ValueError(f"branches must be >= 2, got {branches}")
    if conv_style not in ("repvgg", "acnet", "parallel"):
        raise ValueError(f"conv_style must be 'repvgg', 'acnet' or 'parallel', got {conv_style!r}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    new = copy.deepcopy(model)
    shared = _shared_parameters(new)
    done: dict[int, nn.Module | None] = {}  # id(original submodule) -> its expansion (None: left alone)
    skipped: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in compat.child_modules(parent):
            if child is None:
                continue
            qualified = f"{prefix}{name}"
            if id(child) not in done:
                done[id(child)] = None
                if isinstance(child, _BRANCHED):
                    continue
                if _selected(qualified, child, include, exclude):
                    reason = _refusal(child, shared, conv_style)
                    if reason is None:
                        done[id(child)] = _expand_layer(child, branches, conv_style, spread, generator)
                    elif include is not None:
                        skipped.append(f"{qualified} ({reason})")
                if done[id(child)] is None:
                    visit(child, f"{qualified}.")
            if done[id(child)] is not None:
                setattr(parent, name, done[id(child)])

    visit(new, "")
    if skipped:
        warnings.warn(f"expand left {len(skipped)} selected module(s) as they are: {'; '.join(skipped)}",
                      stacklevel=2)  # fmt: skip
    return new


def _matches(selection: Selection, name: str, module: nn.Module) -> bool:
    if isinstance(selection, Sequence) and not isinstance(selection, str):
        return any(_matches(s, name, module) for s in selection)
    if isinstance(selection, type):
        return isinstance(module, selection)
    if isinstance(selection, (str, re.Pattern)):
        parts = name.split(".")
        scopes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]  # the module, then its ancestors
        if isinstance(selection, str):
            return any(fnmatch.fnmatchcase(scope, selection) for scope in scopes)
        return any(selection.fullmatch(scope) is not None for scope in scopes)
    return bool(selection(name, module))


def _selected(name: str, module: nn.Module, include: Selection | None, exclude: Selection | None) -> bool:
    if not isinstance(module, _DEFAULT_TYPES):
        return False
    if include is None:
        if type(module) not in _DEFAULT_TYPES:
            return False
    elif not _matches(include, name, module):
        return False
    return exclude is None or not _matches(exclude, name, module)


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module object (tied weights)."""
    owners: dict[int, set[int]] = defaultdict(set)
    for module in model.modules():
        for _, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners[id(p)].add(id(module))
    return {p for p, modules in owners.items() if len(modules) > 1}


def _refusal(layer: nn.Module, shared: set[int], conv_style: ConvStyle) -> str | None:
    """Why ``layer`` cannot be expanded, or None."""
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in params):
        return "uninitialized lazy module"
    if any(id(p) in shared for p in params):
        return "shared weight"
    if isinstance(layer, CONV_TYPES):
        footprints = conv_footprints(layer, conv_style, 2)
        if isinstance(footprints, str):
            return footprints
    return None


def conv_footprints(conv: nn.Module, style: ConvStyle, branches: int) -> list[Footprint] | str:
    """The branch footprints ``style`` gives ``conv`` (the full kernel first), or why it cannot."""
    kernel = tuple(conv.kernel_size)
    if style == "parallel":
        return [kernel] * branches
    if type(conv) not in CONV_TYPES:
        return f"{type(conv).__name__} is not a plain conv"
    if conv.padding_mode != "zeros":
        return f"padding mode {conv.padding_mode!r}"
    if any(k % 2 == 0 for k in kernel):
        return "even kernel"
    centred = tuple(d * (k - 1) // 2 for k, d in zip(kernel, conv.dilation))
    padding = conv.padding if not isinstance(conv.padding, str) else centred if conv.padding == "same" else None
    if tuple(padding or ()) != centred:
        return f"padding {conv.padding} does not centre the kernel {kernel}"
    if max(kernel) < 3:
        return "1x1 kernel"
    footprints: list[Footprint] = [kernel]
    if style == "repvgg":
        footprints.append((1,) * len(kernel))
        if conv.in_channels == conv.out_channels and all(s == 1 for s in conv.stride):
            footprints.append(IDENTITY)
        return footprints
    for axis, k in enumerate(kernel):
        along = tuple(k if i == axis else 1 for i in range(len(kernel)))
        if k > 1 and along not in footprints:
            footprints.append(along)
    return footprints if len(footprints) > 1 else "no 1xK / Kx1 branch smaller than the kernel"


@torch.no_grad()
def _expand_layer(
    layer: nn.Module, branches: int, style: ConvStyle, spread: float, generator: torch.Generator
) -> nn.Module:
    """The branched module equal to ``layer``: built in float64, checked, then cast to ``layer``'s dtype."""
    is_conv = isinstance(layer, CONV_TYPES)
    footprints = conv_footprints(layer, style, branches) if is_conv else [()] * branches
    assert not isinstance(footprints, str)
    split = split_weight(layer.weight, layer.bias, footprints, groups=getattr(layer, "groups", 1),
                         spread=spread, generator=generator)  # fmt: skip
    modules = []
    for footprint, w, b in zip(footprints, split.weights, split.biases):
        if footprint == IDENTITY:
            continue
        branch = copy.deepcopy(layer) if footprint == footprints[0] else _small_conv(layer, footprint)
        branch.weight = _like(w, layer.weight)
        branch.bias = _like(b, layer.bias) if b is not None else None
        modules.append(branch)
    if not is_conv:
        block: nn.Module = BranchedLinear.from_branches(modules)
    else:
        identity = None
        if IDENTITY in footprints:
            scale = split.weights[footprints.index(IDENTITY)]
            identity = _like(scale.reshape(-1, *[1] * (layer.weight.dim() - 2)), layer.weight)
        block = BranchedConv(modules, identity)
    _check_sum(layer, block)
    return block.to(device=layer.weight.device, dtype=layer.weight.dtype).train(layer.training)


def _like(value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    """A float64 parameter, trainable as ``like``; ``block.to`` casts it once the sum is checked."""
    return nn.Parameter(value.to(torch.float64), requires_grad=like.requires_grad)


def _small_conv(conv: nn.Module, kernel: tuple[int, ...]) -> nn.Module:
    """A plain conv of ``conv``'s geometry with a centred smaller ``kernel`` (padding shrunk to match)."""
    padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, conv.dilation))
    return nn.utils.skip_init(
        type(conv), conv.in_channels, conv.out_channels, kernel, stride=conv.stride, padding=padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, dtype=torch.float64,
    )  # fmt: skip


def _check_sum(layer: nn.Module, block: nn.Module) -> None:
    """The float64 branch sum equals ``layer``'s map (up to float64 rounding), geometry included."""
    want, got = layer_map(layer), sum_maps(branch_maps(block))
    assert isinstance(got, (Dense, Conv)) and type(got) is type(want)
    if isinstance(want, Conv):
        assert isinstance(got, Conv)
        if (got.stride, got.padding, got.dilation, got.groups) != (want.stride, want.padding, want.dilation,
                                                                   want.groups):  # fmt: skip
            raise RuntimeError(f"expanded conv changed geometry: {got} vs {want}")
    got_w, got_b, want_w, want_b = value(got.weight), value(got.bias), value(want.weight), value(want.bias)
    scale = max(want_w.abs().max().item(), want_b.abs().max().item() if want_b.numel() else 0.0, 1e-30)
    err = max((got_w - want_w).abs().max().item(), (got_b - want_b).abs().max().item())
    if err > 1e-12 * scale:
        raise RuntimeError(f"expanded branches do not sum to the original weight (error {err:.3g})")
