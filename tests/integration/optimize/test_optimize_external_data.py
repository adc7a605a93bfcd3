"""`strata optimize` checks a model's external data itself, before any library opens the model, whatever
onnx/onnxruntime/OpenVINO version is installed (older ones follow `..`: onnx CVE-2024-27318): a model whose
tensors name files outside its folder would otherwise have a build machine's files baked into the packages it
ships. Every pass then reads the checked copy, not the user's folder. Tiny models made with onnx.helper."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from onnx import TensorProto, helper

from strata.agent.runtime import load_and_check
from strata.core.errors import ConfigError, PackageBuildError, PackageError
from strata.core.hashing import sha256_file
from strata.core.modelrefs import check_location, onnx_external_refs
from strata.core.package import verify_package
from strata.core.profiles import get_profile
from strata.optimize import pipeline
from strata.optimize.base import Candidate, PassContext
from strata.optimize.data import Feeds
from strata.optimize.passes import (
    DynamicQuantizationPass,
    Float16Pass,
    GraphOptimizationPass,
    StaticQuantizationPass,
)
from strata.optimize.pipeline import OptimizeRequest, open_reference, run_optimize
from strata.package_build import build_package

SECRET = b"-----BEGIN PRIVATE KEY----- the build machine's signing key"
N = 8  # float32 weights: 32 bytes
WEIGHTS = np.arange(N, dtype=np.float32) / 4
Array = npt.NDArray[np.float32]


def write_model(folder: Path, location: str, offset: int = 0, length: int = N * 4) -> Path:
    """out = x + W, W (float32[N]) kept in external data at `location`."""
    weights = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[N], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["out"])],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", N])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if onnxruntime is asked to open the model: the check must refuse it first."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("onnxruntime was asked to open a model the check should have refused")

    monkeypatch.setattr(pipeline, "OrtRunner", refuse)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("dotdot", r"'W' reads external data from '\.\./secret\.bin', which is not a plain relative path"),
        ("nested-dotdot", r"'W' reads external data from 'sub/\.\./\.\./secret\.bin', which is not a plain"),
        ("absolute", r"'W' reads external data from '/.*/secret\.bin', which is not a plain relative path"),
        ("symlink", r"'W' reads external data from 'weights\.bin', which resolves to .*secret\.bin, outside"),
        ("symlinked-folder", r"'W' reads external data from 'sub/secret\.bin', which resolves to .*outside"),
        ("link-inside", r"'W' reads external data from 'weights\.bin', through a symbolic link"),
        ("past-end", r"'W' reads external data from 'weights\.bin', bytes 16\.\.48, past the end .*\(32 bytes\)"),
        ("memory-address", r"'W' reads external data from '\*/_ORT_MEM_ADDR_/\*', onnxruntime's marker"),
        ("hard-link", r"'W' reads external data from 'weights\.bin', a file with 2 hard links"),
        ("fifo", r"'W' reads external data from 'weights\.bin', which is not a regular file"),
        ("model-itself", r"'W' reads external data from 'model\.onnx', the model file itself"),
        ("missing", r"'W' reads external data from 'weights\.bin', which cannot be opened .*No such file"),
    ],
)
def test_external_data_outside_the_folder_is_refused_before_anything_loads(
    case: str, message: str, tmp_path: Path, no_load: None
) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    folder = tmp_path / "model"
    location, offset = "weights.bin", 0
    folder.mkdir()
    if case == "dotdot":
        location = "../secret.bin"
    elif case == "nested-dotdot":  # onnx before 1.16 stripped a leading `../` but followed this one
        (folder / "sub").mkdir()
        location = "sub/../../secret.bin"
    elif case == "absolute":
        location = str(secret)
    elif case == "symlink":
        (folder / "weights.bin").symlink_to("../secret.bin")
    elif case == "symlinked-folder":
        (tmp_path / "outside").mkdir()
        (tmp_path / "outside" / "secret.bin").write_bytes(SECRET)
        (folder / "sub").symlink_to(tmp_path / "outside")
        location = "sub/secret.bin"
    elif case == "link-inside":  # a link to a file in the folder: still a link, which could be swapped
        (folder / "real.bin").write_bytes(WEIGHTS.tobytes())
        (folder / "weights.bin").symlink_to("real.bin")
    elif case == "past-end":
        (folder / "weights.bin").write_bytes(WEIGHTS.tobytes())
        offset = 16
    elif case == "memory-address":
        location, offset = "*/_ORT_MEM_ADDR_/*", 4096
    elif case == "hard-link":  # a regular file in the folder, but the secret under another name
        os.link(secret, folder / "weights.bin")
    elif case == "fifo":
        os.mkfifo(folder / "weights.bin")  # opening it for reading must not hang the check
    elif case == "model-itself":
        location = "model.onnx"
    model = write_model(folder, location, offset)
    copy = tmp_path / "copy"
    copy.mkdir()
    with pytest.raises(ConfigError, match=message):
        open_reference(model, copy)
    assert not any(SECRET in path.read_bytes() for path in copy.rglob("*") if path.is_file())


def test_a_sparse_initializer_outside_the_folder_is_refused_too(tmp_path: Path, no_load: None) -> None:
    """onnxruntime before 1.27 followed `..` in a sparse initializer's external data when loading by path."""
    (tmp_path / "secret.bin").write_bytes(SECRET)
    values = TensorProto(name="S", data_type=TensorProto.UINT8, dims=[8], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "8")):
        entry = values.external_data.add()
        entry.key, entry.value = key, value
    sparse = helper.make_sparse_tensor(values, helper.make_tensor("S_indices", TensorProto.INT64, [8], range(8)), [8])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["S"], ["out"])],
        "sparse",
        [],
        [helper.make_tensor_value_info("out", TensorProto.UINT8, [8])],
    )
    graph.sparse_initializer.append(sparse)
    (tmp_path / "model").mkdir()
    model = tmp_path / "model" / "model.onnx"
    model.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    (tmp_path / "copy").mkdir()
    with pytest.raises(ConfigError, match=r"tensor 'S' reads external data from '\.\./secret\.bin'"):
        open_reference(model, tmp_path / "copy")


