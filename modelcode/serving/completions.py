"""POST /v1/completions: prompts as text or token ids, n choices each, echo and the legacy logprobs schema
(what lm-eval's `local-completions` scores multiple-choice tasks with)."""

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import StreamingResponse

from modelcode.generation import IncrementalDetokenizer
from modelcode.serving.errors import APIError
from modelcode.serving.generation import (
    Choice,
    check_prompt,
    event_stream,
    merged,
    new_id,
    sampling_params,
    sse,
    started,
    usage,
)
from modelcode.serving.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse


def prompts_of(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts as a list, each text or token ids."""
    p = req.prompt
    return [p] if isinstance(p, str) or isinstance(p[0], int) else p


def choices_of(req: CompletionRequest, prompts: list[list[int]], server) -> list[Choice]:
    max_tokens = server.max_seq_len - max(map(len, prompts)) if req.max_tokens is None else req.max_tokens
    if max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens is 0: set echo to score the prompt, or ask for at least one token",
                       "max_tokens")
    # echo with max_tokens 0 only scores the prompt: the engine takes that as prompt logprobs
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else (0 if max_tokens == 0 else None)
    choices = []
    for i, ids in enumerate(prompts):
        check_prompt(ids, max_tokens, server.max_seq_len, server.vocab_size, "prompt")
        choices += [Choice(i * req.n + j, i, ids, sampling_params(req, j, max_tokens, server.vocab_size,
                                                                  logprobs=req.logprobs,
                                                                  prompt_logprobs=prompt_logprobs))
                    for j in range(req.n)]
    return choices


def legacy_logprobs(choice: Choice, tok, ids: list[int], lps: list, tops: list) -> CompletionLogprobs:
    """`tokens` are each token's share of the text, `text_offset` where it starts in the choice's text;
    `top_logprobs` holds the chosen token and the most likely ones, by their text."""
    out = CompletionLogprobs()
    for i, lp, top in zip(ids, lps, tops):
        piece = choice.pieces.add(i)
        out.tokens.append(piece)
        out.token_logprobs.append(lp)
        out.top_logprobs.append(None if top is None else
                                {tok.decode([k]): v for k, v in {**top, i: lp}.items()})
        out.text_offset.append(choice.text_offset)
        choice.text_offset += len(piece)
    return out


def advance(choice: Choice, req: CompletionRequest, tok, prompt_text: str) -> CompletionChoice | None:
    """What choice's latest output adds: new text and logprobs since the last call (None: nothing yet)."""
    out, first = choice.out, not choice.started
    choice.started = True
    text, new_ids = out.text[choice.sent_text:], out.token_ids[choice.sent_tokens:]
    logprobs = None
    if req.logprobs is not None:
        logprobs = CompletionLogprobs()
        if first:  # with echo, the pieces start from the prompt's first token
            choice.pieces = IncrementalDetokenizer(tok, [] if req.echo else choice.prompt)
        if first and req.echo:
            logprobs = legacy_logprobs(choice, tok, choice.prompt, out.prompt_logprobs, out.prompt_top_logprobs)
        more = legacy_logprobs(choice, tok, new_ids, (out.logprobs or [])[choice.sent_tokens:],
                               (out.top_logprobs or [])[choice.sent_tokens:])
        for name in CompletionLogprobs.model_fields:
            getattr(logprobs, name).extend(getattr(more, name))
    if first and req.echo:
        text = prompt_text + text
    choice.sent_text, choice.sent_tokens = len(out.text), len(out.token_ids)
    if not (text or new_ids or out.finished):
        return None
    return CompletionChoice(index=choice.index, text=text, logprobs=logprobs,
                            finish_reason=out.finish_reason if out.finished else None)


async def create_completion(req: CompletionRequest, server):
    tok = server.lm.tokenizer
    given = prompts_of(req)
    prompts = [tok.encode(p, bos=tok.add_bos) if isinstance(p, str) else p for p in given]
    choices = choices_of(req, prompts, server)  # checks the ids before anything decodes them
    texts = [p if isinstance(p, str) else tok.decode(p) for p in given]  # what an echo writes back
    rid, created = new_id("cmpl"), int(time.time())
    stream = await started(merged(server.engine, choices, rid, server.metrics.timed))
    if req.stream:
        body = chunks(req, server, rid, created, prompts, texts, choices, stream)
        return StreamingResponse(event_stream(body), media_type="text/event-stream")
    parts: dict[int, list[CompletionChoice]] = {c.index: [] for c in choices}
    async with aclosing(stream):
        async for c in stream:
            if (part := advance(c, req, tok, texts[c.prompt_index])) is not None:
                parts[c.index].append(part)
    return CompletionResponse(id=rid, created=created, model=server.model_name,
                              choices=[join(p) for p in parts.values()], usage=usage(prompts, choices))


def join(parts: list[CompletionChoice]) -> CompletionChoice:
    """The streamed parts of one choice as one."""
    whole = parts[-1].model_copy(update={"text": "".join(p.text for p in parts)})
    if whole.logprobs is not None:
        whole.logprobs = CompletionLogprobs(**{name: [x for p in parts for x in getattr(p.logprobs, name)]
                                               for name in CompletionLogprobs.model_fields})
    return whole


async def chunks(req, server, rid, created, prompts, texts, choices, stream) -> AsyncIterator[str]:
    tok = server.lm.tokenizer
    async with aclosing(stream):
        async for c in stream:
            if (part := advance(c, req, tok, texts[c.prompt_index])) is not None:
                yield sse(CompletionResponse(id=rid, created=created, model=server.model_name, choices=[part]))
    if req.stream_options and req.stream_options.include_usage:
        yield sse(CompletionResponse(id=rid, created=created, model=server.model_name, choices=[],
                                     usage=usage(prompts, choices)))
