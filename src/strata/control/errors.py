"""Errors only the control plane raises; each is a `StrataError`, so the one API error handler maps it."""

from __future__ import annotations

import errno

from strata.core.errors import StrataError, Unavailable


class PayloadTooLarge(StrataError):
    """A request body is larger than the server accepts."""

    code = "payload_too_large"
    http_status = 413


class TooManyRequests(StrataError):
    """A caller has as many of these requests under way as it may; it may send again once one is answered."""

    code = "too_many_requests"
    http_status = 429


class StoreError(Unavailable):
    """The database or the blob store failed (locked, disk full, connection lost); the request may be retried."""

    code = "store_unavailable"


class StorageFull(StoreError):
    """The disk (or quota) of the database or the blob store is full: a retry fails until space is freed."""

    code = "storage_full"
    http_status = 507


def disk_error(message: str, exc: OSError) -> StoreError:
    """`message` (which should say what failed and why) as a `StorageFull` when `exc` is a full disk or quota, else as
    a `StoreError`."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(message)
    return StoreError(message)