def test_the_memory_address_marker_is_refused_in_packages_too() -> None:
    """Listed as a package file, the marker would still make onnxruntime read its own memory."""
    with pytest.raises(PackageError, match="memory address"):
        check_location("*/_ORT_MEM_ADDR_/*")
    check_location("weights/model.bin")


def test_proper_external_data_opens_and_every_pass_reads_the_checked_copy(tmp_path: Path) -> None:
    """Weights in a file of the model's folder (in a subfolder): the model opens and computes with them. A file
    swapped into the folder after the check (a link to the secret) is never read: the passes read the copy."""
    folder = tmp_path / "model"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "weights.bin").write_bytes(b"\0" * 16 + WEIGHTS.tobytes())
    model = write_model(folder, "data/weights.bin", offset=16)
    copy = tmp_path / "copy"
    copy.mkdir()
    reference = open_reference(model, copy)
    assert reference.model == copy / "model.onnx"
    x = np.ones((2, N), np.float32)
    np.testing.assert_array_equal(reference.runner.run({"x": x})["out"], x + WEIGHTS)
    (tmp_path / "secret.bin").write_bytes(SECRET[: N * 4 + 16].ljust(N * 4 + 16, b"!"))
    (folder / "data" / "weights.bin").unlink()
    (folder / "data" / "weights.bin").symlink_to(tmp_path / "secret.bin")
    cuda = get_profile("x86_64-cuda")  # the fp16 pass builds for GPU targets; nothing runs on one here
    context = PassContext("embedding", get_profile("cpu-generic"), (cuda,), Feeds({"x": x}))
    (tmp_path / "fp16").mkdir()
    [candidate] = Float16Pass().apply(reference.model, tmp_path / "fp16", context)
    assert candidate.error is None
    assert WEIGHTS.astype(np.float16).tobytes() in candidate.model_path.read_bytes()  # the checked weights


def small_run(model: Path, data: Path, out: Path) -> OptimizeRequest:
    """One round, no memory probe, the generic CPU target: an embedding task over `data` for both sets."""
    return OptimizeRequest(
        model=model,
        name="external",
        version="1",
        task="embedding",
        calibration=data,
        evaluation=data,
        out=out,
        targets=("cpu-generic",),
        rounds=1,
        measure_memory=False,
    )


