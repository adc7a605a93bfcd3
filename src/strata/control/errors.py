"""Errors only the control plane raises; each is a `StrataError`, so the one API error handler maps it."""

from __future__ import annotations

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
