"""Package tars crafted against the upload path of a real control plane (issue 11, finding 8).

The attack: a 3 KB upload holding a GNU sparse member that declares 2 GiB. tarfile calls it a regular file, and the
server extracted it before any size or signature check: 1.8 GB written to its tmp in 5.8 s, then 422. Now a
package tar may hold only plain regular files (and folders), each named once; their sizes are checked against the
bytes the tar holds and the manifest before anything but the manifest is written. Each tar here goes to a real
`strata server` over HTTP; the server must answer 4xx with a reason, and write next to nothing (its write count,
read from /proc, and its data folder's size).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from strata.core.package import tar_bytes
from strata.localfleet import LocalFleet
from strata.package_build import build_package

pytestmark = pytest.mark.slow

DECLARED = 1 << 30  # what each sparse member claims to expand to
SMALL = 4 << 20  # more than an answer and a log line, far less than any expansion


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    with LocalFleet(tmp_path_factory.mktemp("fleet"), poll_wait_s=5) as running:
        running.start_server()
        yield running


@pytest.fixture(scope="module")
def package_files(digits_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The members of a real package tar, by name (manifest first)."""
    package = build_package(digits_onnx, tmp_path_factory.mktemp("pkg") / "p", name="digits", version="1")
    with tarfile.open(fileobj=io.BytesIO(tar_bytes(package))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)


def gnu_sparse_member(name: str, realsize: int) -> bytes:
    """A GNU 'S' (old GNU sparse) member: one byte of data stored at the end of `realsize` bytes of hole."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 1
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:398] = b"%011o\0" % (realsize - 1)  # sparse[0].offset
    header[398:410] = b"%011o\0" % 1  # sparse[0].numbytes
    header[483:495] = b"%011o\0" % realsize  # realsize
    _checksum(header)
    return bytes(header) + b"x" + b"\0" * 511


def pax_sparse_member(name: str, realsize: int, version: str) -> bytes:
    """A PAX member with GNU.sparse.* headers in format 0.0, 0.1 or 1.0, one byte stored at the end of the hole."""
    if version == "0.0":
        pax = {
            "GNU.sparse.size": str(realsize),
            "GNU.sparse.numblocks": "1",
            "GNU.sparse.offset": str(realsize - 1),
            "GNU.sparse.numbytes": "1",
        }
        data = b"x"
    elif version == "0.1":
        pax = {"GNU.sparse.size": str(realsize), "GNU.sparse.numblocks": "1", "GNU.sparse.map": f"{realsize - 1},1"}
        data = b"x"
    else:
        pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name}
        pax["GNU.sparse.realsize"] = str(realsize)
        sparse_map = f"1\n{realsize - 1}\n1\n".encode()
        data = sparse_map + b"\0" * (512 - len(sparse_map)) + b"x"
    info = tarfile.TarInfo(name if version != "1.0" else f"GNUSparseFile.0/{name}")
    info.size = len(data)
    info.pax_headers = pax
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    return raw[: _members_end(raw)]


def _members_end(tar: bytes) -> int:
    """Where the end-of-archive zero blocks start."""
    end = len(tar)
    while end >= 512 and tar[end - 512 : end] == b"\0" * 512:
        end -= 512
    return end


def plain_members(files: dict[str, bytes], skip: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            if name == skip:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    return raw[: _members_end(raw)]


def special_member(name: str, kind: bytes, link: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info.tobuf(tarfile.PAX_FORMAT)


def finish(*parts: bytes) -> bytes:
    return b"".join(parts) + b"\0" * 1024


def written_by(pid: int) -> int:
    """Bytes the process has passed to write() so far (files, sockets and logs alike)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/PID/io")


def disk_usage(folder: Path) -> int:
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def upload(fleet: LocalFleet, tar: bytes) -> httpx.Response:
    headers = {"Authorization": f"Bearer {fleet.admin_token}", "Content-Type": "application/x-tar"}
    return httpx.post(f"{fleet.server_url}/v1/packages", content=tar, headers=headers, timeout=60, verify=fleet.tls())


def refused(fleet: LocalFleet, tar: bytes) -> str:
    """Upload `tar`; assert a 4xx with a reason and next to nothing written; return the reason."""
    assert fleet.server is not None
    pid = fleet.server.pid
    before_written, before_disk = written_by(pid), disk_usage(fleet.server_dir)
    response = upload(fleet, tar)
    assert 400 <= response.status_code < 500, response.text
    reason = str(response.json()["error"])
    assert written_by(pid) - before_written < SMALL
    assert disk_usage(fleet.server_dir) - before_disk < SMALL
    return reason


