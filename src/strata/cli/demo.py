"""`strata demo`: a whole local fleet on an embedded default, end to end, in under a minute.

Trains a real digits classifier and exports it to ONNX, makes a release key, starts a control plane that requires
packages signed by it and three agents (two tiers, two regions) as real processes on free loopback ports, pushes
v1 signed, deploys it everywhere (each node checks the signature and the TUF metadata before it runs it), checks
real inference answers on every node, shows the control plane refusing an unsigned package, pushes v2 and
deploys it to one region, shows the fleet, and stops all.
"""

from __future__ import annotations

import functools
import shlex
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import typer
from rich.markup import escape

from strata.cli.common import console, out
from strata.core.errors import StrataError

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class DemoFailed(StrataError):
    code = "demo_failed"


def _interrupt(signum: int, _frame: object) -> None:
    for each in _STOP_SIGNALS:  # a second one (a service manager's, a key held down) must not cut the clean-up short
        signal.signal(each, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def step(title: str) -> Iterator[None]:
    started = time.monotonic()
    with console.status(title):
        yield
    console.print(f"[green]✓[/green] {title} [dim]({time.monotonic() - started:.1f}s)[/dim]")


def _predict_local(model_path: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    labels = session.run(["label"], {"X": x})[0]
    return np.asarray(labels)


def _infer(url: str, x: np.ndarray[Any, Any], binary: bool) -> tuple[str, np.ndarray[Any, Any]]:
    """Ask a node for labels over the Open Inference Protocol; return (model_version, labels)."""
    from strata.core.oip import HEADER_LENGTH, decode_response, encode_request

    body, header_length = encode_request({"X": x}, binary=binary, outputs=["label"], binary_output=binary)
    headers = {"content-type": "application/octet-stream" if binary else "application/json"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    response = httpx.post(f"{url}/v2/models/digits/infer", content=body, headers=headers, timeout=30)
    if response.status_code != 200:
        raise DemoFailed(f"inference at {url} answered {response.status_code}: {response.text}")
    length = response.headers.get(HEADER_LENGTH)
    header, arrays = decode_response(response.content, int(length) if length else None)
    return str(header["model_version"]), arrays["label"]


def ending(keep: bool, workdir: Path, deleted: bool) -> str:
    """What becomes of the fleet and of `workdir` (`deleted`: the demo deletes it as it ends), said once the
    console's address and token are shown: they stop working with the fleet, and the key, data and token go with
    the folder."""
    files = (
        f" and deletes {workdir}: the key, data and token above go with it"
        if deleted
        else f"; its files stay in {workdir}"
    )
    if keep:
        return f"  the fleet stays up for the console until Ctrl-C; then the demo stops it{files}"
    others = "; `--workdir DIR` keeps the files" if deleted else ""
    return f"  the demo now stops the fleet{files}\n  (`strata demo --keep` leaves it up until Ctrl-C{others})"


def cli_lines(server_url: str, ca_path: Path, token_path: Path) -> str:
    """How to point the `strata` CLI at a kept demo fleet from another terminal: its server, fleet CA and admin
    token (read from its file when the line runs: the secret is not printed), each path quoted for the shell."""
    server, ca, token = (shlex.quote(str(value)) for value in (server_url, ca_path, token_path))
    return (
        "  to drive it with the CLI from another terminal (strata on PATH: `. .venv/bin/activate` in the repository):\n"
        f"    export STRATA_SERVER={server} STRATA_CA={ca} STRATA_TOKEN=$(cat {token})\n"
        "    strata nodes list; strata deploy list; strata telemetry digits"
    )


def run_demo(workdir: Path, say: Callable[[str], None], keep: bool = False, kept: bool = True) -> float:
    """Run the whole demo under `workdir`; return the seconds it took (up to the console's address). With `keep`,
    leave the fleet running for the console until Ctrl-C, then stop it. `kept`: the caller leaves `workdir` in
    place afterwards (else the demo says the folder goes).

    Raises:
        DemoFailed, FleetError: a step did not give what it should (the message says which, with logs).
    """
    from strata.cli.nodes import fleet_table
    from strata.cli.telemetry import telemetry_table
    from strata.core.package import pack_tar
    from strata.core.profiles import detect_profile, read_host_facts
    from strata.examples.digits import load_data, train_digits
    from strata.localfleet import LocalFleet
    from strata.package_build import build_package
    from strata.trust.release import sign_release
    from strata.trust.signing import create_release_key, key_hint

    started = time.monotonic()
    data = load_data()
    host_profile = detect_profile(read_host_facts()).id
    with step("train two versions of a digits classifier and export them to ONNX"):
        acc1 = train_digits(workdir / "digits-v1.onnx", hidden=64, seed=0)
        acc2 = train_digits(workdir / "digits-v2.onnx", hidden=96, seed=1)
    say(f"  v1 held-out accuracy {acc1:.3f}, v2 {acc2:.3f}; this host's profile: {host_profile}")

    with step("make a release key (the model owner keeps the private half offline)"):
        release_key, release_pub = create_release_key(workdir / "keys")
    say(f"  release key {key_hint(release_pub.read_bytes())[:16]} in {release_key.parent}")

    with LocalFleet(workdir / "fleet", poll_wait_s=20) as fleet:
        with step("start the control plane (it accepts only packages signed by the release key)"):
            fleet.start_server(extra_args=["--release-key", str(release_pub)])
        say(f"  {fleet.server_url} (data in {fleet.server_dir})")
        nodes = {
            "edge-eu-1": ("device", {"fleet": "demo", "region": "eu-west", "site": "berlin"}),
            "gateway-eu-1": ("near-edge", {"fleet": "demo", "region": "eu-west", "site": "berlin"}),
            "edge-us-1": ("device", {"fleet": "demo", "region": "us-east", "site": "boston"}),
        }
        with step("start 3 agents (2 tiers, 2 regions) and enroll them"):
            for name, (tier, labels) in nodes.items():
                fleet.start_agent(name, tier, labels, extra_args=["--telemetry-interval", "1"])
            fleet.wait_for(lambda: len(fleet.nodes()) == 3, 30, "3 nodes to enroll")

        reference = {"X": data.train_x[:500]}  # drift references come from the training distribution

        def push(version: str, model: Path, signed: bool = True) -> None:
            for profile in dict.fromkeys(["cpu-generic", host_profile]):
                package = build_package(
                    model,
                    workdir / f"pkg-{version}-{profile}",
                    name="digits",
                    version=version,
                    profile=profile,
                    sample=reference,
                )
                signature = sign_release(package.path, release_key, time.time(), 86400).to_base64() if signed else None
                tar = workdir / f"digits-{version}-{profile}.tar"
                pack_tar(package, tar)
                fleet.client.push_package(tar, signature=signature)

        with step("push digits v1 signed (a package for cpu-generic and one for this host's profile)"):
            push("1", workdir / "digits-v1.onnx")
        with step("deploy digits v1 to fleet=demo; every node checks signature and TUF metadata, then runs it"):
            fleet.client.deploy("digits", "1", {"fleet": "demo"})
            fleet.wait_for_versions({name: {"digits": "1"} for name in nodes}, timeout=60)
        verified = sorted(name for name, node in fleet.nodes().items() if node.get("supply") == "verified")
        say(f"  nodes that run only signed packages: {', '.join(verified)}")

        x, y = data.test_x[:64], data.test_y[:64]
        expected_v1 = _predict_local(workdir / "digits-v1.onnx", x)
        with step("send real inference requests to every node (JSON and binary tensors)"):
            for index, name in enumerate(nodes):
                version, answer = _infer(fleet.agents[name].serve_url, x, binary=index % 2 == 1)
                if version != "1" or not np.array_equal(answer, expected_v1):
                    raise DemoFailed(f"{name} answered version {version} with labels that differ from v1's")
        say(f"  every node agrees with v1 run locally; accuracy on 64 held-out digits: {np.mean(expected_v1 == y):.3f}")

        with step("the control plane refuses an unsigned package"):
            try:
                push("9", workdir / "digits-v2.onnx", signed=False)
            except StrataError as exc:
                refusal = exc
            else:
                raise DemoFailed("the control plane took an unsigned package")
        say(f"  refused: {refusal}")  # under its step's line, as every step's details are
        with step("push digits v2 signed and deploy it to region=eu-west only"):
            push("2", workdir / "digits-v2.onnx")
            fleet.client.deploy("digits", "2", {"fleet": "demo", "region": "eu-west"})
            fleet.wait_for_versions(
                {"edge-eu-1": {"digits": "2"}, "gateway-eu-1": {"digits": "2"}, "edge-us-1": {"digits": "1"}}, 60
            )
        expected_v2 = _predict_local(workdir / "digits-v2.onnx", x)
        with step("check answers: eu-west serves v2, us-east still v1"):
            checks: list[tuple[str, str, np.ndarray[Any, Any]]] = [
                ("edge-eu-1", "2", expected_v2),
                ("gateway-eu-1", "2", expected_v2),
                ("edge-us-1", "1", expected_v1),
            ]
            for name, want_version, want in checks:
                version, answer = _infer(fleet.agents[name].serve_url, x, binary=True)
                if version != want_version or not np.array_equal(answer, want):
                    raise DemoFailed(f"{name} answered version {version}; expected {want_version}")
        out.print(fleet_table(list(fleet.nodes().values()), time.time()))
        with step("collect the nodes' telemetry (requests, latency percentiles, drift)"):

            def uploaded() -> dict[str, Any] | None:
                answer = fleet.client.telemetry("digits", since_s=600)
                return answer if sum(n["requests"] for n in answer["nodes"]) >= 6 else None

            traffic = fleet.wait_for(uploaded, 30, "telemetry from the nodes")
        out.print(telemetry_table(traffic, "digits telemetry, last 10 minutes", out.width))
        read_token = fleet.client.create_api_token("read", "demo console")["token"]
        say(f"  console: {fleet.server_url}/ui/ (its certificate is the fleet CA's: {fleet.ca_path})")
        say(f"  read-only token for it: {read_token}")
        elapsed = time.monotonic() - started
        say(ending(keep, workdir, deleted=not kept))
        if keep:
            say(escape(cli_lines(fleet.server_url, fleet.ca_path, fleet.server_dir / "admin.token")))
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                say("")
        with step("stop every process the demo started"):
            fleet.close()
            still = [p.name for p in fleet.processes() if p.running]
            if still:
                raise DemoFailed(f"processes still running: {still}")
    return elapsed


def demo(
    workdir: Annotated[
        Path | None, typer.Option("--workdir", help="Keep everything in this folder (default: a temporary one).")
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave the demo fleet running for the console at /ui until Ctrl-C.")
    ] = False,
) -> None:
    """Run a whole local fleet end to end: train, package, push, deploy, infer, update one region."""
    if workdir is not None and (workdir / "keys").exists():  # before minutes of work that would end at the key
        raise typer.BadParameter(
            f"{workdir} holds an earlier demo (its release key is never overwritten): pass a new or empty folder",
            param_hint="--workdir",
        )
    # A service manager's stop, a closed terminal: as Ctrl-C, so the demo stops every process it started (a plain
    # `kill` used to end the demo alone, its server and agents left running on their ports). SIGINT too: a demo
    # started in the background by a shell without job control inherits SIGINT ignored, and Python then leaves it
    # so: Ctrl-C (or `kill -INT`) did nothing and `--keep` ran on for ever.
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _interrupt)
    # unwrapped: the terminal folds a long line, where Rich would break it with newlines, and a path or the CLI's
    # export line would no longer paste whole
    say = functools.partial(console.print, soft_wrap=True)
    try:
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
            elapsed = run_demo(workdir, say, keep)
        else:
            with tempfile.TemporaryDirectory(prefix="strata-demo-") as tmp:
                elapsed = run_demo(Path(tmp), say, keep, kept=False)
    except KeyboardInterrupt as stop:  # Ctrl-C, or a signal above: the fleet and its folder are gone by now
        files = f"; its files stay in {workdir}" if workdir is not None else " and deleted its folder"
        console.print(f"[yellow]interrupted[/yellow] ({stop}): the demo stopped every process it started{files}")
        raise typer.Exit(130) from None
    console.print(f"[bold green]demo passed[/bold green] in {elapsed:.1f}s")
