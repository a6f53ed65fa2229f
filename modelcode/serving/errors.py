"""Every error the server returns, in the OpenAI envelope {"error": {"message", "type", "param", "code"}}:
the `openai` client turns the status into its exception class and shows the message."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from modelcode.serving.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("modelcode.serving")

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=TYPES.get(self.status, "server_error"), param=self.param,
                         code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def context_length_exceeded(max_seq_len: int, prompt: int, max_tokens: int, param: str) -> APIError:
    """OpenAI's wording, with the numbers."""
    return APIError(400, f"This model's maximum context length is {max_seq_len} tokens. However, you requested "
                    f"{prompt + max_tokens} tokens ({prompt} in the prompt, {max_tokens} for the completion). "
                    "Please reduce the prompt or the completion length.", param, "context_length_exceeded")


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 becomes OpenAI's 400: the first failing field, where it is and what was wrong."""
    first = exc.errors()[0]
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('msg')}").response()
    # Union types name each alternative in the location (e.g. prompt.str); the field is the first part.
    param = where[0] if where else None
    place = ".".join(where) or "body"
    return APIError(400, f"{place}: {first.get('msg')} (got {str(first.get('input'))[:80]!r})", param,
                    "invalid_value" if where else "invalid_body").response()


def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = {404: f"no route {request.url.path}: see /docs for the API",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return APIError(exc.status_code, message).response()


def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("error while answering %s %s", request.method, request.url.path)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(Exception, _unexpected)
