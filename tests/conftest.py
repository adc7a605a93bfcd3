"""Fixtures shared by every test: real models made once per session."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from softtpm import SoftTpm


def _local_ports(worker: str | None, workers: int) -> str | None:
    """The ports this pytest process's fleets take (`strata.localfleet.free_port`), from 20000 up to the kernel's
    ephemeral ports (where `bind(0)` and outgoing connections take theirs): a share of their own for each xdist
    worker, the top 2000 for a run without workers (a single test run beside the whole suite). A port kept for a
    restarted agent or server is then taken by nothing else meanwhile. None (the kernel picks, as without this)
    where the ephemeral ports start too low to leave each worker 100."""
    try:
        top = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) - 1
    except (OSError, ValueError, IndexError):  # not Linux: its usual ephemeral ports start at 49152
        top = 49151
    low, alone = 20000, 2000
    index = worker.removeprefix("gw") if worker else ""
    if not index.isdigit() or workers < 1:
        return f"{top - alone + 1}-{top}" if top - alone >= low + 100 else None
    share = (top - alone - low + 1) // workers
    if share < 100:
        return None
    start = low + share * int(index)
    return f"{start}-{start + share - 1}"


# Set, not defaulted: xdist's workers inherit the environment of the process that started them, which set its own.
_PORTS = _local_ports(os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")))
if _PORTS is None:
    os.environ.pop("STRATA_LOCAL_PORTS", None)
else:
    os.environ["STRATA_LOCAL_PORTS"] = _PORTS

# The workspace's shared folder sits beside the checkout (../shared); STRATA_SHARED_DIR points elsewhere.
SHARED_DIR = Path(os.environ.get("STRATA_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
SHARED_MINILM = SHARED_DIR / "models" / "minilm"


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real MLP trained on scikit-learn's digits, exported to ONNX (about 3 s, once per session)."""
    from strata.examples.digits import train_digits

    path = tmp_path_factory.mktemp("digits") / "digits.onnx"
    accuracy = train_digits(path)
    assert accuracy > 0.9
    return path


@pytest.fixture(scope="session")
def huge_input_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Identity model whose input is declared [100000, 100000, 100000]: petabytes, were golden inputs made up for
    it (nothing here allocates them)."""
    import onnx
    from onnx import TensorProto, helper

    shape = [100000, 100000, 100000]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])],
        "huge",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)],
    )
    path = tmp_path_factory.mktemp("huge") / "huge.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="session")
def digits_onnx_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different digits model: the next version of the same model."""
    from strata.examples.digits import train_digits

    path = tmp_path_factory.mktemp("digits-v2") / "digits.onnx"
    train_digits(path, hidden=32, seed=1)
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real MiniLM sentence-embedding model from ../shared (present on developer machines and CI)."""
    if not (SHARED_MINILM / "model.onnx").is_file():
        pytest.skip("../shared/models/minilm is not on this machine (it ships with the strata workspace, not PyPI)")
    return SHARED_MINILM


def _mlp(path: Path, change: bool) -> None:
    """Six 256x256 MatMuls (6 x 256 KiB of weights); `change` alters only the last matrix."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((256, 256)).astype(np.float32) for _ in range(6)]
    if change:
        weights[-1] = weights[-1] + 1.0
    nodes, previous = [], "x"
    for i in range(6):
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"]))
        previous = f"h{i}"
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 256])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["n", 256])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture(scope="session")
def mlp_versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two versions of a 1.5 MB model that differ in one of six weight matrices (chunk reuse)."""
    folder = tmp_path_factory.mktemp("mlp")
    _mlp(folder / "v1.onnx", change=False)
    _mlp(folder / "v2.onnx", change=True)
    return folder / "v1.onnx", folder / "v2.onnx"


@pytest.fixture
def soft_tpm_factory(tmp_path: Path) -> Iterator[Callable[..., SoftTpm]]:
    """Makes running software TPMs (swtpm); each `make(name, manufacturer=...)` with the same manufacturer
    shares that manufacturer's EK-certificate CA. Skips where swtpm or tpm2-pytss is missing."""
    from softtpm import SoftTpm, skip_without_swtpm

    skip_without_swtpm()
    started: list[SoftTpm] = []

    def make(name: str, manufacturer: str = "acme") -> SoftTpm:
        tpm = SoftTpm(tmp_path / "tpm" / name, ca_folder=tmp_path / "tpm-ca" / manufacturer).start()
        started.append(tpm)
        return tpm

    yield make
    for tpm in started:
        tpm.stop()
