"""Generation equals transformers: greedy tokens, logprobs, batches of unequal prompts."""

import pytest
import torch
import transformers
from hf_reference import random_prompts, tiny_hf_model

import modelcode
from modelcode.api import EMBEDDED
from modelcode.generation import ContextLengthError


@pytest.fixture(scope="module")
def tinystories():
    hf = transformers.LlamaForCausalLM.from_pretrained(EMBEDDED["tinystories-656k"], dtype=torch.float32).eval()
    return modelcode.load("tinystories-656k"), hf


def hf_greedy(hf, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=0,
                      attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    for i, t in enumerate(out):  # ours leaves the stop token out
        if t in eos:
            return out[:i]
    return out


@pytest.mark.parametrize("prompt", ["Once upon a time", "Tom and Lily went to the park. They saw a", "The sun"])
def test_tinystories_greedy_64_equals_transformers(tinystories, prompt):
    lm, hf = tinystories
    ids = lm.tokenizer.encode(prompt, bos=True)
    tokens, _ = lm.generate([ids], max_new_tokens=64, temperature=0.0)
    assert tokens[0] == hf_greedy(hf, ids, 64, lm.stop_ids)
    assert len(tokens[0]) > 20


@pytest.fixture(scope="module", params=["llama3-gqa", "mistral-sliding-window", "qwen2-qkv-bias"])
def tiny(request, tmp_path_factory):
    hf = tiny_hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    hf.generation_config.eos_token_id = None  # random weights: let both run the full 64 tokens
    lm = modelcode.load(folder)
    lm.config.max_seq_len = 128  # the tiny configs say 64 positions; HF does not enforce it, we do
    return lm, hf


def test_random_models_greedy_64_equals_transformers(tiny):
    lm, hf = tiny
    for prompt in random_prompts(hf.config.vocab_size, batch=2, length=7, seed=3).tolist():
        tokens, _ = lm.generate([prompt], max_new_tokens=64, temperature=0.0, stop_ids=frozenset())
        assert tokens[0] == hf_greedy(hf, prompt, 64, set())
        assert len(set(tokens[0])) >= 4  # not stuck on one token


def test_batch_of_unequal_prompts_equals_each_alone(tiny):
    lm, _ = tiny
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 11, 1, 7)]
    batch, _ = lm.generate(prompts, max_new_tokens=20, temperature=0.0, stop_ids=frozenset())
    for p, out in zip(prompts, batch):
        alone, _ = lm.generate([p], max_new_tokens=20, temperature=0.0, stop_ids=frozenset())
        assert out == alone[0]


def test_logprobs_and_echo_equal_reference_log_softmax(tiny):
    lm, hf = tiny
    prompt = random_prompts(hf.config.vocab_size, batch=1, length=6, seed=9)[0].tolist()
    tokens, lps = lm.generate([prompt], max_new_tokens=10, temperature=0.0, logprobs=True, echo=True,
                              stop_ids=frozenset())
    assert tokens[0][:6] == prompt and len(tokens[0]) == 16 and len(lps[0]) == 16
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor(tokens)).logits[0].float(), dim=-1)
    expected = ref[torch.arange(15), torch.tensor(tokens[0][1:])]
    assert lps[0][0] is None  # the first prompt token has no context to be predicted from
    torch.testing.assert_close(torch.tensor(lps[0][1:]), expected, atol=1e-4, rtol=1e-4)


def test_sampling_is_reproducible_with_a_seed(tiny):
    lm, _ = tiny
    def run(seed):
        return lm.generate([[1, 2, 3]], max_new_tokens=20, temperature=1.0, top_p=0.9, seed=seed,
                           stop_ids=frozenset())[0]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_prompt_longer_than_context_is_an_error(tinystories):
    lm, _ = tinystories
    with pytest.raises(ContextLengthError, match="prompt 0 has 600 tokens, but the model's context is 512"):
        lm.generate([[1] * 600], max_new_tokens=5)


def test_generation_stops_at_context_limit(tinystories):
    lm, _ = tinystories
    tokens, _ = lm.generate([[1] * 505], max_new_tokens=50, stop_ids=frozenset())
    assert len(tokens[0]) == 7


def test_decode_with_budgets_past_the_context_is_an_error_not_a_write_out_of_bounds(tinystories):
    from modelcode.generation.generate import decode, prefill
    from modelcode.generation.sampling import SamplingParams

    model = tinystories[0].model
    cache = model.new_cache(1)
    logits, _ = prefill(model, cache, [[1] * 500])
    with pytest.raises(ContextLengthError, match="reach position 519, past the model's context of 512"):
        next(decode(model, cache, logits, [500], [20], SamplingParams()))
