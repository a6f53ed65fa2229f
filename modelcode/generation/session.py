"""A multi-turn chat that keeps its KV cache between turns, so each turn prefills only what is new.

The chat format renders the whole conversation each turn (a Jinja template may change earlier text,
so we never assume it only appends); the tokens that match what the cache already holds are not
run again. Cache slot j holds position j, so rewinding is free: later slots are overwritten.
"""

from collections.abc import Iterator

from modelcode.generation.generate import ContextLengthError
from modelcode.generation.stream import TextStream


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
        self.prefilled = 0  # tokens the last turn had to prefill

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn and stream the assistant's reply."""
        messages = self.messages + [{"role": "user", "content": text}]
        prompt = self.chat.encode_dialog_prompt(messages, add_generation_prompt=True)
        context = self.lm.runner.config.max_seq_len
        if len(prompt) >= context:
            raise ContextLengthError(f"the conversation has grown to {len(prompt)} tokens and no longer fits the "
                                     f"model's context of {context} tokens: /reset to start a new one")
        reused = common_prefix(prompt, self.cached)
        self.prefilled = len(prompt) - reused
        self.cached = self.cached[:reused]  # anything later in the cache is about to be overwritten
        s = dict(self.settings)
        stream = TextStream(self.lm.runner, self.lm.tokenizer, prompt, s.pop("max_new_tokens", None)
                            or self.lm.defaults.max_new_tokens, self.lm.sampling(**{k: s.pop(k, None) for k in
                            ("temperature", "top_p", "top_k")}), self.chat.stop_ids | self.lm.stop_ids,
                            cache=self.cache, cached=reused, **s)
        yield from stream
        self.messages = messages + [{"role": "assistant", "content": stream.text}]
        self.cached = prompt + stream.tokens[:-1]  # the last sampled token was never fed to the model
