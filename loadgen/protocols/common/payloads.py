"""Synthetic request tensors built from a model's declared inputs (KServe v2 metadata).

Dynamic dimensions (-1) become 1 unless a shape override is given, except the batch dimension of a
batching model (a leading -1 before other dimensions), which becomes the batch size; values are
seeded random data of the declared datatype, so two runs with the same seed send the same bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loadgen.lowlevel.dtypes import NUMPY_DTYPES

__all__ = ["has_batch_dim", "synthetic_inputs"]


def has_batch_dim(shape: list[int]) -> bool:
    """Whether a declared shape leads with a batch dimension (Triton's metadata of a model with
    max_batch_size > 0: -1 before the per-row dimensions)."""
    return len(shape) > 1 and int(shape[0]) == -1


def _concrete_shape(shape: list[int], override: list[int] | None, batch_size: int) -> list[int]:
    if override is not None:
        return list(override)
    concrete = [1 if dim < 0 else int(dim) for dim in shape]
    if has_batch_dim(shape):
        concrete[0] = batch_size
    return concrete


def _values(datatype: str, count: int, rng: np.random.Generator) -> list[Any]:
    if datatype == "BYTES":
        return [f"loadgen-{int(v)}" for v in rng.integers(0, 1_000_000, count)]
    if datatype == "BOOL":
        return [bool(v) for v in rng.integers(0, 2, count)]
    if datatype.startswith(("FP", "BF")):
        return [round(float(v), 6) for v in rng.standard_normal(count)]
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise ValueError(f"unsupported datatype {datatype!r}")
    high = min(int(np.iinfo(dtype).max), 127)
    return [int(v) for v in rng.integers(0, high + 1, count)]


def synthetic_inputs(
    specs: list[dict[str, Any]], seed: int = 0, shapes: dict[str, list[int]] | None = None, batch_size: int = 1
) -> list[dict[str, Any]]:
    """KServe v2 JSON input tensors for `specs`, with `data` filled.

    >>> synthetic_inputs([{"name": "x", "datatype": "INT32", "shape": [-1, 2]}])[0]["shape"]
    [1, 2]
    """
    rng = np.random.default_rng(seed)
    tensors = []
    for spec in specs:
        shape = _concrete_shape(spec["shape"], (shapes or {}).get(spec["name"]), batch_size)
        count = int(np.prod(shape)) if shape else 1
        data = _values(spec["datatype"], count, rng)
        tensors.append({"name": spec["name"], "shape": shape, "datatype": spec["datatype"], "data": data})
    return tensors
