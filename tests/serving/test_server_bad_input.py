"""Bad input gets a 4xx in the OpenAI envelope, never a 5xx: hand-written cases, then schemathesis against the
server's own OpenAPI schema. The server here has an API key, so the key checks run too."""

import json

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from live_server import live_server
from schemathesis.generation import GenerationMode

import modelcode

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def lm():
    return modelcode.load("tinystories-656k")


@pytest.fixture(scope="module")
def url(lm):
    with live_server(lm, api_key=KEY) as url:
        yield url


def post(url: str, path: str, body, headers=AUTH) -> requests.Response:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return requests.post(f"{url}{path}", data=data, headers={"Content-Type": "application/json", **headers},
                         timeout=60)


def assert_error(r: requests.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


BAD_FIELDS = [
    ({"prompt": "Hi", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "Hi", "temperature": -1}, "temperature"),
    ({"prompt": "Hi", "top_p": 2}, "top_p"),
    ({"prompt": "Hi", "n": 0}, "n"),
    ({"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, -3]}, "prompt"),
    ({"prompt": "Hi", "stop": 3}, "stop"),
    ({"prompt": "Hi", "seed": -1}, "seed"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "Hi", "logit_bias": {"ab": 1}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"999999": 1}}, "logit_bias"),
    ({"prompt": "Hi", "stream_options": {"include_usage": "maybe"}}, "stream_options"),
    ({}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD_FIELDS)
def test_a_bad_completion_field_is_a_400_naming_it(url, body, param):
    assert_error(post(url, "/v1/completions", body), 400, param)


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_a_bad_chat_field_is_a_400_naming_it(url, body, param):
    assert_error(post(url, "/v1/chat/completions", body), 400, param)


def test_bodies_that_are_not_json(url):
    assert_error(post(url, "/v1/completions", b'{"prompt": "Hi", '), 400)
    assert_error(post(url, "/v1/completions", b'{"prompt": "\xff\xfe caf\xe9"}'), 400)  # not UTF-8
    assert_error(post(url, "/v1/completions", b"[1, 2]"), 400)


def test_an_oversized_body_is_a_413(url):
    assert_error(post(url, "/v1/completions", {"prompt": "a" * (10 << 20)}), 413)


def test_a_prompt_past_the_context_names_the_numbers(url, lm):
    error = assert_error(post(url, "/v1/completions", {"prompt": "Once upon a time " * 2000}), 400, "prompt",
                         "context_length_exceeded")
    assert str(lm.config.max_seq_len) in error["message"]
    error = assert_error(post(url, "/v1/completions", {"prompt": [1] * 500, "max_tokens": 100}), 400, "prompt",
                         "context_length_exceeded")
    assert "600" in error["message"] and "500 in the prompt" in error["message"]
    chat = {"messages": [{"role": "user", "content": "Hi " * 3000}]}
    assert_error(post(url, "/v1/chat/completions", chat), 400, "messages", "context_length_exceeded")


def test_token_ids_outside_the_vocabulary(url, lm):
    assert_error(post(url, "/v1/completions", {"prompt": [1, lm.config.vocab_size]}), 400, "prompt")
    assert_error(post(url, "/detokenize", {"tokens": [10**9]}), 400, "tokens")


def test_an_unknown_model_is_a_404(url):
    assert_error(post(url, "/v1/completions", {"prompt": "Hi", "model": "gpt-5"}), 404, "model", "model_not_found")
    assert_error(requests.get(f"{url}/v1/models/gpt-5", headers=AUTH), 404, "model", "model_not_found")


def test_the_api_key(url):
    body = {"prompt": "Hi", "max_tokens": 2}
    assert_error(post(url, "/v1/completions", body, headers={}), 401, code="invalid_api_key")
    assert_error(post(url, "/v1/completions", body, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(requests.get(f"{url}/v1/models"), 401)
    assert_error(requests.get(f"{url}/tokenizer_info"), 401)
    assert post(url, "/v1/completions", body).status_code == 200
    assert requests.get(f"{url}/health").status_code == 200
    assert requests.get(f"{url}/").status_code == 200


def test_unknown_routes_and_methods(url):
    assert_error(requests.get(f"{url}/v1/nothing", headers=AUTH), 404)
    assert_error(requests.get(f"{url}/v1/completions", headers=AUTH), 405)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis_finds_no_server_error(url, mode):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            r = case.call(base_url=url, headers=AUTH, timeout=60)
            assert r.status_code < 500, f"{case.method} {case.path} {case.body!r}: {r.status_code} {r.text[:300]}"
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}

        try:
            check()
        except Unsatisfiable:  # no invalid input exists for an operation without parameters (GET /health)
            assert mode == GenerationMode.NEGATIVE
    assert requests.get(f"{url}/health").status_code == 200
    assert post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}).status_code == 200
