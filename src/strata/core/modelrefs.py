"""What a package's model may reference outside its own bytes: pure checks over the model file, no I/O.

A model file is data from its author. An ONNX tensor can keep its values in "external data": a file named by a
`location` string, which onnxruntime (and OpenVINO's ONNX reader) resolves against the folder of the model, or
against the process's working directory when the model is given as bytes. A package may use external data only
for files it lists in its manifest (and so hashes), named exactly as listed: no `..`, no absolute path, no drive
letter or backslash. `onnx_external_refs` finds every such reference by walking the protobuf wire format
(initializers, sparse initializers, attribute tensors, subgraphs, model-local functions and training graphs), so
neither the agent nor the control plane needs the `onnx` package to decide. An OpenVINO package's model must be IR
XML (`check_openvino_ir`): OpenVINO reads ONNX and other formats from the same bytes, and those could reference
files the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from strata.core.errors import PackageError

MAX_DEPTH: Final = 64  # nested messages (subgraphs of subgraphs); protobuf's own parser stops at 100
EXTERNAL: Final = 1  # TensorProto.DataLocation.EXTERNAL
ORT_MEMORY_MARKER: Final = "_ORT_MEM_ADDR_"  # in onnxruntime's `*/_ORT_MEM_ADDR_/*` location: "offset is an address"

# Field numbers of onnx.proto3 that lead to tensors. Each message kind maps a field number to the kind of the
# message in it; every other field is skipped.
_MODEL: Final = {7: "graph", 20: "training", 25: "function"}
_TRAINING: Final = {1: "graph", 2: "graph"}  # TrainingInfoProto.initialization, .algorithm
_FUNCTION: Final = {7: "node", 11: "attribute"}  # FunctionProto.node, .attribute_proto
_GRAPH: Final = {1: "node", 5: "tensor", 15: "sparse"}  # GraphProto.node, .initializer, .sparse_initializer
_NODE: Final = {5: "attribute"}  # NodeProto.attribute
# AttributeProto.t, .g, .tensors, .graphs, .sparse_tensor, .sparse_tensors
_ATTRIBUTE: Final = {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"}
_SPARSE: Final = {1: "tensor", 2: "tensor"}  # SparseTensorProto.values, .indices
_KINDS: Final = {
    "model": _MODEL,
    "training": _TRAINING,
    "function": _FUNCTION,
    "graph": _GRAPH,
    "node": _NODE,
    "attribute": _ATTRIBUTE,
    "sparse": _SPARSE,
}
_TENSOR_NAME: Final = 8
_TENSOR_EXTERNAL_DATA: Final = 13
_TENSOR_DATA_LOCATION: Final = 14


@dataclass(frozen=True)
class ExternalRef:
    """One tensor whose values live outside the model file: the file's `location` and the byte range."""

    tensor: str
    location: str
    offset: int
    length: int | None


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise PackageError("the model is not a valid ONNX protobuf: a varint runs past its end")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of one message: varints as ints, length-delimited fields as views."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise PackageError("the model is not a valid ONNX protobuf: field number 0")
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(data, pos)
            if length > len(data) - pos:
                raise PackageError("the model is not a valid ONNX protobuf: a field runs past its message")
            yield number, wire, data[pos : pos + length]
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > len(data):
                raise PackageError("the model is not a valid ONNX protobuf: a field runs past its message")
        else:  # groups (3, 4) and the unused wire types: ONNX has none, and a parser could read them differently
            raise PackageError(f"the model is not a valid ONNX protobuf: wire type {wire}")


def _tensor_ref(data: memoryview) -> ExternalRef | None:
    name = ""
    location_kind = 0
    entries: list[tuple[str, str]] = []
    for number, _wire, value in _fields(data):
        if number == _TENSOR_NAME and isinstance(value, memoryview):
            name = _text(value, "tensor name")
        elif number == _TENSOR_DATA_LOCATION and isinstance(value, int):
            location_kind = value  # the last one wins, as in protobuf
        elif number == _TENSOR_EXTERNAL_DATA and isinstance(value, memoryview):
            key = val = ""
            for entry_number, _, entry_value in _fields(value):
                if entry_number in (1, 2) and isinstance(entry_value, memoryview):
                    if entry_number == 1:
                        key = _text(entry_value, "external data key")
                    else:
                        val = _text(entry_value, "external data value")
            entries.append((key, val))
    if location_kind != EXTERNAL and not entries:
        return None
    label = name or "(unnamed)"
    keys = [key for key, _ in entries]
    if len(set(keys)) != len(keys):
        raise PackageError(f"tensor {label!r} names its external data twice")
    info = dict(entries)
    location = info.get("location")
    if not location:
        raise PackageError(f"tensor {label!r} has external data without a location")
    offset = _number(info.get("offset", "0"), label, "offset")
    length = _number(info["length"], label, "length") if "length" in info else None
    return ExternalRef(tensor=label, location=location, offset=offset, length=length)


