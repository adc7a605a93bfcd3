"""The package format: build from real ONNX models, verify, read, tar, and every way a package can be bad."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from strata.core.datatypes import OIP_TO_NUMPY
from strata.core.errors import ConfigError, PackageBuildError, PackageError, VerificationError
from strata.core.package import (
    MANIFEST_NAME,
    OIP_DATATYPES,
    Manifest,
    Package,
    compare_outputs,
    load_golden,
    pack_tar,
    read_package,
    tar_bytes,
    unpack_tar,
    verify_package,
)
from strata.package_build import build_package


@pytest.fixture
def digits_package(digits_onnx: Path, tmp_path: Path) -> Package:
    return build_package(digits_onnx, tmp_path / "pkg", name="digits", version="1.0", profile="x86_64-avx2")


def test_build_reads_signature_and_golden_from_the_graph(digits_package: Package) -> None:
    manifest = digits_package.manifest
    assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [("X", "FP32", (-1, 64))]
    assert [(t.name, t.datatype, t.shape) for t in manifest.outputs] == [
        ("label", "INT64", (-1,)),
        ("probabilities", "FP32", (-1, 10)),
    ]
    assert manifest.variant == "x86_64-avx2-fp32"
    assert {f.path for f in manifest.files} == {"model.onnx", "golden.npz"}
    inputs, outputs = load_golden(digits_package)
    assert inputs["X"].shape == (2, 64)
    assert outputs["probabilities"].shape == (2, 10)
    assert digits_package.digest.startswith("sha256:")


def test_digest_is_the_canonical_manifest_and_survives_a_round_trip(digits_package: Package, tmp_path: Path) -> None:
    again = Manifest.from_json(json.loads((digits_package.path / MANIFEST_NAME).read_text()))
    assert again.digest == digits_package.digest
    pack_tar(digits_package, tmp_path / "p.tar")
    unpacked = unpack_tar(tmp_path / "p.tar", tmp_path / "out", expected_digest=digits_package.digest)
    assert unpacked.digest == digits_package.digest
    assert read_package(tmp_path / "out").digest == digits_package.digest


def test_tar_is_deterministic(digits_package: Package) -> None:
    assert tar_bytes(digits_package) == tar_bytes(digits_package)


def test_minilm_with_int64_inputs_and_dynamic_axes(minilm_dir: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(["Edge nodes keep serving offline.", "A model version is a fleet problem."])
    sample = {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64),
    }
    np.savez(tmp_path / "sample.npz", **sample)
    package = build_package(
        minilm_dir / "model.onnx",
        tmp_path / "pkg",
        name="minilm",
        version="1",
        sample=tmp_path / "sample.npz",
        extra_files=[minilm_dir / "tokenizer.json"],
    )
    manifest = package.manifest
    assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [
        ("input_ids", "INT64", (-1, -1)),
        ("attention_mask", "INT64", (-1, -1)),
        ("token_type_ids", "INT64", (-1, -1)),
    ]
    assert manifest.outputs[0].shape == (-1, -1, 384)
    _, outputs = load_golden(package)
    assert outputs["last_hidden_state"].shape == (2, sample["input_ids"].shape[1], 384)
    assert "tokenizer.json" in {f.path for f in manifest.files}


def test_minilm_without_samples_gets_consistent_symbolic_dims(minilm_dir: Path, tmp_path: Path) -> None:
    package = build_package(minilm_dir / "model.onnx", tmp_path / "pkg", name="minilm", version="1")
    inputs, _ = load_golden(package)
    shapes = {arr.shape for arr in inputs.values()}
    assert shapes == {(2, 8)}  # batch and seq shared by all three inputs


def test_not_onnx_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"this is not a model")
    with pytest.raises(PackageBuildError, match="not a loadable ONNX model"):
        build_package(bogus, tmp_path / "pkg", name="x", version="1")


def test_made_up_inputs_too_large_are_refused_before_anything_is_allocated(
    huge_input_onnx: Path, tmp_path: Path
) -> None:
    """Without --sample, golden inputs are made up from the declared dims: [100000, 100000, 100000] asked numpy
    for petabytes (a MemoryError traceback), and dims that fit in memory were really allocated and written."""
    with pytest.raises(PackageBuildError) as refused:
        build_package(huge_input_onnx, tmp_path / "pkg", name="h", version="1")
    said = str(refused.value)
    assert "input X, declared [100000, 100000, 100000]" in said
    assert said.endswith("give sample inputs with --sample FILE.npz")
    assert not (tmp_path / "pkg").exists()


def test_the_made_up_inputs_budget_is_over_all_inputs() -> None:
    """Each input alone fits; together they do not: the one that crosses the budget is named, before any is made."""
    from strata.core.package import TensorSpec
    from strata.package_build import MAX_MADE_UP_VALUES, synthesize_inputs

    specs = [TensorSpec("A", "UINT8", (MAX_MADE_UP_VALUES,)), TensorSpec("B", "UINT8", (-1, 3))]
    with pytest.raises(PackageBuildError, match=r"input B, declared \[n, 3\] \(made up as \[2, 3\]\): 16777222 values"):
        synthesize_inputs(specs, {"A": [MAX_MADE_UP_VALUES], "B": ["n", 3]})
    small = synthesize_inputs([TensorSpec("X", "FP32", (-1, 4))], {"X": ["batch", 4]})
    assert (small["X"].shape, small["X"].dtype) == ((2, 4), np.float32)


def test_a_classifier_exported_with_zipmap_is_refused_saying_how_to_export_it(tmp_path: Path) -> None:
    """skl2onnx's default for a classifier: probabilities as a sequence of maps, which no OIP tensor can carry."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    model = to_onnx(LogisticRegression().fit(x, [0, 1, 1, 1]), x[:1])
    (tmp_path / "zipmap.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(PackageError, match=r"seq\(map\(int64,tensor\(float\)\)\).*options=\{'zipmap': False\}"):
        build_package(tmp_path / "zipmap.onnx", tmp_path / "pkg", name="x", version="1")


def test_samples_that_do_not_fit_are_a_clear_error(digits_onnx: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "wrong-name.npz", pixels=np.zeros((2, 64), np.float32))
    with pytest.raises(PackageBuildError, match="missing \\['X'\\]"):
        build_package(digits_onnx, tmp_path / "a", name="d", version="1", sample=tmp_path / "wrong-name.npz")
    np.savez(tmp_path / "wrong-shape.npz", X=np.zeros((2, 63), np.float32))
    with pytest.raises(PackageBuildError, match="shape \\[2, 63\\]"):
        build_package(digits_onnx, tmp_path / "b", name="d", version="1", sample=tmp_path / "wrong-shape.npz")
    np.savez(tmp_path / "extra.npz", X=np.zeros((2, 64), np.float32), colour=np.zeros(2))
    with pytest.raises(PackageBuildError, match="inputs \\['X'\\]: unknown \\['colour'\\] \\(besides"):
        build_package(digits_onnx, tmp_path / "c", name="d", version="1", sample=tmp_path / "extra.npz")


def test_the_file_strata_optimize_reads_is_a_sample_too(digits_onnx: Path, tmp_path: Path) -> None:
    """Its `labels` (optimize's accuracy against the truth) are not an input: left out of the golden data."""
    x = np.random.default_rng(0).random((4, 64), np.float32)
    np.savez(tmp_path / "calib.npz", X=x, labels=np.arange(4))
    package = build_package(digits_onnx, tmp_path / "p", name="d", version="1", sample=tmp_path / "calib.npz")
    with np.load(package.path / "golden.npz") as golden:
        assert "labels" not in golden.files


def test_golden_run_failure_is_a_clear_error(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    # Gather with indices straight from the input: zeros are fine, but sample index 7 is out of range.
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["out"])],
        "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor("table", TensorProto.FLOAT, [3, 2], [0, 1, 2, 3, 4, 5])],
    )
    path = tmp_path / "gather.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    np.savez(tmp_path / "bad.npz", idx=np.array([7], dtype=np.int64))
    with pytest.raises(PackageBuildError, match=r"golden run of gather\.onnx failed"):
        build_package(path, tmp_path / "pkg", name="g", version="1", sample=tmp_path / "bad.npz")


