"""One error shape, one table from exception to HTTP status.

Every 4xx/5xx body is OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
FastAPI's own validation errors (422 by default) become 400 naming the field, as OpenAI does.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from covey.protocol.errors import ApiError, from_validation_errors

__all__ = ["ApiError", "error_response", "install_error_handlers"]

log = logging.getLogger("covey.coordinator")

def error_response(exc: ApiError) -> JSONResponse:
    """A JSON response carrying ``exc``'s envelope, status and headers."""
    return JSONResponse(exc.body().model_dump(), status_code=exc.status, headers=exc.headers)


def validation_to_api_error(exc: RequestValidationError) -> ApiError:
    """Turn FastAPI's validation error into a 400 that names the first offending field."""
    return from_validation_errors(exc.errors())


INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def _log_refusal(request: Request, exc: ApiError) -> None:
    """Give an inference request that failed before it was admitted (key, body) its log
    line and count; admitted ones are logged by their own record."""
    if request.url.path not in INFERENCE_PATHS or getattr(request.state, "logged", False):
        return
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.refused(request.url.path, exc.status, exc.code)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers so every error leaves in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        _log_refusal(request, exc)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_to_api_error(exc)
        _log_refusal(request, error)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        code = None
        if exc.status_code == 404:
            message = "Unknown URL. See GET /v1/models and POST /v1/chat/completions."
        elif exc.status_code == 400:  # FastAPI could not decode the body (bad UTF-8, …)
            message, code = "We could not parse the JSON body of your request.", "invalid_json"
        error = ApiError(exc.status_code, message, code=code, headers=exc.headers)
        _log_refusal(request, error)
        return error_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(
            ApiError(500, "The coordinator hit an internal error.", code="internal_error")
        )
