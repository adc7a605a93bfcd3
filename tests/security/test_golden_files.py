"""Golden files crafted against the health check (security review of session 7, finding 1).

The attack: a 0.5 MiB golden.npz whose input array is 512 MiB of deflated zeros. `np.load(allow_pickle=False)` stops
pickles, not deflate; it loaded every zip member, named by the manifest or not, and nothing compared the arrays'
shapes with the signature before the model ran on them: the agent reached 1.1 GiB in `load_and_check`. Now a golden
file is read as `np.savez` writes it, and refused from its zip directory and .npy headers before any array is read:
members stored as is, in disjoint ranges of the file, exactly those the signature names, each holding the bytes its
header declares, golden inputs of the signature's datatype and shape.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy
from onnx import TensorProto, helper

from strata.agent.runtime import load_and_check
from strata.core.errors import ModelLoadError, PackageError
from strata.core.hashing import sha256_file
from strata.core.package import GOLDEN_NAME, MODEL_NAME, SCHEMA, TensorSpec, load_golden, read_golden, verify_package

INPUTS = (TensorSpec("x", "FP32", (-1, 4)),)
OUTPUTS = (TensorSpec("y", "FP32", (-1, 4)),)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    npy.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    npy.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def npz(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def genuine() -> dict[str, bytes]:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    return {"input:x.npy": npy_bytes(x), "output:y.npy": npy_bytes(-x)}


def with_sizes(blob: bytes, name: str, size: int) -> bytes:
    """`blob` with the central directory entry of `name` claiming `size` bytes (stored and unpacked alike)."""
    raw = bytearray(blob)
    at = 0
    while True:
        at = raw.index(b"PK\x01\x02", at)
        length = int.from_bytes(raw[at + 28 : at + 30], "little")
        if raw[at + 46 : at + 46 + length] == name.encode():
            break
        at += 4
    raw[at + 20 : at + 28] = size.to_bytes(4, "little") * 2
    return bytes(raw)


def refused(blob: bytes) -> str:
    with pytest.raises(PackageError) as caught:
        read_golden(blob, INPUTS, OUTPUTS)
    return str(caught.value)


def test_the_genuine_golden_file_loads() -> None:
    inputs, outputs = read_golden(npz(genuine()), INPUTS, OUTPUTS)
    assert inputs["x"].shape == (2, 4)
    assert np.array_equal(outputs["y"], -inputs["x"])


def test_what_np_savez_writes_loads() -> None:
    buffer = io.BytesIO()
    x = np.ones((3, 4), np.float32)
    np.savez(buffer, **{"input:x": x, "output:y": x})
    inputs, _ = read_golden(buffer.getvalue(), INPUTS, OUTPUTS)
    assert np.array_equal(inputs["x"], x)


def test_a_deflated_member_is_refused() -> None:
    bomb = {"input:x.npy": npy_header((1 << 22, 4)) + bytes(16 << 22), "output:y.npy": genuine()["output:y.npy"]}
    blob = npz(bomb, zipfile.ZIP_DEFLATED)
    assert len(blob) < 128 << 10  # 64 MiB of zeros
    assert "compressed" in refused(blob)


def test_a_member_the_signature_does_not_name_is_refused() -> None:
    reason = refused(npz({**genuine(), "input:extra.npy": npy_bytes(np.zeros(1 << 10, np.float32))}))
    assert "not in the signature ['input:extra.npy']" in reason


def test_a_flood_of_members_is_refused_from_the_end_record_alone() -> None:
    """zipfile makes an object of every central directory entry when it opens the file: 20,000 empty members
    (about 2 MB) are refused from the size of the directory the end record gives, before that."""
    flood = {f"{i}": b"" for i in range(20_000)}
    assert "more than its arrays need" in refused(npz({**genuine(), **flood}))


def test_a_member_twice_is_refused() -> None:
    buffer = io.BytesIO(npz(genuine()))
    with zipfile.ZipFile(buffer, "a") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        archive.writestr("input:x.npy", npy_bytes(np.zeros((4, 4), np.float32)))
    assert "a name twice" in refused(buffer.getvalue())


def test_a_missing_member_is_refused() -> None:
    assert "missing ['output:y.npy']" in refused(npz({"input:x.npy": genuine()["input:x.npy"]}))


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.zeros((2, 5), np.float32), "has shape [2, 5]; the model takes [-1, 4]"),
        (np.zeros((2, 4, 1), np.float32), "has shape [2, 4, 1]"),
        (np.zeros((2, 4), np.float64), "is float64; the model takes FP32"),
    ],
    ids=["shape", "rank", "dtype"],
)
def test_a_golden_input_that_does_not_fit_the_signature_is_refused(array: np.ndarray, words: str) -> None:
    assert words in refused(npz({**genuine(), "input:x.npy": npy_bytes(array)}))


def test_a_header_declaring_more_than_the_member_holds_is_refused() -> None:
    reason = refused(npz({**genuine(), "input:x.npy": npy_header((1 << 32, 4)) + bytes(16)}))
    assert "declares 68719476736 bytes" in reason
    assert "but holds 16" in reason


def test_a_member_claiming_bytes_past_the_end_is_refused() -> None:
    blob = npz(genuine())
    assert "past the end of the file" in refused(with_sizes(blob, "output:y.npy", 1 << 30))


def test_overlapping_members_are_refused() -> None:
    blob = npz(genuine())
    # the first member's data now runs over the second's local header and data: a zip bomb's quoted overlap
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        second = archive.getinfo("output:y.npy")
    assert "overlaps" in refused(with_sizes(blob, "input:x.npy", second.header_offset + second.file_size))


def test_object_arrays_are_refused() -> None:
    header = npy_header((2, 4), descr="|O")
    assert "plain numbers" in refused(npz({**genuine(), "output:y.npy": header + bytes(64)}))


def test_the_agent_refuses_a_deflated_golden_file_before_running_the_model(tmp_path: Path) -> None:
    """The reviewer's path: a verified package, then `load_and_check` (what the reconciler activates)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (tmp_path / MODEL_NAME).write_bytes(model.SerializeToString())
    bomb = {"input:x.npy": npy_header((1 << 22, 4)) + bytes(16 << 22), "output:y.npy": genuine()["output:y.npy"]}
    (tmp_path / GOLDEN_NAME).write_bytes(npz(bomb, zipfile.ZIP_DEFLATED))
    files = []
    for name in (MODEL_NAME, GOLDEN_NAME):
        sha, size = sha256_file(tmp_path / name)
        files.append({"path": name, "size": size, "sha256": sha})
    spec = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    manifest = {
        "schema": SCHEMA, "name": "m", "version": "1", "variant": "v", "profile": "cpu-generic",
        "runtime": "onnxruntime", "precision": "fp32", "model_file": MODEL_NAME, "inputs": spec,
        "outputs": [{**spec[0], "name": "y"}], "files": files,
        "golden": {"file": GOLDEN_NAME, "rtol": 0.001, "atol": 0.0001},
    }  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    package = verify_package(tmp_path)
    with pytest.raises(PackageError, match="compressed"):
        load_golden(package)
    with pytest.raises(ModelLoadError, match="compressed"):
        load_and_check(package, threads=1)
