"""Open Inference Protocol (KServe v2) tensors: JSON and Triton's binary tensor extension, both ways.

Pure functions over bytes and numpy arrays, shared by the node's inference server and the clients.
Binary extension: the body is a JSON header of `Inference-Header-Content-Length` bytes followed by raw
tensors in the order of the header's tensors that carry `parameters.binary_data_size`. Fixed-size types
are little-endian, row-major; BYTES elements are each a 4-byte little-endian length and the bytes.

Decoding is bounded by what the caller actually sent: a shape is checked (rank, each dimension, the element
count, in Python integers) before anything is built from it, and nothing is allocated for a tensor until the
bytes or JSON values it needs are known to be present, so a small body can never make a large array. Every
malformed input is a `BadRequest`, never another exception.

JSON is read and written with orjson (compiled; about a tenth of the standard library's CPU for a tensor's numbers,
which is most of a JSON request's decoding), and with the standard library for what orjson refuses and a client
may still send or expect: NaN and Infinity literals, integers beyond 64 bits, lone surrogates in strings, and
non-finite floats in a JSON tensor (orjson would write them as null). So what is accepted and what is written
does not depend on which of the two did it.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson

from strata.core.datatypes import ELEMENT_SIZE, OIP_TO_NUMPY, oip_from_numpy
from strata.core.errors import BadRequest
from strata.core.package import TensorSpec

HEADER_LENGTH: Final = "inference-header-content-length"
MAX_ELEMENTS: Final = 1 << 28  # elements in one tensor
MAX_DIMS: Final = 32  # dimensions of one tensor (numpy 1.x holds at most 32)
MAX_BYTES_ELEMENTS: Final = 1 << 22  # BYTES elements in one tensor: each is a Python object, decoded one by one

Array = npt.NDArray[Any]
# The binary region of a body is handled as a memoryview, so tensors are sliced out of the body without copies.
Buffer = bytes | memoryview


@dataclass
class InferInput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    array: Array


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None


@dataclass
class InferRequest:
    id: str | None
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None
    binary_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


def check_shape(raw: Any, what: str) -> tuple[int, ...]:
    """A tensor's shape, checked before anything is built from it: at most `MAX_DIMS` non-negative dimensions
    whose product (in Python integers, so it cannot overflow) is at most `MAX_ELEMENTS`. A zero dimension makes
    an empty tensor, but the other dimensions are bounded too: numpy refuses any shape whose non-zero dimensions
    multiply past its index range, empty or not.

    Raises:
        BadRequest: the shape is not a list of non-negative integers, or is too large.
    """
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise BadRequest(f"{what}: 'shape' must be a list of non-negative integers, got {_excerpt(raw)}")
    if len(raw) > MAX_DIMS:
        raise BadRequest(f"{what}: shape has {len(raw)} dimensions; at most {MAX_DIMS} are supported")
    if math.prod(d for d in raw if d) > MAX_ELEMENTS:
        raise BadRequest(f"{what}: shape {_excerpt(raw)} holds more than {MAX_ELEMENTS} elements")
    return tuple(raw)


def _excerpt(value: Any, limit: int = 120) -> str:
    """`repr(value)` cut to `limit` characters: error messages echo caller input, but never much of it."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode_bytes_elements(buffer: Buffer, count: int, what: str, size_name: str = "binary_data_size") -> Array:
    """`count` BYTES elements (each a 4-byte length and its bytes) that must fill `buffer` exactly.

    Every element takes at least 4 bytes, so a count the buffer cannot hold is refused before anything is
    allocated: the work and memory are bounded by the bytes present, not by the shape.

    Raises:
        BadRequest: the buffer cannot hold `count` elements, an element runs past it, or bytes are left over.
    """
    if count > MAX_BYTES_ELEMENTS:
        raise BadRequest(f"{what}: {count} BYTES elements; at most {MAX_BYTES_ELEMENTS} are supported")
    if count * 4 > len(buffer):
        raise BadRequest(
            f"{what}: {count} BYTES elements need at least {count * 4} bytes; {size_name} is {len(buffer)}"
        )
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(buffer):
            raise BadRequest(f"{what}: binary BYTES data ends after {i} of {count} elements")
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise BadRequest(f"{what}: binary BYTES element {i} runs past the data")
        out[i] = bytes(buffer[offset : offset + length])
        offset += length
    if offset != len(buffer):
        raise BadRequest(f"{what}: binary BYTES data has {len(buffer) - offset} bytes after {count} elements")
    return out


