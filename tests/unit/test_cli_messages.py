"""What the CLI says where a new user's first tries went wrong: usage errors without pydantic's wording, a
--server without its scheme, a --port out of range, and what `strata demo` does with its fleet and folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer import _click as click  # Typer vendors Click

from strata.cli.app import command, usage_message
from strata.cli.common import exit_code
from strata.cli.demo import cli_lines, ending
from strata.control.server import listen_sockets
from strata.control_client import ControlClient, check_server_url
from strata.core.errors import (
    ConfigError,
    OptimizationError,
    PackageBuildError,
    PackageError,
    VerificationError,
)
from strata.core.policy import PolicyError


def test_usage_errors_lose_pydantics_prefix_and_keep_the_rest() -> None:
    assert usage_message("Value error, 'god' is not one of 'read', 'admin'.") == "'god' is not one of 'read', 'admin'."
    assert usage_message("Assertion failed, too big") == "too big"
    plain = "Input should be a valid integer, unable to parse string as an integer"
    assert usage_message(plain) == plain
    assert usage_message("'x' is not k=v: Value error, kept") == "'x' is not k=v: Value error, kept"  # only a prefix


@pytest.mark.parametrize(("typed", "said"), [(["nods", "list"], "'nodes'"), (["--server", "x", "rolout"], "'rollout'")])
def test_a_mistyped_command_gets_the_close_matches_though_commands_are_built_when_asked_for(
    typed: list[str], said: str
) -> None:
    with pytest.raises(click.exceptions.UsageError) as refused:
        command().main(typed, prog_name="strata", standalone_mode=False)
    assert refused.value.message.endswith(f"Did you mean {said}?")


def test_a_mistyped_deploy_subcommand_is_named_not_read_as_a_model_without_its_version() -> None:
    """`strata deploy lst` said "Missing argument 'VERSION'" for `strata deploy create`, a command never typed."""
    with pytest.raises(click.exceptions.UsageError) as refused:
        command().main(["deploy", "lst"], prog_name="strata", standalone_mode=False)
    assert refused.value.message.startswith("No such command 'lst'. Did you mean 'list'?")
    with pytest.raises(click.exceptions.UsageError) as refused:  # a model name alone: a model short of its version
        command().main(["deploy", "digits"], prog_name="strata", standalone_mode=False)
    assert "Missing argument 'VERSION'" in refused.value.format_message()


@pytest.mark.parametrize(
    ("server", "said"),
    [
        ("127.0.0.1:8700", "--server '127.0.0.1:8700' has no scheme (strata server serves HTTPS: --server "
                           "https://127.0.0.1:8700)"),
        ("cp.example:8700", "has no scheme (strata server serves HTTPS: --server https://cp.example:8700)"),
        ("ftp://cp:8700", "--server 'ftp://cp:8700' is not an https:// URL (strata server serves HTTPS: --server "
                          "https://cp:8700)"),
    ],
)  # fmt: skip
def test_a_server_address_without_https_is_refused_as_bad_input_with_the_url_to_give(server: str, said: str) -> None:
    with pytest.raises(ConfigError) as refused:
        check_server_url(server)
    assert said in str(refused.value)
    with pytest.raises(ConfigError):  # before any request: httpx's refusal was "cannot reach" (exit 4)
        ControlClient(server, "t")
    check_server_url("https://cp:8700")
    check_server_url("http://cp:8700")  # sent, and answered by a hint to use https when it fails


def test_a_port_out_of_range_is_refused_before_anything_is_bound() -> None:
    for port in (-1, 65536, 99999999999):  # 99999999999 wrapped around to some port, and the server ran there
        with pytest.raises(ConfigError, match=f"--port must be between 0 and 65535, got {port}"):
            listen_sockets("127.0.0.1", port)


def test_the_demo_says_what_becomes_of_its_fleet_and_folder() -> None:
    folder = Path("/tmp/strata-demo-abc")
    assert ending(False, folder, deleted=True) == (
        "  the demo now stops the fleet and deletes /tmp/strata-demo-abc: the key, data and token above go with it\n"
        "  (`strata demo --keep` leaves it up until Ctrl-C; `--workdir DIR` keeps the files)"
    )
    assert ending(False, folder, deleted=False) == (
        "  the demo now stops the fleet; its files stay in /tmp/strata-demo-abc\n"
        "  (`strata demo --keep` leaves it up until Ctrl-C)"
    )
    assert ending(True, folder, deleted=True) == (
        "  the fleet stays up for the console until Ctrl-C; then the demo stops it and deletes /tmp/strata-demo-abc: "
        "the key, data and token above go with it"
    )
    assert ending(True, folder, deleted=False).endswith(
        "then the demo stops it; its files stay in /tmp/strata-demo-abc"
    )


def test_a_kept_demo_says_how_to_point_the_cli_at_it_without_printing_the_admin_token() -> None:
    lines = cli_lines("https://127.0.0.1:8700", Path("/tmp/my demo/fleet/server/ca.pem"), Path("/tmp/d/admin.token"))
    assert (
        "    export STRATA_SERVER=https://127.0.0.1:8700 STRATA_CA='/tmp/my demo/fleet/server/ca.pem'"
        " STRATA_TOKEN=$(cat /tmp/d/admin.token)\n"
    ) in lines
    assert lines.endswith("strata nodes list; strata deploy list; strata telemetry digits")


def test_a_bad_policy_file_is_bad_input() -> None:
    """Exit code 2, as any bad input (it was 1, an unexpected failure)."""
    assert exit_code(PolicyError("policy has unknown keys ['colour']")) == 2


def test_what_package_build_and_optimize_cannot_do_with_a_model_is_bad_input() -> None:
    """2, as `strata optimize` says of a model it cannot load (they exited 5 and 1); 5 stays a package that fails
    its checks."""
    assert exit_code(PackageBuildError("not a loadable ONNX model: a varint runs past its end")) == 2
    assert exit_code(OptimizationError("onnxruntime run failed: Failed to allocate memory")) == 2
    assert exit_code(VerificationError("model.onnx: sha256 differs")) == 5
    assert exit_code(PackageError("not a readable tar")) == 5
