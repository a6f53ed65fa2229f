"""The object `modelcode.load` returns for a causal language model: the model, its tokenizer and chat
format, and generation calls in the spirit of Meta's Llama 3 reference (`generate`, `text_completion`,
`chat_completion`), with the checkpoint's own generation defaults."""

import json
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path

from torch import nn

from modelcode.errors import ArgumentError
from modelcode.generation import GenerationOutput, IncrementalDetokenizer, SamplingParams, TextStream, aot, generate
from modelcode.generation.compile import CompiledModel, default_steps_per_call, saves_steps
from modelcode.generation.speculative import SpeculativeOutput, same_tokenizer, speculative_generate
from modelcode.kernels import Installed
from modelcode.quantization.host import prepare_decoding
from modelcode.tokenization import ChatFormat, Tokenizer, generation_stop_ids, load_chat_format, load_tokenizer

Message = dict[str, str]


@dataclass
class GenerationDefaults:
    """Settings a checkpoint ships in generation_config.json; greedy when it does not ask to sample."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    max_new_tokens: int = 256

    @classmethod
    def from_folder(cls, folder: Path) -> "GenerationDefaults":
        path = folder / "generation_config.json"
        c = json.loads(path.read_text()) if path.exists() else {}
        if not c.get("do_sample", False):
            return cls(max_new_tokens=c.get("max_new_tokens") or cls.max_new_tokens)
        return cls(temperature=c.get("temperature", 1.0), top_p=c.get("top_p", 1.0),
                   top_k=c.get("top_k", 50),  # transformers' default when sampling
                   max_new_tokens=c.get("max_new_tokens") or cls.max_new_tokens)


@dataclass
class LM:
    model: nn.Module
    config: object
    path: Path
    tokenizer: Tokenizer | None = None
    chat_format: ChatFormat | None = None
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    stop_ids: frozenset[int] = frozenset()  # end of a plain completion: tokenizer EOS + generation_config
    compiled: CompiledModel | None = None  # set by `compile()`
    kernels: Installed = field(default_factory=Installed)  # what `compile()` installed

    @classmethod
    def from_folder(cls, model: nn.Module, config, folder: Path) -> "LM":
        try:
            tokenizer = load_tokenizer(folder)
        except FileNotFoundError:
            return cls(model, config, folder, defaults=GenerationDefaults.from_folder(folder))
        return cls(model, config, folder, tokenizer, load_chat_format(folder, tokenizer),
                   GenerationDefaults.from_folder(folder), tokenizer.stop_ids | generation_stop_ids(folder))

    def compile(self, max_seq_len: int | None = None, freeze: bool = True, autotune: bool = True,
                steps_per_call: int | None = None, saved: bool | None = None, build: bool = True) -> "LM":
        """From now on, generate with a static KV cache of `max_seq_len` positions (default: the context, at
        most 2048) and compiled decode steps (see `generation/compile.py` for `freeze`, `autotune`,
        `steps_per_call`, and `saved` and `build`: a small model's steps compiled once per machine and kept). The
        first generation of each batch size (and sampling setting) compiles; prompt and new tokens together end
        at `max_seq_len`. modelcode's kernels are installed on the model first (`kernels.install_cpu_kernels`:
        its bfloat16 Linear layers rearranged in place, ...; on CUDA `install_gpu_kernels`). Returns self."""
        fingerprint = self.fingerprint()  # of the weights as loaded, before the kernels rearrange them
        self.kernels = prepare_decoding(self.model)
        self.compiled = CompiledModel(self.model, max_seq_len, freeze, autotune, steps_per_call, saved, build,
                                      fingerprint)
        return self

    def fingerprint(self) -> str | None:
        """What names a small model's compiled steps on disk (`generation/aot.py`); None for a larger one."""
        return aot.model_fingerprint(self.model) if default_steps_per_call(self.model) > 1 else None

    def compile_if_saved(self) -> bool:
        """`compile(build=False)` if steps of this (small, CPU) model were compiled on this machine before:
        generation then loads them (about 0.1 s) instead of decoding eagerly. Returns whether it compiled."""
        if self.compiled is not None or not saves_steps(self.model) or not aot.has_packages(self.fingerprint()):
            return False
        self.compile(build=False)
        return True

    def wants_saved_steps(self) -> bool:
        """Whether this small CPU model just decoded eagerly for want of compiled steps saved on this machine:
        none at all (`compile_if_saved` found none), or none for the batch size and sampling it ran."""
        if self.compiled is not None:
            return bool(self.compiled.saved and self.compiled.unbuilt)
        return saves_steps(self.model)

    @property
    def runner(self) -> "nn.Module | CompiledModel":
        """What generation runs: the compiled stand-in after `compile()`, else the model itself."""
        return self.model if self.compiled is None else self.compiled

    def sampling(self, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None) -> SamplingParams:
        d = self.defaults
        return SamplingParams(d.temperature if temperature is None else temperature,
                              d.top_k if top_k is None else top_k, d.top_p if top_p is None else top_p)

    def generate(self, prompt_tokens: list[list[int]], max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 stop: list[str] | None = None, logprobs: bool = False, echo: bool = False, seed: int | None = None,
                 stop_ids: frozenset[int] | None = None) -> tuple[list[list[int]], list[list[float | None]] | None]:
        """New tokens for each prompt (with echo: prompt + new tokens), and their logprobs if asked.

        Ends each sequence at a stop id (not returned), at a stop string (the token completing it is
        returned), at max_new_tokens, or at the context length.
        """
        _check_prompts(prompt_tokens, self.config.vocab_size)
        out = self._generate(prompt_tokens, max_new_tokens, temperature, top_p, top_k, stop, logprobs, echo, seed,
                             self.stop_ids if stop_ids is None else stop_ids)
        tokens, lps = out.tokens, out.logprobs
        if echo:
            tokens = [p + t for p, t in zip(prompt_tokens, tokens)]
            if logprobs:
                lps = [p + t for p, t in zip(out.prompt_logprobs, lps)]
        return tokens, lps

    def _generate(self, prompts, max_new_tokens, temperature, top_p, top_k, stop, logprobs, echo, seed,
                  stop_ids) -> GenerationOutput:
        return generate(self.runner, prompts, self._budget(max_new_tokens),
                        self.sampling(temperature, top_p, top_k), stop_ids, seed, logprobs, echo,
                        self._stop_check(prompts, stop))

    def _stop_check(self, prompts: list[list[int]], stop: list[str] | None):
        """stop_check(b, token) for `generate`: True once sequence b's text contains a stop string."""
        if not stop:
            return None
        detoks = [IncrementalDetokenizer(self._tokenizer(), p) for p in prompts]

        def stop_check(b: int, token: int) -> bool:
            detoks[b].add(token)
            return any(s in detoks[b].text for s in stop)

        return stop_check

    def speculative_generate(self, prompt: list[int], draft: "LM | nn.Module | None" = None,
                             prompt_lookup: int | None = None, speculate_k: int = 4,
                             max_new_tokens: int | None = None, temperature: float | None = None,
                             top_p: float | None = None, top_k: int | None = None, stop: list[str] | None = None,
                             seed: int | None = None, stop_ids: frozenset[int] | None = None) -> SpeculativeOutput:
        """New tokens for one prompt (batch size 1) with speculative decoding: `draft` (a smaller model with
        the same tokenizer) or prompt lookup of n-grams up to `prompt_lookup` tokens proposes `speculate_k`
        tokens per pass of this model. Same output as `generate` (token for token when greedy, same
        distribution when sampling), fewer passes of this model; `.stats` says how many drafts it accepted."""
        if isinstance(draft, LM):
            both = draft.tokenizer is not None and self.tokenizer is not None
            if both and not same_tokenizer(draft.tokenizer, self.tokenizer):
                raise ValueError(f"the draft model at {draft.path} does not tokenize like {self.path}: a draft "
                                 "must share the target's tokenizer")
            draft = draft.model
        return speculative_generate(self.model, prompt, self._budget(max_new_tokens), draft,
                                    prompt_lookup, speculate_k, self.sampling(temperature, top_p, top_k),
                                    self.stop_ids if stop_ids is None else stop_ids, seed,
                                    self._stop_check([prompt], stop))

    def text_completion(self, prompts: list[str], max_new_tokens: int | None = None, temperature: float | None = None,
                        top_p: float | None = None, top_k: int | None = None, stop: list[str] | None = None,
                        logprobs: bool = False, echo: bool = False, seed: int | None = None) -> list[dict]:
        """Complete each prompt: [{"generation": text, "tokens": ids, "logprobs": [...] if asked}]."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("text_completion takes a list of prompt strings, e.g. ['Once upon a time']")
        tok = self._tokenizer()
        prompt_tokens = [tok.encode(p, bos=tok.add_bos) for p in prompts]
        stop = self._stop_strings(stop, self.stop_ids)
        tokens, lps = self.generate(prompt_tokens, max_new_tokens, temperature, top_p, top_k, stop, logprobs, echo,
                                    seed)
        return [self._completion(p, t, lp, stop, echo)
                for p, t, lp in zip(prompt_tokens, tokens, lps or [None] * len(tokens))]

    def chat_completion(self, dialogs: list[list[Message]], max_new_tokens: int | None = None,
                        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                        stop: list[str] | None = None, logprobs: bool = False, seed: int | None = None) -> list[dict]:
        """Answer each dialog: [{"generation": {"role": "assistant", "content": text}, ...}]."""
        chat = self._chat_format()
        prompt_tokens = [chat.encode_dialog_prompt(d, add_generation_prompt=True) for d in dialogs]
        stop = self._stop_strings(stop, chat.stop_ids | self.stop_ids)
        tokens, lps = self.generate(prompt_tokens, max_new_tokens, temperature, top_p, top_k, stop, logprobs,
                                    seed=seed, stop_ids=chat.stop_ids | self.stop_ids)
        results = [self._completion(p, t, lp, stop) for p, t, lp in zip(prompt_tokens, tokens,
                                                                         lps or [None] * len(tokens))]
        for r in results:
            r["generation"] = {"role": "assistant", "content": r["generation"]}
        return results

    def stream(self, prompt: str | list[int], max_new_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, top_k: int | None = None, stop: list[str] | None = None,
               seed: int | None = None) -> TextStream:
        """Iterate over the returned stream for text deltas as they are generated."""
        tok = self._tokenizer()
        ids = tok.encode(prompt, bos=tok.add_bos) if isinstance(prompt, str) else prompt
        _check_prompts([ids], self.config.vocab_size)
        return TextStream(self.runner, tok, ids, self._budget(max_new_tokens),
                          self.sampling(temperature, top_p, top_k), self.stop_ids,
                          self._stop_strings(stop, self.stop_ids), seed)

    def _completion(self, prompt: list[int], tokens: list[int], lps: list | None, stop: list[str] | None,
                    echo: bool = False) -> dict:
        """The result dict of one sequence. New text is decoded after the prompt, not alone, because
        sentencepiece-style decoders drop the leading space of the first token they decode."""
        decode = self._tokenizer().decode
        text = decode(tokens) if echo else decode(prompt + tokens)[len(decode(prompt)):]
        for s in stop or []:
            text = text.split(s, 1)[0] if s else text
        out = {"generation": text, "tokens": tokens}
        if lps is not None:
            out["logprobs"] = lps
        return out

    def _budget(self, max_new_tokens: int | None) -> int:
        """max_new_tokens, or the checkpoint's default when None (0 asks for no new tokens)."""
        if max_new_tokens is None:
            return self.defaults.max_new_tokens
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ArgumentError("max_new_tokens", f"must be a whole number, 0 or more, got {max_new_tokens!r}")
        return max_new_tokens

    def _stop_strings(self, stop: list[str] | None, stop_ids: frozenset[int]) -> list[str]:
        """The caller's stop strings and the text of each stop token: a model may spell a stop token out in
        ordinary tokens (TinyStories-656K writes "<|", "end", "_story", "|>" before its EOS)."""
        if isinstance(stop, str) or not all(isinstance(s, str) for s in stop or []):
            raise TypeError("stop takes a list of strings, e.g. ['\\n\\n']")
        texts = [text for text, i in (self.tokenizer.special_tokens if self.tokenizer else {}).items()
                 if i in stop_ids]
        return [*(stop or []), *texts]

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"no tokenizer files in {self.path}: pass token ids to generate(), or add the "
                             "checkpoint's tokenizer.json / tokenizer.model to the folder")
        return self.tokenizer

    def _chat_format(self) -> ChatFormat:
        self._tokenizer()
        return self.chat_format



def _check_prompts(prompt_tokens, vocab_size: int) -> None:
    """Token-id prompts come as a list of lists of ints within the vocabulary: the usual slips get a message,
    not a TypeError or an IndexError deep in the model."""
    ok = isinstance(prompt_tokens, list | tuple) and all(
        isinstance(p, list | tuple) and all(isinstance(t, Integral) for t in p) for p in prompt_tokens)
    if not ok:
        raise TypeError("generate takes token ids, one list per prompt, e.g. [[1, 450, 2]]: for text, use "
                        "text_completion(['...']) or lm.tokenizer.encode(text)")
    for i, p in enumerate(prompt_tokens):
        bad = next((t for t in p if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt {i} has token id {bad}, outside this model's vocabulary (0 to "
                             f"{vocab_size - 1}): encode text with this model's own tokenizer")
