"""A synthetic ONNX model of any size, with external data, written without holding it in memory.

The big-models benchmark needs a model over the 2 GB protobuf limit, and no exporter writes one without
first holding every weight in memory. This module writes one weight at a time: the data file tensor by
tensor (seeded random values, offsets aligned for memory mapping), then a small ``ModelProto`` whose
initializers point into it (``location``, ``offset``, ``length``).

The model is a stack of residual parallel-branch blocks on ``x: float32[batch, width]``::

    y = Relu(A(x) + B(x) + x)

where ``A`` and ``B`` cycle through the forms exporters write for a linear layer: ``MatMul`` by a
``[in, out]`` weight, ``Gemm`` with ``transB=1`` and a bias (the legacy exporter's ``nn.Linear``), and one
of each. Every block is foldable: its two linears and the identity become one linear, so a fold removes
half of the MatMul/Gemm ops and about half of the bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

KINDS = ("matmul", "gemm", "mixed")  # block i uses KINDS[i % 3]
ALIGNMENT = 4096  # page size: onnxruntime memory-maps an external tensor only at an aligned offset
OPSET = 17


@dataclass(frozen=True)
class SyntheticModel:
    """What was written: the two files and what a correct fold must make of them."""

    path: Path
    data_path: Path
    blocks: int
    width: int
    linear_ops: int  # MatMul + Gemm nodes written (two per block)
    total_bytes: int  # model file + data file

    @property
    def linear_ops_after_fold(self) -> int:
        return self.blocks


class _DataWriter:
    """Appends float32 arrays to the external data file, each at an aligned offset."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("wb")
        self.name = path.name
        self.offset = 0

    def add(self, name: str, values: np.ndarray) -> TensorProto:
        pad = -self.offset % ALIGNMENT
        self.file.write(b"\0" * pad)
        self.offset += pad
        data = np.ascontiguousarray(values, dtype="<f4")
        self.file.write(memoryview(data).cast("B"))
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(data.shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.name), ("offset", self.offset), ("length", data.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.offset += data.nbytes
        return tensor

    def close(self) -> None:
        self.file.close()


def _linear(form: str, x: str, name: str, width: int, rng: np.random.Generator, scale: float,
            data: _DataWriter, initializers: list[TensorProto]) -> onnx.NodeProto:
    """One linear of ``x``: ``MatMul(x, W[in, out])`` or ``Gemm(x, W[out, in], b, transB=1)``."""
    weight = rng.standard_normal((width, width), dtype=np.float32)
    weight *= scale
    initializers.append(data.add(f"{name}.weight", weight))
    del weight  # one weight in memory at a time
    if form == "matmul":
        return helper.make_node("MatMul", [x, f"{name}.weight"], [f"{name}.out"], name=name)
    bias = (rng.standard_normal(width, dtype=np.float32) * scale).astype(np.float32)
    initializers.append(helper.make_tensor(f"{name}.bias", TensorProto.FLOAT, [width], bias))
    return helper.make_node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [f"{name}.out"], name=name, transB=1)


def write_stacked_branches(path: str | os.PathLike, blocks: int, width: int, *, seed: int = 0,
                           scale: float | None = None) -> SyntheticModel:
    """Write ``<path>`` and ``<path>.data``: ``blocks`` residual blocks of two parallel linears each.

    ``scale`` multiplies the standard-normal weights; the default ``0.5 / sqrt(width)`` keeps activations
    of the same order through any depth, so a fold error shows as a relative error, not an overflow. The
    weights depend only on ``seed``, ``blocks`` and ``width``. Each weight is ``4 * width**2`` bytes:
    ``width=4096`` gives 64 MiB per weight and ``blocks=17`` a 2.1 GiB data file.
    """
    if blocks < 1 or width < 1:
        raise ValueError("blocks and width must be positive")
    path = Path(path)
    scale = 0.5 / np.sqrt(width) if scale is None else scale
    data_path = path.with_name(path.name + ".data")
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[TensorProto] = []
    data = _DataWriter(data_path)
    x = "x"
    try:
        for i in range(blocks):
            kind = KINDS[i % len(KINDS)]
            forms = {"matmul": ("matmul", "matmul"), "gemm": ("gemm", "gemm"), "mixed": ("matmul", "gemm")}[kind]
            a, b = (_linear(form, x, f"block{i}.{side}", width, rng, scale, data, initializers)
                    for form, side in zip(forms, "ab"))
            nodes += [
                a, b,
                helper.make_node("Add", [a.output[0], b.output[0]], [f"block{i}.branches"], name=f"block{i}.add"),
                helper.make_node("Add", [f"block{i}.branches", x], [f"block{i}.sum"], name=f"block{i}.residual"),
                helper.make_node("Relu", [f"block{i}.sum"], [f"block{i}.y"], name=f"block{i}.relu"),
            ]  # fmt: skip
            x = f"block{i}.y"
    finally:
        data.close()
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes, f"stacked_branches_{blocks}x{width}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="branchfold-bench")
    path.write_bytes(model.SerializeToString())  # small: every weight is external
    return SyntheticModel(path=path, data_path=data_path, blocks=blocks, width=width, linear_ops=2 * blocks,
                          total_bytes=path.stat().st_size + data_path.stat().st_size)
