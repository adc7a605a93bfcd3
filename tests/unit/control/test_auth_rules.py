"""The authorization decisions: pure functions of the caller and the target."""

from __future__ import annotations

import pytest

from strata.control.auth import ADMIN, Access, Principal, authorize, authorize_blob, hash_secret, new_secret
from strata.core.errors import Forbidden

NODE_A = Principal(node_id="a")


@pytest.mark.parametrize(
    ("principal", "access", "target", "allowed"),
    [
        (ADMIN, Access.ANY, None, True),
        (NODE_A, Access.ANY, None, True),
        (ADMIN, Access.ADMIN, None, True),
        (NODE_A, Access.ADMIN, None, False),
        (NODE_A, Access.ADMIN, "a", False),
        (ADMIN, Access.SELF_OR_ADMIN, "a", True),
        (NODE_A, Access.SELF_OR_ADMIN, "a", True),
        (NODE_A, Access.SELF_OR_ADMIN, "b", False),
        (NODE_A, Access.SELF, "a", True),
        (NODE_A, Access.SELF, "b", False),
        (ADMIN, Access.SELF, "a", False),
        (ADMIN, Access.SELF, None, False),
    ],
)
def test_authorize(principal: Principal, access: Access, target: str | None, allowed: bool) -> None:
    if allowed:
        authorize(principal, access, target)
    else:
        with pytest.raises(Forbidden):
            authorize(principal, access, target)


def test_blobs_are_for_the_admin_and_for_nodes_that_need_them() -> None:
    authorize_blob(ADMIN, referenced_by_caller=False)
    authorize_blob(NODE_A, referenced_by_caller=True)
    with pytest.raises(Forbidden):
        authorize_blob(NODE_A, referenced_by_caller=False)


def test_secrets_are_random_and_stored_hashed() -> None:
    first, second = new_secret(), new_secret()
    assert first != second
    assert len(first) >= 43
    assert hash_secret(first) != first
    assert len(hash_secret(first)) == 64
    assert hash_secret(first) == hash_secret(first)