def test_a_run_with_external_data_outside_its_folder_stops_with_a_clear_error(tmp_path: Path) -> None:
    """Through `run_optimize`: a ConfigError naming the tensor and the location, no output folder left."""
    (tmp_path / "secret.bin").write_bytes(SECRET)
    model = write_model(tmp_path / "model", "../secret.bin")
    np.savez(tmp_path / "data.npz", x=np.ones((16, N), np.float32))
    request = small_run(model, tmp_path / "data.npz", tmp_path / "out" / "run")
    with pytest.raises(ConfigError, match=r"tensor 'W' reads external data from '\.\./secret\.bin'"):
        run_optimize(request, [GraphOptimizationPass(levels=("basic",))])
    assert not (tmp_path / "out").exists()


def write_matmul_model(folder: Path, weights: Array, location: str = "weights.bin") -> Path:
    """out = x @ W + b, W (float32 32x64: 8 KiB, 2 KiB in int8, over the 1 KiB from which variants keep a tensor in
    a data file) in the file `location` of the model's folder, as every model over protobuf's 2 GB keeps its
    weights; b inside the model."""
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    (folder / location).write_bytes(weights.tobytes())
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=list(weights.shape), data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", str(weights.nbytes))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    bias = helper.make_tensor("b", TensorProto.FLOAT, [weights.shape[1]], np.linspace(-1, 1, weights.shape[1]))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["out"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weights.shape[0]])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", weights.shape[1]])],
        [w, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["weights.bin", "data/weights.bin"])
def test_a_model_with_external_data_gets_variants_and_packages_that_carry_theirs(tmp_path: Path, location: str) -> None:
    """The graph, dynamic and static int8 passes write each variant's large tensors to a data file of its own
    (`<variant>.onnx.data`), and every package, the fp32 baseline's included (its data where the model names it,
    in a subfolder too), lists and carries the files its model names, verifies, and loads on a node computing what
    the original does. They used to fail: a variant named the original's `weights.bin`, which was not beside it,
    and quantization lost it."""
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((32, 64)).astype(np.float32)
    (tmp_path / "model").mkdir()
    model = write_matmul_model(tmp_path / "model", weights, location)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    request = OptimizeRequest(
        model=model,
        name="external",
        version="1",
        task="embedding",
        calibration=tmp_path / "data.npz",
        evaluation=tmp_path / "data.npz",
        out=tmp_path / "out",
        gate="min_cosine>=0.9",
        rounds=1,
        measure_memory=False,
    )
    passes = [
        GraphOptimizationPass(levels=("basic", "extended")),
        DynamicQuantizationPass(weight_types=("QInt8",), per_channel=(False,), reduce_range=(False,)),
        StaticQuantizationPass(methods=("MinMax",)),
    ]
    report = run_optimize(request, passes)
    packaged = {v.id: v for v in report.variants if v.gate == "passed"}
    assert set(packaged) == {"fp32", "fp32-ort-basic", "fp32-ort-extended", "int8-dyn-s8", "int8-qdq-minmax"}, [
        (v.id, v.gate, v.reason) for v in report.variants
    ]
    assert report.model["sha256"] == sha256_file(model)[0]  # the original's digest, as the user gave it
    expected = x[:4] @ weights + np.linspace(-1, 1, 64).astype(np.float32)
    for variant_id, variant in packaged.items():
        package = verify_package(request.out / variant.path)
        listed = sorted(f.path for f in package.manifest.files if f.path.endswith((".bin", ".data")))
        assert listed == ([location] if variant_id == "fp32" else [f"{variant_id}.onnx.data"]), listed
        assert [r.location for r in onnx_external_refs((package.path / "model.onnx").read_bytes())] == listed
        answer = load_and_check(package, 1).run({"x": x[:4]})["out"]
        np.testing.assert_allclose(answer, expected, atol=0.5 if variant_id.startswith("int8") else 1e-4)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "*/_ORT_MEM_ADDR_/*"])
def test_a_variant_naming_data_outside_its_folder_is_never_copied_into_a_package(tmp_path: Path, location: str) -> None:
    """A candidate's files are what its model names: a location out of the run's folder (no pass writes one; a
    library that did would) is refused, not followed to a file to copy into the package."""
    model = write_model(tmp_path / "run", location)
    candidate = Candidate("fp32-ort-basic", model, "cpu-generic", "onnxruntime", "fp32", ("test",))
    with pytest.raises(PackageError):
        _ = candidate.files


