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

from covey.protocol.openai import ErrorBody, ErrorResponse

log = logging.getLogger("covey.coordinator")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}

# Pydantic adds the member of a union it tried ("str", "list[TextPart]", "function-after[…]")
# to an error's location; they are not field names and must not reach ``param``.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def _is_type_tag(part: object) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part)


class ApiError(Exception):
    """An error to return to an API client.

    ``status`` is the HTTP status; ``code`` OpenAI's machine-readable code (e.g.
    ``model_not_found``); ``param`` the request field at fault; ``headers`` extra response
    headers such as ``Retry-After``.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        """The OpenAI error envelope for this error."""
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        )


def error_response(exc: ApiError) -> JSONResponse:
    """A JSON response carrying ``exc``'s envelope, status and headers."""
    return JSONResponse(exc.body().model_dump(), status_code=exc.status, headers=exc.headers)


def _param_from_loc(loc: tuple[object, ...]) -> str | None:
    parts = [p for p in loc if p != "body" and not _is_type_tag(p)]
    if not parts:
        return None
    out = str(parts[0])
    for p in parts[1:]:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def validation_to_api_error(exc: RequestValidationError) -> ApiError:
    """Turn FastAPI's validation error into a 400 that names the first offending field."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "Invalid request body.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return ApiError(
            400,
            "We could not parse the JSON body of your request: "
            f"{first.get('ctx', {}).get('error', 'invalid JSON')}.",
            code="invalid_json",
        )
    loc = tuple(first.get("loc", ()))
    param = _param_from_loc(loc)
    # Union types report one error per member under a loc suffix like "str" or
    # "list[TextPart]"; the field itself is the useful name.
    if first.get("type") == "missing":
        if param is None:
            return ApiError(400, "The request has no body; send a JSON object.",
                            code="missing_body")
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param,
                        code="missing_required_parameter")
    if param is None:
        return ApiError(400, f"Invalid request body: {first.get('msg')}.", code="invalid_body")
    return ApiError(
        400,
        f"Invalid value for '{param}': {first.get('msg')}.",
        param=param,
        code="invalid_value",
    )


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
