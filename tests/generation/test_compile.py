"""Static KV cache and the compiled decode step: token-for-token the same output as plain generation, and
one compilation per batch size, whatever the prompt lengths and numbers of new tokens."""

import pytest
import torch
from hf_reference import tiny_hf_model
from torch._dynamo.utils import counters

import modelcode
from modelcode.generation import ContextLengthError, SamplingParams, decode, generate, prefill
from modelcode.generation.compile import CompiledModel
from modelcode.generation.session import ChatSession
from modelcode.kernels import kernels_available
from modelcode.kernels.cpu import attention_kernel_available

PROMPTS = ["Once upon a time", "Tom and Lily went to the park. They saw a", "The sun"]


@pytest.fixture(scope="module")
def plain():
    return modelcode.load("tinystories-656k")


@pytest.fixture(scope="module")
def compiled():
    # autotune off: it only changes which kernels run, and would make this test minutes longer on CPU
    return modelcode.load("tinystories-656k").compile(max_seq_len=128, autotune=False, saved=False)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_static_cache_greedy_equals_contiguous_cache(plain):
    model = plain.model
    prompts = [plain.tokenizer.encode(p, bos=True) for p in PROMPTS]
    expected = generate(model, prompts, 40).tokens
    cache = model.new_cache(len(prompts), 64, static=True)
    logits, _ = prefill(model, cache, prompts)
    lengths = [len(p) for p in prompts]
    got = [[] for _ in prompts]
    for step in decode(model, cache, logits, lengths, [40] * 3, SamplingParams()):
        for b, t in enumerate(step.tokens):
            if t is not None:
                got[b].append(t)
    assert got == expected


def test_compiled_greedy_equals_plain_with_one_compilation_per_batch_size(plain, compiled):
    before = graphs()
    for prompt, n in zip(PROMPTS, (50, 20, 70)):  # prompt lengths and new-token counts all differ
        ids = plain.tokenizer.encode(prompt, bos=True)
        expected, _ = plain.generate([ids], max_new_tokens=n)
        got, _ = compiled.generate([ids], max_new_tokens=n)
        assert got == expected and len(got[0]) > 10
    assert graphs() - before == 1  # batch size 1: compiled once, then reused as positions advanced
    batch = [plain.tokenizer.encode(p, bos=True) for p in PROMPTS[:2]]  # unequal lengths in one batch
    assert compiled.generate(batch, max_new_tokens=30)[0] == plain.generate(batch, max_new_tokens=30)[0]
    assert compiled.generate(batch[::-1], max_new_tokens=12)[0] == plain.generate(batch[::-1], max_new_tokens=12)[0]
    assert graphs() - before == 2  # batch size 2: one more


def test_compiled_sampling_with_a_seed_equals_plain(plain, compiled):
    ids = plain.tokenizer.encode(PROMPTS[0], bos=True)
    settings = dict(max_new_tokens=30, temperature=0.8, top_p=0.9, seed=7)
    assert compiled.generate([ids], **settings) == plain.generate([ids], **settings)


def test_compiled_stream_and_chat_equal_plain(plain, compiled):
    assert list(compiled.stream(PROMPTS[1], max_new_tokens=25)) == list(plain.stream(PROMPTS[1], max_new_tokens=25))
    chats = [ChatSession(lm, max_new_tokens=15) for lm in (plain, compiled)]
    for turn in ("Hello", "Tell me a story"):  # the second turn reuses the cache of the first
        replies = ["".join(chat.send(turn)) for chat in chats]
        assert replies[0] == replies[1]
    assert chats[1].cache is compiled.compiled.new_cache(1)  # the static cache, kept between turns


def test_several_steps_per_call_end_each_sequence_exactly_where_plain_decoding_does(plain):
    # 3 steps per call: budgets and stops fall in the middle of a call, and what a finished sequence sampled
    # after its end (fed to the model, written to the cache) must never show, nor harm the others.
    lm = modelcode.load("tinystories-656k").compile(max_seq_len=96, autotune=False, steps_per_call=3, saved=False)
    batch = [plain.tokenizer.encode(p, bos=True) for p in PROMPTS]
    free_run = plain.generate(batch[:1], max_new_tokens=12, stop_ids=frozenset())[0][0]
    for n in (1, 2, 3, 4, 7):
        assert lm.generate(batch, max_new_tokens=n)[0] == plain.generate(batch, max_new_tokens=n)[0]
    stop = frozenset({free_run[4]})  # the 5th token: sequence 0 stops mid-call, the others go on
    expected, expected_lp = plain.generate(batch, max_new_tokens=20, stop_ids=stop, logprobs=True)
    got, got_lp = lm.generate(batch, max_new_tokens=20, stop_ids=stop, logprobs=True)
    assert got == expected and len(got[0]) < 5 < len(got[1])
    assert [len(lp) for lp in got_lp] == [len(t) for t in got]
    torch.testing.assert_close(sum(got_lp, []), sum(expected_lp, []), atol=1e-4, rtol=0)


