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


class Request:
    """The engine's state of one request. `ids` holds the prompt then each new token; the keys and values
    of the first `num_computed` are in the KV pool, in `blocks`. A request is preempted by dropping its
    blocks and `num_computed`: it is recomputed from `ids` when readmitted, so nothing it produced is lost."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival: int,
                 stop_ids: frozenset[int], detokenizer, generator):
        self.request_id, self.prompt_ids, self.params, self.arrival = request_id, prompt_ids, params, arrival
        self.stop_ids, self.detokenizer, self.generator = stop_ids, detokenizer, generator
        self.ids = list(prompt_ids)
        self.num_computed = 0
        self.blocks: list[int] = []
        self.hashes: list[int] = []  # chain hashes of the full blocks computed so far
        self.status = Status.WAITING
        self.output = RequestOutput(request_id, list(prompt_ids),
                                    logprobs=[] if params.logprobs is not None else None,
                                    top_logprobs=[] if params.logprobs is not None else None)
        if params.prompt_logprobs is not None:
            self.output.prompt_logprobs, self.output.prompt_top_logprobs = [None], [None]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Still scoring prompt tokens (echo): those positions' logits are needed, not only the last one."""
        return self.params.prompt_logprobs is not None and len(self.output.prompt_logprobs) < len(self.prompt_ids)

    def finish(self, reason: str) -> None:
        self.status, self.output.finished, self.output.finish_reason = Status.FINISHED, True, reason

    def snapshot(self) -> RequestOutput:
        """A copy of the output so far, safe to hand to another thread."""
        o = self.output
        copy = lambda x: None if x is None else list(x)  # noqa: E731
        return RequestOutput(o.request_id, o.prompt_ids, list(o.token_ids), o.text, copy(o.logprobs),
                             copy(o.top_logprobs), copy(o.prompt_logprobs), copy(o.prompt_top_logprobs),
                             o.cached_tokens, o.finished, o.finish_reason)
