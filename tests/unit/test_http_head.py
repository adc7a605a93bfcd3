"""What the agent's HTTP server writes before a body: only header names and values that cannot split a response."""

from __future__ import annotations

from strata.agent.httpd import _head_start


def test_a_header_name_or_value_that_would_split_the_response_is_not_sent() -> None:
    assert _head_start(200, {"content-type": "application/json"}) == (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    )
    # a name ending in a newline passed the check: a regular expression's "$" also matches before a final newline
    for name, value in (("x-a\n", "1"), ("x-a\r\nx-b", "1"), ("x a", "1"), ("x-a", "1\r\nx-b: 2"), ("x-a", "\0")):
        assert _head_start(200, {name: value}) is None, (name, value)