def tensor_from_binary(
    buffer: Buffer, datatype: str, shape: tuple[int, ...], what: str, size_name: str = "binary_data_size"
) -> Array:
    """A tensor of a checked shape (`check_shape`) from its raw little-endian bytes, a view of `buffer` (no copy);
    `size_name` is what the error messages call the buffer's size.

    Raises:
        BadRequest: the buffer holds more or fewer bytes than the shape needs (BYTES: malformed elements).
    """
    count = math.prod(shape)
    if datatype == "BYTES":
        return _decode_bytes_elements(buffer, count, what, size_name).reshape(shape)
    expected = count * ELEMENT_SIZE[datatype]
    if len(buffer) != expected:
        raise BadRequest(
            f"{what}: {size_name} is {len(buffer)} bytes; shape {list(shape)} of {datatype} needs {expected}"
        )
    dtype = OIP_TO_NUMPY[datatype].newbyteorder("<")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _from_json_data(data: Any, datatype: str, shape: tuple[int, ...], what: str) -> Array:
    count = math.prod(shape)
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        if count > MAX_BYTES_ELEMENTS:
            raise BadRequest(f"{what}: {count} BYTES elements; at most {MAX_BYTES_ELEMENTS} are supported")
        strings = _flat_strings(data, count, what)
        out = np.empty(len(strings), dtype=object)
        for i, item in enumerate(strings):
            out[i] = item.encode()
        array: Array = out
    else:
        array = _numbers_from_json(data, datatype, what)
    if array.size != count:
        raise BadRequest(f"{what}: 'data' has {array.size} elements; shape {list(shape)} needs {count}")
    return array.reshape(shape)


def _flat_strings(data: list[Any], count: int, what: str) -> list[str]:
    """The strings of (nested lists of) JSON BYTES data, row-major; stops as soon as there are more than `count`.

    Raises:
        BadRequest: an element is not a string, or there are more than `count`.
    """
    out: list[str] = []
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) >= MAX_DIMS:
                raise BadRequest(f"{what}: 'data' is nested deeper than {MAX_DIMS} lists")
            stack.append(iter(item))
        elif not isinstance(item, str):
            raise BadRequest(f"{what}: BYTES data must be strings")
        elif len(out) == count:
            raise BadRequest(f"{what}: 'data' has more than the {count} elements its shape needs")
        else:
            out.append(item)
    return out


_END: Final = object()


def _numbers_from_json(data: list[Any], datatype: str, what: str) -> Array:
    """A flat array of `datatype` from JSON numbers, refusing anything that would not survive the conversion."""
    dtype = OIP_TO_NUMPY[datatype]
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise BadRequest(f"{what}: 'data' is ragged or malformed: {exc}") from None
    if raw.size == 0:  # [] has no element type to check
        return np.empty(0, dtype=dtype)
    if dtype.kind in "iu" and raw.dtype.kind in "fO":
        # numpy holds integers beyond int64 (large UINT64 values) as float64 or objects; take them exactly
        return _exact_integers(data, datatype, what)
    if raw.dtype.kind not in "biuf":
        raise BadRequest(f"{what}: 'data' holds values that are not {datatype} numbers (or are too large for any)")
    if dtype.kind == "b":
        if raw.dtype.kind != "b":
            raise BadRequest(f"{what}: BOOL data must be true or false")
    elif raw.dtype.kind == "b":
        raise BadRequest(f"{what}: {datatype} data must be numbers, not true or false")
    raw = raw.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected below, not warned about
        array = raw.astype(dtype)
        if dtype.kind in "iu" and not np.array_equal(array, raw):
            raise BadRequest(f"{what}: data is out of range for {datatype}")
        # A finite value that became infinite overflowed (all finite, the usual case, is the cheaper test)
        if dtype.kind == "f" and not np.isfinite(array).all() and np.any(np.isfinite(raw) & ~np.isfinite(array)):
            raise BadRequest(f"{what}: data is out of range for {datatype}")
    return array


