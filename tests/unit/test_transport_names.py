"""The agent's transport reaches a server by an ASCII name without the idna codec (stringprep, unicodedata: about
0.4 MB of the agent's memory budget), and still takes a name that is not ASCII."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from strata.agent.transport import _host_name

CLIENT = textwrap.dedent(
    """
    import socket, sys, threading
    from strata.agent.transport import H11Transport

    listener = socket.create_server(("127.0.0.1", 0))
    def answer():
        conn, _ = listener.accept()
        data = b""
        while b"\\r\\n\\r\\n" not in data:
            data += conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")
        conn.close()
    threading.Thread(target=answer, daemon=True).start()
    port = listener.getsockname()[1]
    response = H11Transport().request("GET", f"http://localhost:{port}/", headers={}, timeout=10)
    assert response.body == b"ok", response
    print(sorted(name for name in ("encodings.idna", "stringprep", "unicodedata") if name in sys.modules))
    """
)


def test_a_request_by_an_ascii_name_does_not_load_the_idna_codec() -> None:
    done = subprocess.run([sys.executable, "-c", CLIENT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_ascii_names_go_as_bytes_and_others_as_text_for_the_idna_codec() -> None:
    assert _host_name("control.example.com") == b"control.example.com"
    assert _host_name("127.0.0.1") == b"127.0.0.1"
    assert _host_name("bücher.example") == "bücher.example"
