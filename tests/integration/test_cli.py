"""The `strata` command as an operator meets it, run as a real process: help that fits 80 columns with every option
named in full, shell completion, --version, the documented exit codes, and config files that are checked."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer import _click as click  # Typer vendors Click
from typer.core import TyperGroup

from strata.cli.app import command
from strata.trust.signing import create_release_key

# One process prints every command's --help (30-odd pages; a process each would cost ~20 s of CPU), as the real
# `strata` entry point builds its command tree, with COLUMNS=80 in its environment.
HELP_SCRIPT = """
import contextlib, io, json, sys
from strata.cli.app import command
from strata.trust.signing import create_release_key
from typer.core import TyperGroup

def walk(cmd, path):
    yield path
    if isinstance(cmd, TyperGroup):
        for name in cmd.list_commands(None):  # the root builds each command as it is asked for
            yield from walk(cmd.get_command(None, name), [*path, name])

pages = {}
root = command()
for path in walk(root, []):
    page = io.StringIO()
    with contextlib.redirect_stdout(page), contextlib.suppress(SystemExit):
        root.main([*path, "--help"], prog_name="strata")
    pages[" ".join(path)] = page.getvalue()
sys.stdout.write(json.dumps(pages))
"""


def strata(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    return subprocess.run(
        [sys.executable, "-m", "strata", *args],
        env={**base, "COLUMNS": "80", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _options(path: str) -> list[str]:
    """Every long option name of the command at `path` (as `strata` builds it, --ca included)."""
    cmd = command()
    for name in path.split():
        group = cmd
        assert isinstance(group, TyperGroup)
        found = group.get_command(click.Context(group), name)
        assert found is not None
        cmd = found
    options = [param for param in cmd.params if param.param_type_name == "option" and not getattr(param, "hidden", 0)]
    return [opt for param in options for opt in (*param.opts, *param.secondary_opts)]


def test_every_commands_help_fits_80_columns_and_names_every_option_in_full() -> None:
    """Rich cut option names at 80 columns (`--max-download-r…`) and ate `[tpm]` as markup."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    ran = subprocess.run(
        [sys.executable, "-c", HELP_SCRIPT], env={**base, "COLUMNS": "80"}, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stderr
    pages: dict[str, str] = json.loads(ran.stdout)
    assert len(pages) > 30
    assert "nodes list" in pages
    assert "agent" in pages
    for path, page in pages.items():
        assert page.startswith(f"Usage: strata {path}".rstrip()), (path, page[:200])
        too_wide = [line for line in page.splitlines() if len(line) > 80]
        assert not too_wide, (path, too_wide)
        assert "…" not in page, path
        named = set(re.findall(r"(?<![\w-])--?[a-z][\w-]*", page))
        for option in _options(path):
            assert option in named, (path, option)
    assert "strata[tpm]" in pages["agent"]
    assert "strata[grpc]" in pages["agent"]
    for path in ("nodes list", "telemetry", "token create", "pin add", "model list", "rollout status"):
        assert "  --ca <str>" in pages[path], path
        assert "STRATA_CA" in pages[path], path
    # Arguments as the text names them, and one value of a repeatable option: the usage line read `{name} {version}`
    # under "Start rolling NAME VERSION out", and options `--gate <list[str]>`, `--extra <list[Path]>`.
    for path, page in pages.items():
        assert "<list[" not in page, path
        assert not re.search(r"[{}]", page.splitlines()[0]), path
    assert pages["rollout create"].startswith("Usage: strata rollout create [OPTIONS] NAME VERSION\n")
    assert "  NAME <str>  " in pages["rollout create"]
    assert "  --gate <str>  " in pages["rollout create"]
    assert "  --profile <str>  " in pages["model push"]
    assert "  --extra <path>  " in pages["model push"]
    assert "  --release-key <file>  " in pages["server"]
    assert pages["nodes label"].startswith("Usage: strata nodes label [OPTIONS] NODE [CHANGES]...\n")
    assert "  CHANGES... <str>  " in pages["nodes label"]
    root = " ".join(pages[""].split())
    assert "--server, --token and --ca go before the command or after it" in root
    assert "Exit codes: 2 bad input or configuration" in root
    assert "7 conflict" in root


