"""One translation from exceptions to JSON error answers: `{"error": <message>, "code": <code>}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from strata.core.errors import AuthError, StrataError
from strata.core.words import clip

log = logging.getLogger(__name__)


def error_response(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON body every error of the API has, the message cut to `words.MAX_MESSAGE_CHARS` (it may quote what
    the caller sent)."""
    return JSONResponse({"error": clip(message), "code": code}, status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()))
        problems.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg", "invalid")))
    return "; ".join(problems) or "invalid request"


async def _strata_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StrataError)
    if exc.http_status >= 500:
        log.error("%s: %s", exc.code, exc.message, exc_info=exc)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthError) else None
    return error_response(exc.http_status, exc.message, exc.code, headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, _describe_validation(exc), "invalid_request")


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), f"http_{exc.status_code}", dict(exc.headers or {}))


async def _client_gone(request: Request, _exc: Exception) -> JSONResponse:
    # Nobody is left to read this answer (an upload cut short); it exists for the access log only.
    log.info("client went away during %s %s", request.method, request.url.path)
    return error_response(400, "the client disconnected before the request was complete", "client_disconnected")


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error", "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Make every error of `app` answer in the one JSON shape, with the status of its `StrataError` class."""
    app.add_exception_handler(StrataError, _strata_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected_error)
