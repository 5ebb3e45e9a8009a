"""KServe v2 tensor datatypes as numpy dtypes, for the generator's payloads and the servers' tensors."""

from __future__ import annotations

import numpy as np

__all__ = ["NUMPY_DTYPES"]

NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
"""KServe v2 datatype -> numpy dtype; fixed sizes are little-endian, the wire byte order."""
