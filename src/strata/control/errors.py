"""Errors only the control plane raises; each is a `StrataError`, so the one API error handler maps it."""

from __future__ import annotations

from strata.core.errors import StrataError, Unavailable


class PayloadTooLarge(StrataError):
    """A request body is larger than the server accepts."""

    code = "payload_too_large"
    http_status = 413


class StoreError(Unavailable):
    """The database or the blob store failed (locked, disk full, connection lost); the request may be retried."""

    code = "store_unavailable"
