"""The model package: a folder (or its tar) holding `manifest.json` and the files it lists.

A package is one variant of one model version for one hardware profile. The manifest names the model,
its version and variant, the profile and runtime it was built for, the input and output signature (Open
Inference Protocol datatypes, -1 for dynamic dimensions), every file with its size and sha256, and the golden
inputs and expected outputs that the on-node health check replays. The package digest is the sha256 of the
canonical JSON of the manifest, so one digest pins every byte of the package.

Verify: `verify_package`. Read: `read_package`. Travel: `pack_tar` / `unpack_tar`. The golden comparison is the
pure `compare_outputs`. Building a package from a model (onnxruntime) is `strata.package_build`.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, Final, TypeAlias

from strata.core.chunking import Chunk
from strata.core.errors import PackageError, StrataError, VerificationError
from strata.core.fsutil import write_bytes_atomic
from strata.core.hashing import digest_json, is_hex_sha256, sha256_file
from strata.core.modelrefs import (
    ExternalRef,
    check_external_refs,
    check_openvino_ir,
    onnx_external_refs,
)
from strata.core.profiles import PRECISIONS, RUNTIMES

if TYPE_CHECKING:
    import tarfile
    import zipfile
    from collections.abc import Callable

    import numpy.typing as npt

SCHEMA: Final = "strata.package/v1"
MANIFEST_NAME: Final = "manifest.json"
MODEL_NAME: Final = "model.onnx"
GOLDEN_NAME: Final = "golden.npz"
MAX_MANIFEST_BYTES: Final = 16 << 20
MAX_TAR_MEMBERS: Final = 4096  # files and folders in one package tar
MAX_MANIFEST_DEPTH: Final = 32  # nesting of objects and lists in a manifest (its own sections need 5)
MAX_PATH_PARTS: Final = 32  # folders and name of a file path in a package
MAX_PATH_PART_BYTES: Final = 255  # one name (NAME_MAX)
MAX_PATH_BYTES: Final = 1024  # a whole relative path

_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # \Z: "$" also matches before a final newline

# Tolerances of the golden check by precision. Golden outputs are computed by the variant itself, so these
# cover kernel and hardware differences (another ISA, another thread count), not quantization error.
DEFAULT_TOLERANCE: Final[dict[str, tuple[float, float]]] = {
    "fp32": (1e-3, 1e-4),
    "fp16": (1e-2, 1e-2),
    "bf16": (5e-2, 5e-2),  # 8 significant bits: AMX and AVX512_BF16 kernels round differently
    "int8": (5e-2, 5e-2),
}

# numpy is imported where arrays are read: `strata agent` and the operator commands import this module for its names
# and checks, and numpy alone is a tenth of a second of their start
Array: TypeAlias = "npt.NDArray[Any]"
OIP_DATATYPES: Final = frozenset(
    {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"}
)
"""The Open Inference Protocol's datatypes (`strata.core.datatypes.OIP_TO_NUMPY` maps them to numpy's)."""


def check_name(kind: str, value: str, error: type[StrataError] = PackageError) -> str:
    """Validate a model name, version or variant id: 1-128 of [A-Za-z0-9._-], starting alphanumeric.

    Raises:
        PackageError: the value does not fit (a manifest's); `error` instead where the caller gave it (ConfigError
            for a name typed on a command line: bad input, not a bad package).
    """
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise error(
            f"{kind} {value!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: Open Inference Protocol datatype and shape (-1 = dynamic)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, raw: Any) -> TensorSpec:
        if not isinstance(raw, dict):
            raise PackageError(f"tensor spec must be an object, got {raw!r}")
        name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
        if not isinstance(name, str) or not name:
            raise PackageError(f"tensor spec has no name: {raw!r}")
        if datatype not in OIP_DATATYPES and datatype != "BF16":
            raise PackageError(f"tensor {name!r} has unknown datatype {datatype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= -1 for d in shape):
            raise PackageError(f"tensor {name!r} has a malformed shape {shape!r}")
        return cls(name=name, datatype=datatype, shape=tuple(shape))

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        """True when a concrete `shape` fits this spec (same rank, fixed dimensions equal)."""
        if len(shape) != len(self.shape):
            return False
        return all(want == -1 or want == got for want, got in zip(self.shape, shape, strict=True))


@dataclass(frozen=True)
class FileEntry:
    """A file of the package: relative POSIX path, size, hex sha256, role, and for large files the
    content-defined chunks (sha256, size) it is made of, in order."""

    path: str
    size: int
    sha256: str
    role: str = "data"
    chunks: tuple[Chunk, ...] = ()

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"path": self.path, "size": self.size, "sha256": self.sha256, "role": self.role}
        if self.chunks:
            entry["chunks"] = [[c.sha256, c.size] for c in self.chunks]
        return entry

    @classmethod
    def from_json(cls, raw: Any) -> FileEntry:
        if not isinstance(raw, dict):
            raise PackageError(f"file entry must be an object, got {raw!r}")
        path, size, sha, role = raw.get("path"), raw.get("size"), raw.get("sha256"), raw.get("role", "data")
        if not isinstance(path, str):
            raise PackageError(f"file entry has no path: {raw!r}")
        safe_relative_path(path)
        if not isinstance(size, int) or size < 0:
            raise PackageError(f"file {path!r} has a malformed size {size!r}")
        if not isinstance(sha, str) or not is_hex_sha256(sha):
            raise PackageError(f"file {path!r} has a malformed sha256 {sha!r}")
        if not isinstance(role, str):
            raise PackageError(f"file {path!r} has a malformed role {role!r}")
        chunks = []
        for item in raw.get("chunks", []):
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], str)
                or not is_hex_sha256(item[0])
                or not isinstance(item[1], int)
                or item[1] <= 0
            ):
                raise PackageError(f"file {path!r} has a malformed chunk {item!r}")
            chunks.append(Chunk(item[0], item[1]))
        if chunks and sum(c.size for c in chunks) != size:
            raise PackageError(f"the chunks of {path!r} add up to {sum(c.size for c in chunks)} bytes, not {size}")
        return cls(path=path, size=size, sha256=sha, role=role, chunks=tuple(chunks))


@dataclass(frozen=True)
class GoldenSpec:
    """Where the golden inputs and expected outputs are, and how close a healthy run must come."""

    file: str
    rtol: float
    atol: float

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "rtol": self.rtol, "atol": self.atol}

    @classmethod
    def from_json(cls, raw: Any) -> GoldenSpec:
        if not isinstance(raw, dict):
            raise PackageError("manifest 'golden' must be an object")
        try:
            return cls(file=str(raw["file"]), rtol=float(raw["rtol"]), atol=float(raw["atol"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PackageError(f"manifest 'golden' is malformed: {exc}") from exc


_KNOWN_KEYS: Final = frozenset(
    {
        "schema", "name", "version", "variant", "profile", "runtime", "precision", "model_file",
        "inputs", "outputs", "files", "golden", "metrics", "policy", "build", "drift",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Manifest:
    """Everything a node needs to know about a package before and after it trusts it."""

    name: str
    version: str
    variant: str
    profile: str
    runtime: str
    precision: str
    model_file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: tuple[FileEntry, ...]
    golden: GoldenSpec
    metrics: Mapping[str, Any] = field(default_factory=dict)
    policy: Mapping[str, Any] = field(default_factory=dict)
    build: Mapping[str, Any] = field(default_factory=dict)
    drift: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    def to_json(self) -> dict[str, Any]:
        """The manifest document. Optional sections appear only when set, and keys this strata does not know
        (from a newer one) are kept, so the digest of a parsed manifest is the digest of the file it came from.
        """
        return {
            "schema": self.schema,
            "name": self.name,
            "version": self.version,
            "variant": self.variant,
            "profile": self.profile,
            "runtime": self.runtime,
            "precision": self.precision,
            "model_file": self.model_file,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "files": [f.to_json() for f in self.files],
            "golden": self.golden.to_json(),
            "metrics": dict(self.metrics),
            "policy": dict(self.policy),
            "build": dict(self.build),
            **({"drift": dict(self.drift)} if self.drift else {}),
            **{key: value for key, value in self.extra.items() if key not in _KNOWN_KEYS},
        }

    @property
    def digest(self) -> str:
        """`sha256:<hex>` of the canonical manifest: the one digest that pins the whole package."""
        return digest_json(self.to_json())

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise PackageError(f"manifest lists no file {path!r}")

    @classmethod
    def from_json(cls, raw: Any) -> Manifest:
        """Parse and validate a manifest document.

        Raises:
            PackageError: a field is missing or malformed, or the references between fields do not hold.
        """
        if not isinstance(raw, dict):
            raise PackageError("manifest must be a JSON object")
        _check_depth(raw)
        if raw.get("schema") != SCHEMA:
            raise PackageError(f"manifest schema is {raw.get('schema')!r}; this strata reads {SCHEMA!r}")
        try:
            strings = {k: raw[k] for k in ("name", "version", "variant", "profile", "runtime", "precision")}
            model_file = raw["model_file"]
            inputs, outputs, files = raw["inputs"], raw["outputs"], raw["files"]
            golden = raw["golden"]
        except KeyError as exc:
            raise PackageError(f"manifest has no {exc.args[0]!r}") from None
        for key, value in strings.items():
            if not isinstance(value, str) or not value:
                raise PackageError(f"manifest {key!r} must be a non-empty string")
        check_name("model name", strings["name"])
        check_name("version", strings["version"])
        check_name("variant id", strings["variant"])
        if strings["runtime"] not in RUNTIMES:
            raise PackageError(f"manifest runtime {strings['runtime'][:64]!r} is not one of {list(RUNTIMES)}")
        if strings["precision"] not in PRECISIONS:
            raise PackageError(f"manifest precision {strings['precision'][:64]!r} is not one of {list(PRECISIONS)}")
        if not all(isinstance(x, list) for x in (inputs, outputs, files)):
            raise PackageError("manifest 'inputs', 'outputs' and 'files' must be lists")
        for key in ("metrics", "policy", "build", "drift"):
            if not isinstance(raw.get(key, {}), dict):
                raise PackageError(f"manifest {key!r} must be an object")
        manifest = cls(
            name=strings["name"],
            version=strings["version"],
            variant=strings["variant"],
            profile=strings["profile"],
            runtime=strings["runtime"],
            precision=strings["precision"],
            model_file=str(model_file),
            inputs=tuple(TensorSpec.from_json(t) for t in inputs),
            outputs=tuple(TensorSpec.from_json(t) for t in outputs),
            files=tuple(FileEntry.from_json(f) for f in files),
            golden=GoldenSpec.from_json(golden),
            metrics=raw.get("metrics", {}),
            policy=raw.get("policy", {}),
            build=raw.get("build", {}),
            drift=raw.get("drift", {}),
            extra={key: value for key, value in raw.items() if key not in _KNOWN_KEYS},
        )
        paths = [f.path for f in manifest.files]
        if len(set(paths)) != len(paths):
            raise PackageError("manifest lists a file twice")
        if MANIFEST_NAME in paths:
            raise PackageError("manifest may not list itself")
        for needed in (manifest.model_file, manifest.golden.file):
            if needed not in paths:
                raise PackageError(f"manifest refers to {needed!r}, which it does not list in 'files'")
        if not manifest.inputs or not manifest.outputs:
            raise PackageError("manifest must name at least one input and one output")
        return manifest


def _check_depth(raw: Any) -> None:
    """Refuse a document nested deeper than MAX_MANIFEST_DEPTH (walked without recursion): every later
    json.dumps, digest and database round trip of it would recurse that deep.

    Raises:
        PackageError: it is nested deeper.
    """
    level: list[Any] = [raw]
    for _ in range(MAX_MANIFEST_DEPTH):
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node if isinstance(node, list) else ())
            if isinstance(child, (dict, list))
        ]
        if not level:
            return
    raise PackageError(f"manifest is nested more than {MAX_MANIFEST_DEPTH} levels deep")


def parse_manifest(data: bytes | str, label: str = MANIFEST_NAME) -> Manifest:
    """Parse and validate manifest bytes (see `Manifest.from_json`).

    Raises:
        PackageError: not JSON (or nested so deep that the parser gives up), or not a valid manifest.
    """
    try:
        raw = json.loads(data)
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError of bytes that are not UTF-8
        raise PackageError(f"{label} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise PackageError(f"{label} is nested more than {MAX_MANIFEST_DEPTH} levels deep") from None
    return Manifest.from_json(raw)


@dataclass(frozen=True)
class Package:
    """A verified package on disk."""

    path: Path
    manifest: Manifest

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file


def safe_relative_path(path: str) -> PurePosixPath:
    """Validate a path inside a package: relative, normalised, no `..`, no empty parts, at most MAX_PATH_PARTS
    parts of at most MAX_PATH_PART_BYTES each and MAX_PATH_BYTES in all (a path thousands of folders deep made
    `Path.mkdir(parents=True)` recurse past Python's limit).

    Raises:
        PackageError: the path could escape the package folder.
    """
    if not path or "\\" in path or "\x00" in path:
        raise PackageError(f"file path {path!r} is not allowed in a package")
    if len(path.encode(errors="surrogateescape")) > MAX_PATH_BYTES or path.count("/") >= MAX_PATH_PARTS:
        raise PackageError(
            f"file path {path[:64]!r}... is too long for a package: at most {MAX_PATH_PARTS} parts and "
            f"{MAX_PATH_BYTES} bytes"
        )
    parts = path.split("/")
    pure = PurePosixPath(path)
    if pure.is_absolute() or any(part in ("", ".", "..") for part in parts):
        raise PackageError(f"file path {path!r} is not allowed in a package")
    if any(len(part.encode(errors="surrogateescape")) > MAX_PATH_PART_BYTES for part in parts):
        raise PackageError(f"file path {path!r} has a name longer than {MAX_PATH_PART_BYTES} bytes")
    return pure


def package_pieces(manifest: Manifest) -> list[str]:
    """The blob ids a node fetches to rebuild a package: the canonical manifest (blob id = the digest's hex),
    then each file's chunks, or the file whole when it has none, in order."""
    pieces = [manifest.digest.removeprefix("sha256:")]
    for entry in manifest.files:
        pieces.extend([c.sha256 for c in entry.chunks] if entry.chunks else [entry.sha256])
    return pieces


# --- reading and verifying -------------------------------------------------------------------------------


def read_manifest(folder: Path) -> Manifest:
    """Parse `folder/manifest.json` without checking the files.

    Raises:
        PackageError: missing, too large, not JSON, or not a valid manifest.
    """
    path = folder / MANIFEST_NAME
    try:
        if path.is_symlink() or not path.is_file():
            raise PackageError(f"{folder} has no {MANIFEST_NAME}")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise PackageError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise PackageError(f"cannot read {path}: {exc}") from exc
    return parse_manifest(data, str(path))


def verify_package(folder: Path, expected_digest: str | None = None) -> Package:
    """Check a package folder: manifest digest, then every listed file's size and sha256, and nothing extra.

    Raises:
        PackageError: the manifest does not parse, or the model references a file outside the package (see
            `check_model_references`).
        VerificationError: the digest differs from `expected_digest`, a file is missing, is a link, has another
            size or hash, or the folder holds a file the manifest does not list.
    """
    manifest = read_manifest(folder)
    if expected_digest is not None and manifest.digest != expected_digest:
        raise VerificationError(
            f"package digest is {manifest.digest}, expected {expected_digest}: the manifest was changed"
        )
    listed = {MANIFEST_NAME}
    for entry in manifest.files:
        listed.add(entry.path)
        file_path = folder / entry.path
        if file_path.is_symlink() or not file_path.is_file():
            raise VerificationError(f"package file {entry.path} is missing or not a regular file")
        try:
            sha, size = sha256_file(file_path)
        except OSError as exc:
            raise VerificationError(f"cannot read package file {entry.path}: {exc}") from exc
        if size != entry.size:
            raise VerificationError(f"package file {entry.path} has {size} bytes, manifest says {entry.size}")
        if sha != entry.sha256:
            raise VerificationError(f"package file {entry.path} has sha256 {sha}, manifest says {entry.sha256}")
    for found in _walk_files(folder):
        if found not in listed:
            raise VerificationError(f"package holds {found}, which its manifest does not list")
    _check_model_on_disk(folder, manifest)
    return Package(path=folder, manifest=manifest)


def check_model_references(manifest: Manifest, model: bytes | bytearray | memoryview) -> tuple[ExternalRef, ...]:
    """The model may reference only files of its own package (see `strata.core.modelrefs`): ONNX external data
    names a file the manifest lists, and an OpenVINO model is IR XML (whose weights the runtime hands over).
    Returns the ONNX model's external data references (all allowed), none for OpenVINO.

    Raises:
        PackageError: the model references anything else, or is not a model its runtime's reader can be given.
    """
    if manifest.runtime == "openvino":
        check_openvino_ir(model)
        return ()
    refs = onnx_external_refs(model)
    check_external_refs(refs, {entry.path: entry.size for entry in manifest.files}, manifest.model_file)
    return refs


def _check_model_on_disk(folder: Path, manifest: Manifest) -> None:
    try:
        model = (folder / manifest.model_file).read_bytes()
    except OSError as exc:
        raise VerificationError(f"cannot read the model {manifest.model_file}: {exc}") from exc
    check_model_references(manifest, model)


def _walk_files(folder: Path) -> Iterable[str]:
    for root, dirs, files in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            yield (rel_root / name).as_posix()


def read_package(path: Path, expected_digest: str | None = None, workdir: Path | None = None) -> Package:
    """Open a package given as a folder or a tar file, verifying it whole.

    A tar is extracted into `workdir` (a new folder beside the tar when not given).

    Raises:
        PackageError, VerificationError: as `verify_package` and `unpack_tar`.
    """
    if path.is_dir():
        return verify_package(path, expected_digest)
    target = workdir if workdir is not None else path.with_name(path.name + ".d")
    return unpack_tar(path, target, expected_digest)


# --- tar ------------------------------------------------------------------------------------------------


def pack_tar(package: Package, out: Path | IO[bytes]) -> None:
    """Write `package` as a deterministic, uncompressed tar (sorted names, zero times and owners).

    Model weights barely compress, and an uncompressed tar can be range-resumed and hashed as it streams.
    """

    import tarfile  # here, not at the top: an agent restarting from disk never needs it

    def add(tar: tarfile.TarFile, rel: str) -> None:
        source = package.path / rel
        info = tarfile.TarInfo(rel)
        info.size = source.stat().st_size
        info.mode = 0o644
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        with source.open("rb") as fh:
            tar.addfile(info, fh)

    names = [MANIFEST_NAME, *sorted(f.path for f in package.manifest.files)]
    if isinstance(out, Path):
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
            for rel in names:
                add(tar, rel)
    else:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel in names:
                add(tar, rel)


def unpack_tar(
    source: Path | IO[bytes],
    dest: Path,
    expected_digest: str | None = None,
    *,
    max_bytes: int | None = None,
    check_manifest: Callable[[Manifest], None] | None = None,
) -> Package:
    """Extract a package tar into `dest` (which must not exist or be empty), then verify it whole.

    Everything that can be decided from the tar's headers and its manifest is decided before a byte is written:
    members are only plain regular files (no sparse files, links, devices, fifos, contiguous files) and
    folders, with safe relative names, each once; `manifest.json` is read first (at most MAX_MANIFEST_BYTES),
    checked against `expected_digest` and by `check_manifest` (the release signature over its digest); then
    every other member must be a file the manifest lists, with the size it lists, all of them present, and their
    sizes together within the tar's own length and `max_bytes`. Each file is copied with exactly its size, then
    every hash is checked by `verify_package`. On any error `dest` is removed.

    Raises:
        PackageError: the tar is unreadable or holds a member that is not allowed, or its sizes do not add up.
        VerificationError: as `verify_package`, and what `check_manifest` raises.
    """

    if dest.exists() and any(dest.iterdir()):
        raise PackageError(f"{dest} is not empty")
    length = _source_length(source)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with _open_tar(source) as tar:
            members = _read_headers(tar)
            files = plan_tar_members(members, length)
            raw = _read_member(tar, files[MANIFEST_NAME], MAX_MANIFEST_BYTES)
            manifest = parse_manifest(raw, f"the package's {MANIFEST_NAME}")
            if expected_digest is not None and manifest.digest != expected_digest:
                raise VerificationError(
                    f"package digest is {manifest.digest}, expected {expected_digest}: the manifest was changed"
                )
            if check_manifest is not None:
                check_manifest(manifest)
            check_tar_against_manifest(files, manifest, max_bytes)
            write_bytes_atomic(dest / MANIFEST_NAME, raw)
            for entry in manifest.files:
                target = dest / safe_relative_path(entry.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                _copy_member(tar, files[entry.path], target)
        return verify_package(dest, expected_digest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _read_headers(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The tar's member headers, read one by one and no more than MAX_TAR_MEMBERS (a tar of a hundred thousand
    empty entries costs memory and time before anything else can refuse it).

    Raises:
        PackageError: the tar is corrupt or holds more members than a package may.
    """
    import tarfile

    members: list[tarfile.TarInfo] = []
    try:
        while (member := tar.next()) is not None:
            members.append(member)
            if len(members) > MAX_TAR_MEMBERS:
                raise PackageError(f"package tar holds more than {MAX_TAR_MEMBERS} members")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PackageError(f"package tar is corrupt: {exc}") from exc
    except (MemoryError, RecursionError):  # a PAX or GNU long-name header declaring 2**50 bytes, say
        raise PackageError("package tar is corrupt: a header declares more than can be read") from None
    return members


def plan_tar_members(members: Sequence[tarfile.TarInfo], tar_length: int | None) -> dict[str, tarfile.TarInfo]:
    """The regular files of a package tar by name, from its headers alone (nothing is read or written).

    Raises:
        PackageError: a member is not a plain regular file or folder (sparse, a link, a device, a fifo, a
            contiguous file), has an unsafe name or a name twice, or the files declare more bytes than the tar
            holds; or there is no manifest.
    """
    import tarfile

    files: dict[str, tarfile.TarInfo] = {}
    seen: set[str] = set()
    for member in members:
        name = member.name.rstrip("/") if member.isdir() else member.name
        safe_relative_path(name)
        if name in seen:
            raise PackageError(f"package tar holds {name!r} twice")
        seen.add(name)
        if member.isdir():
            continue
        if (
            member.type == tarfile.GNUTYPE_SPARSE
            or member.sparse is not None
            or any(key.startswith("GNU.sparse") for key in member.pax_headers)
        ):
            raise PackageError(f"package tar member {name!r} is a sparse file; packages hold only plain files")
        if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise PackageError(f"package tar member {name!r} is not a regular file (type {member.type!r})")
        files[name] = member
    if MANIFEST_NAME not in files:
        raise PackageError(f"package tar has no {MANIFEST_NAME}")
    declared = sum(member.size for member in files.values())
    if tar_length is not None and declared > tar_length:
        raise PackageError(f"package tar members declare {declared} bytes, but the tar holds {tar_length}")
    return files


def check_tar_against_manifest(files: Mapping[str, tarfile.TarInfo], manifest: Manifest, max_bytes: int | None) -> None:
    """The tar holds exactly the files the manifest lists, each with its listed size, within `max_bytes`.

    Raises:
        PackageError: a file is missing, unlisted or of another size, or they add up to more than `max_bytes`.
    """
    listed = {entry.path: entry for entry in manifest.files}
    for name, member in files.items():
        if name == MANIFEST_NAME:
            continue
        entry = listed.get(name)
        if entry is None:
            raise PackageError(f"package tar holds {name!r}, which its manifest does not list")
        if member.size != entry.size:
            raise PackageError(f"package tar member {name!r} has {member.size} bytes, its manifest says {entry.size}")
    missing = sorted(listed.keys() - files.keys())
    if missing:
        raise PackageError(f"package tar lacks {missing[0]!r}, which its manifest lists")
    total = sum(member.size for member in files.values())
    if max_bytes is not None and total > max_bytes:
        raise PackageError(f"package files add up to {total} bytes, more than the {max_bytes} allowed")


def _source_length(source: Path | IO[bytes]) -> int | None:
    """How many bytes the tar has (None when the stream cannot tell)."""
    try:
        if isinstance(source, Path):
            return source.stat().st_size
        position = source.tell()
        length = source.seek(0, os.SEEK_END)
        source.seek(position)
    except (OSError, AttributeError, ValueError):
        return None
    return length


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    import tarfile

    if member.size > limit:
        raise PackageError(f"package tar member {member.name!r} is larger than {limit} bytes")
    try:
        extracted = tar.extractfile(member)
        if extracted is None:
            raise PackageError(f"cannot read {member.name!r} from the package tar")
        with extracted:
            data = extracted.read(member.size)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PackageError(f"package tar is truncated at {member.name!r}: {exc}") from exc
    if len(data) != member.size:
        raise PackageError(f"package tar is truncated at {member.name!r}")
    return data


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    """Copy exactly `member.size` bytes of a (checked, plain) member into a new file."""
    import tarfile

    remaining = member.size
    try:
        extracted = tar.extractfile(member)
        if extracted is None:
            raise PackageError(f"cannot read {member.name!r} from the package tar")
        with extracted, target.open("xb") as out:
            while remaining:
                block = extracted.read(min(remaining, 1 << 20))
                if not block:
                    raise PackageError(f"package tar is truncated at {member.name!r}")
                out.write(block)
                remaining -= len(block)
    except (tarfile.TarError, EOFError) as exc:
        raise PackageError(f"package tar is truncated at {member.name!r}: {exc}") from exc


def _open_tar(source: Path | IO[bytes]) -> tarfile.TarFile:
    import tarfile

    try:
        if isinstance(source, Path):
            return tarfile.open(source, "r:")
        return tarfile.open(fileobj=source, mode="r:")
    except (tarfile.TarError, OSError) as exc:
        raise PackageError(f"package is not a readable tar: {exc}") from exc
    except (MemoryError, RecursionError):  # tarfile reads the first header here: see `_read_headers`
        raise PackageError("package is not a readable tar: a header declares more than can be read") from None


def tar_bytes(package: Package) -> bytes:
    """The package as tar bytes in memory (small packages, tests)."""
    buffer = io.BytesIO()
    pack_tar(package, buffer)
    return buffer.getvalue()


# --- golden data and the health comparison ------------------------------------------------------------------


def load_golden(package: Package, data: bytes | None = None) -> tuple[dict[str, Array], dict[str, Array]]:
    """Golden inputs and expected outputs of a verified package, keyed by tensor name.

    `data` is the golden file's bytes when the caller has them in memory (decrypted); by default it is read.
    Everything `read_golden` checks is decided from the zip's directory and the arrays' headers before an array
    is read, so loading the file costs no more memory than its own size.

    Raises:
        PackageError: the golden file is unreadable, or not an npz of the expected arrays (see `read_golden`).
    """
    path = package.path / package.manifest.golden.file
    try:
        blob = data if data is not None else path.read_bytes()
    except OSError as exc:
        raise PackageError(f"golden file {path.name} is unreadable: {exc}") from exc
    return read_golden(blob, package.manifest.inputs, package.manifest.outputs, path.name)


_GOLDEN_DIRECTORY_SLACK: Final = 256  # bytes of central directory allowed per member beyond its fixed part and name


def read_golden(
    blob: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], label: str = GOLDEN_NAME
) -> tuple[dict[str, Array], dict[str, Array]]:
    """The golden arrays in `blob`, an npz as `np.savez` writes it, checked before any array is read.

    The zip holds exactly the members `input:<name>.npy` and `output:<name>.npy` of the signature's tensors, each
    stored as is (not deflated: a few KB of deflate can expand to gigabytes; not encrypted), in disjoint ranges
    of the file (Python 3.11's zipfile does not refuse overlapping entries), its central directory no larger than
    those members need. Each array is of a plain fixed-size dtype (no objects, no records), and its header
    declares exactly the bytes its member holds. Golden inputs, which the model is run on, have the signature's
    datatype and a shape it accepts.

    Raises:
        PackageError: any of that does not hold, or the zip or an array header is malformed; the message says
            which member and why.
    """
    import zipfile

    wanted = {f"input:{spec.name}.npy": spec for spec in inputs}
    wanted.update({f"output:{spec.name}.npy": spec for spec in outputs})
    directory = sum(46 + len(name.encode()) + _GOLDEN_DIRECTORY_SLACK for name in wanted)
    _check_zip_directory(blob, directory, label)
    split: tuple[dict[str, Array], dict[str, Array]] = ({}, {})
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as npz:
            infos = npz.infolist()
            names = [info.filename for info in infos]
            if len(set(names)) != len(names) or set(names) != wanted.keys():
                unknown, missing = sorted(set(names) - wanted.keys()), sorted(wanted.keys() - set(names))
                raise PackageError(
                    f"golden file {label} must hold each array of the model's signature once: "
                    f"missing {missing}, not in the signature {unknown}"
                    + (", a name twice" if len(set(names)) != len(names) else "")
                )
            _check_zip_layout(blob, infos, label)
            for info in infos:
                _check_npy_header(npz, info, wanted[info.filename], info.filename.startswith("input:"), label)
            from numpy.lib import format as npy

            for info in infos:
                spec = wanted[info.filename]
                with npz.open(info) as member:
                    array = npy.read_array(member, allow_pickle=False)
                split[0 if info.filename.startswith("input:") else 1][spec.name] = array
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise PackageError(f"golden file {label} is unreadable: {exc}") from exc
    return split


def _check_zip_directory(blob: bytes, limit: int, label: str) -> None:
    """The zip's central directory, found where zipfile looks for it, is at most `limit` bytes: zipfile makes
    an object of some hundred bytes of every entry in it before anything else can refuse one.

    Raises:
        PackageError: there is no end record, a ZIP64 one (over 2 GiB: not a golden file), or the directory is
            larger.
    """
    signature = b"PK\x05\x06"
    at = len(blob) - 22
    if at < 0 or blob[at : at + 4] != signature or blob[-2:] != b"\0\0":
        at = blob.rfind(signature, max(0, len(blob) - 22 - (1 << 16)))
    if at < 0 or len(blob) < at + 22:
        raise PackageError(f"golden file {label} is not an npz (no zip end record)")
    if at >= 20 and blob[at - 20 : at - 16] == b"PK\x06\x07":
        raise PackageError(f"golden file {label} is a ZIP64 archive; golden files are far smaller")
    size = int.from_bytes(blob[at + 12 : at + 16], "little")
    if size > limit:
        raise PackageError(f"golden file {label} has a zip directory of {size} bytes, more than its arrays need")


def _check_zip_layout(blob: bytes, infos: Sequence[zipfile.ZipInfo], label: str) -> None:
    """Every member stored as is, its local header and data inside the file and apart from every other's.

    Raises:
        PackageError: a member is deflated or encrypted, or its bytes overlap another's or pass the file's end.
    """
    import zipfile

    end = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        name = info.filename
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size or info.flag_bits & 1:
            raise PackageError(
                f"golden file {label} member {name!r} is compressed or encrypted: strata reads only arrays stored "
                "as is (np.savez, not np.savez_compressed)"
            )
        start = info.header_offset
        local = blob[start : start + 30]
        if start < end or len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise PackageError(f"golden file {label} member {name!r} overlaps another or is not where it says")
        data = start + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        end = data + info.compress_size
        if end > len(blob):
            raise PackageError(f"golden file {label} member {name!r} claims bytes past the end of the file")


def _check_npy_header(
    npz: zipfile.ZipFile, info: zipfile.ZipInfo, spec: TensorSpec, is_input: bool, label: str
) -> None:
    """The .npy header of one member: a plain dtype and shape whose bytes are exactly the member's rest; for a
    golden input, the signature's datatype and a shape it accepts.

    Raises:
        PackageError: it is not; ValueError: the header is malformed (numpy's words).
    """
    from numpy.lib import format as npy

    name = info.filename
    with npz.open(info) as member:
        version = npy.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = npy.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = npy.read_array_header_2_0(member)
        else:
            raise PackageError(f"golden file {label} member {name!r} is .npy version {version}; strata reads 1.0, 2.0")
        header = member.tell()
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize == 0:
        raise PackageError(f"golden file {label} member {name!r} has dtype {dtype}; golden arrays are plain numbers")
    if any(dim < 0 for dim in shape):
        raise PackageError(f"golden file {label} member {name!r} has a negative dimension in {list(shape)}")
    count = math.prod(shape)
    if header + count * dtype.itemsize != info.file_size:
        raise PackageError(
            f"golden file {label} member {name!r} declares {count * dtype.itemsize} bytes of {dtype} {list(shape)}, "
            f"but holds {info.file_size - header}"
        )
    if not is_input:
        return
    from strata.core.datatypes import OIP_TO_NUMPY

    want = OIP_TO_NUMPY.get(spec.datatype)
    if want is not None and want.kind != "O" and dtype != want:
        raise PackageError(f"golden input {spec.name} is {dtype}; the model takes {spec.datatype}")
    if not spec.accepts_shape(tuple(shape)):
        raise PackageError(f"golden input {spec.name} has shape {list(shape)}; the model takes {list(spec.shape)}")


def compare_outputs(expected: Mapping[str, Array], actual: Mapping[str, Array], rtol: float, atol: float) -> list[str]:
    """Differences between expected and actual outputs; an empty list means the run is healthy.

    Floats must agree within `atol + rtol * |expected|` (NaN equal to NaN); integers, booleans and bytes
    must be equal.
    """
    import numpy as np

    problems: list[str] = []
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            problems.append(f"output {name} is missing")
            continue
        if got.shape != want.shape:
            problems.append(f"output {name} has shape {list(got.shape)}, expected {list(want.shape)}")
            continue
        if want.dtype.kind == "f":
            got_f = got.astype(np.float64)
            want_f = want.astype(np.float64)
            if not np.allclose(got_f, want_f, rtol=rtol, atol=atol, equal_nan=True):
                diff = np.abs(got_f - want_f)
                worst = float(np.nanmax(diff)) if diff.size else 0.0
                problems.append(f"output {name} differs by up to {worst:.3g} (rtol {rtol}, atol {atol})")
        elif not np.array_equal(got, want):
            mismatched = int(np.sum(got != want))
            problems.append(f"output {name}: {mismatched} of {want.size} values differ")
    return problems


def ort_disabled_optimizers(providers: Sequence[str]) -> list[str]:
    """The onnxruntime graph optimizers strata leaves off in a session on `providers` (first one the target).

    On the CPU: SkipLayerNormFusion, which turns Add + LayerNormalization into SkipLayerNormalization wherever
    the shapes are known. onnxruntime's CPU kernel of that operator is a scalar loop (sequential sums, a division
    per element): onnxruntime 1.32 runs it in 55-80 µs at MiniLM's [26, 384], against 16-20 µs for the Add and
    LayerNormalization it replaces, and on MiniLM's fused int8 variant its 12 instances were a quarter of the
    time at batch 1. GPU providers keep it (their kernel is fast).
    """
    return ["SkipLayerNormFusion"] if list(providers[:1]) == ["CPUExecutionProvider"] else []


def ort_session_in_memory(
    ort: Any, model: bytes, options: Any, external: Mapping[str, bytes] | None, providers: Sequence[str]
) -> Any:
    """An onnxruntime session over `model`'s bytes whose external data comes only from `external` (in memory).

    Loaded from bytes, onnxruntime would look for external data in the working directory: it is pointed at an
    empty folder instead, so a model cannot make the process read a file nobody gave it. `ort` is the onnxruntime
    module (imported by the caller: core does not load it), `options` its `SessionOptions` as the caller set them.
    Exceptions are onnxruntime's own, for the caller to word.
    """
    import tempfile

    if external:
        names = list(external)
        options.add_external_initializers_from_files_in_memory(
            names, [external[n] for n in names], [len(external[n]) for n in names]
        )
    # The bytes are always an ONNX protobuf: onnxruntime would otherwise take bytes that look like its own ORT
    # flatbuffer format for one, a format strata never checks (no external data references to vet there).
    options.add_session_config_entry("session.load_model_format", "ONNX")
    with tempfile.TemporaryDirectory(prefix="strata-model-") as nothing:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", nothing)
        return ort.InferenceSession(
            model, options, providers=list(providers), disabled_optimizers=ort_disabled_optimizers(providers)
        )
