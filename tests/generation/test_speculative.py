"""Speculative decoding: greedy output identical to plain greedy decoding, samples distributed as the
target's, stopping exactly where `generate` stops, and the acceptance rate reported."""

import copy
import dataclasses
import re

import pytest
import torch
from cli_helpers import cli_error
from hf_reference import random_prompts, tiny_hf_model
from torch import nn

import modelcode
from modelcode.cli.__main__ import main as cli
from modelcode.generation import SamplingParams, probabilities
from modelcode.generation.speculative import speculative_generate
from modelcode.lm import LM
from modelcode.models.llama import Llama, LlamaConfig

PROMPTS = ["Once upon a time", "Tom and Lily went to the park. They saw a", "One day, a bird"]  # the last ends at 86
# TinyStories-656K seldom copies its prompt, but from this one its greedy story falls into a loop
# ("the sound of the sound of ..."), which prompt lookup predicts.
LOOPING = 'Lily said, "Can I play?" Max said, "Yes, you can play." Lily said, "Can I play?" Max said,'


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm():
    return modelcode.load("tinystories-656k")


def first_layer_only(model: Llama, **config) -> Llama:
    """The target with its second layer dropped: a smaller draft with the same vocabulary."""
    draft = Llama(dataclasses.replace(model.config, n_layers=1, **config))
    draft.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("layers.1.")})
    return draft.eval()


def noisy_copy(model: nn.Module, scale: float, seed: int = 0) -> nn.Module:
    """The target with noise of `scale` times each weight's spread: agrees with it most of the time."""
    draft, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return draft


class AlwaysToken(nn.Module):
    """A draft 'model' that always proposes one fixed token (TinyStories never writes its <unk>, id 0)."""

    def __init__(self, config, token: int = 0):
        super().__init__()
        self.config = config
        self.scores = nn.Parameter(torch.nn.functional.one_hot(torch.tensor(token), config.vocab_size).float())

    def new_cache(self, batch_size: int):
        return None

    def forward(self, tokens, positions=None, cache=None):
        return self.scores.expand(*tokens.shape, -1)


def greedy(lm, ids, n, stop_ids=None):
    return lm.generate([ids], max_new_tokens=n, temperature=0.0,
                       stop_ids=lm.stop_ids if stop_ids is None else stop_ids)[0][0]


# --- greedy: the very same tokens as plain greedy decoding -----------------------------------------------

