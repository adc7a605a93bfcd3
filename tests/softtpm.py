"""A real software TPM for tests: swtpm manufactured by swtpm_setup, with EK certificates from a local
"manufacturer" CA made for this test (not the machine's /var/lib/swtpm-localca), served on loopback TCP."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

TOOLS = ("swtpm", "swtpm_setup", "swtpm_localca")


def skip_without_swtpm() -> None:
    """Skip (with the reason) where swtpm or tpm2-pytss is missing; `make test` installs both."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian: apt-get install swtpm swtpm-tools)")
    pytest.importorskip("tpm2_pytss", reason="tpm2-pytss not installed (pip install 'strata[tpm]')")


def _free_port_pair() -> int:
    """A port whose next one is free too: tpm2-tss's swtpm TCTI reaches the control channel at port + 1."""
    for _ in range(100):
        with socket.socket() as sock, socket.socket() as after:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
            try:
                after.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two free adjacent ports")


class SoftTpm:
    """One manufactured swtpm. `ca_files` are the manufacturer CA certificates that issued its EK certificate."""

    def __init__(self, folder: Path, ca_folder: Path | None = None) -> None:
        self.folder = folder
        self.state = folder / "state"
        self.ca = ca_folder or folder / "ca"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.state.mkdir(parents=True, exist_ok=True)
        self.ca.mkdir(parents=True, exist_ok=True)
        self._manufacture()

    def _manufacture(self) -> None:
        localca = self.folder / "swtpm-localca.conf"
        localca.write_text(
            f"statedir = {self.ca}\nsigningkey = {self.ca}/signkey.pem\n"
            f"issuercert = {self.ca}/issuercert.pem\ncertserial = {self.ca}/certserial\n"
        )
        options = self.folder / "swtpm-localca.options"
        options.write_text("--platform-manufacturer Strata\n--platform-version 2.1\n--platform-model test\n")
        setup = self.folder / "swtpm_setup.conf"
        setup.write_text(
            f"create_certs_tool = {shutil.which('swtpm_localca')}\ncreate_certs_tool_config = {localca}\n"
            f"create_certs_tool_options = {options}\nactive_pcr_banks = sha256\n"
        )
        subprocess.run(
            [
                "swtpm_setup", "--tpm2", "--tpmstate", str(self.state), "--config", str(setup),
                "--create-ek-cert", "--lock-nvram", "--overwrite",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )  # fmt: skip

    @property
    def ca_files(self) -> list[Path]:
        return [self.ca / "issuercert.pem", self.ca / "swtpm-localca-rootca-cert.pem"]

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> SoftTpm:
        self.port = _free_port_pair()
        control = self.port + 1
        self.proc = subprocess.Popen(
            [
                "swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state}",
                "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                "--ctrl", f"type=tcp,port={control},bindaddr=127.0.0.1",
                "--flags", "not-need-init,startup-clear",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"swtpm exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("swtpm did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None
