"""Canonical foldable ops → affine maps, shared by every dialect (FX and ONNX).

A dialect's recognizer only finds the op's constant operands and attributes and calls one of these;
the checks that make a fold exact (training mode, broadcast axis, pooling semantics, transposed
convs), arithmetic with a constant operand and the shared-weight marking live here, once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Sequence

import torch

from branchfold.rewriter.affine import F64, Conv, Dense, Diagonal, Lookup, Refusal, stored
from branchfold.rewriter.region import Op


def _f64(t: torch.Tensor | float | int) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.detach().to(device="cpu", dtype=F64, copy=True)  # one copy: never alias a user's tensor
    return torch.tensor(float(t), dtype=F64)


def _tuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(i) for i in v)
    return v * n if len(v) == 1 else v


def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Dense:
    """``x @ weight.T + bias`` (torch Linear / Gemm with transB)."""
    if weight.dim() != 2:
        raise Refusal("shape", f"linear weight of rank {weight.dim()}")
    b = _f64(bias) if bias is not None else torch.zeros(weight.shape[0], dtype=F64)
    return Dense(stored(weight), b.expand(weight.shape[0]).clone())


def lookup(table: torch.Tensor, max_norm: float | None = None) -> Lookup:
    """``table[idx]`` (torch embedding, ONNX Gather on axis 0 of a constant table).

    ``padding_idx``, ``scale_grad_by_freq`` and ``sparse`` change only gradients: the forward is the plain
    lookup. ``max_norm`` rescales (and writes) the rows it reads, so such a lookup is not a constant map."""
    if max_norm is not None:
        raise Refusal("unsupported-args", "embedding with max_norm renormalizes the rows it reads")
    if table.dim() != 2 or not table.is_floating_point():
        raise Refusal("shape", f"lookup table of rank {table.dim()} and dtype {table.dtype}")
    return Lookup(stored(table))


def quantized(what: str) -> Refusal:
    """The refusal for a weight stored quantized (integers, dequantized by the graph on every call): folding it
    would be exact, but the folded weight would be stored in floating point, 4x the memory of int8 and none of
    the quantized kernels' speed, which is what the quantization was for."""
    return Refusal("quantized", f"{what} is stored quantized; a folded float weight would undo the quantization")


def dequantizes(source_bits: int | None, quantized_type: bool, float_result: bool, shape: Sequence[int] | None) -> bool:
    """Whether a cast of stored data to floating point is the dequantization of a quantized weight: the data
    are a matrix (two axes longer than one) of a quantized type, or of integers narrower than 64 bits (int8,
    uint8, int4 packed in int32). 64-bit integers are indices and positions, and a vector is a bias or a scale:
    casting those is arithmetic on constants like any other."""
    if not float_result or shape is None or sum(int(d) > 1 for d in shape) < 2:
        return False
    return quantized_type or (source_bits is not None and 1 < source_bits < 64)


