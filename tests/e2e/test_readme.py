"""The README's quick tour, run as written: every command of its shell block, in order, in one bash session against
the real processes it starts, so the docs cannot drift from what strata does.

What the test changes, and only that: the data folders (/var/lib/...) and ports (8700, 8080, 8443, 8090) become
free ones under tmp_path; `strata` and `python` are this interpreter (the tour's first line, which activates the
virtual environment, only checks that they are on PATH); the lines that start a server, an agent or a
gateway run in the background, and the test waits until each is ready (the server answers, the node is enrolled,
the gateway listens) before the next line. The lines with `...` are elisions, not commands, and the optimize example
needs its user's data: `NOT_RUN` says where each runs for real, and the test fails when another line with `...`
appears or one of them is gone.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from strata.localfleet import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

# The lines the tour does not run, and where each is run for real: the elided ones (`...`) are not commands, and
# the optimize example needs its user's model and data (MiniLM, calibration and evaluation text).
NOT_RUN = {
    "strata optimize model.onnx --name minilm --version 1 --task embedding --calibration calib.txt --eval eval.txt "
    "--tokenizer tokenizer.json --target x86_64-avx2 --target cpu-generic --out build/minilm-1 --push "
    "--sign-key keys/release.key": (
        "needs MiniLM and its data: tests/integration/optimize/test_optimize_minilm.py optimizes it; "
        "tests/e2e/test_optimize_fleet.py runs strata optimize --push --sign-key into a fleet with a release key"
    ),
    "strata server --data-dir /var/lib/strata --tpm-ca tpm-vendor-root.pem --tpm-ca tpm-vendor-ca.pem ...": (
        "needs TPM vendor CAs: tests/e2e/test_tpm.py runs a server with --tpm-ca against swtpm"
    ),
    "strata agent ... --tpm device:/dev/tpmrm0": "needs a TPM: tests/e2e/test_tpm.py runs an agent against swtpm",
}
DAEMONS = ("strata server", "strata agent", "strata gateway")
# The virtual environment's activation: the test puts this interpreter's strata and python on PATH itself (shims).
ACTIVATE = ". .venv/bin/activate"
# What some lines must print (beyond exiting 0), keyed by how the line starts.
EXPECTED = {
    "strata deploy digits 1": "1 running",
    "strata nodes show gw-berlin-1": "certificate expires",
    "strata package push build/digits-2": "signed",
    "strata rollout status 1": "rollout 1: digits 2",
    "strata events --since 1h": "enrolled",
    "strata token list": "grafana",
    "strata model history digits": "gw-berlin-1",
    "curl -s localhost:8080/v2/models/digits/infer": '"outputs"',
    "curl -s localhost:8080/metrics": "nv_inference_request_success",
    "curl -si localhost:8090/v2/models/digits/infer": "strata-served-by",
}
GATEWAY_LINE = "curl -si localhost:8090/v2/models/digits/infer"


@dataclass(frozen=True)
class Line:
    """One command of the block: its text as written (continuations kept) and its first physical line joined."""

    text: str

    @property
    def command(self) -> str:
        """The command without continuations and trailing comment, for matching."""
        joined = re.sub(r"\\\n\s*", "", self.text)
        return re.sub(r"\s+#\s[^'\"]*$", "", joined).strip()


def quick_tour_lines(readme: str) -> list[Line]:
    """The commands of the shell blocks of the README's `## Quick tour` section, in order."""
    section = readme.split("\n## Quick tour\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert blocks, "the Quick tour has no ```sh block"
    lines: list[Line] = []
    for block in blocks:
        current: list[str] = []
        for raw in block.splitlines():
            if not current and (not raw.strip() or raw.lstrip().startswith("#")):
                continue
            current.append(raw)
            if not raw.endswith("\\"):
                lines.append(Line("\n".join(current)))
                current = []
        assert not current, f"a continuation line ends the block: {current}"
    return lines


def _ready_check(line: Line, ports: dict[str, int]) -> str:
    """A bash condition that is true once what `line` started is ready."""
    words = shlex.split(line.command.replace("$", ""))
    if line.command.startswith("strata server"):
        token = '-H "authorization: Bearer $(cat server-data/admin.token)"'
        return f"curl -sf --max-time 2 --cacert server-data/ca.pem {token} https://127.0.0.1:{ports['8700']}/v1/health"
    if line.command.startswith("strata agent"):
        name = words[words.index("--name") + 1]
        return (
            'curl -sf --max-time 2 --cacert "$STRATA_CA" -H "authorization: Bearer $STRATA_TOKEN" '
            '"$STRATA_SERVER/v1/nodes" '
            f'| grep -q \'"name":"{name}"\''
        )
    return f"curl -s --max-time 2 -o /dev/null localhost:{ports['8090']}/v2/health/live"


def script_for(lines: list[Line], ports: dict[str, int], work: Path) -> str:
    """The bash script that runs `lines` in one session, marking where each begins and how it exited."""
    out = [
        "set -u",
        f"cd {shlex.quote(str(work))}",
        'ready() { for _ in $(seq 600); do eval "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }',
    ]
    for number, line in enumerate(lines):
        text = line.text.replace("/var/lib/strata-agent", "agent-data").replace("/var/lib/strata", "server-data")
        for port, free in ports.items():
            text = re.sub(rf"\b{port}\b", str(free), text)
        out.append(f"echo '@@step {number}'")
        if line.command in NOT_RUN:
            out.append(f"echo '@@rc {number} not-run'")
        elif line.command == ACTIVATE:
            out.append("command -v strata python >/dev/null")
            out.append(f'echo "@@rc {number} $?"')
        elif line.command.startswith(DAEMONS):
            out.append(f"{{ {text}\n}} > daemon-{number}.log 2>&1 &")  # a line may end in a comment
            check = _ready_check(line, ports)
            out.append(f"if ready {shlex.quote(check)}; then echo '@@rc {number} 0'; else echo '@@rc {number} 1';")
            out.append(f"  cat daemon-{number}.log; fi")
        else:
            out.append(f'{text}\necho "@@rc {number} $?"')
    return "\n".join(out) + "\n"


def _stop_group(process: subprocess.Popen[str]) -> None:
    """Stop the tour's bash and everything it started (its process group): SIGTERM, then SIGKILL after 20 s."""
    for signum, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            continue
        break
    process.wait(timeout=10)


def test_the_readme_quick_tour_runs_as_written(tmp_path: Path) -> None:
    assert shutil.which("curl"), "the quick tour uses curl"
    lines = quick_tour_lines((ROOT / "README.md").read_text())
    assert {line.command for line in lines if "..." in line.command} <= set(NOT_RUN)
    assert {line.command for line in lines} >= set(NOT_RUN), "a line of NOT_RUN is no longer in the README"
    assert lines[0].command == ACTIVATE, "the tour starts by putting strata on PATH"
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "scenarios", work / "scenarios")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, target in (("strata", f"{sys.executable} -m strata"), ("python", sys.executable)):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONUNBUFFERED"] = "1"
    ports = {port: free_port() for port in ("8700", "8080", "8443", "8090")}
    script = script_for(lines, ports, work)
    (tmp_path / "tour.sh").write_text(script)

    log = tmp_path / "tour.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            ["bash", str(tmp_path / "tour.sh")],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # the daemons it starts share its process group: stopped together below
        )
        try:
            process.wait(timeout=240)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _stop_group(process)
    output = log.read_text()

    printed: dict[int, str] = {}
    codes: dict[int, str] = {}
    for chunk in output.split("@@step ")[1:]:
        head, _, rest = chunk.partition("\n")
        number = int(head)
        body, marker, tail = rest.rpartition(f"@@rc {number} ")
        assert marker, f"line {number} never finished:\n{lines[number].text}\n{rest[-3000:]}"
        printed[number], codes[number] = body, tail.split("\n", 1)[0]
    assert len(codes) == len(lines), f"the tour stopped after line {len(codes)}:\n{output[-3000:]}"
    for number, line in enumerate(lines):
        if line.command in NOT_RUN:
            continue
        assert codes[number] == "0", (
            f"README line failed (exit {codes[number]}):\n{line.text}\n{printed[number][-3000:]}"
        )
        for start, expected in EXPECTED.items():
            if line.command.startswith(start):
                assert expected in printed[number], f"{line.text}\nprinted no {expected!r}:\n{printed[number][-3000:]}"
    assert {start for start in EXPECTED if any(line.command.startswith(start) for line in lines)} == set(EXPECTED)
    # The README says the gateway answers from local, parent or cloud (it used to answer `none` when asked before
    # its first topology read: it now listens only after that read).
    [served] = [printed[n] for n, line in enumerate(lines) if line.command.startswith(GATEWAY_LINE)]
    assert re.search(r"strata-served-by: (local|parent|cloud)", served), served
