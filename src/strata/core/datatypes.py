"""Tensor datatypes: Open Inference Protocol names, numpy dtypes and onnxruntime type strings."""

from __future__ import annotations

from typing import Final

import numpy as np

from strata.core.errors import BadRequest, PackageError

# Open Inference Protocol datatype -> numpy dtype. BYTES holds variable-length byte strings (numpy object).
OIP_TO_NUMPY: Final[dict[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

_NUMPY_TO_OIP: Final[dict[str, str]] = {str(dtype): name for name, dtype in OIP_TO_NUMPY.items() if name != "BYTES"}
_BY_DTYPE: dict[np.dtype[np.generic], str] = {}

# onnxruntime's NodeArg.type strings -> Open Inference Protocol datatype.
ORT_TO_OIP: Final[dict[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",
}

# Bytes per element for fixed-size datatypes (BYTES has none).
ELEMENT_SIZE: Final[dict[str, int]] = {name: dtype.itemsize for name, dtype in OIP_TO_NUMPY.items() if name != "BYTES"}


def oip_from_ort(type_string: str) -> str:
    """Map an onnxruntime type string such as `tensor(float)` to its Open Inference Protocol datatype.

    Raises:
        PackageError: the type is not a tensor type strata can serve (sequences, maps, optional types).
    """
    try:
        return ORT_TO_OIP[type_string]
    except KeyError:
        hint = ""
        if type_string.startswith("seq(map("):  # what skl2onnx makes of a classifier's probabilities by default
            hint = " (a scikit-learn classifier: convert it with skl2onnx's options={'zipmap': False})"
        raise PackageError(
            f"model uses type {type_string!r}, which strata cannot serve; only tensors are supported{hint}"
        ) from None


def oip_from_numpy(dtype: np.dtype[np.generic]) -> str:
    """The Open Inference Protocol datatype for a numpy dtype (object and string arrays are BYTES).

    Raises:
        BadRequest: numpy dtype with no protocol equivalent (complex numbers, say).
    """
    known = _BY_DTYPE.get(dtype)  # str(dtype) costs microseconds; servers ask this for every tensor they send
    if known is not None:
        return known
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        datatype = _NUMPY_TO_OIP[str(dtype)]
    except KeyError:
        raise BadRequest(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None
    _BY_DTYPE[dtype] = datatype
    return datatype
