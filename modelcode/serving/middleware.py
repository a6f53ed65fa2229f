"""ASGI middleware that answers before any route runs: the API key, the body size limit, request counting."""

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from modelcode.serving.errors import APIError


class APIKey:
    """With a key set, the API's paths need `Authorization: Bearer <key>`; the page, /health and /metrics do not
    (the page asks for the key and sends it with each request)."""

    OPEN = {"/", "/health", "/metrics", "/docs", "/openapi.json", "/favicon.ico"}

    def __init__(self, app: ASGIApp, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if self.key is None or scope["type"] != "http" or scope["path"] in self.OPEN:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
            error = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with "
                             "the key the server was started with", code="invalid_api_key")
            return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """Bodies over max_bytes get 413 in the OpenAI envelope (Starlette's own limit answers in plain text) before
    they are parsed; the body read here is handed on, and the client's later messages (its disconnect) pass
    through."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def too_large(self) -> Response:
        return APIError(413, f"the request body is over {self.max_bytes} bytes: send a smaller request").response()

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self.too_large()(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self.too_large()(scope, receive, send)
        read = False

        async def replay():
            nonlocal read
            if read:
                return await receive()
            read = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


class CountRequests:
    """Counts responses by endpoint and status in `counter` (paths outside `endpoints` count as "other")."""

    def __init__(self, app: ASGIApp, counter, endpoints: set[str]):
        self.app, self.counter, self.endpoints = app, counter, endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.counter.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


async def unless_disconnected(request: Request, work: Awaitable):
    """Run `work` (a route's answer) unless the client goes away first: then cancel it, which aborts its engine
    requests at once. (Streamed answers are cancelled by Starlette itself once they have begun.)"""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    return task.result()