def conv(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] | Sequence[tuple[int, int]] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    transposed: bool = False,
) -> Conv:
    """A torch/ONNX convolution. ``padding`` is symmetric per dim, (lo, hi) pairs, or "same"/"valid"."""
    if transposed:
        raise Refusal("geometry", "transposed convolution")
    nd = weight.dim() - 2
    if nd < 1:
        raise Refusal("shape", "conv weight without spatial dims")
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    kernel = tuple(weight.shape[2:])
    if isinstance(padding, str):
        if padding == "valid":
            pads = ((0, 0),) * nd
        elif padding == "same":
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            pads = tuple((t // 2, t - t // 2) for t in total)
        else:
            raise Refusal("geometry", f"padding {padding!r}")
    elif isinstance(padding, int) or (len(padding) and isinstance(padding[0], int)):
        pads = tuple((p, p) for p in _tuple(padding, nd))  # type: ignore[arg-type]
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)  # type: ignore[misc]
    if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise Refusal("geometry", f"padding mode {padding_mode!r}")
    if not any(p for pair in pads for p in pair):
        padding_mode = "zeros"  # without padding the mode means nothing
    b = _f64(bias) if bias is not None else torch.zeros(weight.shape[0], dtype=F64)
    return Conv(stored(weight), b, stride, pads, dilation, int(groups), padding_mode)


def batch_norm(
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rank: int | None,
    training: bool = False,
) -> Diagonal:
    """Inference BatchNorm: ``(x - mean) / sqrt(var + eps) * weight + bias`` on axis 1."""
    if training:
        raise Refusal("training-mode", "BatchNorm uses batch statistics in training mode")
    if mean is None or var is None:
        raise Refusal("training-mode", "BatchNorm without running statistics")
    if rank is None:
        raise Refusal("shape", "BatchNorm input of unknown rank")
    inv = 1.0 / torch.sqrt(_f64(var) + float(eps))
    scale = inv * (_f64(weight) if weight is not None else 1.0)
    shift = (_f64(bias) if bias is not None else 0.0) - _f64(mean) * scale
    return Diagonal(scale, shift.expand_as(scale).clone(), 1 - rank if rank > 1 else -1)


def layer_norm_affine(normalized_shape: Sequence[int], weight, bias) -> Diagonal | None:
    """The γ, β of a LayerNorm over the last axis as a map on top of the plain normalisation."""
    if len(normalized_shape) != 1 or (weight is None and bias is None):
        return None
    n = int(normalized_shape[0])
    scale = _f64(weight) if weight is not None else torch.ones(n, dtype=F64)
    shift = _f64(bias) if bias is not None else torch.zeros(n, dtype=F64)
    return Diagonal(scale.expand(n).clone(), shift.expand(n).clone(), -1)


def channel_constant(const: torch.Tensor | float | int, x_shape: Sequence[int] | None) -> Diagonal:
    """A constant that broadcasts against ``x`` as per-channel: the scale of ``x * const``.

    The constant must vary along at most one axis of ``x`` and must not grow ``x``'s shape: a
    constant that broadcasts along the wrong axis, or widens the result, is not a channel map.
    """
    c = _f64(const)
    if c.dim() == 0 or c.numel() == 1:
        if x_shape is not None and c.dim() > len(x_shape):
            raise Refusal("broadcast", "constant of higher rank than its operand")
        return Diagonal(c.reshape(()), torch.zeros((), dtype=F64), None)
    if x_shape is None:
        raise Refusal("shape", "per-channel constant on a value of unknown shape")
    rank = len(x_shape)
    if c.dim() > rank:
        raise Refusal("broadcast", "constant of higher rank than its operand")
    cs = (1,) * (rank - c.dim()) + tuple(c.shape)
    varying = [i for i, n in enumerate(cs) if n != 1]
    if len(varying) != 1:
        raise Refusal("broadcast", f"constant of shape {tuple(c.shape)} varies along several axes: not a per-channel map")
    (i,) = varying
    if x_shape[i] != cs[i]:
        raise Refusal("broadcast", f"constant of shape {tuple(c.shape)} would broadcast {tuple(x_shape)}")
    vec = c.reshape(-1)
    return Diagonal(vec, torch.zeros_like(vec), i - rank)


def shift_constant(const, x_shape) -> Diagonal:
    """``x + const`` with a per-channel (or scalar) constant."""
    d = channel_constant(const, x_shape)
    return Diagonal(torch.ones_like(d.scale), d.scale, d.axis)


def arithmetic_constant(kind: str, const, x_shape, constant_first: bool = False) -> Diagonal | None:
    """``x ⊕ const`` (``const ⊕ x`` with ``constant_first``) for ``kind`` in add, sub, mul, div, as a
    per-channel map of ``x``; None for ``const / x``, which is not linear. ``c - x`` is ``-x + c``."""
    if kind == "add":
        return shift_constant(const, x_shape)
    if kind == "sub" and not constant_first:
        return shift_constant(-_f64(const), x_shape)
    if kind == "sub":
        d = shift_constant(const, x_shape)
        return Diagonal(-d.scale, d.shift, d.axis)
    if kind == "mul":
        return channel_constant(const, x_shape)
    if kind == "div" and not constant_first:
        return channel_constant(1.0 / _f64(const), x_shape)
    return None


def mark_shared(ops: Sequence[Op], reads: Callable[[Op], Collection[str]]) -> None:
    """Flag the affine ops whose stored tensors (``reads``: their names, as the dialect counts readers)
    another op reads too: a module called from several places, an initializer used twice.

    Folding never writes into a stored tensor; the flag keeps the walk from merging a shared weight with a
    private one, which would un-share it (``shared-weight``)."""
    stored = {op.key: frozenset(reads(op)) for op in ops}
    readers = Counter(name for names in stored.values() for name in names)
    for op in ops:
        if op.kind == "affine" and stored[op.key]:
            op.shared = any(readers[name] > 1 for name in stored[op.key])


def avg_pool(
    kernel: int | Sequence[int],
    stride: int | Sequence[int] | None,
    padding: int | Sequence[int] | Sequence[tuple[int, int]],
    channels: int | None,
    nd: int,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> Conv:
    """Average pooling as the depthwise conv with a constant kernel it equals (exact cases only)."""
    if channels is None:
        raise Refusal("shape", "average pooling over an unknown number of channels")
    kernel = _tuple(kernel, nd)
    stride = _tuple(stride if stride not in (None, [], ()) else kernel, nd)
    if isinstance(padding, int) or (len(padding) and isinstance(padding[0], int)):
        pads = tuple((p, p) for p in _tuple(padding, nd))  # type: ignore[arg-type]
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)  # type: ignore[misc]
    padded = any(p for pair in pads for p in pair)
    if ceil_mode:
        raise Refusal("geometry", "average pooling with ceil_mode")
    if padded and not count_include_pad:
        raise Refusal("padding-border", "average pooling that excludes padding from its count")
    divisor = divisor_override or int(torch.tensor(kernel).prod())
    w = torch.full((channels, 1, *kernel), 1.0 / divisor, dtype=F64)
    return Conv(w, torch.zeros(channels, dtype=F64), stride, pads, (1,) * nd, channels, "zeros")
