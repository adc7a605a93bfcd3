"""The Open Inference Protocol's gRPC messages (KServe v2 `inference.*`, with Triton's extensions), both ways.

Pure functions over protobuf messages and numpy arrays; the gRPC service (`strata.agent.oip_grpc`) drives them.
The message classes come from the descriptor set in `strata.agent.oip_grpc_descriptor` (vendored, see
tools/gen-oip-grpc), built in a descriptor pool of their own, so they never clash with another copy of the same
`inference.*` names in the process (tritonclient.grpc's).

A `ModelInferRequest` is checked as strictly as a REST body (`strata.core.oip`): every shape is checked before
anything is built from it, raw contents must hold exactly the bytes their shape and datatype need, typed contents
exactly the number of elements and in the field of their datatype, values that do not fit a narrow datatype are
refused, and the tensors are views of the received bytes wherever they can be. Every fault is a `BadRequest` that
names the tensor. Answers carry every output in `raw_output_contents`, as Triton's do.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any, Final

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError

from strata.agent.oip_grpc_descriptor import FILE_DESCRIPTOR_SET
from strata.core.datatypes import OIP_TO_NUMPY, oip_from_numpy
from strata.core.errors import BadRequest
from strata.core.oip import (
    MAX_BYTES_ELEMENTS,
    Array,
    InferInput,
    InferRequest,
    RequestedOutput,
    check_shape,
    tensor_from_binary,
    tensor_to_binary,
)

# The typed-contents field of each datatype, and the numpy type its values arrive in. FP16 (and BF16) have none:
# they travel only as raw contents.
CONTENTS_FIELD: Final[dict[str, tuple[str, Any]]] = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int32),
    "INT16": ("int_contents", np.int32),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint32),
    "UINT16": ("uint_contents", np.uint32),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
    "BYTES": ("bytes_contents", np.object_),
}


@functools.cache
def message_class(name: str) -> Any:
    """The class of message `inference.<name>` (built once, from the vendored descriptors, in a private pool).

    Raises:
        KeyError: no such message in the descriptors.
    """
    return _message_classes()[f"inference.{name}"]


@functools.cache
def _message_classes() -> dict[str, Any]:
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(FILE_DESCRIPTOR_SET)
    pool = descriptor_pool.DescriptorPool()
    for file in descriptors.file:
        pool.Add(file)
    classes: dict[str, Any] = message_factory.GetMessageClassesForFiles([f.name for f in descriptors.file], pool)
    return classes


def parse_message(name: str, data: bytes) -> Any:
    """Parse a serialized `inference.<name>`.

    Raises:
        BadRequest: the bytes are not that message.
    """
    try:
        return message_class(name).FromString(data)
    except DecodeError as exc:
        raise BadRequest(f"the request is not a valid inference.{name}: {exc}") from None


def from_json(name: str, payload: Mapping[str, Any]) -> Any:
    """An `inference.<name>` from its JSON form (Triton's REST answers are the JSON form of its gRPC messages)."""
    return json_format.ParseDict(payload, message_class(name)())


def decode_infer_request(message: Any) -> InferRequest:
    """A `ModelInferRequest` as the decoded request the REST decoder makes (`strata.core.oip.InferRequest`).

    Raises:
        BadRequest: no inputs, an input named twice, an unknown datatype, a bad shape, contents that do not
            match the shape and datatype, raw and typed contents mixed, or an output named twice.
    """
    tensors = message.inputs
    raw_contents = message.raw_input_contents
    if not tensors:
        raise BadRequest("inference request must have at least one input")
    if raw_contents and len(raw_contents) != len(tensors):
        raise BadRequest(
            f"raw_input_contents has {len(raw_contents)} entries for {len(tensors)} inputs; give one per input,"
            " in the order of 'inputs'"
        )
    inputs: list[InferInput] = []
    for index, tensor in enumerate(tensors):
        label = f"input {tensor.name!r}" if tensor.name else f"inputs[{index}]"
        if not tensor.name:
            raise BadRequest(f"{label} has no name")
        datatype = tensor.datatype
        if datatype not in OIP_TO_NUMPY:
            raise BadRequest(f"{label}: unsupported datatype {datatype[:40]!r}; use one of {sorted(OIP_TO_NUMPY)}")
        shape = check_shape(list(tensor.shape), label)
        if raw_contents:
            if tensor.HasField("contents"):
                raise BadRequest(f"{label} has typed contents while the request uses raw_input_contents")
            array = tensor_from_binary(
                memoryview(raw_contents[index]), datatype, shape, label, size_name="its raw_input_contents"
            )
        else:
            array = _from_contents(tensor.contents, datatype, shape, label)
        inputs.append(InferInput(name=tensor.name, datatype=datatype, shape=shape, array=array))
    names = [tensor.name for tensor in inputs]
    if len(set(names)) != len(names):
        raise BadRequest("inference request names an input twice")
    outputs: list[RequestedOutput] | None = None
    if message.outputs:
        outputs = []
        named: set[str] = set()  # a set: scanning the list for each name costs seconds at a few thousand
        for index, wanted in enumerate(message.outputs):
            if not wanted.name:
                raise BadRequest(f"outputs[{index}] has no name")
            if wanted.name in named:
                raise BadRequest(f"request names output {wanted.name!r} twice")
            named.add(wanted.name)
            outputs.append(RequestedOutput(name=wanted.name, binary=True))
    return InferRequest(id=message.id or None, inputs=inputs, outputs=outputs, binary_output=True)


def _from_contents(contents: Any, datatype: str, shape: tuple[int, ...], label: str) -> Array:
    """A tensor from its typed contents: exactly `shape`'s elements, in the field of `datatype`, each in range.

    Raises:
        BadRequest: as said.
    """
    count = math.prod(shape)
    if datatype not in CONTENTS_FIELD:
        raise BadRequest(f"{label}: {datatype} has no typed contents field; send it in raw_input_contents")
    field, wire = CONTENTS_FIELD[datatype]
    present = [descriptor.name for descriptor, _ in contents.ListFields()]
    stray = [name for name in present if name != field]
    if stray:
        raise BadRequest(f"{label} is {datatype}, whose values go in contents.{field}, not in {', '.join(stray)}")
    if datatype == "BYTES" and count > MAX_BYTES_ELEMENTS:  # as REST's decoder: each element is a Python object
        raise BadRequest(f"{label}: {count} BYTES elements; at most {MAX_BYTES_ELEMENTS} are supported")
    values = getattr(contents, field)
    if len(values) != count:
        raise BadRequest(f"{label}: contents.{field} has {len(values)} elements; shape {list(shape)} needs {count}")
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        for i, value in enumerate(values):
            array[i] = value
        return array.reshape(shape)
    received = np.fromiter(values, dtype=wire, count=count)
    target = OIP_TO_NUMPY[datatype]
    if target == received.dtype:
        return received.reshape(shape)
    narrowed = received.astype(target)
    if not np.array_equal(narrowed, received):
        raise BadRequest(f"{label}: contents.{field} holds values out of range for {datatype}")
    return narrowed.reshape(shape)


def encode_infer_response(
    model_name: str, model_version: str, request_id: str | None, outputs: Iterable[tuple[str, Array]]
) -> bytes:
    """A serialized `ModelInferResponse` with every output in `raw_output_contents` (little-endian, row-major;
    BYTES elements each a 4-byte length and the bytes).

    Raises:
        BadRequest: an array's dtype has no Open Inference Protocol datatype.
    """
    response = message_class("ModelInferResponse")(model_name=model_name, model_version=model_version)
    if request_id:
        response.id = request_id
    for name, array in outputs:
        datatype = oip_from_numpy(array.dtype)
        tensor = response.outputs.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(array.shape)
        response.raw_output_contents.append(bytes(tensor_to_binary(array, datatype)))
    data: bytes = response.SerializeToString()
    return data
