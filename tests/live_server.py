"""A live uvicorn server on 127.0.0.1 (a free port) in a background thread, for tests that talk HTTP to it."""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import requests
import uvicorn

from modelcode.engine import Engine
from modelcode.serving import create_app


@contextmanager
def running(app) -> Iterator[str]:
    """The URL of `app` served by uvicorn once it listens (its model may still be loading); stopped on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def live_server(lm, api_key: str | None = None, **engine_args) -> Iterator[str]:
    """The URL of a server of `lm` (served as "tinystories-656k") on its own engine, once /health says ready."""
    app = create_app(lambda: Engine(lm, **engine_args), "tinystories-656k", api_key=api_key)
    with running(app) as url:
        deadline = time.monotonic() + 60
        while requests.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        yield url