@pytest.mark.parametrize("kind", ["identical", "noisy", "first-layer", "always-wrong"])
def test_greedy_with_a_draft_model_equals_plain_greedy(lm, kind):
    draft = {"identical": lambda: lm.model, "noisy": lambda: noisy_copy(lm.model, 0.05),
             "first-layer": lambda: first_layer_only(lm.model),
             "always-wrong": lambda: AlwaysToken(lm.config)}[kind]()
    stopped_early = False
    for prompt in PROMPTS:
        ids = lm.tokenizer.encode(prompt, bos=True)
        plain = greedy(lm, ids, 100)
        stopped_early |= len(plain) < 100  # the story's end token came first
        for k in (1, 3, 6) if kind in ("identical", "noisy") else (2, 5):  # the others accept little: keep it short
            out = lm.speculative_generate(ids, draft, speculate_k=k, max_new_tokens=100, temperature=0.0)
            assert out.tokens == plain, (prompt, k)
            s = out.stats
            assert s.proposed > 0 and sum(s.accepted_per_pass) == s.target_passes - 1
            assert s.accepted == sum(i * c for i, c in enumerate(s.accepted_per_pass))
            if kind == "identical":
                assert s.accepted == s.proposed  # every draft is the target's own choice
                assert s.target_passes <= 1 + -(-len(plain) // (k + 1)) + 1
            elif kind == "always-wrong":
                # one token per pass, like plain decoding (whose last pass may yield the end token)
                assert s.accepted == 0 and s.target_passes == len(plain) + (len(plain) < 100)
            else:
                assert 0 < s.accepted < s.proposed
    assert stopped_early


def test_greedy_with_prompt_lookup_equals_plain_greedy(lm):
    for prompt in [*PROMPTS, LOOPING]:
        ids = lm.tokenizer.encode(prompt, bos=True)
        plain = greedy(lm, ids, 100)
        for n in (1, 3):
            for k in (1, 4, 8):
                out = lm.speculative_generate(ids, prompt_lookup=n, speculate_k=k, max_new_tokens=100,
                                              temperature=0.0)
                assert out.tokens == plain, (prompt, n, k)
                assert out.stats.proposed > 0


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A random Mistral (sliding window of 4: the verify pass must mask it too) and a random Llama-2-style
    draft of another shape over the same 128-token vocabulary, loaded from saved HF folders."""
    lms = []
    for variant, seed in [("mistral-sliding-window", 0), ("llama2-mha", 1)]:
        folder = tmp_path_factory.mktemp(variant)
        tiny_hf_model(variant, seed).save_pretrained(folder)
        lms.append(modelcode.load(folder))
    return lms


def test_random_hf_models_greedy_equals_plain_greedy(tiny_pair):
    target, other = tiny_pair
    drafts = [other, noisy_copy(target.model, 0.3)]
    for prompt in random_prompts(128, batch=3, length=7, seed=4).tolist():
        plain = greedy(target, prompt, 40, stop_ids=frozenset())
        assert len(set(plain)) >= 4  # not stuck on one token
        for draft in [*drafts, None]:
            for k in (2, 5):
                out = target.speculative_generate(prompt, draft, None if draft else 2, k, max_new_tokens=40,
                                                  temperature=0.0, stop_ids=frozenset())
                assert out.tokens == plain
        # up to the context: the tiny config has 64 positions
        assert target.speculative_generate(prompt, drafts[1], speculate_k=4, max_new_tokens=500, temperature=0.0,
                                           stop_ids=frozenset()).tokens == greedy(target, prompt, 500, frozenset())


# --- ends exactly where generate ends --------------------------------------------------------------------

def test_max_new_tokens_stop_ids_stop_strings_and_context_as_generate(lm, monkeypatch):
    ids = lm.tokenizer.encode(PROMPTS[1], bos=True)
    plain = greedy(lm, ids, 60)
    drafters = [dict(draft=lm.model), dict(prompt_lookup=2), dict(draft=noisy_copy(lm.model, 0.05))]
    for kw in drafters:
        for n in range(8):  # budgets smaller than, equal to and just over k + 1
            out = speculative_generate(lm.model, ids, n, speculate_k=4, stop_ids=lm.stop_ids, **kw)
            assert out.tokens == plain[:n] and len(out.tokens) == n
        for i in (0, 5, 17):  # a stop id that a draft proposes and the target accepts mid-pass
            stop = frozenset({plain[i]})
            out = speculative_generate(lm.model, ids, 60, speculate_k=4, stop_ids=stop, **kw)
            assert out.tokens == greedy(lm, ids, 60, stop) == plain[:plain.index(plain[i])]
        text_stop = ["park", "ball"]  # stop strings: the token completing one is kept, as in generate
        spec = lm.speculative_generate(ids, speculate_k=4, max_new_tokens=60, temperature=0.0, stop=text_stop, **kw)
        assert spec.tokens == lm.generate([ids], max_new_tokens=60, temperature=0.0, stop=text_stop)[0][0]
        assert len(spec.tokens) < 60
    # the context limit: 9 positions left after the prompt
    monkeypatch.setattr(lm.config, "max_seq_len", len(ids) + 9)
    for kw in drafters:
        assert speculative_generate(lm.model, ids, 60, speculate_k=4, stop_ids=lm.stop_ids, **kw).tokens == plain[:9]


def test_draft_with_a_shorter_context_stops_drafting_but_not_generating(lm):
    ids = lm.tokenizer.encode(PROMPTS[0], bos=True)
    draft = first_layer_only(lm.model, max_seq_len=len(ids) + 10)
    out = lm.speculative_generate(ids, draft, speculate_k=4, max_new_tokens=40, temperature=0.0)
    assert out.tokens == greedy(lm, ids, 40)
    assert out.stats.proposed <= 4 * 11


# --- sampling: the target's distribution ------------------------------------------------------------------

V = 5  # a vocabulary small enough to know the target's exact distribution over 4 new tokens


def tiny_llama(seed: int) -> Llama:
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(vocab_size=V, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_seq_len=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.5)  # peaked, position-dependent next-token distributions
    return model


def exact_distribution(model: nn.Module, prompt: list[int], n: int, params: SamplingParams) -> dict:
    """{(t1, ..., tn): probability} of the first n sampled tokens, from full forward passes (no cache)."""
    joint = {(): 1.0}
    with torch.no_grad():
        for _ in range(n):
            prefixes = list(joint)
            probs = probabilities(model(torch.tensor([prompt + list(p) for p in prefixes]))[:, -1], params)
            joint = {p + (t,): joint[p] * float(probs[i, t]) for i, p in enumerate(prefixes) for t in range(V)}
    return joint


def marginal(joint: dict, positions: tuple[int, ...]) -> dict:
    out = {}
    for seq, p in joint.items():
        key = tuple(seq[i] for i in positions)
        out[key] = out.get(key, 0.0) + p
    return out


def chi_square_p_value(expected: dict, counts: dict, n: int) -> float:
    """Pearson's chi-square test of counts against expected probabilities; the least likely cells are
    pooled until each pooled cell expects >= 5 samples, as the test's chi-square approximation needs."""
    stat, df, e, c = 0.0, -1, 0.0, 0
    for cell in sorted(expected, key=expected.get):
        e, c = e + expected[cell] * n, c + counts.get(cell, 0)
        if e >= 5:
            stat, df, e, c = stat + (c - e) ** 2 / e, df + 1, 0.0, 0
    if e > 0:  # a leftover sliver of mass joins the last cell's degree of freedom
        stat += (c - e) ** 2 / e
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


# 1000 seeded runs per case. Checked by hand against broken rules (accept every draft; accept with
# probability p instead of p/q; draw from p instead of the residual after a rejection; take the bonus
# token from the wrong row): in both draft-model cases each gave a p-value below 1e-16 in some table,
# and with prompt lookup the first three below 1e-18 (its passes seldom accept both drafts, so the bonus
# row is left to the draft cases); the correct rule gave p >= 0.2 in every table. The threshold 1e-5
# leaves room on both sides.
N_RUNS, P_MIN = 1000, 1e-5
# Token 1 comes from the prefill; tokens 2-4 from a pass over 2 drafts, and a second pass after a rejection.
TABLES = [(0, 1), (1, 2), (2, 3), (1, 2, 3)]


@pytest.mark.parametrize(("drafter", "params"), [
    ("draft", SamplingParams(temperature=1.0)),
    ("draft", SamplingParams(temperature=0.7, top_k=4, top_p=0.9)),  # p and q both truncated the same way
    ("lookup", SamplingParams(temperature=1.0)),  # q one-hot: accept with probability p(draft)
])
def test_sampling_follows_the_target_distribution(drafter, params):
    target, draft = tiny_llama(0), tiny_llama(1)
    prompt = [0, 1, 2, 3, 4, 0, 1, 2]  # every token occurs: prompt lookup always finds a match
    expected = exact_distribution(target, prompt, 4, params)
    if drafter == "draft":  # the draft is far from the target, so a wrong rule shows
        wrong = exact_distribution(draft, prompt, 4, params)
        assert sum(abs(expected[s] - wrong[s]) for s in expected) / 2 > 0.3
    kw = dict(draft=draft) if drafter == "draft" else dict(prompt_lookup=2)
    runs = [speculative_generate(target, prompt, 4, speculate_k=2, params=params, seed=s, **kw)
            for s in range(N_RUNS)]
    assert all(len(r.tokens) == 4 for r in runs)
    proposed = sum(r.stats.proposed for r in runs)
    accepted = sum(r.stats.accepted for r in runs)
    assert proposed >= 2 * N_RUNS and 0.1 * proposed < accepted < 0.9 * proposed  # both branches taken
    for positions in TABLES:
        counts: dict[tuple, int] = {}
        for r in runs:
            key = tuple(r.tokens[i] for i in positions)
            counts[key] = counts.get(key, 0) + 1
        assert chi_square_p_value(marginal(expected, positions), counts, N_RUNS) > P_MIN, positions


def test_sampling_is_reproducible_with_a_seed(lm):
    ids = lm.tokenizer.encode(PROMPTS[0], bos=True)
    draft = noisy_copy(lm.model, 0.05)

    def run(seed: int) -> list[int]:
        return lm.speculative_generate(ids, draft, speculate_k=3, max_new_tokens=40, temperature=0.8,
                                       seed=seed).tokens

    assert run(7) == run(7) != run(8)


# --- acceptance rate -------------------------------------------------------------------------------------

def test_prompt_lookup_accepts_most_drafts_once_the_text_repeats(lm):
    ids = lm.tokenizer.encode(LOOPING, bos=True)
    out = lm.speculative_generate(ids, prompt_lookup=3, speculate_k=4, max_new_tokens=128, temperature=0.0)
    s = out.stats
    assert s.acceptance_rate > 0.6 and len(out.tokens) / s.target_passes > 1.9  # measured: 68.7%, 2.13
    story = lm.speculative_generate(lm.tokenizer.encode(PROMPTS[0], bos=True), prompt_lookup=3, speculate_k=4,
                                    max_new_tokens=128, temperature=0.0).stats
    assert story.acceptance_rate < 0.3  # a story that does not repeat itself gives few right guesses


def test_generate_command_reports_the_acceptance_rate(capsys):
    cli(["generate", LOOPING, "--prompt-lookup", "3", "--max-new-tokens", "128", "--temperature", "0"])
    out, err = capsys.readouterr()
    assert out.startswith(LOOPING) and "the sound of the sound of" in out
    rate = re.search(r"draft tokens accepted \((\d+\.\d)%\)", err)
    assert rate and float(rate.group(1)) > 60
    cli(["generate", "Once upon a time", "--draft", "tinystories-656k", "--speculate-k", "3", "--max-new-tokens",
         "20"])
    assert "(100.0%)" in capsys.readouterr().err


# --- bad input ---------------------------------------------------------------------------------------------

def test_bad_input_says_what_to_do(lm, capsys):
    ids = lm.tokenizer.encode("Once", bos=True)
    with pytest.raises(ValueError, match="exactly one drafter"):
        lm.speculative_generate(ids)
    with pytest.raises(ValueError, match="exactly one drafter"):
        lm.speculative_generate(ids, lm, prompt_lookup=2)
    with pytest.raises(ValueError, match="speculate_k .* must be 1 or more, got 0"):
        lm.speculative_generate(ids, lm, speculate_k=0)
    with pytest.raises(ValueError, match="prompt_lookup .* must be 1 or more, got 0"):
        lm.speculative_generate(ids, prompt_lookup=0)
    with pytest.raises(ValueError, match="one prompt .*batch size 1"):
        lm.speculative_generate([ids, ids], prompt_lookup=2)
    with pytest.raises(ValueError, match="one prompt .*batch size 1"):
        lm.speculative_generate([], prompt_lookup=2)
    with pytest.raises(ValueError, match="vocabulary has 5 tokens but the target's has 2048"):
        lm.speculative_generate(ids, tiny_llama(0))

    class Shifted:  # same vocabulary size, other ids
        def encode(self, text, bos=False, eos=False):
            return [i + 1 for i in lm.tokenizer.encode(text, bos, eos)]

    other = LM(lm.model, lm.config, lm.path / "other", tokenizer=Shifted())
    with pytest.raises(ValueError, match="does not tokenize like .*must share the target's tokenizer"):
        lm.speculative_generate(ids, other)
    cli_error(["generate", "a", "b", "--prompt-lookup", "2"], capsys, "one prompt at a time, got 2")