def _exact_integers(data: list[Any], datatype: str, what: str) -> Array:
    """The slow, exact path for JSON integers numpy cannot hold in int64: each must be an int that fits."""
    try:
        objects = np.asarray(data, dtype=object).reshape(-1)
    except (ValueError, TypeError, RecursionError) as exc:
        raise BadRequest(f"{what}: 'data' is ragged or malformed: {exc}") from None
    if not all(type(value) is int for value in objects):
        # orjson reads an integer past 64 bits as a float: whole, and beyond every integer type's range
        if any(type(value) is float and value.is_integer() and not -(2**63) < value < 2**64 for value in objects):
            raise BadRequest(f"{what}: data is out of range for {datatype}")
        raise BadRequest(f"{what}: {datatype} data must be integers")
    try:
        return objects.astype(OIP_TO_NUMPY[datatype])
    except (OverflowError, ValueError, TypeError):
        raise BadRequest(f"{what}: data is out of range for {datatype}") from None


def _parameters(raw: Mapping[str, Any], what: str) -> dict[str, Any]:
    params = raw.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"{what}: 'parameters' must be an object")
    return params


def split_body(body: bytes, header_length: int | None) -> tuple[Any, memoryview]:
    """Split a request or response body into its JSON header (parsed) and the binary region after it.

    The binary region is a view into `body` (no copy).

    Raises:
        BadRequest: the header length is out of range or the header is not a JSON object.
    """
    if header_length is None:
        header_bytes, binary = body, memoryview(b"")
    else:
        if header_length < 0 or header_length > len(body):
            raise BadRequest(f"Inference-Header-Content-Length is {header_length}; the body has {len(body)} bytes")
        header_bytes, binary = body[:header_length], memoryview(body)[header_length:]
    try:
        header = _loads(header_bytes)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, integers of over 4300 digits, nesting
        hint = ""
        if header_length is None and isinstance(exc, json.JSONDecodeError) and exc.msg == "Extra data":
            hint = " (binary tensors after the JSON need an Inference-Header-Content-Length header: its length)"
        raise BadRequest(f"request body is not valid JSON: {exc}{hint}") from None
    if not isinstance(header, dict):
        raise BadRequest("request body must be a JSON object")
    return header, binary


