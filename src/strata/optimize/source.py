"""The model `strata optimize` was given, checked and copied into the run's own folder before anything loads it.

An ONNX tensor can keep its values in "external data": a file named by a `location` string, which onnxruntime,
the `onnx` package and OpenVINO resolve against the model's folder. Whether they refuse a location that leaves
that folder (`../../etc/passwd`, an absolute path, a symbolic link out) depends on their version: onnx before
1.16 followed `..` (CVE-2024-27318), and onnxruntime validated external data paths only from late 2025. A pass
that loads such a model bakes the bytes it reads into a candidate's initializers, and so into a package shipped to
the fleet: a build machine's signing key, say. So strata checks the references itself, with its own walker
(`strata.core.modelrefs`), whatever library versions are installed:

- every location is a plain relative path (`check_location`), not onnxruntime's memory-address marker
  (`*/_ORT_MEM_ADDR_/*`, whose offset onnxruntime would take as a pointer) nor the model file itself;
- it names a regular file inside the model's folder, reached without a symbolic link anywhere on the way (each
  folder opened with O_NOFOLLOW from the model's folder, so a link swapped in after the check is not followed),
  with no other hard link (as onnx 1.21 refuses too: another name could be a file anywhere on the filesystem);
- every tensor's byte range lies inside that file.

The model's bytes (read once, the very bytes walked) and the referenced files (read from the descriptors the
checks were made on) are copied into a folder of the run's own: the reference session and every pass then read
that copy, never the user's folder again, so a file swapped there mid-run changes nothing.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Final

from strata.core.errors import ConfigError, PackageError
from strata.core.modelrefs import ORT_MEMORY_MARKER, ExternalRef, check_location, onnx_external_refs

_CHUNK: Final = 1 << 20
_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)
_NO_LINK: Final = os.O_RDONLY | os.O_NOFOLLOW | _CLOEXEC


def copy_checked_model(model: Path, folder: Path) -> Path:
    """Check `model`'s external data references and copy it, with the files they name, into `folder` (which the
    caller created for this run, empty). Returns the copy's model path (`folder / model.name`).

    Raises:
        ConfigError: the model cannot be read or is not an ONNX protobuf strata's walker can read; a tensor's
            external data location is not a plain relative path, is onnxruntime's memory-address marker or the
            model file itself, leaves the model's folder, goes through a symbolic link, is not a regular file, has
            another hard link or cannot be read; or its byte range runs past the file's end. Each names the tensor
            and the location.
    """
    root = model.parent.resolve()
    try:
        # The model and its external data are read through one descriptor of the folder: a folder swapped
        # for another (or a link) between the reads cannot pair this model with another folder's files.
        root_fd = os.open(root, _NO_LINK | os.O_DIRECTORY)
    except OSError as exc:
        raise ConfigError(f"cannot read model {model}: {exc.strerror or exc}") from exc
    try:
        data = _read_model(root_fd, model)
        try:
            refs = onnx_external_refs(data)
        except PackageError as exc:
            raise ConfigError(f"{model} is not an ONNX model strata can read: {exc}") from exc
        copy = folder / model.name
        copy.write_bytes(data)
        sizes: dict[str, int] = {}
        for ref in refs:
            if ref.location not in sizes:
                _check_name(ref, model.name)
                sizes[ref.location] = _copy_inside(root, root_fd, ref, folder)
            _check_range(ref, sizes[ref.location])
        return copy
    finally:
        os.close(root_fd)


def _read_model(root_fd: int, model: Path) -> bytes:
    """The model file's bytes (the model itself may be a link: the user named it)."""
    try:
        fd = os.open(model.name, os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC, dir_fd=root_fd)
    except OSError as exc:
        raise ConfigError(f"cannot read model {model}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise ConfigError(f"model {model} is not a regular file")
        return file.read()


def _refused(ref: ExternalRef, why: str) -> ConfigError:
    return ConfigError(f"tensor {ref.tensor!r} reads external data from {ref.location!r}, {why}")


def _check_name(ref: ExternalRef, model_name: str) -> None:
    if ORT_MEMORY_MARKER in ref.location:
        raise _refused(ref, "onnxruntime's marker for data at a memory address, not a file")
    try:
        check_location(ref.location)
    except PackageError:
        raise _refused(ref, "which is not a plain relative path inside the model's folder") from None
    if ref.location == model_name:
        raise _refused(ref, "the model file itself")


def _copy_inside(root: Path, root_fd: int, ref: ExternalRef, folder: Path) -> int:
    """Copy the file at `ref.location` under `root` (open as `root_fd`) to the same place under `folder`;
    returns its size."""
    resolved = os.path.realpath(root / ref.location)
    if os.path.commonpath([resolved, root]) != str(root):
        raise _refused(ref, f"which resolves to {resolved}, outside the model's folder {root}")
    if resolved != str(root / ref.location):
        raise _refused(ref, "through a symbolic link: external data must be a regular file in the model's folder")
    try:
        fd = _open_below(root_fd, ref.location)
    except OSError as exc:
        raise _refused(ref, f"which cannot be opened inside the model's folder: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as source:
        facts = os.fstat(source.fileno())
        if not stat.S_ISREG(facts.st_mode):
            raise _refused(ref, "which is not a regular file")
        if facts.st_nlink > 1:  # another name of the same file could be anywhere on this filesystem
            raise _refused(ref, f"a file with {facts.st_nlink} hard links: copy it into the model's folder")
        target = folder / ref.location
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("xb") as sink:
                shutil.copyfileobj(source, sink, _CHUNK)
                return sink.tell()
        except OSError as exc:  # a name that clashes with another in the copy (a case-insensitive disk), disk full
            raise _refused(ref, f"which cannot be copied for the run: {exc.strerror or exc}") from exc


def _open_below(root_fd: int, location: str) -> int:
    """A read descriptor of `location` under the folder `root_fd`, every part opened without following a symbolic
    link (a link swapped in after the realpath check fails here with ELOOP or ENOTDIR). O_NONBLOCK: a FIFO put
    there does not hang the open (it is then refused as not a regular file)."""
    parts = location.split("/")
    current = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            below = os.open(part, _NO_LINK | os.O_DIRECTORY, dir_fd=current)
            os.close(current)
            current = below
        return os.open(parts[-1], _NO_LINK | os.O_NONBLOCK, dir_fd=current)
    finally:
        os.close(current)


def _check_range(ref: ExternalRef, size: int) -> None:
    end = ref.offset + (ref.length if ref.length is not None else 0)
    if ref.offset > size or end > size:
        raise _refused(ref, f"bytes {ref.offset}..{end}, past the end of the file ({size} bytes)")
