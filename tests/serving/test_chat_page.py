"""The chat page at / in a real browser: Debian's headless Chromium, driven by Playwright, against a server with
an API key. Typing a message streams a reply equal to the API's greedy reply; a screenshot is saved."""

import os
import shutil
from pathlib import Path

import pytest
import requests
from live_server import live_server
from playwright.sync_api import expect, sync_playwright

import modelcode

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
SCREENSHOT = Path(os.environ.get("PYTEST_SCREENSHOTS", Path(__file__).parents[2] / "test-artifacts")) / "chat_page.png"
KEY = "page-key"


@pytest.fixture(scope="module")
def url():
    with live_server(modelcode.load("tinystories-656k"), api_key=KEY) as url:
        yield url


@pytest.fixture(scope="module")
def page(url):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (Debian's), as .ci/run does")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page()
        page.goto(f"{url}/")
        yield page
        browser.close()


def api_reply(url: str, messages: list[dict], max_tokens: int) -> str:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
    r = requests.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    return r.json()["choices"][0]["message"]["content"]


def test_the_page_asks_for_the_key_then_streams_the_greedy_reply(page, url):
    expect(page.locator("#model")).to_contain_text("API key")  # 401 before the key is given
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    expect(page.locator("#model")).to_contain_text("tinystories-656k")
    page.fill("#system", "You tell short stories.")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "40")
    page.fill("#input", "A story about a red ball")
    page.press("#input", "Enter")
    reply = page.locator(".turn.assistant").last
    expect(reply.locator(".stats")).to_contain_text("tokens/s", timeout=30_000)
    first = [{"role": "system", "content": "You tell short stories."},
             {"role": "user", "content": "A story about a red ball"}]
    expected = api_reply(url, first, 40)
    assert reply.locator(".bubble").text_content() == expected

    # a second turn carries the first in its history
    page.fill("#input", "And then?")
    page.click("#send")
    second = page.locator(".turn.assistant").nth(1)
    expect(second.locator(".stats")).to_contain_text("tokens/s", timeout=30_000)
    history = first + [{"role": "assistant", "content": expected}, {"role": "user", "content": "And then?"}]
    assert second.locator(".bubble").text_content() == api_reply(url, history, 40)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 0


def test_stop_ends_a_reply_midway(page):
    page.click("#reset")
    page.fill("#system", "")
    page.fill("#max-tokens", "400")
    page.fill("#input", "Lily and Tom and Lily and Tom")  # its greedy reply loops until max tokens
    page.click("#send")
    reply = page.locator(".turn.assistant").last
    expect(reply.locator(".bubble")).not_to_have_text("", timeout=30_000)
    page.click("#stop")
    expect(reply.locator(".stats")).to_contain_text("stopped", timeout=10_000)
    expect(page.locator("#send")).to_be_enabled()
