"""One error shape for every 4xx/5xx: RFC 9457 problem details with a stable ``code``.

``{"type": "https://fedstr-escrow/problems/<code>", "title": ..., "status": ..., "code": ..., "detail": ...}``
served as ``application/problem+json``. Validation errors list the failing fields
(location and message, never the submitted values). Unexpected exceptions become a
bare 500 ``internal_error``: no stack trace, no secret reaches a client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Problem(BaseModel):
    type: str
    title: str
    status: int
    code: str
    detail: str
    errors: list[dict] | None = None


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, *, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers
        super().__init__(f"{status} {code}: {detail}")


def problem(
    status: int, code: str, detail: str, *, errors: list[dict] | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {
        "type": f"https://fedstr-escrow/problems/{code}",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "code": code,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type="application/problem+json", headers=headers)


def responses(*statuses: int) -> dict:
    """OpenAPI ``responses`` entries for the problem shape."""
    return {
        s: {"model": Problem, "description": TITLES.get(s, "Error"), "content": {"application/problem+json": {}}}
        for s in statuses
    }


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return problem(exc.status, exc.code, exc.detail, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))[:200]} for e in exc.errors()[:20]
        ]
        return problem(422, "invalid_request", "the request does not match the schema", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        detail = exc.detail if isinstance(exc.detail, str) else TITLES.get(exc.status_code, "error")
        return problem(exc.status_code, code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "internal_error", "an internal error occurred; it has been logged")
