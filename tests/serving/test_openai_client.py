"""The official `openai` client against a live server: what it gets equals the model's own generation."""

import openai
import pytest
import requests
import torch
from live_server import live_server

import modelcode

PROMPT = "Once upon a time, a little cat"


@pytest.fixture(scope="module")
def lm():
    return modelcode.load("tinystories-656k")


@pytest.fixture(scope="module")
def url(lm):
    with live_server(lm) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def reference(lm, prompt=PROMPT, **settings) -> str:
    return lm.text_completion([prompt], temperature=0, **settings)[0]["generation"]


def token_logprobs(lm, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, from one causal pass."""
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(torch.tensor([ids])).float(), -1)[0]
    return lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_greedy_completion_equals_generate(client, lm):
    r = client.completions.create(model="tinystories-656k", prompt=PROMPT, max_tokens=32, temperature=0)
    assert r.choices[0].text == reference(lm, max_new_tokens=32)
    assert r.choices[0].finish_reason == "length"
    ids = lm.tokenizer.encode(PROMPT, bos=True)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 32)
    assert r.usage.prompt_tokens_details.cached_tokens <= len(ids)


def test_prompts_as_token_ids_and_batches(client, lm):
    ids = lm.tokenizer.encode(PROMPT, bos=True)
    other = "Tom had a big red ball."
    r = client.completions.create(model="tinystories-656k", prompt=[ids, lm.tokenizer.encode(other, bos=True)],
                                  max_tokens=12, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [reference(lm, max_new_tokens=12), reference(lm, other, max_new_tokens=12)]
    r = client.completions.create(model="tinystories-656k", prompt=[PROMPT, other], max_tokens=12, temperature=0)
    assert [c.text for c in r.choices] == [reference(lm, max_new_tokens=12), reference(lm, other, max_new_tokens=12)]


def test_streamed_deltas_join_to_the_whole_and_usage_comes_last(client):
    settings = dict(model="tinystories-656k", prompt=PROMPT, max_tokens=40, temperature=0)
    whole = client.completions.create(**settings)
    chunks = list(client.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_with_a_seed_are_each_the_seeded_generation(client, lm):
    r = client.completions.create(model="tinystories-656k", prompt=PROMPT, max_tokens=16, temperature=1.0, n=2,
                                  seed=7)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    expected = [lm.text_completion([PROMPT], max_new_tokens=16, temperature=1.0, seed=7 + i)[0]["generation"]
                for i in range(2)]
    assert texts == expected and texts[0] != texts[1]
    again = client.completions.create(model="tinystories-656k", prompt=PROMPT, max_tokens=16, temperature=1.0,
                                      n=2, seed=7)
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts


def test_stop_string_cuts_the_text(client, lm):
    full = reference(lm, max_new_tokens=40)
    stop = full.split()[3]  # a word the greedy text reaches
    r = client.completions.create(model="tinystories-656k", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == full.split(stop)[0]
    assert r.choices[0].finish_reason == "stop"


def test_logprobs_are_the_models(client, lm):
    r = client.completions.create(model="tinystories-656k", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ids = lm.tokenizer.encode(PROMPT, bos=True)
    new = lm.generate([ids], 10, temperature=0)[0][0]
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), token_logprobs(lm, ids + new)[-10:], atol=1e-4, rtol=0)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy: chosen is top


def test_logit_bias_pushes_a_token(client, lm):
    r = client.completions.create(model="tinystories-656k", prompt=PROMPT, max_tokens=4, temperature=0,
                                  logit_bias={"42": 100}, logprobs=0)
    ids = lm.tokenizer.encode(PROMPT, bos=True)
    assert r.choices[0].text == lm.tokenizer.decode(ids + [42] * 4)[len(lm.tokenizer.decode(ids)):]


def test_echo_scores_the_prompt(client, lm):
    ids = lm.tokenizer.encode(PROMPT, bos=True)
    r = client.completions.create(model="tinystories-656k", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == lm.tokenizer.decode(ids) and len(lp.token_logprobs) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), token_logprobs(lm, ids), atol=1e-4, rtol=0)
    r = client.completions.create(model="tinystories-656k", prompt=PROMPT, max_tokens=5, echo=True, temperature=0)
    assert r.choices[0].text == PROMPT + reference(lm, max_new_tokens=5)


def test_chat_equals_chat_completion(client, lm):
    messages = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "A dog"}]
    r = client.chat.completions.create(model="tinystories-656k", messages=messages, max_tokens=24, temperature=0)
    expected = lm.chat_completion([messages], max_new_tokens=24, temperature=0)[0]["generation"]["content"]
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    parts = [{"role": "user", "content": [{"type": "text", "text": "A "}, {"type": "text", "text": "dog"}]}]
    alone = [{"role": "user", "content": "A dog"}]
    r = client.chat.completions.create(model="tinystories-656k", messages=parts, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == lm.chat_completion([alone], max_new_tokens=8,
                                                              temperature=0)[0]["generation"]["content"]


def test_chat_stream_logprobs_and_usage(client, lm):
    settings = dict(model="tinystories-656k", messages=[{"role": "user", "content": "Tell me a story"}],
                    max_completion_tokens=30, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**settings)
    chunks = list(client.chat.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)
    assert whole.choices[0].finish_reason in ("stop", "length")


def test_models_health_tokenizer_and_metrics(client, url, lm):
    [card] = client.models.list().data
    assert card.id == "tinystories-656k" and card.model_extra["max_model_len"] == lm.config.max_seq_len
    assert requests.get(f"{url}/health").status_code == 200
    ids = requests.post(f"{url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert ids == lm.tokenizer.encode(PROMPT, bos=True)
    assert requests.post(f"{url}/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()["tokens"] \
        == lm.tokenizer.encode(PROMPT)
    assert requests.post(f"{url}/detokenize", json={"tokens": ids}).json()["prompt"] == lm.tokenizer.decode(ids)
    info = requests.get(f"{url}/tokenizer_info").json()
    assert (info["eos_token"], info["bos_token"]) == ("<|end_story|>", "<|start_story|>")
    metrics = requests.get(f"{url}/metrics").text
    assert 'modelcode_requests_total{endpoint="/v1/completions",status="200"}' in metrics
    for name in ("time_to_first_token_seconds_count", "inter_token_latency_seconds_count", "generation_tokens_total",
                 "kv_blocks_used", "running_requests", "waiting_requests", "prefix_cache_hit_tokens_total"):
        assert f"modelcode_{name}" in metrics