@pytest.mark.parametrize("fmt", ["gnu-S", "pax-0.0", "pax-0.1", "pax-1.0"])
def test_a_sparse_member_is_refused_before_a_byte_of_it_is_written(
    fleet: LocalFleet, package_files: dict[str, bytes], fmt: str
) -> None:
    if fmt == "gnu-S":
        sparse = gnu_sparse_member("golden.npz", DECLARED)
    else:
        sparse = pax_sparse_member("golden.npz", DECLARED, fmt.removeprefix("pax-"))
    tar = finish(plain_members(package_files, skip="golden.npz"), sparse)
    assert len(tar) < 64 << 10
    assert "sparse" in refused(fleet, tar)


def test_members_declaring_more_than_the_tar_holds_are_refused(
    fleet: LocalFleet, package_files: dict[str, bytes]
) -> None:
    info = tarfile.TarInfo("golden.npz")
    info.size = DECLARED  # a plain header that lies: the data is not there
    tar = finish(plain_members(package_files, skip="golden.npz"), info.tobuf(tarfile.PAX_FORMAT), b"x" * 512)
    reason = refused(fleet, tar)
    assert "declare" in reason or "end of data" in reason


@pytest.mark.parametrize(
    ("kind", "link", "words"),
    [
        (tarfile.LNKTYPE, "model.onnx", "not a regular file"),
        (tarfile.SYMTYPE, "/etc/passwd", "not a regular file"),
        (tarfile.CHRTYPE, "", "not a regular file"),
        (tarfile.BLKTYPE, "", "not a regular file"),
        (tarfile.FIFOTYPE, "", "not a regular file"),
        (tarfile.CONTTYPE, "", "not a regular file"),
    ],
    ids=["hard-link", "symlink", "char-device", "block-device", "fifo", "contiguous"],
)
def test_links_devices_and_fifos_are_refused(
    fleet: LocalFleet, package_files: dict[str, bytes], kind: bytes, link: str, words: str
) -> None:
    tar = finish(plain_members(package_files), special_member("extra.bin", kind, link))
    assert words in refused(fleet, tar)


def test_a_name_twice_is_refused(fleet: LocalFleet, package_files: dict[str, bytes]) -> None:
    tar = finish(plain_members(package_files), plain_members({"model.onnx": b"\1" * 64}))
    assert "twice" in refused(fleet, tar)


def test_a_member_the_manifest_does_not_list_is_refused_before_it_is_written(
    fleet: LocalFleet, package_files: dict[str, bytes]
) -> None:
    tar = finish(plain_members({**package_files, "extra.bin": b"\1" * (1 << 20)}))
    assert "does not list" in refused(fleet, tar)


def test_the_genuine_package_is_still_accepted(fleet: LocalFleet, package_files: dict[str, bytes]) -> None:
    response = upload(fleet, finish(plain_members(package_files)))
    assert response.status_code in (200, 201), response.text


def test_a_flood_of_members_is_refused_after_the_first_few_thousand(
    fleet: LocalFleet, package_files: dict[str, bytes]
) -> None:
    """Review: 100,000 directory entries cost 43 MB and 7.7 s before refusal (every header was read first)."""
    folders = b"".join(special_member(f"d{i}/", tarfile.DIRTYPE) for i in range(5000))
    reason = refused(fleet, finish(plain_members(package_files), folders))
    assert "more than 4096 members" in reason


_CRAFTED = itertools.count()


def with_manifest(package_files: dict[str, bytes], change: Callable[[dict[str, Any]], object]) -> dict[str, bytes]:
    """The package's members with its manifest changed by `change` (which edits the parsed document in place), as
    a variant id of its own (so that what is refused is the change, not a clash with the genuine package)."""
    manifest = json.loads(package_files["manifest.json"])
    manifest["variant"] = f"crafted-{next(_CRAFTED)}"
    change(manifest)
    return {**package_files, "manifest.json": json.dumps(manifest).encode()}


def test_a_manifest_nested_past_the_parser_is_refused(fleet: LocalFleet, package_files: dict[str, bytes]) -> None:
    """Review: 100,000 nested lists in a free-form section raised RecursionError in json.loads: a 500."""
    raw = package_files["manifest.json"].decode()
    deep = raw[: raw.rindex("}")] + ', "notes": ' + "[" * 100_000 + "]" * 100_000 + "}"
    reason = refused(fleet, finish(plain_members({**package_files, "manifest.json": deep.encode()})))
    assert "nested more than 32 levels" in reason


def test_a_manifest_nested_a_little_too_deep_is_refused(fleet: LocalFleet, package_files: dict[str, bytes]) -> None:
    deep: list[Any] = []
    for _ in range(40):
        deep = [deep]
    tar = finish(plain_members(with_manifest(package_files, lambda m: m["metrics"].update(deep=deep))))
    assert "nested more than 32 levels" in refused(fleet, tar)


