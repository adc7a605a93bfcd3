"""What passes share: the candidate variants they produce, the context they run in, and their one interface.

Every pass is `Pass.apply(model_path, workdir, context) -> list[Candidate]`: it reads the fp32 model, writes
new model files under `workdir` and describes each as a `Candidate` (which profile and runtime it needs, which
precision it computes in, and the steps that made it). A candidate whose build failed carries the error and
stays in the report. `Pass.skip_reason(context)` says why a pass has nothing to do for these targets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from strata.core.errors import OptimizationError
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
        """The model's files: an ONNX file, or an OpenVINO IR (`.xml` and its `.bin`)."""
        if self.model_path.suffix == ".xml":
            return (self.model_path, self.model_path.with_suffix(".bin"))
        return (self.model_path,)


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
