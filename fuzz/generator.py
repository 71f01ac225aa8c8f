"""Random model specs (plain dicts, so a failing one prints, shrinks and pastes into a test) and the
torch modules they describe.

A spec is a stack of blocks over one input: ``conv1d``/``conv2d``/``conv3d`` domains read ``[B, C, *S]``,
the ``seq`` domain reads ``[B, T, D]``. Each block is one of

- ``branches``: K paths of ops from the block input, summed in a drawn style (``+``, ``sum(...)``,
  ``torch.add``, ``+=``, ``add_``, a random binary tree), then an activation;
- ``chain``: ops one after another, then an activation;
- ``residual``: ``x + chain(x)``, then an activation;
- ``shared``: one module used at two sites (``m(x) + m(bn(x))`` or ``m(act(m(x)))``): must not be folded
  into a site-specific map.

Ops mix what folds (linear, conv with random geometry, BatchNorm, LayerNorm, constant scale/shift,
average pooling, identity, eval Dropout) with what must not (training-mode BatchNorm/Dropout, a constant
varying along the wrong axis, asymmetric padding before a conv, weights computed at run time, a shift
before a zero-padded conv arises from the draws) and with nonlinearities, including the hand-written
GELU / SiLU / LayerNorm / RMSNorm forms the exporters decompose.

Blocks the generator *knows* to fold (every branch linear and aligned, the fused op not costlier than
the branches, by the project's cost rule) carry ``"foldable": True``; ``op_bound`` turns those into the
most linear/conv/BatchNorm ops a correct fold may leave.
"""

from __future__ import annotations

import copy
import math
import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Spec = dict[str, Any]
ACTS = ("relu", "gelu", "gelu_tanh", "silu", "hardswish", "hand_gelu_tanh", "hand_gelu_erf", "hand_silu",
        "hand_layernorm", "hand_rmsnorm")  # fmt: skip
SUM_STYLES = ("+", "sum", "torch.add", "+=", "add_", "tree")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# drawing specs


