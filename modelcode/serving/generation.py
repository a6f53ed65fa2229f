"""One API request on the engine: its prompts times `n` become engine requests (choices), whose outputs are
merged into one stream; the endpoints turn that stream into a response or into server-sent events."""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pydantic import BaseModel

from modelcode.engine import InvalidRequest, RequestOutput, SamplingParams
from modelcode.generation import IncrementalDetokenizer
from modelcode.serving.errors import APIError, context_length_exceeded
from modelcode.serving.protocol import PromptTokensDetails, SamplingFields, Usage

log = logging.getLogger("modelcode.serving")


@dataclass
class Choice:
    """One engine request: choice `index` of the response, sampled from prompt `prompt_index`."""

    index: int
    prompt_index: int
    prompt: list[int]
    params: SamplingParams
    out: RequestOutput | None = None  # the latest output
    started: bool = False  # whether anything of it was sent (the role, an echo)
    sent_text: int = 0  # characters of out.text already streamed
    sent_tokens: int = 0  # tokens already streamed (their logprobs)
    pieces: IncrementalDetokenizer | None = None  # each new token's share of the text (logprobs)
    text_offset: int = 0


def sampling_params(req: SamplingFields, i: int, max_tokens: int, vocab_size: int, **settings) -> SamplingParams:
    """The engine's settings for choice i of `req`: a seed becomes seed + i, so n choices differ."""
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    return SamplingParams(temperature=req.temperature, top_k=req.top_k if req.top_k and req.top_k > 0 else None,
                          top_p=req.top_p, seed=None if req.seed is None else req.seed + i, max_tokens=max_tokens,
                          stop=tuple(s for s in stop if s), ignore_eos=req.ignore_eos,
                          logit_bias=logit_bias(req.logit_bias, vocab_size), **settings)


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    out = []
    for key, value in (bias or {}).items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise APIError(400, f"logit_bias key {key!r} is not a token id: use ids from 0 to {vocab_size - 1}",
                           "logit_bias")
        out.append((int(key), value))
    return tuple(out)


def check_prompt(ids: list[int], max_tokens: int, max_seq_len: int, vocab_size: int, param: str) -> None:
    """The engine would refuse these too; checked here to answer with OpenAI's codes."""
    if not ids:
        raise APIError(400, "the prompt is empty: give at least one token", param)
    if max(ids) >= vocab_size:
        raise APIError(400, f"token id {max(ids)} is outside the vocabulary (ids go from 0 to {vocab_size - 1})",
                       param, "invalid_value")
    if len(ids) + max_tokens > max_seq_len or len(ids) >= max_seq_len:
        raise context_length_exceeded(max_seq_len, len(ids), max_tokens, param)


async def merged(engine, choices: list[Choice], request_id: str, timed: Callable) -> AsyncIterator[Choice]:
    """Run every choice on the engine at once; yield a choice each time its output advances (choice.out).
    Leaving early (the client went away) cancels the choices, which aborts their engine requests."""
    queue: asyncio.Queue = asyncio.Queue()
    start = time.perf_counter()

    async def pump(choice: Choice):
        try:
            async for out in timed(engine.generate(choice.prompt, choice.params, f"{request_id}-{choice.index}"),
                                   start):
                await queue.put((choice, out, None))
            await queue.put((choice, None, None))
        except Exception as e:  # handed to the consumer, which raises it
            await queue.put((choice, None, e))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        running = len(tasks)
        while running:
            choice, out, error = await queue.get()
            if error is not None:
                raise error
            if out is None:
                running -= 1
                continue
            choice.out = out
            yield choice
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def started(stream: AsyncIterator[Choice]) -> AsyncIterator[Choice]:
    """Wait for the first output, so that a request the engine refuses is an HTTP error rather than a broken
    stream; returns the stream with that output still at its head."""
    try:
        first = await anext(stream)
    except InvalidRequest as e:
        await stream.aclose()
        raise APIError(400, str(e)) from None
    except BaseException:
        await stream.aclose()
        raise

    async def chain():
        try:
            yield first
            async for c in stream:
                yield c
        finally:
            await stream.aclose()

    return chain()


def usage(prompts: list[list[int]], choices: list[Choice]) -> Usage:
    """Prompt tokens count once per prompt, however many choices share it (as OpenAI and vLLM count)."""
    completion = sum(len(c.out.token_ids) for c in choices if c.out)
    cached = [0] * len(prompts)
    for c in choices:
        if c.out:
            cached[c.prompt_index] = max(cached[c.prompt_index], c.out.cached_tokens)
    prompt = sum(map(len, prompts))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached)))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(body: BaseModel | dict) -> str:
    data = body.model_dump_json() if isinstance(body, BaseModel) else json.dumps(body)
    return f"data: {data}\n\n"


async def event_stream(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Server-sent events, ended by [DONE]; an error after the stream began is one error event before it."""
    try:
        async for chunk in chunks:
            yield chunk
    except InvalidRequest as e:
        yield sse(APIError(400, str(e)).body())
    except APIError as e:
        yield sse(e.body())
    except Exception as e:
        log.exception("error during a stream")
        yield sse(APIError(500, f"internal error: {type(e).__name__}: {e}").body())
    yield "data: [DONE]\n\n"