def test_a_build_that_fails_while_writing_leaves_no_half_package(digits_onnx: Path, tmp_path: Path) -> None:
    """An extra file that cannot be copied (a folder) or that clashes with strata's own fails after the model and
    golden file were written: a folder the build made goes, an empty one it was given is left empty."""
    folder_extra = tmp_path / "labels"
    folder_extra.mkdir()
    clashing = tmp_path / "clash" / "golden.npz"
    clashing.parent.mkdir()
    clashing.write_bytes(b"not ours")
    for extra, why in ((folder_extra, "cannot copy"), (clashing, "clashes with a file strata writes")):
        new = tmp_path / f"new-{extra.name}" / "pkg"
        with pytest.raises(PackageBuildError, match=why):
            build_package(digits_onnx, new, name="digits", version="1", extra_files=[extra])
        assert not new.exists()
        assert new.parent.exists()  # a parent it made stays: only the package folder is the build's
        given = tmp_path / f"given-{extra.name}"
        given.mkdir()
        with pytest.raises(PackageBuildError, match=why):
            build_package(digits_onnx, given, name="digits", version="1", extra_files=[extra])
        assert given.is_dir()
        assert list(given.iterdir()) == []


def test_invalid_names_are_refused(digits_onnx: Path, tmp_path: Path) -> None:
    """As bad input (the caller's names: the CLI exits 2), not as a bad package (it exited 5, "package invalid")."""
    with pytest.raises(ConfigError, match="model name"):
        build_package(digits_onnx, tmp_path / "p", name="../etc", version="1")
    with pytest.raises(ConfigError, match="version"):
        build_package(digits_onnx, tmp_path / "p", name="ok", version="1 0")
    with pytest.raises(ConfigError, match="model name"):  # "$" matched before a final newline: it passed
        build_package(digits_onnx, tmp_path / "p", name="digits\n", version="1")


