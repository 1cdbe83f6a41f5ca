"""The API's one error: an HTTP status and OpenAI's ``{"error": {...}}`` body.

It lives in the protocol package because the local privacy proxy answers in the same shape
as the coordinator, from the same request checks (:mod:`covey.protocol.requests`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from covey.protocol.openai import ErrorBody, ErrorResponse

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


# Pydantic adds the member of a union it tried ("str", "list[TextPart]", "function-after[…]")
# to an error's location; they are not field names and must not reach ``param``.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def _is_type_tag(part: object) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part)


def _param_from_loc(loc: tuple[object, ...]) -> str | None:
    parts = [p for p in loc if p != "body" and not _is_type_tag(p)]
    if not parts:
        return None
    out = str(parts[0])
    for p in parts[1:]:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def from_validation_errors(errors: Sequence[Any]) -> ApiError:
    """Turn pydantic's (or FastAPI's) validation errors into a 400 that names the first
    offending field (``param``), as OpenAI's API does."""
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
    # A field validator's ValueError arrives as "Value error, <our message>": keep ours.
    msg = str(first.get("msg", "")).removeprefix("Value error, ")
    if param is None:
        return ApiError(400, f"Invalid request body: {msg}.", code="invalid_body")
    return ApiError(
        400,
        f"Invalid value for '{param}': {msg}.",
        param=param,
        code="invalid_value",
    )