def conv_out(size: int, k: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1


class _Draw:
    """Draws blocks for one domain, tracking the current shape (channels, spatial or sequence)."""

    def __init__(self, rng: random.Random, domain: str, channels: int, spatial: list[int]) -> None:
        self.rng, self.domain = rng, domain
        self.c, self.spatial = channels, spatial
        self.dims = 0 if domain == "seq" else int(domain[4])
        self.opaque = True  # the current value is not an affine map of anything (model input or after an act)
        self.train_dropout_used = False

    # -- helpers
    def pick(self, *options):
        return self.rng.choice(options)

    def channels(self) -> int:
        return self.rng.randint(2, 8)

    def groups_for(self, cin: int, cout: int) -> int:
        return self.rng.choice([g for g in (1, 1, 2, 4, cin) if cin % g == 0 and cout % g == 0])

    def act(self, allow_none: bool = True) -> str:
        options = list(ACTS) + (["none"] if allow_none else [])
        return self.rng.choice(options)

    # -- blocks
    def block(self) -> Spec:
        shape_in = [self.c, *self.spatial]
        r = self.rng.random()
        if r < 0.45:
            b = self.branches_block()
        elif r < 0.7:
            b = self.chain_block()
        elif r < 0.85:
            b = self.residual_block()
        else:
            b = self.shared_block()
        b["in"] = shape_in
        return b

    def finish(self, block: Spec, act: str) -> Spec:
        block["act"] = act
        self.opaque = act != "none"
        return block

    def branches_block(self) -> Spec:
        foldable = self.opaque and self.rng.random() < 0.6
        block = self.seq_branches(foldable) if self.domain == "seq" else self.conv_branches(foldable)
        block["style"] = self.pick(*SUM_STYLES)
        block["tree"] = _tree(self.rng, len(block["branches"]))
        if block["style"] in ("+=", "add_"):  # the accumulator must be a fresh tensor, not an alias of the input
            fresh = [i for i, b in enumerate(block["branches"]) if b and b[0]["op"] not in ("identity", "dropout")]
            if not fresh:
                block["style"] = "+"
            else:
                i = fresh[0]
                block["branches"].insert(0, block["branches"].pop(i))
        if block.get("foldable"):
            return self.finish(block, self.act(allow_none=False))
        return self.finish(block, self.act())

    def conv_branches(self, foldable: bool) -> Spec:
        """K branches of aligned geometry (odd kernels, "same" padding, one stride); ``foldable`` keeps
        to the forms whose single-op fold is known, and recomputes the cost rule to say so."""
        c, d, rng = self.c, self.dims, self.rng
        cout = c if foldable or rng.random() < 0.5 else self.channels()
        stride = rng.choice([1, 1, 1, 2]) if min(self.spatial) >= 4 else 1
        dilation = 1 if foldable else rng.choice([1, 1, 2])
        groups = self.groups_for(c, cout)
        k = rng.randint(2, 4)
        branches, cost, common, kernel, pooled = [], 0, groups, [1] * d, False
        for i in range(k):
            kinds = ["conv", "conv", "conv", "1x1-kxk", "pool", "identity"]
            if not foldable:
                kinds += ["scale", "bn", "bad-scale", "train-bn", "dropout", "runtime-conv", "padconv"]
            kind = rng.choice(kinds) if i else "conv"
            if kind in ("identity", "scale", "bn", "bad-scale", "train-bn", "dropout", "pool") and (
                stride != 1 or cout != c
            ):
                kind = "conv"
            if kind == "padconv" and (stride != 1 or dilation != 1):
                kind = "conv"
            if kind == "pool" and (min(self.spatial) < 3 or (foldable and pooled)):
                kind = "conv"  # two pool branches are one value after an exporter's CSE: a diamond, not a sum
            pooled = pooled or kind == "pool"
            bn = rng.random() < 0.5
            ops: list[Spec] = []
            if kind == "conv":
                ks = [rng.choice([1, 3, 3, 5]) for _ in range(d)] if rng.random() < 0.5 else [rng.choice([1, 3, 5])] * d
                ops.append(_conv(c, cout, ks, stride, [dilation * (q // 2) for q in ks], dilation, groups, not bn))
                cost += c * cout // groups * math.prod(ks)
            elif kind == "1x1-kxk":
                kk = rng.choice([1, 3])
                mid = c
                ops += [_conv(c, mid, [1] * d, 1, [0] * d, 1, 1, False),
                        _conv(mid, cout, [kk] * d, stride, [dilation * (kk // 2)] * d, dilation, 1, not bn)]  # fmt: skip
                ks = [kk] * d
                cost += c * mid + mid * cout * kk**d
                common = 1
            elif kind == "pool":
                ops.append({"op": "avgpool", "k": 3, "stride": 1, "pad": 1, "include_pad": foldable or rng.random() < 0.7})
                ks = [3] * d
                cost += c * 3**d
                common = math.gcd(common, c)
            elif kind == "identity":
                ops.append({"op": "identity"})
                ks = [1] * d
                cost += c if bn else 0
                common = math.gcd(common, c)
            elif kind == "padconv":
                kk = rng.choice([2, 3])
                ops.append({"op": "padconv", "cin": c, "cout": cout, "k": kk, "pad": [0, kk - 1], "bias": rng.random() < 0.5})
                ks = [kk] * d
            elif kind == "runtime-conv":
                kk = rng.choice([1, 3])
                ops.append({"op": "runtime_conv", "cin": c, "cout": cout, "k": kk, "stride": stride, "pad": dilation * (kk // 2),
                            "dilation": dilation})  # fmt: skip
                ks = [kk] * d
            else:
                ops.append(self.diagonal_op(kind))
                ks = [1] * d
            if bn:
                ops.append({"op": "bn", "c": cout, "train": False})
                cost += cout
            kernel = [max(a, b) for a, b in zip(kernel, ks)]
            branches.append(ops)
        cost += cout * (k - 1)
        after = c * cout // common * math.prod(kernel)
        block = {"kind": "branches", "branches": branches}
        if foldable and after <= cost:
            block["foldable"] = True
        self.spatial = [conv_out(s, 1, stride, 0, 1) for s in self.spatial]
        self.c = cout
        return block

    def diagonal_op(self, kind: str) -> Spec:
        """Per-channel ops (and their traps) of the current shape."""
        c = self.c
        if kind == "scale":
            return {"op": self.pick("scale", "shift", "scalar"), "c": c}
        if kind == "bn":
            return {"op": "bn", "c": c, "train": False}
        if kind == "train-bn":
            return {"op": "bn", "c": c, "train": True}
        if kind == "dropout":
            train = not self.train_dropout_used and self.rng.random() < 0.5
            self.train_dropout_used |= train
            return {"op": "dropout", "p": 0.3, "train": train}
        if kind == "bad-scale":  # varies along a non-channel axis
            return {"op": self.pick("wrong_scale", "wrong_shift"), "c": c, "shape": self.wrong_shape()}
        raise ValueError(kind)

    def wrong_shape(self) -> list[int]:
        if self.domain == "seq":
            return [self.spatial[0], 1]  # along the sequence, not the features
        shape = [1, 1] + [1] * self.dims
        axis = self.rng.randrange(self.dims)
        shape[2 + axis] = self.spatial[axis]
        return shape

    def seq_branches(self, foldable: bool) -> Spec:
        d, rng = self.c, self.rng
        dout = d if foldable and rng.random() < 0.5 else self.channels()
        if not foldable and rng.random() < 0.5:
            dout = d
        k = rng.randint(2, 5)
        branches = []
        for i in range(k):
            kinds = ["linear", "linear", "scaled", "chain", "identity"]
            if not foldable:
                kinds += ["bottleneck", "scale", "bad-scale", "dropout", "runtime-linear", "layernorm"]
            kind = rng.choice(kinds) if i else "linear"
            if kind in ("identity", "scale", "bad-scale", "dropout") and dout != d:
                kind = "linear"
            bias = rng.random() < 0.6
            if kind == "linear":
                ops = [_linear(d, dout, bias)]
            elif kind == "scaled":
                ops = [_linear(d, dout, bias), {"op": self.pick("scale", "shift"), "c": dout}]
            elif kind == "chain":
                ops = [_linear(d, d, bias), _linear(d, dout, rng.random() < 0.5)]
            elif kind == "bottleneck":
                ops = [_linear(d, 2, bias), _linear(2, dout, rng.random() < 0.5)]
            elif kind == "identity":
                ops = [{"op": "identity"}]
            elif kind == "runtime-linear":
                ops = [{"op": "runtime_linear", "din": d, "dout": dout}]
            elif kind == "layernorm":
                ops = [{"op": "layernorm", "c": d, "affine": rng.random() < 0.8}, _linear(d, dout, bias)]
            else:
                ops = [self.diagonal_op(kind)]
            branches.append(ops)
        block = {"kind": "branches", "branches": branches}
        if foldable:
            block["foldable"] = True  # a plain dense d→dout branch bounds the fused cost
        self.c = dout
        return block

    def chain_ops(self, length: int, keep_shape: bool) -> list[Spec]:
        ops = []
        for _ in range(length):
            ops.append(self.seq_op(keep_shape) if self.domain == "seq" else self.conv_op(keep_shape))
        return ops

    def conv_op(self, keep_shape: bool) -> Spec:
        rng, c, d = self.rng, self.c, self.dims
        kind = rng.choice(["conv", "conv", "conv", "bn", "bn", "scale", "pool", "identity", "dropout", "train-bn",
                           "bad-scale", "act", "padconv"])  # fmt: skip
        if kind == "conv":
            cout = c if keep_shape else self.channels()
            ks = [rng.choice([1, 2, 3, 5]) for _ in range(d)]
            dil = rng.choice([1, 1, 2])
            pads = [dil * (q // 2) if rng.random() < 0.8 else rng.randint(0, q) for q in ks]
            stride = 1 if keep_shape else rng.choice([1, 1, 2])
            if keep_shape:
                pads = [dil * (q - 1) // 2 for q in ks]
                ks = [q if dil * (q - 1) % 2 == 0 else q + 1 for q in ks]
                pads = [dil * (q - 1) // 2 for q in ks]
            out = [conv_out(s, q, stride, p, dil) for s, q, p in zip(self.spatial, ks, pads)]
            if min(out) < 2:
                ks, pads, stride, dil = [1] * d, [0] * d, 1, 1
                out = list(self.spatial)
            op = _conv(c, cout, ks, stride, pads, dil, self.groups_for(c, cout), rng.random() < 0.6)
            if rng.random() < 0.1 and all(p > 0 for p in pads) and all(p < s for p, s in zip(pads, self.spatial)):
                op["padding_mode"] = rng.choice(["reflect", "replicate", "circular"])
            self.c, self.spatial = cout, out
            return op
        if kind == "pool" and min(self.spatial) < 3:
            kind = "identity"
        if kind == "pool":
            stride = 1 if keep_shape or min(self.spatial) < 4 else rng.choice([1, 2])
            include = rng.random() < 0.8
            op = {"op": "avgpool", "k": 3, "stride": stride, "pad": 1, "include_pad": include}
            self.spatial = [conv_out(s, 3, stride, 1, 1) for s in self.spatial]
            return op
        if kind == "identity":
            return {"op": "identity"}
        if kind == "act":
            return {"op": "act", "fn": self.act(allow_none=False)}
        if kind == "padconv":
            kk = rng.choice([2, 3])
            return {"op": "padconv", "cin": c, "cout": c, "k": kk, "pad": [0, kk - 1], "bias": rng.random() < 0.5}
        return self.diagonal_op(kind)

    def seq_op(self, keep_shape: bool) -> Spec:
        rng, d = self.rng, self.c
        kind = rng.choice(["linear", "linear", "linear", "scale", "layernorm", "identity", "dropout", "bad-scale",
                           "act", "runtime-linear"])  # fmt: skip
        if kind == "linear":
            dout = d if keep_shape else self.channels()
            self.c = dout
            return _linear(d, dout, rng.random() < 0.6)
        if kind == "layernorm":
            return {"op": "layernorm", "c": d, "affine": rng.random() < 0.8}
        if kind == "identity":
            return {"op": "identity"}
        if kind == "act":
            return {"op": "act", "fn": self.act(allow_none=False)}
        if kind == "runtime-linear":
            dout = d if keep_shape else self.channels()
            self.c = dout
            return {"op": "runtime_linear", "din": d, "dout": dout}
        return self.diagonal_op(kind)

    def chain_block(self) -> Spec:
        block = {"kind": "chain", "ops": self.chain_ops(self.rng.randint(1, 3), keep_shape=False)}
        return self.finish(block, self.act())

    def residual_block(self) -> Spec:
        block = {"kind": "residual", "ops": self.chain_ops(self.rng.randint(1, 3), keep_shape=True)}
        return self.finish(block, self.act())

    def shared_block(self) -> Spec:
        c, rng = self.c, self.rng
        if self.domain == "seq":
            module = _linear(c, c, rng.random() < 0.6)
            site = {"op": self.pick("layernorm", "scale", "shift"), "c": c, "affine": True}
        else:
            k = rng.choice([1, 3])
            module = _conv(c, c, [k] * self.dims, 1, [k // 2] * self.dims, 1, self.groups_for(c, c), rng.random() < 0.6)
            site = {"op": self.pick("bn", "scale", "shift"), "c": c, "train": False}
        block = {"kind": "shared", "module": module, "site": site, "form": self.pick("sum", "chain")}
        return self.finish(block, self.act())


def _conv(cin, cout, k, stride, pad, dilation, groups, bias) -> Spec:
    return {"op": "conv", "cin": cin, "cout": cout, "k": list(k), "stride": stride, "pad": list(pad),
            "dilation": dilation, "groups": groups, "bias": bool(bias)}  # fmt: skip


def _linear(din, dout, bias) -> Spec:
    return {"op": "linear", "din": din, "dout": dout, "bias": bool(bias)}


def _tree(rng: random.Random, n: int):
    nodes: list = list(range(n))
    while len(nodes) > 1:
        i = rng.randrange(len(nodes) - 1)
        nodes[i : i + 2] = [[nodes[i], nodes[i + 1]]]
    return nodes[0]


def random_spec(rng: random.Random, dtypes: tuple[str, ...] = ("float32",) * 8 + ("float16", "bfloat16")) -> Spec:
    """One random model: a domain, an input shape, 1-5 blocks, a dtype, two batch sizes, a weight seed."""
    domain = rng.choice(["conv1d", "conv2d", "conv2d", "conv2d", "conv3d", "seq", "seq", "seq"])
    channels = rng.randint(2, 8)
    if domain == "seq":
        spatial = [rng.randint(3, 6)]
    else:
        dims = int(domain[4])
        hi = 6 if dims == 3 else 10
        spatial = [rng.randint(4, hi) for _ in range(dims)]
    draw = _Draw(rng, domain, channels, spatial)
    blocks = [draw.block() for _ in range(rng.randint(1, 5))]
    b1 = rng.randint(1, 4)
    b2 = rng.choice([b for b in range(1, 6) if b != b1])
    return {
        "domain": domain,
        "channels": channels,
        "spatial": spatial,
        "blocks": blocks,
        "dtype": "float32" if domain == "conv3d" else rng.choice(dtypes),  # no fp16/bf16 3-d pooling on CPU
        "train": rng.random() < 0.05,  # the whole model in training mode
        "batches": [b1, b2],
        "seed": rng.randrange(2**31),
    }


# ----------------------------------------------------------------------------------------------
# building modules


def activation(name: str, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """The named nonlinearity; ``hand_*`` forms are written out so that exporters decompose them."""
    if name == "none":
        return x
    if name == "relu":
        return torch.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x)
    if name == "hardswish":
        return F.hardswish(x)
    if name == "hand_gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))
    if name == "hand_gelu_erf":
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if name == "hand_silu":
        return x * torch.sigmoid(x)
    if name == "hand_layernorm":
        mean = x.mean(channel_dim, keepdim=True)
        var = ((x - mean) ** 2).mean(channel_dim, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5)
    if name == "hand_rmsnorm":
        return x * torch.rsqrt(x.pow(2).mean(channel_dim, keepdim=True) + 1e-6)
    raise ValueError(name)


class Act(nn.Module):
    def __init__(self, fn: str, channel_dim: int) -> None:
        super().__init__()
        self.fn, self.channel_dim = fn, channel_dim

    def forward(self, x):
        return activation(self.fn, x, self.channel_dim)


class Affine(nn.Module):
    """A constant multiply or add (``mode``) by a parameter of ``shape`` (or a Python scalar)."""

    def __init__(self, mode: str, shape: list[int] | None, generator: torch.Generator) -> None:
        super().__init__()
        self.mode = mode
        if shape is None:
            self.value = float(torch.rand((), generator=generator)) + 0.5
        else:
            t = torch.rand(shape, generator=generator) + 0.5 if mode == "mul" else torch.randn(shape, generator=generator)
            self.value = nn.Parameter(t)

    def forward(self, x):
        return x * self.value if self.mode == "mul" else x + self.value


class PadConv(nn.Module):
    """Asymmetric zero padding, then an unpadded conv: a geometry no ``padding=`` can express."""

    def __init__(self, conv: nn.Module, pad: list[int], dims: int) -> None:
        super().__init__()
        self.conv, self.pad = conv, tuple(pad) * dims

    def forward(self, x):
        return self.conv(F.pad(x, self.pad))


class RuntimeWeight(nn.Module):
    """A weight scaled by a statistic of the input: computed at run time, never constant."""

    def __init__(self, fn: str, weight: torch.Tensor, **kw) -> None:
        super().__init__()
        self.fn, self.weight, self.kw = fn, nn.Parameter(weight), kw

    def forward(self, x):
        w = self.weight * torch.sigmoid(x.mean())
        if self.fn == "linear":
            return F.linear(x, w)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.weight.dim() - 3]
        return conv(x, w, None, **self.kw)


class Branches(nn.Module):
    def __init__(self, paths: list[nn.Module], style: str, tree, act: str, channel_dim: int) -> None:
        super().__init__()
        self.paths, self.style, self.tree, self.act, self.channel_dim = nn.ModuleList(paths), style, tree, act, channel_dim

    def _tree(self, node, outs):
        if isinstance(node, int):
            return outs[node]
        return self._tree(node[0], outs) + self._tree(node[1], outs)

    def forward(self, x):
        outs = [p(x) for p in self.paths]
        if self.style == "sum":
            y = sum(outs)
        elif self.style == "tree":
            y = self._tree(self.tree, outs)
        elif self.style == "torch.add":
            y = outs[0]
            for o in outs[1:]:
                y = torch.add(y, o)
        elif self.style == "+=":
            y = outs[0]
            for o in outs[1:]:
                y += o
        elif self.style == "add_":
            y = outs[0]
            for o in outs[1:]:
                y.add_(o)
        else:
            y = outs[0]
            for o in outs[1:]:
                y = y + o
        return activation(self.act, y, self.channel_dim)


class Chain(nn.Module):
    def __init__(self, ops: list[nn.Module], act: str, residual: bool, channel_dim: int) -> None:
        super().__init__()
        self.ops, self.act, self.residual, self.channel_dim = nn.Sequential(*ops), act, residual, channel_dim

    def forward(self, x):
        y = self.ops(x)
        if self.residual:
            y = x + y
        return activation(self.act, y, self.channel_dim)


class Shared(nn.Module):
    """One module at two sites: ``m(x) + m(site(x))`` or ``m(act(site(m(x))))``."""

    def __init__(self, module: nn.Module, site: nn.Module, form: str, act: str, channel_dim: int) -> None:
        super().__init__()
        self.m, self.site, self.form, self.act, self.channel_dim = module, site, form, act, channel_dim

    def forward(self, x):
        if self.form == "sum":
            y = self.m(x) + self.m(self.site(x))
        else:
            y = self.m(torch.relu(self.site(self.m(x))))
        return activation(self.act, y, self.channel_dim)


class FuzzModel(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


def _op_module(op: Spec, dims: int, g: torch.Generator) -> nn.Module:
    kind = op["op"]
    channel_shape = (lambda c: [c]) if dims == 0 else (lambda c: [1, c] + [1] * dims)
    if kind == "conv":
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        return conv(op["cin"], op["cout"], tuple(op["k"]), op["stride"], tuple(op["pad"]), op["dilation"], op["groups"],
                    op["bias"], padding_mode=op.get("padding_mode", "zeros"))  # fmt: skip
    if kind == "padconv":
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        return PadConv(conv(op["cin"], op["cout"], op["k"], bias=op["bias"]), op["pad"], dims)
    if kind == "linear":
        return nn.Linear(op["din"], op["dout"], op["bias"])
    if kind == "bn":
        bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](op["c"])
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(op["c"], generator=g) * 0.5)
            bn.running_var.copy_(torch.rand(op["c"], generator=g) + 0.5)
            bn.weight.copy_(torch.rand(op["c"], generator=g) + 0.5)
            bn.bias.copy_(torch.randn(op["c"], generator=g) * 0.5)
        bn.fuzz_train = op.get("train", False)
        return bn
    if kind == "layernorm":
        ln = nn.LayerNorm(op["c"], elementwise_affine=op.get("affine", True))
        if ln.elementwise_affine:
            with torch.no_grad():
                ln.weight.copy_(torch.rand(op["c"], generator=g) + 0.5)
                ln.bias.copy_(torch.randn(op["c"], generator=g) * 0.5)
        return ln
    if kind in ("scale", "shift"):
        return Affine("mul" if kind == "scale" else "add", channel_shape(op["c"]), g)
    if kind == "scalar":
        return Affine("mul", None, g)
    if kind in ("wrong_scale", "wrong_shift"):
        return Affine("mul" if kind == "wrong_scale" else "add", op["shape"], g)
    if kind == "avgpool":
        pool = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1]
        return pool(op["k"], op["stride"], op["pad"], count_include_pad=op["include_pad"])
    if kind == "identity":
        return nn.Identity()
    if kind == "dropout":
        drop = nn.Dropout(op["p"])
        drop.fuzz_train = op.get("train", False)
        return drop
    if kind == "act":
        return Act(op["fn"], -1 if dims == 0 else 1)
    if kind == "runtime_linear":
        return RuntimeWeight("linear", torch.randn(op["dout"], op["din"], generator=g) / math.sqrt(op["din"]))
    if kind == "runtime_conv":
        w = torch.randn([op["cout"], op["cin"]] + [op["k"]] * dims, generator=g) / math.sqrt(op["cin"] * op["k"] ** dims)
        return RuntimeWeight("conv", w, stride=op["stride"], padding=op["pad"], dilation=op["dilation"])
    raise ValueError(f"unknown op {kind!r}")


def _seq(ops: list[nn.Module]) -> nn.Module:
    return ops[0] if len(ops) == 1 else nn.Sequential(*ops)


def build(spec: Spec) -> nn.Module:
    """The model a spec describes, weights drawn from ``spec["seed"]``, in its dtype and mode."""
    g = torch.Generator().manual_seed(spec["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])  # nn layers' default initialisation
        dims = 0 if spec["domain"] == "seq" else int(spec["domain"][4])
        channel_dim = -1 if dims == 0 else 1
        blocks: list[nn.Module] = []
        for b in spec["blocks"]:
            if b["kind"] == "branches":
                paths = [_seq([_op_module(op, dims, g) for op in ops]) for ops in b["branches"]]
                blocks.append(Branches(paths, b["style"], b.get("tree"), b["act"], channel_dim))
            elif b["kind"] in ("chain", "residual"):
                ops = [_op_module(op, dims, g) for op in b["ops"]] or [nn.Identity()]
                blocks.append(Chain(ops, b["act"], b["kind"] == "residual", channel_dim))
            elif b["kind"] == "shared":
                blocks.append(Shared(_op_module(b["module"], dims, g), _op_module(b["site"], dims, g), b["form"], b["act"],
                                     channel_dim))  # fmt: skip
            else:
                raise ValueError(f"unknown block {b['kind']!r}")
    model = FuzzModel(blocks).to(DTYPES[spec["dtype"]])
    model.train(spec.get("train", False))
    for m in model.modules():
        if getattr(m, "fuzz_train", False):
            m.train()
    return model


def example(spec: Spec, batch: int, seed: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A random input of the spec's shape at ``batch``."""
    shape = [batch, *spec["spatial"], spec["channels"]] if spec["domain"] == "seq" else [batch, spec["channels"], *spec["spatial"]]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.to(dtype or DTYPES[spec["dtype"]])


# ----------------------------------------------------------------------------------------------
# what a correct fold must reach


def _counted(op: Spec) -> int:
    """Linear / conv / BatchNorm ops one spec op computes (what ``count_linear_ops`` counts)."""
    return {"conv": 1, "padconv": 1, "linear": 1, "bn": 1, "runtime_linear": 1, "runtime_conv": 1}.get(op["op"], 0)


def op_bound(spec: Spec) -> int:
    """The most linear/conv/BatchNorm ops a correct fold may leave: one per block known to fold, the
    original count elsewhere (a fold never adds such ops)."""
    total = 0
    for b in spec["blocks"]:
        if b["kind"] == "branches":
            total += 1 if b.get("foldable") else sum(_counted(op) for ops in b["branches"] for op in ops)
        elif b["kind"] in ("chain", "residual"):
            total += sum(_counted(op) for op in b["ops"])
        else:
            total += 2 * _counted(b["module"]) + _counted(b["site"])
    return total


def foldable_blocks(spec: Spec) -> list[Spec]:
    """One single-block spec per block known to fold, on that block's own input shape (eval, same dtype):
    folded alone, each must leave exactly one linear/conv op and no BatchNorm."""
    out = []
    for b in spec["blocks"]:
        if b.get("foldable"):
            sub = {**clone(spec), "blocks": [clone(b)], "train": False, "channels": b["in"][0], "spatial": b["in"][1:]}
            out.append(sub)
    return out


def clone(spec: Spec) -> Spec:
    return copy.deepcopy(spec)
