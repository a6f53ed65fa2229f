"""A multi-turn chat that keeps its KV cache between turns, so each turn prefills only what is new.

The chat format renders the whole conversation each turn (a Jinja template may change earlier text,
so we never assume it only appends). Re-rendered, the model's reply is tokenized afresh, and a model's
own choice of tokens is often not the tokenizer's (TinyStories-656K's tokens span words): so where the
new rendering has the same text as what the model read and wrote, the model's own tokens are kept
(`splice`) and only the rest is new. The tokens that match what the cache already holds are not run
again. Cache slot j holds position j, so rewinding is free: later slots are overwritten.
"""

from collections.abc import Iterator

from modelcode.generation.generate import ContextLengthError
from modelcode.generation.stream import TextStream


def splice(history: list[int], rendered: list[int], decode, window: int = 32) -> list[int]:
    """`rendered` with its start replaced by `history` (tokens the model read and wrote) as far as both
    spell the same text, cut at a token boundary of each within the last `window` tokens of `history`;
    `rendered` itself where they part earlier."""
    text = decode(rendered)
    lengths: dict[int, int] = {}

    def length(i: int) -> int:  # characters of the first i rendered tokens
        if i not in lengths:
            lengths[i] = len(decode(rendered[:i]))
        return lengths[i]

    for m in range(len(history), max(len(history) - window, 0), -1):
        said = decode(history[:m])
        if not text.startswith(said) or "\ufffd" in said[-1:]:
            continue
        lo, hi = 0, len(rendered)  # the first i whose text reaches len(said)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if length(mid) < len(said) else (lo, mid)
        if length(lo) == len(said) and lo < len(rendered):
            return history[:m] + rendered[lo:]
    return rendered


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    def __init__(self, lm, system: str | None = None, **settings):
        """settings: max_new_tokens, temperature, top_p, top_k, seed, stop (as for `LM.stream`)."""
        self.lm, self.system, self.settings = lm, system, settings
        self.chat = lm._chat_format()
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = self.lm.runner.new_cache(1)
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds, in order
        self.history: list[int] = []  # the last prompt and the reply: what the model read and wrote
        self.prompt: list[int] = []  # the last turn's prompt
        self.prefilled = 0  # tokens the last turn had to prefill
        self.prefill_seconds = 0.0  # and the time that took

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn and stream the assistant's reply."""
        messages = self.messages + [{"role": "user", "content": text}]
        rendered = self.chat.encode_dialog_prompt(messages, add_generation_prompt=True)
        prompt = splice(self.history, rendered, self.lm.tokenizer.decode) if self.history else rendered
        context = self.lm.runner.config.max_seq_len
        if len(prompt) >= context:
            raise ContextLengthError(f"the conversation has grown to {len(prompt)} tokens and no longer fits the "
                                     f"model's context of {context} tokens: /reset to start a new one")
        reused = common_prefix(prompt, self.cached)
        self.prompt, self.prefilled = prompt, len(prompt) - reused
        self.cached = self.cached[:reused]  # anything later in the cache is about to be overwritten
        s = dict(self.settings)
        stop_ids = self.chat.stop_ids | self.lm.stop_ids
        stream = TextStream(self.lm.runner, self.lm.tokenizer, prompt, self.lm._budget(s.pop("max_new_tokens", None)),
                            self.lm.sampling(**{k: s.pop(k, None) for k in ("temperature", "top_p", "top_k")}),
                            stop_ids, self.lm._stop_strings(s.pop("stop", None), stop_ids), cache=self.cache,
                            cached=reused, **s)
        yield from stream
        self.prefill_seconds = stream.prefill_seconds
        self.messages = messages + [{"role": "assistant", "content": stream.text}]
        self.history = prompt + stream.tokens
        self.cached = prompt + stream.tokens[:-1]  # the last sampled token was never fed to the model
