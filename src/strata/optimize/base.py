"""What passes share: the candidate variants they produce, the context they run in, and their one interface.

Every pass is `Pass.apply(model_path, workdir, context) -> list[Candidate]`: it reads the fp32 model, writes
new model files under `workdir` and describes each as a `Candidate` (which profile and runtime it needs, which
precision it computes in, and the steps that made it). A candidate whose build failed carries the error and
stays in the report. `Pass.skip_reason(context)` says why a pass has nothing to do for these targets.

A model that keeps its weights in external data (the only way past protobuf's 2 GB) gets variants that do too: each
pass writes a variant's tensors over 1 KiB to `<variant file>.data` beside it (`save_onnx`), and a candidate's
files are its model and the files its tensors name (`external_data_files`), which its package carries.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from strata.core.errors import OptimizationError, PackageError
from strata.core.modelrefs import check_location, onnx_external_refs
from strata.core.profiles import HostFacts, Profile, normalize_arch
from strata.optimize.data import Feeds

GPU_RUNTIMES = ("onnxruntime-cuda", "onnxruntime-tensorrt")


class PassNotApplicable(OptimizationError):
    """A pass found, once it looked at the graph, that it has nothing to do for it (the message says why)."""


@dataclass(frozen=True)
class Candidate:
    """One variant a pass made: its model file and what running it requires."""

    id: str
    model_path: Path
    profile: str
    runtime: str
    precision: str
    passes: tuple[str, ...]
    notes: tuple[str, ...] = ()
    error: str | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        """The model's files: an ONNX file and the external data files it names, or an OpenVINO IR (`.xml` and its
        `.bin`).

        Raises:
            PackageError: the ONNX file is not one this reader can walk, or its external data is malformed.
        """
        if self.model_path.suffix == ".xml":
            return (self.model_path, self.model_path.with_suffix(".bin"))
        return (self.model_path, *external_data_files(self.model_path))


EXTERNAL_DATA_THRESHOLD = 1024
"""Bytes from which a variant of a model with external data keeps a tensor in its data file (onnx's default)."""


def external_data_files(model: Path) -> tuple[Path, ...]:
    """The files beside an ONNX model that its tensors keep their values in (external data), each once, in the order
    first named; () for a model that holds its weights itself. Reads the file mapped: weights are skipped, not read.
    Each location is checked again (a plain relative path: a variant's files are copied into its package by these
    names, and none may reach out of the run's folder), though the passes write them from a checked copy.

    Raises:
        PackageError: the file is not ONNX this reader can walk, its external data is malformed, or a location is not
            a plain relative path.
    """
    with model.open("rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            return ()
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            refused: PackageError | None = None
            with memoryview(mapped) as view:
                try:
                    refs = onnx_external_refs(view)
                except PackageError as exc:  # its traceback holds slices of the view: raised once the map is closed
                    refused = PackageError(str(exc))
                    refs = ()
                    del exc
    if refused is not None:
        raise refused
    for ref in refs:
        check_location(ref.location)
    return tuple(dict.fromkeys(model.parent / ref.location for ref in refs))


def save_onnx(model: Any, out: Path, *, external: bool) -> None:
    """Write an onnx `ModelProto` to `out`; with `external` (its source kept its weights in external data) its tensors
    of `EXTERNAL_DATA_THRESHOLD` bytes or more go to `<out>.data` beside it, so that a model over protobuf's 2 GB
    can be written at all."""
    import onnx

    if not external:
        onnx.save(model, str(out))
        return
    data = out.with_name(out.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(
        model,
        str(out),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=EXTERNAL_DATA_THRESHOLD,
        convert_attribute=True,  # large Constant values too: they count toward protobuf's 2 GB as well
    )


@dataclass(frozen=True)
class PassContext:
    """What a pass may look at: the targets, this host's ISA profile, the calibration samples."""

    task: str
    host: Profile
    targets: tuple[Profile, ...]
    calibration: Feeds
    seed: int = 0

    def targets_with_runtime(self, runtimes: Iterable[str]) -> list[Profile]:
        wanted = set(runtimes)
        return [t for t in self.targets if wanted & set(t.runtimes)]


class Pass(Protocol):
    """A unit of optimization with one interface; see the module docstring."""

    name: str

    def skip_reason(self, context: PassContext) -> str | None:
        """Why this pass does nothing for `context` (None when it applies)."""
        ...

    def apply(self, model_path: Path, workdir: Path, context: PassContext) -> list[Candidate]:
        """Make candidates from the model at `model_path`, writing files under `workdir`.

        Raises:
            OptimizationError: the pass cannot run at all (a candidate that alone fails carries `error`).
        """
        ...


def isa_profile(facts: HostFacts, profiles: Iterable[Profile]) -> Profile:
    """The most specific plain-CPU profile (no accelerator, no vendor, onnxruntime) whose ISA this host has.

    A model saved after onnxruntime's layout optimizations holds kernels' data layouts for this ISA, so that
    is the profile such a variant is built for. Pure; falls back to the catalog's generic profile.
    """
    arch = normalize_arch(facts.arch)
    plain = [
        p
        for p in profiles
        if p.accelerator is None
        and p.cpu_vendor is None
        and "onnxruntime" in p.runtimes
        and p.arch in ("any", arch)
        and p.cpu_features <= facts.cpu_features
    ]
    return max(plain, key=lambda p: (p.rank, len(p.cpu_features), p.id))