def test_fp16_of_a_model_with_external_data_keeps_its_weights_in_a_data_file(tmp_path: Path) -> None:
    """The fp16 pass infers shapes from the file (the converter's in-memory inference cannot pass 2 GB) and writes
    the fp16 weights to `fp16.onnx.data`."""
    weights = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    (tmp_path / "model").mkdir()
    model = write_matmul_model(tmp_path / "model", weights)
    cuda = get_profile("x86_64-cuda")  # the fp16 pass builds for GPU targets; nothing runs on one here
    context = PassContext("embedding", get_profile("cpu-generic"), (cuda,), Feeds({"x": np.ones((2, 32), np.float32)}))
    (tmp_path / "fp16").mkdir()
    [candidate] = Float16Pass().apply(model, tmp_path / "fp16", context)
    assert candidate.error is None, candidate.error
    assert candidate.files == (candidate.model_path, tmp_path / "fp16" / "fp16.onnx.data")
    assert weights.astype(np.float16).tobytes() in (tmp_path / "fp16" / "fp16.onnx.data").read_bytes()
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["model.onnx", "weights.bin"]  # nothing left


def test_a_corrupt_variant_is_a_package_error_not_a_crash(tmp_path: Path) -> None:
    """A truncated model file: `files` says why as a PackageError (caught per candidate), where the memory map it
    reads through raised BufferError on the way out."""
    model = write_model(tmp_path / "run", "weights.bin")
    model.write_bytes(model.read_bytes()[:-7])
    candidate = Candidate("fp32-ort-basic", model, "cpu-generic", "onnxruntime", "fp32", ("test",))
    with pytest.raises(PackageError):
        _ = candidate.files


def test_a_package_reads_each_data_file_once_however_many_tensors_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """400 tensors in one 100 MB file took 24 s to package (the file read once per tensor); a model can hold a
    million. Counted here: one read of the file for 64 tensors."""
    count = 64
    values = np.arange(count * N, dtype=np.float32)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(values.tobytes())
    tensors, nodes, previous = [], [], "x"
    for i in range(count):
        tensor = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[N], data_location=TensorProto.EXTERNAL)
        for key, value in (("location", "weights.bin"), ("offset", str(i * N * 4)), ("length", str(N * 4))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensors.append(tensor)
        nodes.append(helper.make_node("Add", [previous, f"W{i}"], [f"s{i}"]))
        previous = f"s{i}"
    graph = helper.make_graph(
        nodes,
        "many",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["batch", N])],
        tensors,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 9
    (folder / "model.onnx").write_bytes(onnx_model.SerializeToString())
    reads: list[str] = []
    read_bytes = Path.read_bytes

    def counted(path: Path) -> bytes:
        reads.append(path.name)
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", counted)
    package = build_package(
        folder / "model.onnx",
        tmp_path / "pkg",
        name="many",
        version="1",
        data_files={"weights.bin": folder / "weights.bin"},
    )
    assert reads.count("weights.bin") == 1
    assert [f.path for f in package.manifest.files if f.role == "data"] == ["weights.bin"]


@pytest.mark.parametrize(
    ("data", "extra", "message"),
    [
        ({"model.onnx": "w.bin"}, None, "external data file model.onnx clashes with another file of the package"),
        ({"tok.json": "w.bin"}, "tok.json", "external data file tok.json clashes with another file of the package"),
        ({"a": "w.bin", "a/b": "w2.bin"}, None, "external data file a is also a folder of another file"),
        ({"tok.json/b": "w.bin"}, "tok.json", "external data file tok.json/b is also a folder of another file"),
        ({"../w.bin": "w.bin"}, None, "external data location '../w.bin' is not a plain path inside the package"),
    ],
)
def test_data_files_that_would_overwrite_or_nest_in_another_file_are_refused_up_front(
    tmp_path: Path, data: dict[str, str], extra: str | None, message: str
) -> None:
    """Before the golden run and before anything is written: the package folder stays empty."""
    folder = tmp_path / "model"
    model = write_model(folder, "weights.bin")
    for name in {*data.values(), *([extra] if extra else [])}:
        (folder / name).write_bytes(WEIGHTS.tobytes())
    with pytest.raises(PackageBuildError, match=re.escape(message)):
        build_package(
            model,
            tmp_path / "pkg",
            name="n",
            version="1",
            extra_files=[folder / extra] if extra else [],
            data_files={location: folder / name for location, name in data.items()},
        )
    assert not (tmp_path / "pkg").exists() or not any((tmp_path / "pkg").iterdir())
