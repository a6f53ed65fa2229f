"""The server before its model is ready, and a stream that fails after it began."""

import asyncio
import threading

import requests
from live_server import running

import modelcode
from modelcode.engine import Engine, InvalidRequest
from modelcode.serving import create_app
from modelcode.serving.generation import event_stream


def test_health_is_503_until_the_model_is_loaded():
    release = threading.Event()

    def load():
        release.wait(30)
        return Engine(modelcode.load("tinystories-656k"))

    with running(create_app(load, "tinystories-656k")) as url:
        r = requests.get(f"{url}/health")
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        r = requests.post(f"{url}/v1/completions", json={"prompt": "Hi"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        release.set()
        for _ in range(600):
            if requests.get(f"{url}/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert requests.get(f"{url}/health").status_code == 200
        assert requests.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_an_error_during_a_stream_is_one_error_event_then_done():
    async def chunks():
        yield "data: {}\n\n"
        raise InvalidRequest("the engine refused it")

    async def collect():
        return [e async for e in event_stream(chunks())]

    events = asyncio.run(collect())
    assert events[0] == "data: {}\n\n" and events[-1] == "data: [DONE]\n\n" and len(events) == 3
    assert '"message": "the engine refused it"' in events[1] and '"type": "invalid_request_error"' in events[1]
