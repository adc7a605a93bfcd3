"""Node-side safety with the real agent parts: reconciler, artifact store, onnxruntime and the inference server.

No control plane runs here: blobs come from an in-memory peer, and the test plays the desired states a server (or
an old `desired.json`, or a compromised server) would hand the node. A node must roll a bad activation back by
itself and refuse a package whose placement policy forbids it, whatever the desired state says.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from strata.agent.client import ControlPlaneClient
from strata.agent.httpd import Request
from strata.agent.metrics import RETIRED_SERIES_S, InferenceMetrics
from strata.agent.oip_server import InferenceApp
from strata.agent.plan import Activate, Download, Stage, plan
from strata.agent.probation import ProbationConfig
from strata.agent.reconciler import NodeIdentity, Reconciler
from strata.agent.repository import ModelRepository
from strata.agent.serving import ServingTracker
from strata.agent.state import LoadingRecord, NodeState, SlotRef
from strata.agent.store import ArtifactStore
from strata.agent.transport import HttpResponse
from strata.core.chunking import Chunk, offsets
from strata.core.hashing import canonical_json
from strata.core.package import Package, pack_tar
from strata.core.profiles import get_profile
from strata.core.wire import DesiredModel, DesiredState, VariantRef
from strata.examples.compute import build_compute_model
from strata.package_build import build_package

PROFILE = get_profile("cpu-generic")


class Peer:
    """Serves blobs by their sha256, as the control plane's blob endpoint would: package tars, and the pieces
    (canonical manifest, chunks, small files) agents fetch."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def add(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        return sha

    def add_pieces(self, package: Package) -> None:
        self.add(canonical_json(package.manifest.to_json()))
        for entry in package.manifest.files:
            data = (package.path / entry.path).read_bytes()
            for offset, chunk in offsets(entry.chunks or (Chunk(entry.sha256, entry.size),)):
                self.add(data[offset : offset + chunk.size])

    def request(
        self, method: str, url: str, *, headers: Mapping[str, str], body: bytes | None = None, timeout: float
    ) -> HttpResponse:
        raise AssertionError(f"no control plane in this test: {method} {url}")

    @contextlib.contextmanager
    def stream(self, method: str, url: str, *, headers: Mapping[str, str], timeout: float) -> Iterator[_Body]:
        yield _Body(self.blobs[url.rsplit("/", 1)[1]])


class _Body:
    def __init__(self, data: bytes) -> None:
        self.status = 200
        self.headers: dict[str, str] = {}
        self._data = data
        self._pos = 0

    def read(self, size: int) -> bytes:
        piece = self._data[self._pos : self._pos + size]
        self._pos += len(piece)
        return piece