def decoded(model, prompts: list[list[int]], n: int, params: SamplingParams, ahead: bool, stop_ids=frozenset(),
            stop_check=None, seed: int | None = None) -> tuple[list, list]:
    cache = model.new_cache(len(prompts))
    logits, _ = prefill(model, cache, prompts)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    tokens, lps = [[] for _ in prompts], [[] for _ in prompts]
    for step in decode(model, cache, logits, [len(p) for p in prompts], [n] * len(prompts), params, stop_ids,
                       generator, logprobs=True, stop_check=stop_check, ahead=ahead):
        for b, t in enumerate(step.tokens):
            if t is not None:
                tokens[b].append(t)
                lps[b].append(step.logprobs[b])
    return tokens, lps


@pytest.mark.parametrize("steps_per_call", [1, 3])
def test_calls_launched_ahead_of_the_host_change_nothing(plain, steps_per_call):
    # What a GPU does (`ahead`, its default there), run on CPU: each call is launched before the host reads
    # the last one's tokens, so stops are seen a call late; the tokens, logprobs and stops must not change.
    lm = modelcode.load("tinystories-656k").compile(max_seq_len=96, autotune=False, steps_per_call=steps_per_call,
                                                    saved=False)
    batch = [plain.tokenizer.encode(p, bos=True) for p in PROMPTS]
    free_runs = decoded(plain.model, batch, 20, SamplingParams(), ahead=False)[0]
    stop_ids = frozenset({free_runs[0][4]})  # sequence 0 stops mid-call, the others go on

    def stop_check(b, token):  # sequence 2 ends after its third token
        return b == 2 and token == free_runs[2][2]

    for params, seed in [(SamplingParams(), None), (SamplingParams(0.8, None, 0.9), 7)]:
        for stops in [(frozenset(), None), (stop_ids, stop_check)]:
            runs = [decoded(lm.runner, batch, 20, params, ahead, *stops, seed) for ahead in (False, True)]
            assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
            assert runs[1][0] == decoded(plain.model, batch, 20, params, False, *stops, seed)[0]
    greedy_stopped = decoded(lm.runner, batch, 20, SamplingParams(), True, stop_ids, stop_check)[0]
    assert len(greedy_stopped[0]) < 5 and len(greedy_stopped[2]) == 3 and len(greedy_stopped[1]) == 20


def test_small_models_decode_several_steps_per_call(plain):
    from modelcode.generation.compile import default_steps_per_call

    assert default_steps_per_call(torch.nn.Linear(2048, 2048)) == 8  # 16 MiB of float32
    with torch.device("meta"):
        assert default_steps_per_call(torch.nn.Linear(8192, 8192)) == 1  # 256 MiB
    with pytest.raises(ValueError, match="steps_per_call must be at least 1"):
        CompiledModel(plain.model, steps_per_call=0)