def _loads(data: bytes) -> Any:
    """JSON `data` parsed: by orjson, or by the standard library where orjson refuses it (NaN, Infinity, integers
    past 64 bits: what json accepts; and malformed JSON, so that the error names its line and column as before).

    Raises:
        ValueError: not JSON (json.JSONDecodeError), or bad UTF-8.
        RecursionError: nested deeper than the interpreter's recursion limit.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def _dumps(value: Any, finite: bool = True) -> bytes:
    """`value` as compact JSON: by orjson, or by the standard library where orjson would write something else
    (`finite` False: a float is NaN or infinite, which orjson writes as null) or refuses it (a lone surrogate)."""
    if finite:
        try:
            return orjson.dumps(value)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(value, separators=(",", ":")).encode()


def _tensors(
    header: Mapping[str, Any], key: str, binary: memoryview, what: str
) -> list[tuple[str, str, tuple[int, ...], Array]]:
    raw_list = header.get(key)
    if not isinstance(raw_list, list) or (key == "inputs" and not raw_list):
        raise BadRequest(f"{what} must have a non-empty '{key}' list")
    out = []
    offset = 0
    for index, raw in enumerate(raw_list):
        if not isinstance(raw, dict):
            raise BadRequest(f"{key}[{index}] must be an object")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"{key}[{index}] has no 'name'")
        label = f"{key[:-1]} {name!r}"
        datatype = raw.get("datatype")
        if not isinstance(datatype, str) or datatype not in OIP_TO_NUMPY:
            raise BadRequest(f"{label}: unsupported datatype {_excerpt(datatype)}; use one of {sorted(OIP_TO_NUMPY)}")
        shape = check_shape(raw.get("shape"), label)
        size = _parameters(raw, label).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"{label}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise BadRequest(f"{label}: binary_data_size {size} runs past the {len(binary)} bytes of binary data")
            if "data" in raw:
                raise BadRequest(f"{label}: has both 'data' and binary_data_size")
            array = tensor_from_binary(binary[offset : offset + size], datatype, shape, label)
            offset += size
        else:
            if "data" not in raw:
                raise BadRequest(f"{label}: has neither 'data' nor parameters.binary_data_size")
            array = _from_json_data(raw["data"], datatype, shape, label)
        out.append((name, datatype, shape, array))
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data are not claimed by any tensor")
    return out


def decode_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Parse an inference request body (JSON, or JSON header + binary tensors).

    Raises:
        BadRequest: anything malformed, with a message that names the tensor and the problem.
    """
    if not body:  # e.g. `curl -d @FILE` with a FILE that is not there sends nothing
        raise BadRequest("request body is empty: send a JSON object with 'inputs'")
    header, binary = split_body(body, header_length)
    inputs = [
        InferInput(name=n, datatype=d, shape=s, array=a)
        for n, d, s, a in _tensors(header, "inputs", binary, "inference request")
    ]
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise BadRequest("inference request names an input twice")
    params = _parameters(header, "request")
    outputs: list[RequestedOutput] | None = None
    # an empty list asks for every output, as it does over gRPC (it reached the runtime as "no names", which
    # onnxruntime reads as "all", and the answer failed as the model's fault)
    if header.get("outputs") not in (None, []):
        raw_outputs = header["outputs"]
        if not isinstance(raw_outputs, list):
            raise BadRequest("request 'outputs' must be a list")
        outputs = []
        named: set[str] = set()  # a set: scanning the list for each name costs seconds at a few thousand
        for index, raw in enumerate(raw_outputs):
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise BadRequest(f"outputs[{index}] must be an object with a 'name'")
            binary_flag = _parameters(raw, f"outputs[{index}]").get("binary_data")
            if raw["name"] in named:
                raise BadRequest(f"request names output {raw['name']!r} twice")
            named.add(raw["name"])
            outputs.append(
                RequestedOutput(name=raw["name"], binary=bool(binary_flag) if binary_flag is not None else None)
            )
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("request 'id' must be a string")
    return InferRequest(
        id=request_id,
        inputs=inputs,
        outputs=outputs,
        binary_output=bool(params.get("binary_data_output", False)),
        parameters=params,
    )


def check_inputs(request: InferRequest, specs: Sequence[TensorSpec], model: str) -> dict[str, Array]:
    """Match a decoded request against the model's inputs; return the feeds for the runtime.

    Raises:
        BadRequest: unknown, missing or duplicate inputs, or a datatype or shape the model does not take.
    """
    by_name = {spec.name: spec for spec in specs}
    feeds: dict[str, Array] = {}
    for tensor in request.inputs:
        spec = by_name.get(tensor.name)
        if spec is None:
            raise BadRequest(f"model {model} has no input {tensor.name!r}; its inputs are {sorted(by_name)}")
        if tensor.datatype != spec.datatype:
            raise BadRequest(f"input {tensor.name!r} is {tensor.datatype}; model {model} expects {spec.datatype}")
        if not spec.accepts_shape(tensor.shape):
            raise BadRequest(
                f"input {tensor.name!r} has shape {list(tensor.shape)}; model {model} expects {list(spec.shape)}"
                " (-1 = any size)"
            )
        feeds[tensor.name] = tensor.array
    missing = sorted(by_name.keys() - feeds.keys())
    if missing:
        raise BadRequest(f"model {model} needs inputs {missing}, which the request does not give")
    return feeds