def _text(value: memoryview, what: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise PackageError(f"the model is not a valid ONNX protobuf: a {what} is not UTF-8") from None


def _number(text: str, tensor: str, what: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise PackageError(f"tensor {tensor!r} has a malformed external data {what} {text!r}")
    return int(text)


def onnx_external_refs(model: bytes | bytearray | memoryview) -> tuple[ExternalRef, ...]:
    """Every tensor of an ONNX model that keeps its values in external data, in file order.

    A tensor counts when its data_location is EXTERNAL or it has any external_data entry (protobuf merges
    repeated occurrences, so either alone could make it external). Large fields (raw weights) are skipped by
    length, not copied.

    Raises:
        PackageError: the bytes are not an ONNX protobuf this reader can walk (truncated fields, groups, nesting
            deeper than MAX_DEPTH), or a tensor's external data is malformed (no location, a key twice, an offset
            or length that is not a decimal number).
    """
    found: list[ExternalRef] = []
    # An explicit stack, not recursion: the nesting depth is the attacker's to choose.
    stack: list[tuple[str, memoryview, int]] = [("model", memoryview(model), 0)]
    while stack:
        kind, data, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise PackageError(f"the model nests graphs deeper than {MAX_DEPTH} levels")
        if kind == "tensor":
            ref = _tensor_ref(data)
            if ref is not None:
                found.append(ref)
            continue
        children = _KINDS[kind]
        nested = [
            (children[number], value, depth + 1)
            for number, wire, value in _fields(data)
            if wire == 2 and number in children and isinstance(value, memoryview)
        ]
        stack.extend(reversed(nested))
    return tuple(found)


def check_location(location: str) -> None:
    """An external data location must be a plain relative POSIX path inside the package, and not onnxruntime's
    memory-address marker (`*/_ORT_MEM_ADDR_/*`: onnxruntime takes the tensor's offset as a pointer into its own
    process, whatever files are listed).

    Raises:
        PackageError: it is empty, absolute, has a drive letter, a backslash, NUL, `.` or `..` or empty parts, or
            holds the memory-address marker.
    """
    if ORT_MEMORY_MARKER in location:
        raise PackageError(
            f"external data location {location!r} is onnxruntime's marker for data at a memory address, not a file"
        )
    parts = location.split("/")
    if (
        not location
        or location.startswith("/")
        or "\\" in location
        or ":" in location
        or "\x00" in location
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise PackageError(f"external data location {location!r} is not a plain path inside the package")


def check_external_refs(refs: tuple[ExternalRef, ...], files: Mapping[str, int], model_file: str) -> None:
    """Every reference names a file of the package other than the model (`files`: path -> size, as listed in the
    manifest, whose hashes verification checks) and stays inside it.

    Raises:
        PackageError: a location is not a plain relative path, names a file the package does not list (or the
            model itself), or its byte range runs past the file's end.
    """
    for ref in refs:
        check_location(ref.location)
        size = files.get(ref.location)
        if size is None or ref.location == model_file:
            raise PackageError(
                f"tensor {ref.tensor!r} reads external data from {ref.location!r}, which is not a file of this "
                "package: external data must be a file the manifest lists"
            )
        end = ref.offset + (ref.length if ref.length is not None else 0)
        if ref.offset > size or end > size:
            raise PackageError(
                f"tensor {ref.tensor!r} reads bytes {ref.offset}..{end} of {ref.location!r}, which has {size}"
            )


def check_openvino_ir(model: bytes | bytearray | memoryview) -> None:
    """An OpenVINO package's model is IR XML: its root element is `net`, with no document type declaration.

    OpenVINO picks a reader by content, so ONNX (or another format) given as the "xml" would be read as such,
    with its own file references. IR itself names no files: its constants are offsets into the weights buffer
    the runtime hands over.

    Raises:
        PackageError: the bytes are not IR XML.
    """
    from xml.parsers import expat

    found: list[str] = []

    class _Stop(Exception):
        pass

    def start(name: str, _attributes: object) -> None:
        found.append(name)
        raise _Stop

    def doctype(*_args: object) -> None:
        raise PackageError("the OpenVINO model declares a document type: IR XML has none")

    parser = expat.ParserCreate()
    parser.StartElementHandler = start
    parser.StartDoctypeDeclHandler = doctype
    try:
        parser.Parse(bytes(model), True)
    except _Stop:
        pass
    except expat.ExpatError as exc:
        raise PackageError(f"the OpenVINO model is not IR XML: {exc}") from None
    if found != ["net"]:
        raise PackageError("the OpenVINO model is not IR XML: its root element is not <net>")
