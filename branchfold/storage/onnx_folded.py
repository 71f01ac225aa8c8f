"""Folded ONNX weights that are computed as they are written, never held whole in memory.

The commonest folded weight is the sum of two stored ones (two parallel linears, a branch beside an
identity). An ONNX fold writes it as a ``FoldedTensor``: an ``onnx_ir`` tensor that keeps the two stored
weights it sums (views of the memory-mapped input, or of the caller's tensors) and computes the sum a
block of rows at a time into the file being written (``tofile``). A fold of a 2 GB model then allocates
no memory for its new weights, and its speed is that of reading the input and writing the output: a
fresh gigabyte of anonymous memory costs seconds on some machines, more than the sums themselves.
Whatever asks for the values (``numpy()``: a check session, a caller's own code) gets them computed in
full each time; nothing is cached, so a model returned to a caller costs no memory until it is read.

``fingerprint`` and ``same_bytes`` compare weights without computing a folded one whole (the pass that
stores equal folded weights once).
"""

from __future__ import annotations

import functools
import hashlib
import math
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir
import torch

from branchfold.rewriter.rounding import BLOCK_BYTES, RoundedRows, rows_per_block

PATCHES, PATCH = 8, 8  # a fingerprint reads 8 blocks of 8 x 8 elements (8 runs of 64 beyond 2-D)


def _computed(rows: RoundedRows, dtype: ir.DataType) -> ir.Tensor:
    return ir.Tensor(rows.full().numpy(), dtype=dtype)


def _nothing() -> None:
    return None


class FoldedTensor(ir.LazyTensor):
    """A weight a fold wrote, as ``RoundedRows`` (one or two stored weights and a diagonal), computed
    when it is read and a block at a time (``block_bytes``) when it is written to a file.

    ``release`` is called whenever the stored weights were read (written to a file, fingerprinted,
    compared): the ONNX fold passes a function that drops from this process the pages of the memory-mapped
    weights (they stay in the page cache). Without it a process would keep every page it read, and where
    the page cache hands out large folios, reading a few elements maps megabytes."""

    def __init__(self, rows: RoundedRows, dtype: ir.DataType, name: str | None = None,
                 release: Callable[[], None] = _nothing) -> None:  # fmt: skip
        # the thunk holds the rows, not the tensor: no reference cycle keeps the weights alive
        super().__init__(functools.partial(_computed, rows, dtype), dtype, ir.Shape(rows.shape), name=name)
        self.rows = rows
        self.release = release
        self.block_bytes = BLOCK_BYTES

    def _evaluate(self) -> ir.TensorProtocol:
        """The whole weight, computed now (``numpy()``, ``tobytes()``: a check session's input)."""
        try:
            return super()._evaluate()
        finally:
            self.release()

    def byte_blocks(self, buffers: int = 1) -> Iterator[memoryview]:
        """The bytes, little-endian as ONNX stores them, one block of rows at a time (each block valid until
        ``buffers`` more are taken: the rows are computed into reused buffers). Releases the pages after."""
        try:
            for block in self.rows.blocks(self.block_bytes, buffers=buffers):
                array = block.numpy()
                if sys.byteorder != "little":
                    array = array.astype(array.dtype.newbyteorder("<"))
                yield memoryview(array).cast("B")
        finally:
            self.release()

    def tofile(self, file) -> None:
        """Write the bytes one block of rows at a time: a thread writes each block while the next is computed
        (the write and torch's kernels both release the GIL)."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="branchfold-write") as writer:
            pending = None
            for block in self.byte_blocks(buffers=2):
                if pending is not None:
                    pending.result()  # the block before is written: its buffer is the next one computed
                pending = writer.submit(file.write, block)
            if pending is not None:
                pending.result()


def _positions(shape: tuple[int, ...]) -> np.ndarray:
    """Row-major positions of the fingerprint's elements, in small blocks spread over the tensor, so that a
    memory-mapped weight has a few pages read and not all (the kernel maps the pages around each page a
    read touches). A matrix is sampled in square blocks: a weight written as the transpose of the one
    stored (an ONNX MatMul's) then touches as few pages as one stored as written."""
    size = math.prod(shape)
    if size == 0:
        return np.zeros(0, np.int64)
    if len(shape) == 2:
        rows, cols = shape
        r = np.linspace(0, max(rows - PATCH, 0), PATCHES).astype(np.int64)
        c = np.linspace(0, max(cols - PATCH, 0), PATCHES).astype(np.int64)
        step = np.arange(PATCH)
        rr = np.minimum(r[:, None, None] + step[None, :, None], rows - 1)
        cc = np.minimum(c[:, None, None] + step[None, None, :], cols - 1)
        return np.unique(rr * cols + cc)
    starts = np.linspace(0, max(size - PATCH * PATCH, 0), PATCHES).astype(np.int64)
    return np.unique(np.minimum(starts[:, None] + np.arange(PATCH * PATCH), size - 1))


def fingerprint(t: ir.TensorProtocol) -> bytes:
    """A digest of a few hundred elements of ``t`` spread over it: equal tensors have equal fingerprints, and
    a ``FoldedTensor`` gets the one of its computed bytes without being computed whole."""
    positions = _positions(tuple(t.shape.numpy()))
    if isinstance(t, FoldedTensor):
        sample = t.rows.elements(torch.from_numpy(positions)).numpy()
        t.release()
    else:
        sample = np.asarray(t.numpy()).reshape(-1)[positions]
    return hashlib.sha256(np.ascontiguousarray(sample).view(np.uint8).tobytes()).digest()


def _row_blocks(t: ir.TensorProtocol, block_bytes: int):
    """``t``'s rows, ``rows_per_block`` at a time (a FoldedTensor's computed into one reused buffer)."""
    if isinstance(t, FoldedTensor):
        yield from (block.numpy() for block in t.rows.blocks(block_bytes))
        return
    array = np.asarray(t.numpy())
    if array.ndim == 0:
        yield array.reshape(1)
        return
    step = rows_per_block(array.shape, array.itemsize, block_bytes)
    for start in range(0, len(array), step):
        yield array[start : start + step]


def same_bytes(a: ir.TensorProtocol, b: ir.TensorProtocol) -> bool:
    """Whether ``a`` and ``b`` have the same dtype, shape and bytes, compared a block of rows at a time (a
    ``FoldedTensor`` is never computed whole)."""
    if a.dtype != b.dtype or tuple(a.shape.numpy()) != tuple(b.shape.numpy()):
        return False
    try:
        return all(
            np.array_equal(np.ascontiguousarray(x).view(np.uint8), np.ascontiguousarray(y).view(np.uint8))
            for x, y in zip(_row_blocks(a, BLOCK_BYTES), _row_blocks(b, BLOCK_BYTES))
        )
    finally:
        for t in (a, b):
            if isinstance(t, FoldedTensor):
                t.release()