def test_version_completion_and_exit_codes(tmp_path: Path, digits_onnx: Path) -> None:
    version = strata("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("strata 0.")
    # The completion script is for the shell that runs strata (Typer asks shellingham, which looks at the parent
    # process): run it from bash, which stays its parent (`; true`), whatever shell runs the tests (make uses sh).
    base = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    command = f"{shlex.quote(sys.executable)} -m strata --show-completion; true"
    script = subprocess.run(["bash", "-c", command], env=base, capture_output=True, text=True, timeout=60, check=False)
    assert script.returncode == 0, script.stderr
    assert "_STRATA_COMPLETE=complete_bash" in script.stdout
    completed = strata(env={"_STRATA_COMPLETE": "complete_bash", "COMP_WORDS": "strata nodes li", "COMP_CWORD": "2"})
    assert completed.stdout.split() == ["list"]

    # 2: bad input. A malformed selector and an unknown profile exited 1; an unknown option is Click's usage error.
    unreachable = ["--server", "https://127.0.0.1:9", "--token", "t"]
    selector = strata(*unreachable, "pin", "add", "digits", "1", "--selector", "site")
    assert (selector.returncode, selector.stderr.strip()) == (2, "error: selector term 'site' is not k=v")
    # a label that is not k=v was called a selector term
    label = strata(*unreachable, "token", "create", "--label", "site")
    assert (label.returncode, label.stderr.strip()) == (2, "error: --label 'site' is not k=v")
    change = strata(*unreachable, "nodes", "label", "n1", "ring")
    assert (change.returncode, change.stderr.strip()) == (
        2,
        "error: 'ring' is neither k=v (sets a label) nor k- (removes it)",
    )
    profile = strata("agent", "--server", "https://127.0.0.1:9", "--data-dir", str(tmp_path / "a"), "--name", "n",
                     "--profile", "no-such-profile")  # fmt: skip
    assert profile.returncode == 2, profile.stderr
    assert "no-such-profile" in profile.stderr
    # 2: the private release key given to the server (it was a 100-line traceback from the application's start-up)
    private, _ = create_release_key(tmp_path / "keys")
    server = strata("server", "--data-dir", str(tmp_path / "srv"), "--port", "9", "--release-key", str(private))
    assert server.returncode == 2, server.stderr
    assert "Traceback" not in server.stderr
    assert f"--release-key {private} is a private key: give the server the public half" in " ".join(
        server.stderr.split()
    )
    # 2: an allowlist entry no node's code hash can match, an OTLP endpoint that is not a URL (both were taken), a
    # telemetry retention under an hour or that is no duration, an event retention under a day, a node certificate
    # lifetime under an hour or past 397 days
    for option, value, said in [
        ("--agent-allowlist", "abc", "sha256:<64 hex digits>; got 'abc'"),
        ("--otlp-endpoint", "collector:4318", "must be an http:// or https:// URL, got 'collector:4318'"),
        ("--telemetry-retention", "30m", "--telemetry-retention must be at least 1h, got '30m'"),
        ("--telemetry-retention", "nan", "--telemetry-retention: 'nan' is not a duration"),
        ("--event-retention", "12h", "--event-retention must be at least 1d, got '12h'"),
        ("--node-cert-lifetime", "10m", "--node-cert-lifetime must be at least 1h, got '10m'"),
        ("--node-cert-lifetime", "3000000d", "--node-cert-lifetime must be at most 397d, got 3000000d"),  # overflowed
    ]:
        refused = strata("server", "--data-dir", str(tmp_path / "srv"), "--port", "9", option, value, timeout=20)
        assert refused.returncode == 2, refused.stderr
        assert said in refused.stderr
    # 2: a data folder the server cannot write (it exited 1 where one it could not create exited 2)
    (tmp_path / "srv-ro" / "start.lock").mkdir(parents=True)
    unusable = strata("server", "--data-dir", str(tmp_path / "srv-ro"), "--port", "9", timeout=20)
    assert unusable.returncode == 2, unusable.stderr
    assert "Traceback" not in unusable.stderr
    assert f"cannot use the data folder {tmp_path / 'srv-ro'}: cannot open start.lock" in " ".join(
        unusable.stderr.split()
    )
    # 2: a log level that is none (the agent and the gateway logged at info instead)
    for command in (["agent", "--server", "https://127.0.0.1:9", "--data-dir", str(tmp_path / "a"), "--name", "n"],
                    ["gateway", "--cloud", "http://127.0.0.1:9"]):  # fmt: skip
        verbose = strata(*command, "--log-level", "verbose", timeout=20)
        assert (verbose.returncode, verbose.stderr.strip()) == (
            2,
            "error: --log-level must be one of debug, info, warning, error, got 'verbose'",
        )
    # 2: an agent data folder that cannot be made or written (a file there, say): it was a FileExistsError traceback
    (tmp_path / "a-file").write_text("mine\n")
    folder = strata("agent", "--server", "https://127.0.0.1:9", "--data-dir", str(tmp_path / "a-file"), "--name", "n")
    assert folder.returncode == 2, folder.stderr
    assert "Traceback" not in folder.stderr
    assert f"cannot use the data folder {tmp_path / 'a-file'}: File exists" in " ".join(folder.stderr.split())
    # 2: a name that is not one, typed for a node or a model (it exited 5, "package invalid")
    for command in (
        ["agent", "--server", "https://127.0.0.1:9", "--data-dir", str(tmp_path / "a"), "--name", "a b"],
        ["package", "build", str(digits_onnx), "--name", "a b", "--version", "1", "--out", str(tmp_path / "b")],
    ):
        named = strata(*command, timeout=20)
        assert named.returncode == 2, named.stderr
        assert "name 'a b' is not valid" in named.stderr
    # 2: a model given where a package goes: pushing it said to sign it, and signing it said "not a readable tar"
    for command in (["package", "push"], ["model", "sign", "--key", str(tmp_path / "a-file")]):
        model = strata(*unreachable, *command, str(digits_onnx))
        assert model.returncode == 2, model.stderr
        said = " ".join(model.stderr.split())
        assert f"{digits_onnx} is a model, not a package: `strata model push {digits_onnx}" in said
    # 2: a --ca that is not a certificate (it was a traceback).
    (tmp_path / "not-a-cert.pem").write_text("hello\n")
    bad = strata(*unreachable, "nodes", "list", "--ca", str(tmp_path / "not-a-cert.pem"))
    assert bad.returncode == 2, bad.stderr
    assert "Traceback" not in bad.stderr
    assert "holds no certificate" in bad.stderr
    assert "DATA_DIR/ca.pem" in bad.stderr
    # 2: a simulator scenario with a duration that is none, read as the other commands read one
    (tmp_path / "bad-bake.yaml").write_text("name: bad-bake\nrollout: {bake: 30x}\n")
    scenario = strata("sim", "--scenario", str(tmp_path / "bad-bake.yaml"))
    assert (scenario.returncode, scenario.stderr.strip()) == (
        2,
        "error: rollout.bake: '30x' is not a duration (use 90s, 10m, 2h, 7d)",
    )
    # 2: a package built into a folder that holds something (it exited 5, "package invalid", after running the model)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine\n")
    used = strata(
        "package", "build", str(digits_onnx), "--name", "d", "--version", "1", "--out", str(tmp_path / "used")
    )
    assert used.returncode == 2, used.stderr
    assert "is not empty; give a new or empty folder" in " ".join(used.stderr.split())
    # 2: a --server without its scheme (httpx refused to send it, and that was exit 4, "server unreachable")
    bare = strata("--server", "127.0.0.1:9", "--token", "t", "nodes", "list")
    assert (bare.returncode, " ".join(bare.stderr.split())) == (
        2,
        "error: --server '127.0.0.1:9' has no scheme (strata server serves HTTPS: --server https://127.0.0.1:9)",
    )
    # 2: no token, worded for any command (it said "no admin token", and a read token lists nodes)
    tokenless = strata("--server", "https://127.0.0.1:9", "nodes", "list")
    assert tokenless.returncode == 2, tokenless.stderr
    assert "error: no API token given: pass --token or set STRATA_TOKEN" in tokenless.stderr
    # 2: a value Typer checks with pydantic, in plain words ("Value error, 'god' is not one of ...")
    scope = strata(*unreachable, "token", "api", "--scope", "god", "--name", "x")
    assert scope.returncode == 2, scope.stderr
    assert scope.stderr.splitlines()[-1] == "Error: Invalid value for '--scope': 'god' is not one of 'read', 'admin'."
    # 2: a port that is taken, found before anything is written: uvicorn found it after the start-up had made the
    # data folder and the admin token, and exited 3 (a refused credential)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = strata("server", "--data-dir", str(tmp_path / "busy"), "--port", str(port), timeout=20)
    assert (busy.returncode, busy.stderr) == (
        2,
        f"error: cannot listen on 127.0.0.1:{port}: the port is in use (another server has it): give another --port\n",
    )
    assert not (tmp_path / "busy").exists()
    # 4: nothing listens there.
    gone = strata(*unreachable, "nodes", "list")
    assert gone.returncode == 4
    assert "cannot reach the control plane" in gone.stderr


def test_package_build_of_a_model_it_cannot_use_is_bad_input(huge_input_onnx: Path, tmp_path: Path) -> None:
    """Exit 2, as `strata optimize` says of the same file, and no folder: a model that does not load exited 5
    ("package invalid"), and one whose declared input dims are huge ended in numpy's MemoryError traceback (1)."""
    (tmp_path / "garbage.onnx").write_bytes(b"this is not a model")
    for model, said in [
        (tmp_path / "garbage.onnx", "not a loadable ONNX model"),
        (huge_input_onnx, "cannot make up golden data for input X, declared [100000, 100000, 100000]"),
    ]:
        out = tmp_path / f"out-{model.stem}"
        built = strata("package", "build", str(model), "--name", "m", "--version", "1", "--out", str(out))
        assert built.returncode == 2, built.stderr
        assert "Traceback" not in built.stderr
        assert said in " ".join(built.stderr.split())
        assert not out.exists()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('data-dir = "x"\nprot = 8700\n', "unknown key 'prot'"),
        ("data-dir = \n", "is not TOML"),
        ('data-dir = "x"\nconfig = "y.toml"\n', "unknown key 'config'"),
    ],
)
def test_a_config_file_with_an_unknown_key_or_bad_toml_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, error: str
) -> None:
    path = tmp_path / "server.toml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exited:
        command().main(["server", "--config", str(path)], prog_name="strata")
    assert exited.value.code == 2
    message = " ".join(capsys.readouterr().err.split())
    assert error in message
    assert str(path) in message.replace(" ", "")
