"""Many streaming clients at once, some hanging up midway: every finished stream is the prompt's solo greedy
output, nothing fails, and the KV blocks of the ones that left are freed within a second."""

import asyncio
import json
import random
import re
import time

import aiohttp
import pytest
import requests
from live_server import live_server

import modelcode

PROMPTS = ["Once upon a time", "Tom and Lily went to the park. They saw a", "One day, a bird", "The sun was hot and",
           "Max had a red ball.", "Sue liked to bake", "There was a big tree", "A little fish swam"]


@pytest.fixture(scope="module")
def lm():
    return modelcode.load("tinystories-656k")


@pytest.fixture(scope="module")
def url(lm):
    with live_server(lm, max_batch_size=16) as url:  # fewer slots than clients: some wait in the queue
        yield url


async def stream(session: aiohttp.ClientSession, url: str, prompt: str, leave_after: int | None) -> dict:
    """Stream one completion; with leave_after, ask for a long one and hang up after that many events."""
    body = {"prompt": prompt, "max_tokens": 48, "temperature": 0, "stream": True}
    if leave_after is not None:
        body |= {"max_tokens": 400, "ignore_eos": True}
    text, events = [], 0
    async with session.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return {"text": "".join(text), "done": True}
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            text.append(chunk["choices"][0]["text"])
            events += 1
            if leave_after is not None and events >= leave_after:
                r.close()
                return {"text": "".join(text), "done": False}
    return {"text": "".join(text), "done": False}


async def clients(url: str, n: int, leaving: set[int], rng: random.Random) -> list[dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        return await asyncio.gather(*[stream(session, url, PROMPTS[i % len(PROMPTS)],
                                             rng.randint(1, 20) if i in leaving else None) for i in range(n)])


def gauge(metrics: str, name: str) -> float:
    return float(re.search(rf"^modelcode_{name} (\S+)$", metrics, re.M).group(1))


def settled(url: str) -> str:
    """/metrics once no KV block is held, or after a second."""
    deadline = time.monotonic() + 1.0
    while gauge(metrics := requests.get(f"{url}/metrics").text, "kv_blocks_used") and time.monotonic() < deadline:
        time.sleep(0.05)
    return metrics


def test_32_streams_with_a_quarter_leaving(url, lm):
    rng = random.Random(0)
    leaving = set(rng.sample(range(32), 8))
    before = gauge(requests.get(f"{url}/metrics").text, "generation_tokens_total")
    results = asyncio.run(clients(url, 32, leaving, rng))
    solo = {p: lm.text_completion([p], max_new_tokens=48, temperature=0)[0]["generation"] for p in PROMPTS}
    for i, r in enumerate(results):
        expected = solo[PROMPTS[i % len(PROMPTS)]]
        if i in leaving:
            assert expected.startswith(r["text"])
        else:
            assert r["done"] and r["text"] == expected, i
    metrics = settled(url)
    assert gauge(metrics, "kv_blocks_used") == 0
    assert gauge(metrics, "running_requests") == 0 and gauge(metrics, "waiting_requests") == 0
    # the ones that left were aborted, not run to their 400 tokens
    assert gauge(metrics, "generation_tokens_total") - before < 24 * 48 + 8 * 400 / 2
    assert not re.search(r'^modelcode_requests_total\{endpoint="/v1/completions",status="5', metrics, re.M)


def test_a_client_leaving_a_plain_request_aborts_it(url):
    """A non-streamed request whose client hangs up is cancelled too, not run to its end."""
    async def leave():
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True, "temperature": 0}
            with pytest.raises(asyncio.TimeoutError):
                async with session.post(f"{url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=0.3)):
                    pass

    before = gauge(requests.get(f"{url}/metrics").text, "generation_tokens_total")
    asyncio.run(leave())
    metrics = settled(url)
    assert gauge(metrics, "kv_blocks_used") == 0 and gauge(metrics, "running_requests") == 0
    assert gauge(metrics, "generation_tokens_total") - before < 500
