"""The engine equals `lm.generate` of each prompt alone, whatever arrives, leaves or is evicted around it."""

import asyncio
import random

import pytest
import torch
import transformers
from hf_reference import BASE, LLAMA_VARIANTS

import modelcode
from modelcode.engine import Engine, InvalidRequest, SamplingParams
from modelcode.kernels import kernels_available

CONTEXT = 512


def tiny_model(folder, variant: str):
    """A random tiny HF model with a 512-position context, loaded by modelcode."""
    if variant == "gpt-neox":
        config = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=128, rotary_pct=0.5,
                                            max_position_embeddings=CONTEXT, bos_token_id=None, eos_token_id=None)
    else:
        config_class, overrides = LLAMA_VARIANTS[variant]
        config = getattr(transformers, config_class)(**{**BASE, **overrides, "max_position_embeddings": CONTEXT})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.1)
    hf.save_pretrained(folder)
    return modelcode.load(folder, dtype=torch.float32)


@pytest.fixture(scope="module", params=["llama3-gqa", "mistral-sliding-window", "qwen2-qkv-bias", "gpt-neox",
                                        "tinystories"])
def lm(request, tmp_path_factory):
    if request.param == "tinystories":
        return modelcode.load("tinystories-656k", dtype=torch.float32)
    return tiny_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def tinystories():
    return modelcode.load("tinystories-656k", dtype=torch.float32)


def alone(lm, prompt, max_tokens, **kw):
    """lm.generate of one prompt: (tokens, logprobs)."""
    tokens, lps = lm.generate([prompt], max_new_tokens=max_tokens, temperature=kw.pop("temperature", 0.0),
                              logprobs=True, **kw)
    return tokens[0], lps[0]


def run_arriving(engine, requests: list[tuple[list[int], SamplingParams, int]]) -> dict[str, object]:
    """Add each (prompt, params, step) at its step; step until all finish. Returns outputs by request id."""
    finished, ids, step = {}, {}, 0
    while len(finished) < len(requests):
        for i, (prompt, params, at) in enumerate(requests):
            if at == step:
                ids[i] = engine.add_request(prompt, params)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        step += 1
    return [finished[ids[i]] for i in range(len(requests))]


def random_requests(lm, n: int, seed: int, max_prompt: int = 400):
    rng = random.Random(seed)
    vocab = lm.config.vocab_size
    out = []
    for _ in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, max_prompt))]
        out.append((prompt, SamplingParams(max_tokens=rng.randint(1, 24), logprobs=0), rng.randint(0, 40)))
    return out


def test_greedy_outputs_and_logprobs_equal_generate_alone(lm):
    engine = Engine(lm, max_batch_size=16, max_batched_tokens=96, block_size=8)
    requests = random_requests(lm, 32, seed=1)
    outputs = run_arriving(engine, requests)
    for (prompt, params, _), out in zip(requests, outputs):
        tokens, lps = alone(lm, prompt, params.max_tokens)
        assert out.token_ids == tokens
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(lps), atol=1e-4, rtol=0)
    assert engine.stats().kv_blocks_used == 0


def test_seeded_sampling_is_the_same_in_any_company(tinystories):
    prompt = tinystories.tokenizer.encode("Once upon a time", bos=True)
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=7, max_tokens=30)
    lone = Engine(tinystories).generate_batch([prompt], params)[0]
    others = [SamplingParams(temperature=t, top_p=p, max_tokens=20, seed=s)
              for t, p, s in ((1.0, 1.0, None), (0.0, 1.0, None), (0.7, 0.5, 3))]
    crowd = Engine(tinystories).generate_batch([prompt, prompt, prompt[:3], [1, 50]], [others[0], params, *others[1:]])
    assert crowd[1].token_ids == lone.token_ids
    tokens, _ = tinystories.generate([prompt], max_new_tokens=30, temperature=0.9, top_k=40, top_p=0.9, seed=7)
    assert lone.token_ids == tokens[0]