def test_a_path_thousands_of_folders_deep_is_refused(fleet: LocalFleet, package_files: dict[str, bytes]) -> None:
    """Review: a listed file 1500 folders deep (3 KB, under PATH_MAX) made Path.mkdir recurse past the limit."""
    path = "/".join(["a"] * 1500)
    entry = {"path": path, "size": 1, "sha256": hashlib.sha256(b"z").hexdigest(), "role": "data"}
    files = with_manifest(package_files, lambda m: m["files"].append(entry))
    assert "too long for a package" in refused(fleet, finish(plain_members({**files, path: b"z"})))


def test_a_header_declaring_a_petabyte_is_refused(fleet: LocalFleet) -> None:
    """Review: a 2 KB tar whose PAX header declares 2**50 bytes raised MemoryError inside tarfile: a 500."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 1 << 50
    tar = header.tobuf(format=tarfile.GNU_FORMAT) + b"20 path=manifest.json\n".ljust(512, b"\0") + bytes(1024)
    assert "declares more than can be read" in refused(fleet, tar)


@pytest.mark.parametrize(
    ("key", "value"),
    [("runtime", "r" * 100), ("runtime", "tflite"), ("precision", "fp8" * 10)],
    ids=["long-runtime", "unknown-runtime", "long-precision"],
)
def test_an_unknown_runtime_or_precision_is_refused(
    fleet: LocalFleet, package_files: dict[str, bytes], key: str, value: str
) -> None:
    """Review: a runtime longer than its String(64) column was a DataError on PostgreSQL: a 500."""
    tar = finish(plain_members(with_manifest(package_files, lambda m: m.update({key: value}))))
    assert f"manifest {key} {value[:64]!r} is not one of" in refused(fleet, tar)


def test_drift_references_with_more_bins_than_strata_makes_are_refused(
    fleet: LocalFleet, package_files: dict[str, bytes]
) -> None:
    """Review: a 1,000,001-bin reference cost every node ~113 ms per inference (counting, summing, storing)."""
    edges = [float(e) for e in range(1000)]
    drift = {"tensors": [{"tensor": "X", "kind": "input", "edges": edges, "counts": [1] * 1001}]}
    reason = refused(fleet, finish(plain_members(with_manifest(package_files, lambda m: m.update(drift=drift)))))
    assert "has 1000 edges and 1001 counts" in reason


def test_drift_references_naming_one_tensor_many_times_are_refused(
    fleet: LocalFleet, package_files: dict[str, bytes]
) -> None:
    """Review: a node counts each reference's tensor in a buffer of its own; 20,000 references of one tensor (a 1.3
    MB drift section) made 625 MiB of buffers on every node serving the package, and counted its values 20,000
    times into one row. A tensor may have one reference."""
    reference = {"tensor": "X", "kind": "input", "edges": [0.5], "counts": [1, 1]}
    drift = {"tensors": [reference] * 20_000}
    reason = refused(fleet, finish(plain_members(with_manifest(package_files, lambda m: m.update(drift=drift)))))
    assert "more than one reference of tensor 'X'" in reason


@pytest.mark.parametrize(("tensor", "kind"), [("Y", "input"), ("X", "output")])
def test_drift_references_to_a_tensor_the_model_does_not_have_are_refused(
    fleet: LocalFleet, package_files: dict[str, bytes], tensor: str, kind: str
) -> None:
    """A node finds a reference's values by name among a batch's inputs or outputs (its kind): a reference to a
    tensor the model does not have (a typo, or its input named as an output) was stored and rolled out, and its
    drift was never counted, with no error anywhere."""
    drift = {"tensors": [{"tensor": tensor, "kind": kind, "edges": [0.5], "counts": [1, 1]}]}
    reason = refused(fleet, finish(plain_members(with_manifest(package_files, lambda m: m.update(drift=drift)))))
    assert f"refers to {kind} {tensor!r}, which the model does not have" in reason


def test_a_golden_file_every_node_would_refuse_is_refused_at_upload(
    fleet: LocalFleet, package_files: dict[str, bytes]
) -> None:
    # The control plane read no golden file: a deflated one (a decompression bomb on every node's health check)
    # was stored and rolled out, then refused by each node in turn.
    name = next(n for n in package_files if n.endswith(".npz"))
    with zipfile.ZipFile(io.BytesIO(package_files[name])) as genuine:
        arrays = {member: genuine.read(member) for member in genuine.namelist()}
    deflated = io.BytesIO()
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as crafted:
        for member, data in arrays.items():
            crafted.writestr(member, data)
    blob = deflated.getvalue()

    def relist(manifest: dict[str, Any]) -> None:
        entry = next(f for f in manifest["files"] if f["path"] == name)
        entry.update(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())

    files = {**with_manifest(package_files, relist), name: blob}
    assert "is compressed" in refused(fleet, finish(plain_members(files)))
