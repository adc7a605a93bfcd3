"""Logs fetched from a node on demand: the operator asks, the ask rides in the node's desired state (waking its long
poll), the node answers its own request, the operator reads the answer; who may do which."""

from __future__ import annotations

import threading
import time
from typing import Any

from control_harness import Harness, NodeCredentials

from strata.control.nodelogs import KEEP_PER_NODE, MAX_ANSWER_BYTES


def _ask(server: Harness, node: NodeCredentials, lines: int = 50, headers: dict[str, str] | None = None) -> Any:
    return server.client.post(
        f"/v1/nodes/{node.node_id}/log-requests", json={"lines": lines}, headers=headers or server.admin
    )


def _answer(server: Harness, node: NodeCredentials, request_id: str, text: bytes, as_node: NodeCredentials) -> Any:
    return server.client.post(
        f"/v1/nodes/{node.node_id}/log-requests/{request_id}",
        content=text,
        headers={**as_node.headers, "content-type": "text/plain; charset=utf-8"},
    )


def test_an_ask_wakes_the_nodes_long_poll_and_its_answer_reaches_the_operator(server: Harness) -> None:
    node = server.enroll("edge-1")
    etag = server.desired(node).headers["ETag"]
    assert "log_request" not in server.desired(node).json()  # the shape (and ETag) of a state without an ask
    woke: dict[str, Any] = {}

    def poll() -> None:
        started = time.monotonic()
        woke["response"] = server.desired(node, etag, wait=30)
        woke["seconds"] = time.monotonic() - started

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.3)
    asked = _ask(server, node, lines=120)
    assert asked.status_code == 201, asked.text
    request = asked.json()
    assert (request["state"], request["lines"], request["text"]) == ("pending", 120, None)
    poller.join(timeout=10)
    assert not poller.is_alive()
    assert woke["seconds"] < 5
    assert woke["response"].status_code == 200
    assert woke["response"].json()["log_request"] == {"id": request["id"], "lines": 120}

    read = server.client.get(f"/v1/nodes/{node.node_id}/log-requests/{request['id']}", headers=server.admin)
    assert read.json()["state"] == "pending"
    text = "2026-12-04 INFO strata.agent[edge-1]: activated digits 1 ✓\n".encode()
    assert _answer(server, node, request["id"], text, node).status_code == 204
    read = server.client.get(f"/v1/nodes/{node.node_id}/log-requests/{request['id']}", headers=server.admin)
    assert (read.json()["state"], read.json()["text"]) == ("answered", text.decode())
    # Answered: the ask leaves the desired state, and a second answer does not replace the first.
    assert "log_request" not in server.desired(node).json()
    assert server.desired(node).headers["ETag"] == etag
    assert _answer(server, node, request["id"], b"again", node).status_code == 204
    read = server.client.get(f"/v1/nodes/{node.node_id}/log-requests/{request['id']}", headers=server.admin)
    assert read.json()["text"] == text.decode()


def test_who_may_ask_answer_and_read(server: Harness) -> None:
    node, other = server.enroll("edge-1"), server.enroll("edge-2")
    request_id = _ask(server, node).json()["id"]
    other_request = _ask(server, other).json()["id"]
    path = f"/v1/nodes/{node.node_id}/log-requests/{request_id}"

    # A read token sees the fleet but not its logs (they may hold what it should not see); nor may a node ask.
    reader = server.client.post("/v1/api-tokens", json={"scope": "read"}, headers=server.admin).json()["token"]
    read_headers = {"Authorization": f"Bearer {reader}"}
    assert _ask(server, node, headers=read_headers).status_code == 403
    assert server.client.get(path, headers=read_headers).status_code == 403
    assert _ask(server, node, headers=node.headers).status_code == 403
    # A node reads no log, not even its own answer; it answers only its own requests.
    assert server.client.get(path, headers=node.headers).status_code == 403
    assert _answer(server, node, request_id, b"forged", other).status_code == 403  # another node's path
    assert _answer(server, other, request_id, b"forged", other).status_code == 404  # its path, another's request
    assert _answer(server, node, other_request, b"forged", node).status_code == 404
    assert server.client.get(path, headers=server.admin).json()["state"] == "pending"
    assert (
        server.client.get(f"/v1/nodes/{other.node_id}/log-requests/{request_id}", headers=server.admin).status_code
        == 404
    )

    too_large = _answer(server, node, request_id, b"x" * (MAX_ANSWER_BYTES + 1), node)
    assert too_large.status_code == 413, too_large.text
    assert too_large.json()["code"] == "payload_too_large"
    assert server.client.get(path, headers=server.admin).json()["state"] == "pending"

    assert _ask(server, node, lines=0).status_code == 422
    assert _ask(server, node, lines=2001).status_code == 422
    missing = server.client.post("/v1/nodes/nope/log-requests", json={"lines": 5}, headers=server.admin)
    assert missing.status_code == 404
    server.client.delete(f"/v1/nodes/{other.node_id}", headers=server.admin)
    assert _ask(server, other).status_code == 404  # a revoked node is asked nothing


def test_a_newer_ask_is_the_one_the_node_sees_and_its_answer_settles_the_older_ones(server: Harness) -> None:
    node = server.enroll("edge-1")
    ids = [_ask(server, node, lines=10 + i).json()["id"] for i in range(KEEP_PER_NODE + 2)]
    assert server.desired(node).json()["log_request"] == {"id": ids[-1], "lines": 10 + KEEP_PER_NODE + 1}
    assert _answer(server, node, ids[-1], b"tail\n", node).status_code == 204
    kept = [server.client.get(f"/v1/nodes/{node.node_id}/log-requests/{i}", headers=server.admin) for i in ids]
    assert [r.status_code for r in kept] == [404, 404] + [200] * KEEP_PER_NODE  # only the newest few are kept
    assert {r.json()["text"] for r in kept[2:]} == {"tail\n"}
    assert "log_request" not in server.desired(node).json()


def test_a_log_cannot_carry_terminal_escapes_to_the_operator(server: Harness) -> None:
    # A node's log is its claim, printed in the operator's terminal: escape sequences could hide or forge lines, or
    # write the clipboard (OSC 52); NUL is refused by PostgreSQL's text columns. Tab and newline stay.
    node = server.enroll("edge-1")
    request = _ask(server, node).json()
    hostile = b"ok\tline\n\x1b[2J\x1b]52;c;cm0gLXJmIH4=\x07fake\x00\xc2\x9b31m\n"
    assert _answer(server, node, request["id"], hostile, node).status_code == 204
    text = server.client.get(f"/v1/nodes/{node.node_id}/log-requests/{request['id']}", headers=server.admin).json()
    assert text["text"] == "ok\tline\n\ufffd[2J\ufffd]52;c;cm0gLXJmIH4=\ufffdfake\ufffd\ufffd31m\n"
