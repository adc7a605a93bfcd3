"""Messages between the agent and its serving processes: framed over a Unix socket pair, each a JSON header and
a binary blob (package files), with requests matched to their replies.

A frame is two big-endian 32-bit lengths (header, blob), the header's JSON, then the blob. A request carries an
`id`; its reply carries `re` (that id) and either its fields or `error`. Both ends are the agent's own
processes, started by it, so the channel trusts what it reads; it still bounds a header's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Final

from strata.core.errors import StrataError, Unavailable

log = logging.getLogger(__name__)

_FRAME: Final = struct.Struct("!II")
_MAX_HEADER: Final = 64 << 20  # a metrics snapshot of many models is a few hundred KB

Message = dict[str, Any]
# answers a request: (fields, blob) for its reply; a message without `id` gets no reply
Handler = Callable[[Message, bytes], Awaitable[tuple[Message, bytes]]]


class Channel:
    """One end of a serving process's channel, inside the running event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[tuple[Message, bytes]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        """A channel over a connected Unix socket (one end of a socket pair)."""
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    def send(self, op: str, fields: Message | None = None, blob: bytes = b"") -> None:
        """Send a message that needs no reply (nothing happens when the channel is closed)."""
        self._write({"op": op, **(fields or {})}, blob)

    async def request(
        self, op: str, fields: Message | None = None, blob: bytes = b"", timeout: float | None = None
    ) -> tuple[Message, bytes]:
        """Send a request and wait for its reply's fields and blob.

        Raises:
            Unavailable: the channel closed (the other process ended) or no reply came within `timeout`.
            StrataError: the other end failed to answer it (its message).
        """
        if self.closed.is_set():
            raise Unavailable("the serving process is gone")
        ident = next(self._ids)
        future: asyncio.Future[tuple[Message, bytes]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        try:
            self._write({"op": op, "id": ident, **(fields or {})}, blob)
            async with asyncio.timeout(timeout):
                header, data = await future
        except TimeoutError as exc:
            raise Unavailable(f"the serving process did not answer {op!r} in {timeout:g} s") from exc
        finally:
            self._waiting.pop(ident, None)
            # The future holds the exception a close puts in it, whose traceback holds this frame: without this,
            # the caller's frames (a freshly loaded model among their locals) wait for the cycle collector.
            del future
        if "error" in header:
            raise StrataError(str(header["error"]))
        return header, data

    def _write(self, header: Message, blob: bytes) -> None:
        if self.closed.is_set() or self._writer.is_closing():
            return
        encoded = json.dumps(header, separators=(",", ":")).encode()
        self._writer.write(_FRAME.pack(len(encoded), len(blob)) + encoded)
        if blob:
            self._writer.write(blob)

    async def serve(self, handler: Handler) -> None:
        """Read messages until the other end closes: replies resolve their requests, requests are answered by
        `handler` (each in its own task, so a slow one does not hold the others up)."""
        try:
            while True:
                try:
                    lengths = await self._reader.readexactly(_FRAME.size)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                header_length, blob_length = _FRAME.unpack(lengths)
                if header_length > _MAX_HEADER:
                    log.error("a serving process sent a %d-byte message header; closing its channel", header_length)
                    return
                try:
                    header = json.loads(await self._reader.readexactly(header_length))
                    blob = await self._reader.readexactly(blob_length) if blob_length else b""
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if "re" in header:
                    future = self._waiting.get(header["re"])
                    if future is not None and not future.done():
                        future.set_result((header, blob))
                    continue
                task = asyncio.get_running_loop().create_task(self._answer(handler, header, blob))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            self.close()

    async def _answer(self, handler: Handler, header: Message, blob: bytes) -> None:
        try:
            fields, data = await handler(header, blob)
        except StrataError as exc:
            fields, data = {"error": str(exc)}, b""
        except Exception as exc:  # a bug: logged here, and the requester gets an error rather than a hang
            log.exception("serving channel: %s failed", header.get("op"))
            fields, data = {"error": f"internal error: {type(exc).__name__}"}, b""
        if "id" in header:
            self._write({"re": header["id"], **fields}, data)

    def close(self) -> None:
        """Close the channel; requests still waiting fail with Unavailable."""
        if self.closed.is_set():
            return
        self.closed.set()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(Unavailable("the serving process is gone"))
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._writer.close()