def assert_each_token_is_a_near_argmax(model, prompt: list[int], tokens: list[int], ulps: int = 2):
    """bfloat16: inductor fuses what eager rounds step by step, so greedy runs may part at a near-tie. What
    must hold: under the eager model, each token the compiled run chose has the top logit to within two
    bfloat16 steps of its size (eager decoding itself, with the KV cache, parts from the full pass that much:
    0.125 at logits of 8-16 on TinyStories)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1].float()
    chosen = logits.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    top = logits.max(-1).values
    assert (top - chosen <= ulps * torch.finfo(torch.bfloat16).eps * top.abs()).all()


def test_compiled_bfloat16_chooses_what_eager_would():
    # On CPU compile() installs modelcode's kernels: bfloat16 Linear layers repacked in place, where they run
    lm = modelcode.load("tinystories-656k", dtype="bfloat16").compile(max_seq_len=96, autotune=False, saved=False)
    ids = lm.tokenizer.encode(PROMPTS[2], bos=True)
    got, _ = lm.generate([ids], max_new_tokens=30)
    assert lm.kernels.packed_layers == (14 if kernels_available() else 0)
    assert lm.kernels.fused_groups == (4 if kernels_available() else 0)  # q, k, v and gate, up of 2 layers
    assert lm.kernels.attention_layers == (2 if attention_kernel_available() else 0)
    assert_each_token_is_a_near_argmax(lm.model, ids, got[0])


def test_compiled_int4_bfloat16_chooses_what_eager_would():
    # bfloat16 int4 runs modelcode's own CPU kernel where the CPU has AVX-512 or AVX2: a custom op in the graph
    from modelcode.quantization import quantize

    lm = modelcode.load("tinystories-656k", dtype="bfloat16")
    quantize(lm.model, "int4", 32)
    ids = lm.tokenizer.encode(PROMPTS[1], bos=True)
    got, _ = lm.compile(max_seq_len=96, autotune=False, saved=False).generate([ids], max_new_tokens=30)
    assert_each_token_is_a_near_argmax(lm.model, ids, got[0])


def test_compiled_context_is_its_static_length(plain, compiled):
    ids = plain.tokenizer.encode(PROMPTS[0], bos=True)
    tokens, _ = compiled.generate([ids], max_new_tokens=500, stop_ids=frozenset())
    assert len(ids) + len(tokens[0]) == 128  # ends where the static cache ends
    with pytest.raises(ContextLengthError, match="128 tokens"):
        compiled.generate([ids * 40], max_new_tokens=5)


def test_compiled_calls_after_the_first_pick_their_own_graph(plain, compiled):
    """Once a (batch size, sampling) graph is compiled, its calls skip dynamo's guards but for those that tell
    the compiled graphs apart: two compiled models of the same code, and two settings, called in turn, must
    each still run their own."""
    other = modelcode.load("tinystories-656k")
    with torch.no_grad():
        other.model.norm.weight.mul_(torch.linspace(0.5, 1.5, other.model.norm.weight.numel()))

    def both(lm):  # greedy, and sampled with a seed
        return (lm.generate([[1, 415, 1261]], max_new_tokens=20)[0],
                lm.generate([[1, 415, 1261]], max_new_tokens=20, temperature=0.9, seed=3)[0])

    expected = [both(plain), both(other)]
    assert expected[0] != expected[1]
    other.compile(max_seq_len=128, autotune=False, saved=False)
    for _ in range(2):
        assert [both(compiled), both(other)] == expected


def test_unfrozen_compiled_step_reads_the_models_own_weights():
    model = modelcode.load("tinystories-656k").model  # its own copy: the weights change below
    lean = CompiledModel(model, max_seq_len=96, freeze=False, saved=False)
    ids = [1, 415, 1261, 263, 931]
    before = graphs()
    first = generate(model, [ids], 40).tokens
    assert generate(lean, [ids], 40).tokens == first
    assert graphs() - before == 1
    with torch.no_grad():
        model.norm.weight.mul_(torch.linspace(0.5, 1.5, model.norm.weight.numel()))
    changed = generate(model, [ids], 40).tokens
    assert changed != first and generate(lean, [ids], 40).tokens == changed


def test_bad_static_length_says_what_fits(plain):
    with pytest.raises(ValueError, match=r"max_seq_len=4096 .* between 2 and the model's context \(512"):
        CompiledModel(plain.model, max_seq_len=4096)


def test_a_model_that_cannot_be_captured_says_so(tmp_path):
    hf = tiny_hf_model("dynamic-ntk-rope")  # its rotary frequencies follow the largest position, read on the host
    hf.save_pretrained(tmp_path)
    lm = modelcode.load(tmp_path).compile(freeze=False, saved=False)
    with pytest.raises(ValueError, match="cannot capture Llama's decode step as one graph.*without compile"):
        lm.generate([[1, 2, 3]], max_new_tokens=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_greedy_equals_plain():
    lm = modelcode.load("tinystories-656k", device="cuda")
    ids = lm.tokenizer.encode(PROMPTS[0], bos=True)
    expected, _ = lm.generate([ids], max_new_tokens=40)
    lm.compile(max_seq_len=128, saved=False)
    before = graphs()
    for n in (40, 17):
        assert lm.generate([ids], max_new_tokens=n)[0] == [expected[0][:n]]
    assert graphs() - before == 1