def test_a_chat_turn_prefills_only_its_new_tokens(tinystories):
    engine = Engine(tinystories, block_size=4)
    tok = tinystories.tokenizer
    turn1 = tok.encode("Once upon a time, there was a girl named Lily.", bos=True)
    first = engine.generate_batch([turn1], SamplingParams(max_tokens=20))[0]
    turn2 = turn1 + first.token_ids + tok.encode(" She had a big red ball.", bos=False)
    second = engine.generate_batch([turn2], SamplingParams(max_tokens=20))[0]
    computed_before = len(turn1) + len(first.token_ids) - 1  # the last new token was never fed
    assert second.cached_tokens == computed_before // 4 * 4
    assert len(turn2) - second.cached_tokens <= len(turn2) - computed_before + 4
    cold = Engine(tinystories, block_size=4).generate_batch([turn2], SamplingParams(max_tokens=20))[0]
    assert cold.cached_tokens == 0 and second.token_ids == cold.token_ids
    assert engine.stats().prefix_hit_tokens == second.cached_tokens


def test_a_small_pool_evicts_and_preempts_without_changing_outputs(tinystories):
    rng = random.Random(2)
    shared = [rng.randrange(2048) for _ in range(24)]
    requests = [((shared if i % 2 else []) + [rng.randrange(2048) for _ in range(rng.randint(1, 40))],
                 SamplingParams(max_tokens=40), i % 3) for i in range(12)]  # they grow past the pool
    engine = Engine(tinystories, max_batch_size=8, block_size=8, num_blocks=40)  # 39 blocks: ~2 requests' worth
    outputs = run_arriving(engine, requests)
    for (prompt, params, _), out in zip(requests, outputs):
        assert out.token_ids == alone(tinystories, prompt, params.max_tokens)[0]
    stats = engine.stats()
    assert stats.preemptions > 0 and stats.kv_blocks_used == 0 and stats.running == stats.waiting == 0


def test_abort_frees_blocks_by_the_next_step_and_the_others_go_on(tinystories):
    engine = Engine(tinystories, block_size=8)
    prompts = [tinystories.tokenizer.encode(t, bos=True) for t in ("Once upon a time", "The sun", "Tom had")]
    ids = [engine.add_request(p, SamplingParams(max_tokens=30)) for p in prompts]
    for _ in range(5):
        engine.step()
    held = {r: len(engine.requests[r].blocks) for r in ids}
    engine.abort(ids[1])
    outs = engine.step()
    assert engine.stats().kv_blocks_used == held[ids[0]] + held[ids[2]]
    assert any(o.request_id == ids[1] and o.finish_reason == "abort" for o in outs)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert done[ids[0]].token_ids == alone(tinystories, prompts[0], 30)[0]
    assert engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "empty"),
    ([1] * 600, SamplingParams(), "context is 512"),
    ([1] * 500, SamplingParams(max_tokens=20), "shorten the prompt or lower max_tokens"),
    ([1, 99999], SamplingParams(), "outside the vocabulary"),
    ([1], SamplingParams(max_tokens=0), "max_tokens must be at least 1"),
    ([1], SamplingParams(temperature=-1.0), "temperature must be >= 0"),
    ([1], SamplingParams(top_p=2.0), "top_p in (0, 1]"),
    ([1], SamplingParams(top_k=0), "top_k >= 1"),
    ([1], SamplingParams(logprobs=50), "logprobs must be between 0 and 20"),
])
def test_bad_requests_fail_alone(tinystories, prompt, params, message):
    engine = Engine(tinystories)
    good = engine.add_request([1, 80], SamplingParams(max_tokens=5))
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        engine.add_request(prompt, params)
    outs = {o.request_id: o for _ in range(10) for o in engine.step()}
    assert outs[good].finished and len(outs[good].token_ids) == 5