def check_outputs(request: InferRequest, specs: Sequence[TensorSpec], model: str) -> list[tuple[str, bool]]:
    """Which outputs to return and whether each goes as binary.

    Raises:
        BadRequest: the request asks for an output the model does not have.
    """
    names = [spec.name for spec in specs]
    if request.outputs is None:
        return [(name, request.binary_output) for name in names]
    chosen = []
    for wanted in request.outputs:
        if wanted.name not in names:
            raise BadRequest(f"model {model} has no output {wanted.name!r}; its outputs are {names}")
        chosen.append((wanted.name, request.binary_output if wanted.binary is None else wanted.binary))
    return chosen


def tensor_to_binary(array: Array, datatype: str) -> Buffer:
    """A tensor's raw bytes as the binary extension and gRPC's raw contents carry them (see the module doc)."""
    if datatype == "BYTES":
        parts = []
        for item in array.reshape(-1):
            raw = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(raw)))
            parts.append(raw)
        return b"".join(parts)
    # A view of the array's own memory: the body is assembled with a single copy in join_body.
    contiguous = np.ascontiguousarray(array, dtype=OIP_TO_NUMPY[datatype].newbyteorder("<"))
    return contiguous.reshape(-1).view(np.uint8).data


def _to_json_data(array: Array, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return [item.decode(errors="replace") if isinstance(item, bytes) else str(item) for item in array.reshape(-1)]
    flat: list[Any] = array.reshape(-1).tolist()
    return flat


def encode_tensors(
    tensors: Iterable[tuple[str, Array, bool]],
) -> tuple[list[dict[str, Any]], list[Buffer], bool]:
    """Tensor objects for a header, the binary parts (in order) for those sent as binary, and whether every
    float sent as JSON is finite (`join_body` takes it).

    Raises:
        BadRequest: an array's dtype has no Open Inference Protocol datatype.
    """
    objects: list[dict[str, Any]] = []
    parts: list[Buffer] = []
    finite = True
    for name, array, binary in tensors:
        datatype = oip_from_numpy(array.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = tensor_to_binary(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            entry["data"] = _to_json_data(array, datatype)
            finite = finite and (array.dtype.kind != "f" or bool(np.isfinite(array).all()))
        objects.append(entry)
    return objects, parts, finite


def join_body(header: Mapping[str, Any], parts: Sequence[Buffer], finite: bool = True) -> tuple[bytes, int | None]:
    """Serialise a header and binary parts; the second value is the header length (None: pure JSON). `finite`
    False: a float in the header is NaN or infinite (written as the standard library writes it: NaN, Infinity)."""
    header_bytes = _dumps(header, finite)
    if not parts:
        return header_bytes, None
    return b"".join([header_bytes, *parts]), len(header_bytes)


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Iterable[tuple[str, Array, bool]],
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """An inference response body; returns (body, header length or None when it is plain JSON)."""
    objects, parts, finite = encode_tensors(outputs)
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": objects}
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = dict(parameters)
    return join_body(header, parts, finite)


def encode_request(
    inputs: Mapping[str, Array],
    *,
    binary: bool = True,
    outputs: Sequence[str] | None = None,
    binary_output: bool = True,
    request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """An inference request body for `inputs`, binary by default (what a Triton client sends)."""
    objects, parts, finite = encode_tensors((name, np.asarray(array), binary) for name, array in inputs.items())
    header: dict[str, Any] = {"inputs": objects}
    if request_id is not None:
        header["id"] = request_id
    if outputs is not None:
        header["outputs"] = [{"name": n, "parameters": {"binary_data": binary_output}} for n in outputs]
    elif binary_output:
        header["parameters"] = {"binary_data_output": True}
    return join_body(header, parts, finite)


def decode_response(body: bytes, header_length: int | None = None) -> tuple[dict[str, Any], dict[str, Array]]:
    """Parse an inference response into its header and output arrays by name.

    Raises:
        BadRequest: the response is malformed.
    """
    header, binary = split_body(body, header_length)
    arrays = {name: array for name, _, _, array in _tensors(header, "outputs", binary, "inference response")}
    return header, arrays