@dataclass
class Clock:
    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Node:
    """One agent's parts, wired as `strata agent` wires them."""

    reconciler: Reconciler
    app: InferenceApp
    clock: Clock
    peer: Peer
    refs: dict[str, VariantRef] = field(default_factory=dict)

    def offer(self, package: Package, tar: Path) -> VariantRef:
        data = tar.read_bytes()
        self.peer.add_pieces(package)
        manifest = package.manifest
        ref = VariantRef(
            id=manifest.variant,
            profile=manifest.profile,
            runtime=manifest.runtime,
            precision=manifest.precision,
            digest=manifest.digest,
            blob=self.peer.add(data),
            size=len(data),
        )
        self.refs[manifest.version] = ref
        return ref

    def want(self, version: str, name: str = "latency") -> DesiredState:
        model = DesiredModel(name=name, version=version, deployment="1", variants=(self.refs[version],))
        return DesiredState(node_id="n1", models=(model,))

    def infer(self, count: int, name: str = "latency") -> list[str]:
        body = json.dumps(
            {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
        ).encode()

        async def send() -> list[str]:
            versions = []
            for _ in range(count):
                answer = await self.app.handle(Request("POST", f"/v2/models/{name}/infer", {}, {}, body))
                assert answer.status == 200, answer.body
                versions.append(json.loads(answer.body)["model_version"])
            return versions

        return asyncio.run(send())


def make_node(tmp_path: Path, labels: dict[str, str], probation: ProbationConfig | None = None) -> Node:
    clock = Clock()
    peer = Peer()
    serving = ServingTracker(clock=clock)
    repository = ModelRepository()
    client = ControlPlaneClient("https://control.invalid", peer)
    client.authenticate("n1")
    identity = NodeIdentity(tier="device", labels=labels, profile=PROFILE, emulated=False, serve_url=None, name="n1")
    reconciler = Reconciler(
        ArtifactStore(tmp_path / "node"),
        repository,
        client,
        identity,
        frozenset({"onnxruntime"}),
        inference_threads=1,
        clock=clock,
        monotonic=clock,  # one fake time for dates and waits: these tests step neither apart
        serving=serving,
        probation=probation or ProbationConfig(duration_s=60, min_requests=20),
    )
    app = InferenceApp(repository, InferenceMetrics(serving=serving, clock=clock))
    return Node(reconciler, app, clock, peer)


def package(model: Path, version: str, tmp: Path, name: str = "latency", **fields: object) -> tuple[Package, Path]:
    built = build_package(model, tmp / f"{name}-{version}", name=name, version=version, **fields)
    tar = tmp / f"{name}-{version}.tar"
    pack_tar(built, tar)
    return built, tar


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real model, and one with twenty times its layers (about twenty times its compute: a margin over the
    probation's 5x limit that scheduling noise on a busy machine cannot eat)."""
    folder = tmp_path_factory.mktemp("compute")
    built = {}
    for label, layers in (("fast", 12), ("slow", 240)):
        built[label] = folder / f"{label}.onnx"
        build_compute_model(built[label], layers, replicas=512)
    return built


def test_a_slow_activation_fails_probation_and_the_node_rolls_back_by_itself(
    models: dict[str, Path], tmp_path: Path
) -> None:
    node = make_node(tmp_path, {"region": "eu-west"})
    node.offer(*package(models["fast"], "1", tmp_path))
    node.offer(*package(models["slow"], "2", tmp_path))

    node.reconciler.converge(node.want("1"))
    assert node.infer(60) == ["1"] * 60
    node.clock.now += 61
    node.reconciler.check_probation()
    assert node.reconciler.state.probation == {}

    node.reconciler.converge(node.want("2"))
    record = node.reconciler.state.probation["latency"]
    assert record.reference_p95_ms is not None
    assert record.reference == "1 on this node"
    assert node.reconciler.status(None).models[0].probation == "running"
    assert node.infer(25) == ["2"] * 25  # twenty times the compute, served: it loads and passes its golden check
    node.clock.now += 5
    node.reconciler.check_probation()  # no server involved: the decision is the node's own

    slots = node.reconciler.state.models["latency"]
    assert slots.active.version == "1"
    assert slots.previous is None
    assert node.infer(1) == ["1"]
    failure = node.reconciler.state.failures[node.refs["2"].digest]
    assert failure.kind == "probation"
    assert "p95 latency" in failure.reason
    assert "the limit is 5x" in failure.reason
    status = node.reconciler.status(None)
    assert [(m.version, m.probation) for m in status.models] == [("1", "passed")]
    assert [(f.version, f.kind) for f in status.failures] == [("2", "probation")]
    # The desired state still says 2: the node does not take it again until the failure's backoff (10 min).
    waiting = plan(node.want("2"), node.reconciler.observe(), node.clock.now + 60)
    assert not any(isinstance(a, Download | Stage | Activate) for a in waiting)
    assert plan(node.want("2"), node.reconciler.observe(), node.clock.now + 601) == [
        Activate("latency", "2", node.refs["2"])
    ]


def test_an_activation_that_serves_well_passes_probation(models: dict[str, Path], tmp_path: Path) -> None:
    node = make_node(tmp_path, {})
    node.offer(*package(models["fast"], "1", tmp_path))
    node.offer(*package(models["fast"], "2", tmp_path, variant="cpu-generic-fp32-again"))
    node.reconciler.converge(node.want("1"))
    node.infer(25)
    node.reconciler.converge(node.want("2"))
    node.infer(25)
    node.clock.now += 60
    node.reconciler.check_probation()
    assert node.reconciler.state.models["latency"].active.version == "2"
    assert node.reconciler.state.models["latency"].previous is not None
    assert node.reconciler.state.failures == {}
    counters = node.reconciler.status(None).models[0].serving
    assert counters is not None
    assert counters.requests == 25
    assert counters.errors == 0


def test_a_node_going_through_many_versions_keeps_counters_of_the_ones_it_serves_not_of_every_one(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Nodes run for months and take a new version often: the serving counters (probation, status reports) of a
    version are dropped when another is activated, and its Prometheus series once it has not served for
    `RETIRED_SERIES_S` (a scraper has its final counts), so neither grows with every version ever served."""
    node = make_node(tmp_path, {})
    versions = ["1", "2", "3", "4"]
    for version in versions:
        node.offer(*package(models["fast"], version, tmp_path))
        node.reconciler.converge(node.want(version))
        assert node.infer(3) == [version] * 3
        node.clock.now += RETIRED_SERIES_S
        node.reconciler.check_probation()
    serving = node.reconciler.serving
    assert [v for v in versions if serving.counters("latency", v) is not None] == ["4"]

    def versions_in_metrics() -> set[str]:
        page = asyncio.run(node.app.handle(Request("GET", "/metrics", {}, {}, b""))).body.decode()
        return set(re.findall(r'nv_inference_request_success\{model="latency",version="(\w+)"\}', page))

    assert versions_in_metrics() == {"4"}  # 1-3 last served more than RETIRED_SERIES_S ago
    node.offer(*package(models["fast"], "5", tmp_path))
    node.reconciler.converge(node.want("5"))
    node.infer(1)
    assert versions_in_metrics() == {"4", "5"}  # 4 retired just now: a scraper still gets its final counts
    node.clock.now += RETIRED_SERIES_S + 1
    assert versions_in_metrics() == {"5"}


def test_the_agent_refuses_a_package_its_policy_forbids_here_whatever_the_desired_state_says(
    digits_onnx: Path, tmp_path: Path
) -> None:
    eu_only = {"data_class": "personal", "allowed_regions": ["eu-*"]}
    node = make_node(tmp_path, {"region": "us-east"})
    node.offer(*package(digits_onnx, "1", tmp_path, name="faces", policy=eu_only))
    actions = node.reconciler.converge(node.want("1", name="faces"))
    assert actions >= 3  # downloaded and staged: the policy is in the verified package, checked before activation
    assert node.reconciler.state.models == {}
    assert node.reconciler.repository.get("faces") is None
    [failure] = node.reconciler.status(None).failures
    assert failure.kind == "policy"
    assert "allowed_regions" in failure.reason
    assert "us-east" in failure.reason


def test_cel_rules_are_checked_by_the_agent_out_of_process(digits_onnx: Path, tmp_path: Path) -> None:
    rules = {"rules": [{"name": "devices-only", "allow": 'node.tier == "device" && node.region != ""'}]}
    allowed = make_node(tmp_path / "a", {"region": "eu-west"})
    allowed.offer(*package(digits_onnx, "1", tmp_path, name="faces", policy=rules))
    allowed.reconciler.converge(allowed.want("1", name="faces"))
    assert allowed.reconciler.state.models["faces"].active.version == "1"

    refused = make_node(tmp_path / "b", {})
    refused.offer(*package(digits_onnx, "1", tmp_path / "b", name="faces", policy=rules))
    refused.reconciler.converge(refused.want("1", name="faces"))
    assert refused.reconciler.state.models == {}
    [failure] = refused.reconciler.status(None).failures
    assert failure.kind == "policy"
    assert "devices-only" in failure.reason


def test_a_restart_with_labels_the_policy_forbids_does_not_serve_the_model(digits_onnx: Path, tmp_path: Path) -> None:
    eu_only = {"allowed_regions": ["eu-*"]}
    node = make_node(tmp_path, {"region": "eu-west"})
    node.offer(*package(digits_onnx, "1", tmp_path, name="faces", policy=eu_only))
    node.reconciler.converge(node.want("1", name="faces"))
    assert node.reconciler.state.models["faces"].active.version == "1"

    moved = make_node(tmp_path, {"region": "us-east"})  # the same data folder, the node now says it is in the US
    moved.reconciler.restore()
    assert moved.reconciler.state.models == {}
    assert moved.reconciler.repository.get("faces") is None
    assert [f.kind for f in moved.reconciler.status(None).failures] == ["policy"]
    # Even told again to run it, the node does not take it before the refusal's backoff (ten minutes)...
    again = plan(node.want("1", name="faces"), moved.reconciler.observe(), moved.clock.now + 60)
    assert not any(isinstance(a, Download | Stage | Activate) for a in again)
    # ...and when it tries, it refuses again.
    moved.clock.now += 601
    moved.reconciler.converge(node.want("1", name="faces"))
    assert moved.reconciler.state.models == {}
    assert moved.reconciler.state.failures[node.refs["1"].digest].attempts == 2


def test_a_stopping_agent_sees_a_load_whose_record_is_being_written_and_starts_no_other(
    digits_onnx: Path,
    digits_onnx_v2: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stop asks the reconciler for the load under way from another thread. A load counts from before its
    loading record is written: held in the middle of that write (on disk, not yet in memory), the stop still sees it
    and waits for it. Once the agent is stopping, no load starts, so none is cut off half-way
    (tests/e2e/test_crash_loading.py stops a real agent mid-load)."""
    node = make_node(tmp_path, {})
    node.offer(*package(digits_onnx, "1", tmp_path / "a", name="digits"))
    v2 = node.offer(*package(digits_onnx_v2, "2", tmp_path / "b", name="digits"))
    node.reconciler.converge(node.want("1", name="digits"))
    store = node.reconciler.store
    writing, proceed = threading.Event(), threading.Event()
    save_state = store.save_state

    def held_save(state: NodeState) -> None:
        save_state(state)
        if state.loading is not None:  # on disk; the reconciler's state is not yet assigned
            writing.set()
            assert proceed.wait(30)

    monkeypatch.setattr(store, "save_state", held_save)  # holds the loop's thread at the race's instant
    converging = threading.Thread(target=node.reconciler.converge, args=(node.want("2", name="digits"),))
    converging.start()
    assert writing.wait(30)
    assert json.loads(store.state_path.read_text())["loading"]["digest"] == v2.digest
    assert node.reconciler.state.loading is None  # what the stop used to read: no load under way
    loading = node.reconciler.refuse_loads()
    assert loading is not None
    assert (loading.version, loading.digest) == ("2", v2.digest)
    assert node.reconciler.activating == loading
    proceed.set()
    converging.join(30)
    assert node.reconciler.activating is None
    assert node.reconciler.state.models["digits"].active.version == "2"
    assert "loading" not in json.loads(store.state_path.read_text())

    # Stopping: a desired state that would load version 1 again runs nothing; an activation planned before the stop
    # loads nothing. Neither leaves a loading record.
    want = node.want("1", name="digits")
    assert node.reconciler.converge(want) == 0
    [activate] = plan(want, node.reconciler.observe(), node.clock.now)
    assert isinstance(activate, Activate)
    with caplog.at_level(logging.INFO, logger="strata.agent"):
        node.reconciler.execute(activate)
    assert "not loading digits 1 (cpu-generic-fp32): the agent is stopping" in caplog.text
    assert node.reconciler.state.models["digits"].active.version == "2"
    assert node.reconciler.activating is None
    assert "loading" not in json.loads(store.state_path.read_text())


def test_a_load_the_agent_died_in_is_a_failure_at_the_next_start_with_the_usual_backoff(
    digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path
) -> None:
    """The loading record the agent writes before a load (fsynced in state.json) and clears after it: one left
    there is a load the agent died in (killed for its memory, a crash in the runtime). The next start records it
    as that version's failure, serves the previous version, and loads it again only at its retry time, with
    attempts counted as for any failure (tests/e2e/test_crash_loading.py kills a real agent mid-load)."""
    node = make_node(tmp_path, {})
    node.offer(*package(digits_onnx, "1", tmp_path / "a", name="digits"))
    node.offer(*package(digits_onnx_v2, "2", tmp_path / "b", name="digits"))
    node.reconciler.converge(node.want("1", name="digits"))
    node.reconciler.converge(node.want("2", name="digits"))
    store = node.reconciler.store
    assert "loading" not in json.loads(store.state_path.read_text())  # cleared after each load
    v2 = node.refs["2"]

    # Died while activating version 2 (a start-up load of a version the node served gets a second try first: see
    # the next test):
    store.save_state(node.reconciler.state.with_loading(LoadingRecord("digits", "2", v2.id, v2.digest, 1_000.0)))
    restarted = make_node(tmp_path, {})
    restarted.reconciler.restore()
    state = restarted.reconciler.state
    assert state.loading is None
    assert state.models["digits"].active.version == "1"
    assert restarted.infer(1, name="digits") == ["1"]
    [failure] = restarted.reconciler.status(None).failures
    assert (failure.version, failure.kind, failure.attempts) == ("2", "health", 1)
    assert "died while loading" in failure.reason
    want = node.want("2", name="digits")
    assert not any(isinstance(a, Activate) for a in plan(want, restarted.reconciler.observe(), 1_000.0 + 29))
    [retry] = plan(want, restarted.reconciler.observe(), 1_000.0 + 31)
    assert isinstance(retry, Activate)
    assert retry.variant.digest == v2.digest

    # Dies again in that retry: the next start counts a second attempt, and waits twice as long.
    restarted.clock.now += 31
    store.save_state(state.with_loading(LoadingRecord("digits", "2", v2.id, v2.digest, restarted.clock.now)))
    again = make_node(tmp_path, {})
    again.clock.now = restarted.clock.now
    again.reconciler.restore()
    [failure] = again.reconciler.status(None).failures
    assert failure.attempts == 2
    assert not any(isinstance(a, Activate) for a in plan(want, again.reconciler.observe(), again.clock.now + 59))
    assert again.reconciler.state.models["digits"].active.version == "1"


def serving_two_versions(digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path) -> Node:
    """A node that activated digits 1, then 2 (1 is its previous slot)."""
    node = make_node(tmp_path, {})
    node.offer(*package(digits_onnx, "1", tmp_path / "a", name="digits"))
    node.offer(*package(digits_onnx_v2, "2", tmp_path / "b", name="digits"))
    node.reconciler.converge(node.want("1", name="digits"))
    node.reconciler.converge(node.want("2", name="digits"))
    return node


def test_a_start_up_load_the_agent_ended_in_once_is_loaded_again_and_a_second_time_is_a_failure(
    digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start-up load of the version a node serves, cut once in this boot (a stop the agent did not wait out, a
    kill), is loaded again: it served before, and the cut is as likely the service manager's as the package's. It
    used to be that version's failure at once: the model dropped when it had no previous version, its package then
    deleted, and a node without its control plane serving nothing. Ending in that load a second time is the version's
    failure, as for any load the agent dies in."""
    node = serving_two_versions(digits_onnx, digits_onnx_v2, tmp_path)
    store, v2, boot = node.reconciler.store, node.refs["2"], node.reconciler.boot
    cut = LoadingRecord("digits", "2", v2.id, v2.digest, 1_000.0, boot, startup=True)
    store.save_state(node.reconciler.state.with_loading(cut))

    restarted = make_node(tmp_path, {})
    noted: list[LoadingRecord | None] = []
    load = restarted.reconciler._load

    def noting(name: str, slot: SlotRef) -> None:
        noted.append(restarted.reconciler.state.loading)
        load(name, slot)

    monkeypatch.setattr(restarted.reconciler, "_load", noting)
    restarted.reconciler.restore()
    state = restarted.reconciler.state
    assert state.loading is None
    assert state.models["digits"].active.version == "2"
    assert not state.failures
    assert restarted.infer(1, name="digits") == ["2"]
    [record] = noted
    assert record is not None
    assert (record.digest, record.startup, record.deaths) == (v2.digest, True, 1)
    assert json.loads(store.state_path.read_text()).get("loading") is None

    # It ends in that load again (the record as the restore wrote it): now it is the version's failure.
    store.save_state(state.with_loading(record))
    again = make_node(tmp_path, {})
    again.reconciler.restore()
    assert again.reconciler.state.models["digits"].active.version == "1"
    [failure] = again.reconciler.status(None).failures
    assert (failure.version, failure.kind) == ("2", "health")
    assert "died while loading" in failure.reason


def test_a_load_cut_by_a_reboot_is_no_failure(digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path) -> None:
    """A loading record from another boot (the kernel's boot id changed: a power cut or a reboot in the middle of
    the load, an activation here) is as likely not the package's doing: the version is loaded again, and no failure
    is recorded or reported to the rollout's gates, unless it is the third load in a row to end that way."""
    node = serving_two_versions(digits_onnx, digits_onnx_v2, tmp_path)
    store, v2 = node.reconciler.store, node.refs["2"]
    cut = LoadingRecord("digits", "2", v2.id, v2.digest, 1_000.0, "an-earlier-boot")
    store.save_state(node.reconciler.state.with_loading(cut))
    restarted = make_node(tmp_path, {})
    restarted.reconciler.restore()
    assert restarted.reconciler.state.models["digits"].active.version == "2"
    assert not restarted.reconciler.state.failures
    assert restarted.reconciler.state.loading is None
    assert restarted.infer(1, name="digits") == ["2"]

    # The same load ending two more times, across reboots (it hangs or panics the machine until a watchdog resets
    # it): the third death in a row is the version's failure, whatever the boots.
    third = LoadingRecord("digits", "2", v2.id, v2.digest, 1_000.0, "a-later-boot", startup=True, deaths=2)
    store.save_state(restarted.reconciler.state.with_loading(third))
    again = make_node(tmp_path, {})
    again.reconciler.restore()
    assert again.reconciler.state.models["digits"].active.version == "1"
    assert again.reconciler.state.failures[v2.digest].kind == "health"


def test_a_disk_that_refuses_the_state_file_does_not_keep_the_node_from_serving_at_start_up(
    digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start-up that must change the state (a load the agent died in becomes a failure, the model rolls back) on a
    disk remounted read-only after a power cut, or full: the changes are kept in memory and the node serves what it
    has, where `restore` used to raise and the agent to stop before serving anything."""
    node = serving_two_versions(digits_onnx, digits_onnx_v2, tmp_path)
    store, v2 = node.reconciler.store, node.refs["2"]
    store.save_state(node.reconciler.state.with_loading(LoadingRecord("digits", "2", v2.id, v2.digest, 1_000.0)))
    on_disk = store.state_path.read_bytes()

    restarted = make_node(tmp_path, {})

    def read_only(state: NodeState) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(restarted.reconciler.store, "save_state", read_only)
    restarted.reconciler.restore()
    state = restarted.reconciler.state
    assert state.models["digits"].active.version == "1"  # rolled back in memory
    assert state.loading is None
    assert state.failures[v2.digest].kind == "health"
    assert restarted.infer(1, name="digits") == ["1"]
    assert store.state_path.read_bytes() == on_disk  # nothing written


def test_a_version_replaced_during_its_probation_is_not_the_one_to_go_back_to(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Version 1 passed its probation; version 2 is on probation when version 3 arrives. The version to go back to
    stays 1 (and its package stays on the node): version 3 failing its probation returns the node to 1. It used to
    become 2, never judged and 20x slower, which then served with no probation, version 1's package deleted."""
    node = make_node(tmp_path, {})
    node.offer(*package(models["fast"], "1", tmp_path))
    node.offer(*package(models["slow"], "2", tmp_path))
    node.offer(*package(models["fast"], "3", tmp_path, metrics={"latency_ms": {"p95": 1e-6}}))  # fails probation
    reconciler = node.reconciler
    reconciler.converge(node.want("1"))
    node.infer(30)
    node.clock.now += 61
    reconciler.check_probation()
    assert reconciler.state.probation == {}  # 1 proved itself
    reconciler.converge(node.want("2"))
    assert reconciler.state.probation["latency"].version == "2"
    reconciler.converge(node.want("3"))  # before 2 was judged
    slots = reconciler.state.models["latency"]
    assert (slots.active.version, slots.previous.version if slots.previous else None) == ("3", "1")
    assert node.refs["1"].digest in reconciler.store.staged_digests()

    node.infer(25)
    node.clock.now += 5
    reconciler.check_probation()  # 3 fails its probation
    slots = reconciler.state.models["latency"]
    assert slots.active.version == "1"
    assert node.infer(1) == ["1"]
    assert [(f.version, f.kind) for f in reconciler.state.failures.values()] == [("3", "probation")]


def test_a_probation_goes_on_after_a_restart_and_a_version_the_agent_keeps_restarting_on_fails_it(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """The agent ends during a version's probation (its first requests crash it, or the node restarts) and starts
    61 s later: the probation's window starts again with its counters, rather than passing at once on zero requests
    judged. Restarting `max_restarts` (3) times during it fails the probation, and the node goes back to the version
    before: a version whose inference kills the agent never counts an error."""
    node = make_node(tmp_path, {})
    node.offer(*package(models["fast"], "1", tmp_path))
    node.offer(*package(models["fast"], "2", tmp_path / "v2"))
    node.reconciler.converge(node.want("1"))
    node.infer(30)
    node.clock.now += 61
    node.reconciler.check_probation()
    node.reconciler.converge(node.want("2"))
    node.infer(2)

    now = node.clock.now
    for restart in (1, 2):
        now += 61
        again = make_node(tmp_path, {})
        again.clock.now = now
        again.reconciler.restore()
        again.reconciler.check_probation()
        watched = again.reconciler.state.probation["latency"]
        assert (watched.version, watched.restarts, watched.started_at) == ("2", restart, now)
        assert again.infer(1) == ["2"]

    now += 61
    last = make_node(tmp_path, {})
    last.clock.now = now
    last.reconciler.restore()
    last.reconciler.check_probation()
    assert last.reconciler.state.models["latency"].active.version == "1"
    [failure] = last.reconciler.state.failures.values()
    assert (failure.version, failure.kind) == ("2", "probation")
    assert "restarted 3 times" in failure.reason
    assert last.infer(1) == ["1"]


def test_a_probation_rollback_on_a_full_disk_happens_once(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 2 fails its probation while the disk is full: the node goes back to version 1 once, and its slots in
    memory (and so its status) say so until the state file can be written. It used to keep saying 2 and to load 1
    again at every check (every 5 s), the state write failing each time."""
    node = make_node(tmp_path, {})
    node.offer(*package(models["fast"], "1", tmp_path))
    node.offer(*package(models["slow"], "2", tmp_path))
    reconciler = node.reconciler
    reconciler.converge(node.want("1"))
    node.infer(30)
    node.clock.now += 61
    reconciler.check_probation()
    reconciler.converge(node.want("2"))
    node.infer(25)

    def full(state: NodeState) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reconciler.store, "save_state", full)
    loads: list[str] = []
    load = reconciler._load

    def counting(name: str, slot: SlotRef) -> None:
        loads.append(slot.version)
        load(name, slot)

    monkeypatch.setattr(reconciler, "_load", counting)
    for _ in range(3):
        node.clock.now += 5
        reconciler.check_probation()
        assert node.infer(1) == ["1"]
        assert reconciler.state.models["latency"].active.version == "1"
        assert reconciler.status(None).models[0].version == "1"
    assert loads == ["1"]
    assert reconciler.state.failures[node.refs["2"].digest].kind == "probation"


def test_an_activation_cut_by_a_reboot_is_tried_again_with_its_deaths_counted(
    digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 2's activation ended with the machine (a reboot before its slots were committed): the next start
    activates it again, and that activation's record counts the death, so a load that resets the machine every time
    fails at its third, where it used to be activated again at every boot, for ever."""
    node = make_node(tmp_path, {})
    node.offer(*package(digits_onnx, "1", tmp_path / "a", name="digits"))
    second = package(digits_onnx_v2, "2", tmp_path / "b", name="digits")
    node.offer(*second)
    node.reconciler.converge(node.want("1", name="digits"))
    v2 = node.refs["2"]
    cut = LoadingRecord("digits", "2", v2.id, v2.digest, 1_000.0, "an-earlier-boot")
    node.reconciler.store.save_state(node.reconciler.state.with_loading(cut))

    restarted = make_node(tmp_path, {})
    restarted.offer(*second)
    restarted.reconciler.restore()
    assert not restarted.reconciler.state.failures
    noted: list[LoadingRecord | None] = []
    load_new = restarted.reconciler._load_new

    def noting(model: str, version: str, ref: VariantRef) -> None:
        noted.append(restarted.reconciler.state.loading)
        load_new(model, version, ref)

    monkeypatch.setattr(restarted.reconciler, "_load_new", noting)
    restarted.reconciler.converge(restarted.want("2", name="digits"))
    [record] = noted
    assert record is not None
    assert (record.digest, record.startup, record.deaths) == (v2.digest, False, 1)
    assert restarted.reconciler.state.models["digits"].active.version == "2"
