"""A request to the engine: its prompt, its own sampling settings and stop rules, and what it has produced.

Each request carries everything that may differ between the rows of one batch (temperature, top-k, top-p,
seed, stops, logprobs), so requests with different settings decode together in one forward pass.
"""

import enum
from dataclasses import dataclass, field


class InvalidRequest(ValueError):
    """A request the engine cannot run (bad settings, a prompt past the context): only that request fails."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request settings, as vLLM's: temperature 0 is greedy; top_k None and top_p 1.0 do not truncate.

    max_tokens: new tokens at most (0 is allowed only with prompt_logprobs: score a prompt, generate nothing).
    stop: strings that end the output (the text is cut before them); stop_token_ids: ids that end it (not
    returned), by default the model's own end ids, none with ignore_eos. logprobs: None for none, N >= 0 for
    each new token's logprob and its N most likely alternatives; prompt_logprobs likewise for prompt tokens
    (echo). logit_bias: added to the logits of those ids before sampling. A seed makes the request's samples
    the same whatever else shares its batch.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What a request has produced so far; the engine hands out a fresh one each time it advances.

    token_ids: new ids so far (a stop id excluded); text: their text, minus any tail that may still turn
    into a stop string or an unfinished character, so each output's text extends the previous one's.
    logprobs[i]: log p of token_ids[i]; top_logprobs[i]: {id: logprob} of the N most likely at that step.
    prompt_logprobs[i] likewise for prompt token i (None for the first). cached_tokens: prompt tokens
    reused from the prefix cache. finish_reason: "stop", "length" or "abort" once finished.
    """

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    cached_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None