def test_a_short_request_is_answered_while_a_long_prompt_is_prefilled(tinystories):
    engine = Engine(tinystories, max_batched_tokens=32)
    long_id = engine.add_request([1] + [80] * 479, SamplingParams(max_tokens=4))
    engine.step()
    short_id = engine.add_request([1, 80, 147], SamplingParams(max_tokens=4))
    while True:
        outs = {o.request_id: o for o in engine.step()}
        if short_id in outs:
            break
    assert long_id not in outs and engine.requests[long_id].num_computed < 480  # still prefilling


def test_stop_strings_and_text(tinystories):
    prompt = "Once upon a time"
    ids = tinystories.tokenizer.encode(prompt, bos=True)
    out = Engine(tinystories).generate_batch([ids], SamplingParams(max_tokens=60, stop=("Lily",)))[0]
    expected = tinystories.text_completion([prompt], max_new_tokens=60, stop=["Lily"])[0]
    assert out.finish_reason == "stop" and out.text == expected["generation"] and "Lily" not in out.text
    assert out.token_ids == expected["tokens"]


def test_prompt_logprobs_equal_echo(tinystories):
    ids = tinystories.tokenizer.encode("Once upon a time, there was a little dog.", bos=True)
    engine = Engine(tinystories, max_batched_tokens=5)  # the prompt is scored across several chunks
    out = engine.generate_batch([ids], SamplingParams(max_tokens=3, logprobs=2, prompt_logprobs=1))[0]
    tokens, lps = tinystories.generate([ids], max_new_tokens=3, logprobs=True, echo=True)
    assert out.prompt_logprobs[0] is None and tokens[0] == ids + out.token_ids
    torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:] + out.logprobs), torch.tensor(lps[0][1:]),
                               atol=1e-4, rtol=0)
    assert all(len(top) == 2 for top in out.top_logprobs) and out.prompt_top_logprobs[0] is None
    scored = engine.generate_batch([ids], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert scored.token_ids == [] and scored.prompt_logprobs == out.prompt_logprobs


def test_async_front_serves_concurrent_requests_and_aborts_those_left(tinystories):
    engine = Engine(tinystories, block_size=8)
    prompts = [tinystories.tokenizer.encode(t, bos=True) for t in ("Once upon a time", "The sun", "A cat")]

    async def consume(prompt, leave_after=None):
        texts = []
        async for out in engine.generate(prompt, SamplingParams(max_tokens=25)):
            assert out.text.startswith(texts[-1] if texts else "")  # text only grows
            texts.append(out.text)
            if leave_after is not None and len(texts) == leave_after:
                break
        return out

    async def main():
        return await asyncio.gather(consume(prompts[0]), consume(prompts[1], leave_after=3), consume(prompts[2]))

    try:
        full, left, other = asyncio.run(main())
        assert full.token_ids == alone(tinystories, prompts[0], 25)[0]
        assert other.token_ids == alone(tinystories, prompts[2], 25)[0]
        assert not left.finished
        for _ in range(100):
            if not engine.has_unfinished():
                break
            asyncio.run(asyncio.sleep(0.01))
        assert engine.stats().kv_blocks_used == 0 and not engine.has_unfinished()
    finally:
        engine.shutdown()


def test_bfloat16_on_the_cpu_kernels(tinystories):
    """In bfloat16 a prompt's rounding depends on how it is chunked, so tokens are compared with the engine's
    own run of the prompt alone, and the first logprobs with float32's within bfloat16's precision."""
    lm = modelcode.load("tinystories-656k", dtype=torch.bfloat16)
    engine = Engine(lm)  # installs the CPU kernels on lm.model, where they run
    if kernels_available():
        assert any(type(m).__name__ == "PackedBF16Linear" for m in lm.model.modules())
    prompts = [lm.tokenizer.encode(t, bos=True) for t in ("Once upon a time", "The sun was", "Tom and Lily")]
    outs = engine.generate_batch(prompts, SamplingParams(max_tokens=24, logprobs=0))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == engine.generate_batch([prompt], SamplingParams(max_tokens=24))[0].token_ids
        reference = alone(tinystories, prompt, 1)[1][0]
        assert abs(out.logprobs[0] - reference) < 0.05