def test_verify_catches_a_changed_file(digits_package: Package) -> None:
    model = digits_package.path / "model.onnx"
    data = bytearray(model.read_bytes())
    data[100] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=r"model\.onnx has sha256"):
        verify_package(digits_package.path)


def test_verify_catches_a_changed_manifest_against_the_expected_digest(digits_package: Package) -> None:
    path = digits_package.path / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw["version"] = "9.9"
    path.write_text(json.dumps(raw))
    with pytest.raises(VerificationError, match="manifest was changed"):
        verify_package(digits_package.path, expected_digest=digits_package.digest)


def test_verify_refuses_unlisted_files(digits_package: Package) -> None:
    (digits_package.path / "planted.py").write_text("print('hi')")
    with pytest.raises(VerificationError, match=r"planted\.py"):
        verify_package(digits_package.path)


def _tar_with(members: dict[str, bytes], link: tuple[str, str] | None = None) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link[0])
            info.type = tarfile.SYMTYPE
            info.linkname = link[1]
            tar.addfile(info)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize(
    ("members", "link", "message"),
    [
        ({"../escape": b"x", MANIFEST_NAME: b"{}"}, None, "not allowed"),
        ({"/abs": b"x", MANIFEST_NAME: b"{}"}, None, "not allowed"),
        ({MANIFEST_NAME: b"{}"}, ("model.onnx", "/etc/passwd"), "not a regular file"),
        ({"model.onnx": b"x"}, None, "no manifest.json"),
        ({MANIFEST_NAME: b"not json"}, None, "not valid JSON"),
    ],
)
def test_unpack_refuses_dangerous_or_broken_tars(
    tmp_path: Path, members: dict[str, bytes], link: tuple[str, str] | None, message: str
) -> None:
    with pytest.raises(PackageError, match=message):
        unpack_tar(_tar_with(members, link), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_tar_is_refused(digits_package: Package, tmp_path: Path) -> None:
    data = tar_bytes(digits_package)
    with pytest.raises(PackageError):
        unpack_tar(io.BytesIO(data[: len(data) // 2]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compare_outputs_tolerances() -> None:
    want = {"y": np.array([1.0, 2.0], np.float32), "k": np.array([3, 4])}
    assert compare_outputs(want, {"y": np.array([1.0005, 2.0], np.float32), "k": np.array([3, 4])}, 1e-3, 1e-4) == []
    problems = compare_outputs(want, {"y": np.array([1.5, 2.0], np.float32), "k": np.array([3, 5])}, 1e-3, 1e-4)
    assert len(problems) == 2
    assert "differs by up to 0.5" in problems[0]
    assert "1 of 2 values differ" in problems[1]
    assert compare_outputs(want, {"k": np.array([3, 4])}, 1e-3, 1e-4) == ["output y is missing"]


def test_the_package_module_names_the_datatypes_numpy_maps_and_imports_no_numpy_itself() -> None:
    """`strata agent` and the operator commands import the package module for its names and checks, not numpy."""
    import subprocess
    import sys

    assert set(OIP_TO_NUMPY) == OIP_DATATYPES
    code = "import sys, strata.core.package, strata.cli.agent; print('numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
