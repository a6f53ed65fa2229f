"""POST /v1/chat/completions: messages through the checkpoint's chat format, the reply ended by its
end-of-turn ids, logprobs in the chat schema."""

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import StreamingResponse

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
from modelcode.serving.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    Delta,
    TokenLogprob,
    TopLogprob,
)


def prompt_of(req: ChatCompletionRequest, lm) -> list[int]:
    # "developer" is OpenAI's newer name for the system role
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        return lm.chat_format.encode_dialog_prompt(messages, add_generation_prompt=True)
    except Exception as e:  # a template's raise_exception: it rejects this dialog (e.g. roles out of order)
        raise APIError(400, f"the chat template rejects these messages: {e}", "messages") from None


def choices_of(req: ChatCompletionRequest, ids: list[int], server) -> list[Choice]:
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = req.max_completion_tokens or req.max_tokens or server.max_seq_len - len(ids)
    check_prompt(ids, max_tokens, server.max_seq_len, server.vocab_size, "messages")
    stop_ids = server.lm.chat_format.stop_ids | server.lm.stop_ids
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return [Choice(j, 0, ids, sampling_params(req, j, max_tokens, server.vocab_size, logprobs=logprobs,
                                              stop_token_ids=stop_ids)) for j in range(req.n)]


def chat_logprobs(tok, ids: list[int], lps: list[float], tops: list[dict[int, float]], n: int) -> ChatLogprobs:
    def entry(i: int, lp: float) -> TopLogprob:
        text = tok.decode([i])
        return TopLogprob(token=text, logprob=lp, bytes=list(text.encode()))

    content = []
    for i, lp, top in zip(ids, lps, tops):
        best = sorted(top.items(), key=lambda kv: -kv[1])[:n]
        content.append(TokenLogprob(**entry(i, lp).model_dump(), top_logprobs=[entry(k, v) for k, v in best]))
    return ChatLogprobs(content=content)


def advance(choice: Choice, req: ChatCompletionRequest, tok) -> ChatChunkChoice | None:
    """What choice's latest output adds since the last call (None: nothing yet)."""
    out = choice.out
    text, new_ids = out.text[choice.sent_text:], out.token_ids[choice.sent_tokens:]
    logprobs = None
    if req.logprobs:
        logprobs = chat_logprobs(tok, new_ids, (out.logprobs or [])[choice.sent_tokens:],
                                 (out.top_logprobs or [])[choice.sent_tokens:], req.top_logprobs or 0)
    choice.sent_text, choice.sent_tokens = len(out.text), len(out.token_ids)
    if not (text or new_ids or out.finished):
        return None
    return ChatChunkChoice(index=choice.index, delta=Delta(content=text), logprobs=logprobs,
                           finish_reason=out.finish_reason if out.finished else None)


async def create_chat_completion(req: ChatCompletionRequest, server):
    ids = prompt_of(req, server.lm)
    choices = choices_of(req, ids, server)
    rid, created = new_id("chatcmpl"), int(time.time())
    stream = await started(merged(server.engine, choices, rid, server.metrics.timed))
    if req.stream:
        return StreamingResponse(event_stream(chunks(req, server, rid, created, ids, choices, stream)),
                                 media_type="text/event-stream")
    parts: dict[int, list[ChatChunkChoice]] = {c.index: [] for c in choices}
    async with aclosing(stream):
        async for c in stream:
            if (part := advance(c, req, server.lm.tokenizer)) is not None:
                parts[c.index].append(part)
    return ChatCompletionResponse(id=rid, created=created, model=server.model_name,
                                  choices=[join(p) for p in parts.values()], usage=usage([ids], choices))


def join(parts: list[ChatChunkChoice]) -> ChatChoice:
    logprobs = None
    if parts[-1].logprobs is not None:
        logprobs = ChatLogprobs(content=[x for p in parts for x in p.logprobs.content])
    return ChatChoice(index=parts[-1].index, message=ChatMessage(content="".join(p.delta.content for p in parts)),
                      logprobs=logprobs, finish_reason=parts[-1].finish_reason)


async def chunks(req, server, rid, created, ids, choices, stream) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choice: ChatChunkChoice | None, **fields) -> str:
        return sse(ChatCompletionChunk(id=rid, created=created, model=server.model_name,
                                       choices=[] if choice is None else [choice], **fields))

    for c in choices:  # the role first, as OpenAI sends it
        yield chunk(ChatChunkChoice(index=c.index, delta=Delta(role="assistant", content="")))
    async with aclosing(stream):
        async for c in stream:
            if (part := advance(c, req, server.lm.tokenizer)) is not None:
                yield chunk(part)
    if include_usage:
        yield chunk(None, usage=usage([ids], choices))
