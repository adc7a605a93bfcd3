"""The Open Inference Protocol codec (strata.core.oip): round trips of every datatype, and every malformed case."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest

from strata.core.datatypes import OIP_TO_NUMPY
from strata.core.errors import BadRequest
from strata.core.oip import (
    check_inputs,
    check_outputs,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    split_body,
)
from strata.core.package import TensorSpec


def sample_array(datatype: str) -> np.ndarray[Any, Any]:
    """A 2x3 array of `datatype` that includes the extremes of its range."""
    if datatype == "BYTES":
        values: list[Any] = [b"", b"a", "é".encode(), b"hello world", b"x" * 300, b"end"]
        array = np.empty(6, dtype=object)
        array[:] = values
        return array.reshape(2, 3)
    dtype = OIP_TO_NUMPY[datatype]
    if dtype.kind == "b":
        return np.array([[True, False, True], [False, False, True]])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([[info.min, info.max, 0], [1, info.max - 1, 7]], dtype=dtype)
    finfo = np.finfo(dtype)
    return np.array([[finfo.min, finfo.max, 0.0], [-1.5, finfo.tiny, 3.25]], dtype=dtype)


def request_body(*tensors: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"inputs": list(tensors), **extra}).encode()


def tensor(name: str = "x", datatype: str = "FP32", shape: list[Any] | None = None, **fields: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": [2] if shape is None else shape, **fields}


def decode_error(body: bytes, header_length: int | None = None) -> str:
    with pytest.raises(BadRequest) as caught:
        decode_request(body, header_length)
    return str(caught.value)


# --- round trips ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", sorted(OIP_TO_NUMPY))
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_request_round_trip_every_datatype(datatype: str, binary: bool) -> None:
    array = sample_array(datatype)
    body, header_length = encode_request({"t": array}, binary=binary)
    assert (header_length is not None) is binary

    decoded = decode_request(body, header_length)

    (got,) = decoded.inputs
    assert (got.name, got.datatype, got.shape) == ("t", datatype, (2, 3))
    assert got.array.dtype == OIP_TO_NUMPY[datatype]
    assert got.array.tolist() == array.tolist()


@pytest.mark.parametrize("datatype", sorted(OIP_TO_NUMPY))
def test_response_round_trip_mixes_binary_and_json(datatype: str) -> None:
    array = sample_array(datatype)
    body, header_length = encode_response("m", "3", "req-1", [("bin", array, True), ("txt", array, False)])

    header, arrays = decode_response(body, header_length)

    assert (header["model_name"], header["model_version"], header["id"]) == ("m", "3", "req-1")
    assert [o["name"] for o in header["outputs"]] == ["bin", "txt"]
    assert "binary_data_size" in header["outputs"][0]["parameters"]
    assert "data" in header["outputs"][1]
    for name in ("bin", "txt"):
        assert arrays[name].tolist() == array.tolist()
        assert arrays[name].dtype == OIP_TO_NUMPY[datatype]


def test_pure_json_response_has_no_header_length() -> None:
    body, header_length = encode_response("m", "1", None, [("y", np.arange(3, dtype=np.int64), False)])
    assert header_length is None
    assert json.loads(body) == {
        "model_name": "m",
        "model_version": "1",
        "outputs": [{"name": "y", "datatype": "INT64", "shape": [3], "data": [0, 1, 2]}],
    }


def test_binary_inputs_are_views_of_the_body_not_copies() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    body, header_length = encode_request({"x": array})

    decoded = decode_request(body, header_length)

    assert np.shares_memory(decoded.inputs[0].array, np.frombuffer(body, dtype=np.uint8))


def test_binary_tensors_are_taken_in_header_order() -> None:
    first, second = np.arange(3, dtype=np.int32), np.arange(5, dtype=np.float64)
    body, header_length = encode_request({"a": first, "b": second})
    decoded = decode_request(body, header_length)
    assert decoded.inputs[0].array.tolist() == first.tolist()
    assert decoded.inputs[1].array.tolist() == second.tolist()


def test_nested_and_flat_json_data_decode_the_same() -> None:
    nested = request_body(tensor("x", "INT32", [2, 3], data=[[1, 2, 3], [4, 5, 6]]))
    flat = request_body(tensor("x", "INT32", [2, 3], data=[1, 2, 3, 4, 5, 6]))
    for body in (nested, flat):
        assert decode_request(body).inputs[0].array.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_scalar_and_empty_tensors() -> None:
    scalar = decode_request(request_body(tensor("s", "FP64", [], data=2.5)))
    assert scalar.inputs[0].array.shape == ()
    assert float(scalar.inputs[0].array) == 2.5
    empty = decode_request(request_body(tensor("e", "INT64", [0, 4], data=[])))
    assert empty.inputs[0].array.shape == (0, 4)
    assert empty.inputs[0].array.dtype == np.int64


def test_request_fields_id_outputs_and_binary_output_flag() -> None:
    body = request_body(
        tensor("x", data=[1, 2]),
        id="abc",
        outputs=[{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
        parameters={"binary_data_output": False},
    )
    decoded = decode_request(body)
    assert decoded.id == "abc"
    assert decoded.outputs is not None
    assert [(o.name, o.binary) for o in decoded.outputs] == [("y", True), ("z", None)]
    assert decoded.binary_output is False


def test_split_body_returns_the_binary_region_after_the_header() -> None:
    header, binary = split_body(b'{"a":1}XYZ', 7)
    assert header == {"a": 1}
    assert bytes(binary) == b"XYZ"


# --- malformed requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header_length", "needle"),
    [
        (-1, "Inference-Header-Content-Length is -1"),
        (10_000, "Inference-Header-Content-Length is 10000"),
        (5, "not valid JSON"),  # cuts the JSON header short
    ],
)
def test_wrong_header_length(header_length: int, needle: str) -> None:
    body, _ = encode_request({"x": np.zeros(2, dtype=np.float32)})
    assert needle in decode_error(body, header_length)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # nesting deeper than the parser's recursion
        (b'{"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [' + b"9" * 5000 + b"]}]}", "JSON"),
        (b"[]", "must be a JSON object"),
        (b"{}", "non-empty 'inputs' list"),
        (b'{"inputs": []}', "non-empty 'inputs' list"),
        (b'{"inputs": [1]}', "inputs[0] must be an object"),
        (b'{"inputs": [{"datatype": "FP32"}]}', "has no 'name'"),
    ],
)
def test_malformed_json_documents(body: bytes, needle: str) -> None:
    assert needle in decode_error(body)


def test_an_empty_body_and_binary_tensors_without_their_header_length_say_so() -> None:
    """Both answered only "Expecting value: line 1 column 1 (char 0)" or "Extra data: line 1 column 120"."""
    assert decode_error(b"") == "request body is empty: send a JSON object with 'inputs'"
    body, header_length = encode_request({"x": np.zeros(2, dtype=np.float32)}, binary=True)
    assert header_length is not None
    assert "need an Inference-Header-Content-Length header" in decode_error(body)
    assert "Inference-Header-Content-Length" not in decode_error(b'{"inputs": [1]} {}', len(b'{"inputs": [1]} {}'))


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (tensor(datatype="FP8", data=[1, 2]), "unsupported datatype 'FP8'"),
        (tensor(datatype="BF16", data=[1, 2]), "unsupported datatype 'BF16'"),
        (tensor(shape=[-1], data=[1]), "'shape' must be a list of non-negative integers"),
        (tensor(shape=[2.0], data=[1, 2]), "'shape' must be a list of non-negative integers"),
        (tensor(shape=[True], data=[1]), "'shape' must be a list of non-negative integers"),
        (tensor(shape="2", data=[1, 2]), "'shape' must be a list of non-negative integers"),
        (tensor(shape=[1 << 20, 1 << 20]), "holds more than"),
        (tensor(data=[[1, 2], [3]]), "ragged"),
        (tensor(data=[1, [2]]), "ragged"),
        (tensor(data=[1, 2, 3]), "'data' has 3 elements; shape [2] needs 2"),
        (tensor(shape=[2, 2], data=[[1, 2], [3, 4], [5, 6]]), "'data' has 6 elements; shape [2, 2] needs 4"),
        (tensor(), "has neither 'data' nor parameters.binary_data_size"),
        (tensor(data=["a", "b"]), "not FP32 numbers"),
        (tensor(data=[None, 1]), "not FP32 numbers"),
        (tensor(data=[{}, 1]), "not FP32 numbers"),
        (tensor(datatype="INT32", data=[1.5, 2]), "INT32 data must be integers"),
        (tensor(datatype="INT64", data=[1.0, 2.0]), "INT64 data must be integers"),
        (tensor(datatype="INT32", data=[True, False]), "must be numbers, not true or false"),
        (tensor(datatype="BOOL", data=[1, 0]), "BOOL data must be true or false"),
        (tensor(datatype="INT8", data=[127, 128]), "out of range for INT8"),
        (tensor(datatype="INT8", data=[-129, 0]), "out of range for INT8"),
        (tensor(datatype="UINT8", data=[-1, 0]), "out of range for UINT8"),
        (tensor(datatype="UINT16", data=[65536, 0]), "out of range for UINT16"),
        (tensor(datatype="INT32", data=[2**31, 0]), "out of range for INT32"),
        (tensor(datatype="UINT32", data=[2**32, 0]), "out of range for UINT32"),
        (tensor(datatype="INT64", data=[2**63, 0]), "out of range for INT64"),
        (tensor(datatype="UINT64", data=[-1, 0]), "out of range for UINT64"),
        (tensor(datatype="UINT64", data=[2**64, 0]), "out of range for UINT64"),
        (tensor(datatype="UINT64", data=[2**64 - 1, 1.5]), "UINT64 data must be integers"),
        (tensor(datatype="FP16", data=[1e10, 0]), "out of range for FP16"),
        (tensor(datatype="FP32", data=[1e300, 0]), "out of range for FP32"),
        (tensor(datatype="BYTES", data=["a", 1]), "BYTES data must be strings"),
        (tensor(datatype="BYTES", data=[["a"], ["b", "c"]]), "more than the 2 elements its shape needs"),
        (tensor(data=[1, 2], parameters=[]), "'parameters' must be an object"),
        (tensor(parameters={"binary_data_size": -1}), "binary_data_size must be a non-negative integer"),
        (tensor(parameters={"binary_data_size": "8"}), "binary_data_size must be a non-negative integer"),
        (tensor(parameters={"binary_data_size": 8}), "runs past the 0 bytes of binary data"),
    ],
)
def test_malformed_tensors(raw: dict[str, Any], needle: str) -> None:
    message = decode_error(request_body(raw))
    assert needle in message
    assert "'x'" in message or "inference request" in message  # the message names the tensor


def test_binary_size_that_does_not_fit_the_shape() -> None:
    header = json.dumps({"inputs": [tensor("x", "FP32", [3], parameters={"binary_data_size": 8})]}).encode()
    message = decode_error(header + bytes(8), len(header))
    assert "binary_data_size is 8 bytes; shape [3] of FP32 needs 12" in message


def test_tensor_with_both_data_and_binary() -> None:
    header = json.dumps({"inputs": [tensor("x", "FP32", [2], data=[1, 2], parameters={"binary_data_size": 8})]})
    assert "both 'data' and binary_data_size" in decode_error(header.encode() + bytes(8), len(header))


def test_binary_bytes_no_tensor_claims() -> None:
    body, header_length = encode_request({"x": np.zeros(2, dtype=np.float32)})
    assert "4 bytes of binary data are not claimed" in decode_error(body + b"junk", header_length)


def test_binary_bytes_with_pure_json_tensors() -> None:
    header = request_body(tensor("x", data=[1, 2]))
    assert "3 bytes of binary data are not claimed" in decode_error(header + b"abc", len(header))


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (struct.pack("<I", 1) + b"a", "2 BYTES elements need at least 8 bytes"),
        (struct.pack("<I", 5) + b"abcde", "ends after 1 of 2 elements"),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 9) + b"bc", "element 1 runs past the data"),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b" + b"zz", "has 2 bytes after 2 elements"),
    ],
)
def test_malformed_binary_bytes(payload: bytes, needle: str) -> None:
    header = json.dumps({"inputs": [tensor("s", "BYTES", [2], parameters={"binary_data_size": len(payload)})]})
    assert needle in decode_error(header.encode() + payload, len(header))


def test_duplicate_inputs() -> None:
    body = request_body(tensor("x", data=[1, 2]), tensor("x", data=[3, 4]))
    assert "names an input twice" in decode_error(body)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"outputs": {"name": "y"}}, "'outputs' must be a list"),
        ({"outputs": [{"parameters": {}}]}, "outputs[0] must be an object with a 'name'"),
        ({"outputs": [{"name": "y", "parameters": 3}]}, "outputs[0]: 'parameters' must be an object"),
        ({"outputs": [{"name": "y"}, {"name": "y"}]}, "names output 'y' twice"),
        ({"parameters": [1]}, "request: 'parameters' must be an object"),
        ({"parameters": []}, "request: 'parameters' must be an object"),
        ({"id": 7}, "request 'id' must be a string"),
    ],
)
def test_malformed_request_fields(extra: dict[str, Any], needle: str) -> None:
    assert needle in decode_error(request_body(tensor("x", data=[1, 2]), **extra))


# --- matching a request against a model's signature -----------------------------------------------------

INPUTS = (TensorSpec("pixels", "FP32", (-1, 4)), TensorSpec("mask", "BOOL", (4,)))
OUTPUTS = (TensorSpec("label", "INT64", (-1,)), TensorSpec("scores", "FP32", (-1, 3)))


def check_error(*raw: dict[str, Any]) -> str:
    with pytest.raises(BadRequest) as caught:
        check_inputs(decode_request(request_body(*raw)), INPUTS, "m")
    return str(caught.value)


def test_check_inputs_accepts_a_matching_request_and_returns_feeds() -> None:
    request = decode_request(
        request_body(
            tensor("pixels", "FP32", [2, 4], data=[0.0] * 8),
            tensor("mask", "BOOL", [4], data=[True, False, True, True]),
        )
    )
    feeds = check_inputs(request, INPUTS, "m")
    assert sorted(feeds) == ["mask", "pixels"]
    assert feeds["pixels"].shape == (2, 4)
    assert feeds["mask"].dtype == np.bool_


MASK = tensor("mask", "BOOL", [4], data=[True] * 4)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ((tensor("other", "FP32", [1, 4], data=[0] * 4), MASK), "model m has no input 'other'"),
        ((tensor("pixels", "FP64", [1, 4], data=[0] * 4), MASK), "input 'pixels' is FP64; model m expects FP32"),
        ((tensor("pixels", "FP32", [4], data=[0] * 4), MASK), "input 'pixels' has shape [4]; model m expects [-1, 4]"),
        ((tensor("pixels", "FP32", [2, 3], data=[0] * 6), MASK), "has shape [2, 3]; model m expects [-1, 4]"),
        ((MASK,), "model m needs inputs ['pixels']"),
    ],
)
def test_check_inputs_refuses(raw: tuple[dict[str, Any], ...], needle: str) -> None:
    assert needle in check_error(*raw)


def test_check_outputs_defaults_to_all_outputs_with_the_request_binary_flag() -> None:
    body = request_body(tensor("x", data=[1, 2]), parameters={"binary_data_output": True})
    assert check_outputs(decode_request(body), OUTPUTS, "m") == [("label", True), ("scores", True)]


def test_check_outputs_honours_each_requested_output() -> None:
    body = request_body(tensor("x", data=[1, 2]), outputs=[{"name": "scores", "parameters": {"binary_data": True}}])
    assert check_outputs(decode_request(body), OUTPUTS, "m") == [("scores", True)]


def test_check_outputs_refuses_an_unknown_output() -> None:
    body = request_body(tensor("x", data=[1, 2]), outputs=[{"name": "logits"}])
    with pytest.raises(BadRequest, match=r"model m has no output 'logits'; its outputs are \['label', 'scores'\]"):
        check_outputs(decode_request(body), OUTPUTS, "m")


def test_what_orjson_refuses_or_would_write_otherwise_is_read_and_written_as_the_standard_library_does() -> None:
    # orjson reads and writes JSON tensors; where it refuses input json accepts (NaN and Infinity literals, a lone
    # surrogate in a string, a UTF-8 byte order mark) or would write a non-finite float as null, the standard
    # library does it: what a client may send and what it gets back does not depend on which of the two ran.
    tensor = b'{"name":"x","datatype":"FP32","shape":[4],"data":[NaN,Infinity,-Infinity,1e400]}'
    body = b'\xef\xbb\xbf{"id":"\\ud800","inputs":[' + tensor + b"]}"
    request = decode_request(body)
    assert request.id == "\ud800"
    values = request.inputs[0].array
    assert np.isnan(values[0])
    assert values[1:].tolist() == [np.inf, -np.inf, np.inf]

    outputs = [("y", values, False), ("label", np.array([3], np.int64), False)]
    answer, header_length = encode_response("m", "1", "r-1", outputs)
    assert header_length is None
    assert b'"data":[NaN,Infinity,-Infinity,Infinity]' in answer  # not null: it reads back as the floats sent
    _, arrays = decode_response(answer)
    assert decode_response(encode_response("m", "1", request.id, outputs[1:])[0])[0]["id"] == "\ud800"
    assert np.isnan(arrays["y"][0])
    assert arrays["y"][1:].tolist() == [np.inf, -np.inf, np.inf]

    finite, _ = encode_response("m", "1", "r-1", [("y", np.array([0.5, 1e-05], np.float32), False)])
    assert json.loads(finite)["outputs"][0]["data"] == [0.5, float(np.float32(1e-05))]
    with pytest.raises(BadRequest, match="out of range for INT64"):  # orjson reads this integer as a float
        decode_request(b'{"inputs":[{"name":"x","datatype":"INT64","shape":[1],"data":[-9223372036854775809]}]}')
    with pytest.raises(BadRequest, match=r"not valid JSON: Expecting value: line 1 column 2"):  # json's words
        decode_request(b"[,]")
