"""The engine: many requests, arriving and leaving at any step, on one model and one pool of KV memory.

`add_request`, `abort` and `step` are the whole synchronous core (as nano-vllm's LLMEngine): each step the
scheduler picks chunks of tokens, the runner computes them over the paged cache, and each request that
reached its last token samples the next one and checks its stops. `generate_batch` runs a list of
prompts to the end (the offline API, as vLLM's `LLM.generate`). For a web server, `start` runs the steps
in a background thread and `generate` is an async iterator over one request's outputs: the event loop
only waits on a queue, and PyTorch releases the GIL while it computes.
"""

import asyncio
import contextlib
import itertools
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from modelcode.engine.blocks import BlockPool
from modelcode.engine.request import InvalidRequest, Request, RequestOutput, SamplingParams, Status
from modelcode.engine.runner import Runner
from modelcode.engine.sampler import logprobs_of, next_tokens
from modelcode.engine.scheduler import Chunk, Scheduler
from modelcode.generation.detokenize import IncrementalDetokenizer
from modelcode.layers import PagedKVCache
from modelcode.quantization.host import prepare_decoding

MAX_LOGPROBS = 20  # alternatives per token at most, as OpenAI's API


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_hit_tokens: int  # prompt tokens taken from the prefix cache, since the start
    prompt_tokens: int
    generated_tokens: int
    preemptions: int


class Engine:
    def __init__(self, lm, max_batch_size: int = 64, max_batched_tokens: int = 512, block_size: int = 16,
                 num_blocks: int | None = None, kv_cache_bytes: int | None = None, max_seq_len: int | None = None,
                 kernels: bool = True):
        """lm: what `modelcode.load` returns. The KV pool holds `num_blocks` blocks of `block_size`
        positions (default: from `kv_cache_bytes`, else enough for max_batch_size full contexts, at most a
        quarter of the device's memory). `max_batched_tokens`: prompt tokens computed per step, besides
        one token for each running request. `kernels`: install modelcode's kernels on the model first, in place, as
        `LM.compile` does (`quantization.host.prepare_decoding`): on CPU for a bfloat16 model, on CUDA always."""
        if max_batch_size < 1 or max_batched_tokens < 1 or block_size < 1:
            raise ValueError("max_batch_size, max_batched_tokens and block_size must be at least 1")
        self.lm, self.model, config = lm, lm.model, lm.model.config
        self.max_seq_len = min(max_seq_len or config.max_seq_len, config.max_seq_len)
        embedding = next(m for m in self.model.modules() if isinstance(m, torch.nn.Embedding)).weight
        self.device = embedding.device
        if kernels and (self.device.type == "cuda" or self.device.type == "cpu" and embedding.dtype == torch.bfloat16):
            prepare_decoding(self.model)
        block_bytes = 2 * config.n_layers * block_size * config.n_kv_heads * config.head_dim * embedding.element_size()
        if num_blocks is None:
            wanted = max_batch_size * -(-self.max_seq_len // block_size) + 1
            num_blocks = min(wanted, (kv_cache_bytes or _quarter_of_memory(self.device)) // block_bytes)
        self.pool = BlockPool(num_blocks, block_size)
        cache = PagedKVCache(config.n_layers, num_blocks, block_size, config.n_kv_heads, config.head_dim,
                             embedding.dtype, self.device)
        self.scheduler = Scheduler(self.pool, max_batch_size, max_batched_tokens)
        self.runner = Runner(self.model, cache, self.max_seq_len, self.device)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._inbox: list[tuple[str, object]] = []  # adds and aborts from any thread, applied at the next step
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._totals = dict(prefix_hit_tokens=0, prompt_tokens=0, generated_tokens=0)

    # ---- the synchronous core

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; raises InvalidRequest (and queues nothing) if it cannot run."""
        self._validate(prompt_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        stop_ids = frozenset() if params.ignore_eos else (
            self.lm.stop_ids if params.stop_token_ids is None else params.stop_token_ids)
        detok = IncrementalDetokenizer(self.lm.tokenizer, prompt_ids) if self.lm.tokenizer is not None else None
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        request = Request(request_id, list(prompt_ids), params, next(self._ids), stop_ids, detok, generator)
        with self._lock:
            if request_id in self.requests or any(r == request_id for op, r in self._inbox if op == "abort"):
                raise InvalidRequest(f"request id {request_id!r} is already in use")
            self.requests[request_id] = request
            self._inbox.append(("add", request))
        self._wake.set()
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are free after the next step begins. Unknown ids are ignored."""
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wake.set()

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Advance every running request by one token (or one prompt chunk); returns the outputs of the
        requests that advanced or finished."""
        finished = self._apply_inbox()
        chunks = self.scheduler.schedule()
        logits = self.runner.run(chunks) if chunks else {}
        advanced = []
        for i, chunk in enumerate(chunks):
            self.scheduler.computed(chunk)
            if i in logits and chunk.request.wants_prompt_logprobs:
                self._score_prompt(chunk, logits[i])
                logits[i] = logits[i][-1:]
            if chunk.completes:
                advanced.append((chunk.request, logits[i][-1]))
        if advanced:
            self._sample([r for r, _ in advanced], torch.stack([lg for _, lg in advanced]))
        for request, _ in advanced:
            if request.status is Status.FINISHED:
                finished.append(request)
        for request in finished:
            self._retire(request)
        outputs = {r.request_id: r.snapshot() for r in [r for r, _ in advanced] + finished}
        return list(outputs.values())

    def generate_batch(self, prompts: list[list[int]],
                       params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run every prompt to its end, each with its own settings (or one for all); results in order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, s) for p, s in zip(prompts, params)]
        results: dict[str, RequestOutput] = {}
        while len(results) < len(ids):
            for out in self.step():
                if out.finished:
                    results[out.request_id] = out
        return [results[i] for i in ids]

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(len(s.running), len(s.waiting), self.pool.used, self.pool.num_blocks - 1,
                           self._totals["prefix_hit_tokens"], self._totals["prompt_tokens"],
                           self._totals["generated_tokens"], s.preemptions)

    # ---- inside a step

    def _validate(self, prompt: list[int], p: SamplingParams) -> None:
        vocab = self.model.config.vocab_size
        if not prompt:
            raise InvalidRequest("the prompt is empty: give at least one token")
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise InvalidRequest(f"the prompt has token ids outside the vocabulary (0 to {vocab - 1})")
        if p.temperature < 0 or not 0 < p.top_p <= 1 or (p.top_k is not None and p.top_k < 1):
            raise InvalidRequest(f"temperature must be >= 0, top_p in (0, 1] and top_k >= 1, got temperature="
                                 f"{p.temperature}, top_p={p.top_p}, top_k={p.top_k}")
        if p.max_tokens < (0 if p.prompt_logprobs is not None else 1):
            raise InvalidRequest(f"max_tokens must be at least 1 (0 only to score the prompt), got {p.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(p, name)
            if n is not None and not 0 <= n <= MAX_LOGPROBS:
                raise InvalidRequest(f"{name} must be between 0 and {MAX_LOGPROBS}, got {n}")
        if any(not 0 <= t < vocab for t, _ in p.logit_bias):
            raise InvalidRequest(f"logit_bias has token ids outside the vocabulary (0 to {vocab - 1})")
        total = len(prompt) + max(p.max_tokens, 1)
        if total > self.max_seq_len:
            raise InvalidRequest(f"the prompt ({len(prompt)} tokens) and max_tokens ({p.max_tokens}) need {total} "
                                 f"positions, but the context is {self.max_seq_len}: shorten the prompt or "
                                 "lower max_tokens")
        if -(-total // self.pool.block_size) > self.pool.num_blocks - 1:
            raise InvalidRequest(f"{total} positions do not fit the KV pool of {self.pool.num_blocks - 1} blocks "
                                 f"of {self.pool.block_size}: give the engine more KV memory")

    def _apply_inbox(self) -> list[Request]:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        aborted = []
        for op, item in inbox:
            if op == "add":
                self.scheduler.add(item)
                self._totals["prompt_tokens"] += len(item.prompt_ids)
            elif item in self.requests and self.requests[item].status is not Status.FINISHED:
                request = self.requests[item]
                self.scheduler.remove(request)
                request.finish("abort")
                aborted.append(request)
        return aborted

    def _score_prompt(self, chunk: Chunk, logits: torch.Tensor) -> None:
        """Prompt logprobs (echo): logits at position p score prompt token p + 1."""
        request, out = chunk.request, chunk.request.output
        start, prompt = chunk.start, request.prompt_ids
        targets = [(row, start + row + 1) for row in range(chunk.length)
                   if len(out.prompt_logprobs) <= start + row + 1 < len(prompt)]
        if not targets:
            return
        rows = [row for row, _ in targets]
        chosen, top = logprobs_of(logits[rows], [prompt[t] for _, t in targets], request.params.prompt_logprobs)
        out.prompt_logprobs += chosen
        out.prompt_top_logprobs += top
        if request.params.max_tokens == 0 and not request.wants_prompt_logprobs:
            request.finish("length")

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> None:
        live = [i for i, r in enumerate(requests) if r.status is not Status.FINISHED]
        if not live:
            return
        requests, logits = [requests[i] for i in live], logits[live]
        tokens = next_tokens(logits, requests)
        top_n = max((r.params.logprobs or 0) for r in requests)
        scored = logprobs_of(logits, tokens, top_n) if any(r.params.logprobs is not None for r in requests) else None
        for row, (request, token) in enumerate(zip(requests, tokens)):
            self._append(request, token, None if scored is None else (scored[0][row], scored[1][row]))

    def _append(self, request: Request, token: int, scored: tuple[float, dict[int, float]] | None) -> None:
        """Add a sampled token to a request and check its stops, in generate's order: a stop id ends it
        (not kept), then a stop string (kept), then max_tokens or the context."""
        out, p = request.output, request.params
        if token in request.stop_ids:
            return self._finish_text(request, "stop")
        request.ids.append(token)
        out.token_ids.append(token)
        self._totals["generated_tokens"] += 1
        if scored is not None and p.logprobs is not None:
            out.logprobs.append(scored[0])
            out.top_logprobs.append(dict(itertools.islice(scored[1].items(), p.logprobs)))
        if request.detokenizer is not None:
            request.detokenizer.add(token)
            cut = _stop_at(request.detokenizer.text, p.stop)
            if cut is not None:
                out.text = request.detokenizer.text[:cut]
                return request.finish("stop")
        if len(out.token_ids) >= p.max_tokens or len(request.ids) >= self.max_seq_len:
            return self._finish_text(request, "length")
        if request.detokenizer is not None:
            hold = max((len(s) for s in p.stop), default=1) - 1  # a stop string may be forming in these
            text = request.detokenizer.text
            out.text = text[: max(len(out.text), len(text) - hold)]

    def _finish_text(self, request: Request, reason: str) -> None:
        if request.detokenizer is not None:
            request.detokenizer.flush()
            text = request.detokenizer.text
            cut = _stop_at(text, request.params.stop)
            request.output.text = text if cut is None else text[:cut]
        request.finish(reason)

    def _retire(self, request: Request) -> None:
        self.scheduler.remove(request)
        self._totals["prefix_hit_tokens"] += request.output.cached_tokens
        with self._lock:
            self.requests.pop(request.request_id, None)

    # ---- the async front

    def start(self) -> None:
        """Step in a background thread whenever there is work (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="modelcode-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the background thread; requests still running are aborted."""
        for request_id in list(self.requests):
            self.abort(request_id)
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None
        self._apply_inbox()
        self._publish([])

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it advances, the last with `finished` set. Leaving the loop early
        (break, cancellation, a client gone) aborts the request."""
        self.start()
        queue: asyncio.Queue = asyncio.Queue()
        request_id = request_id or f"req-{next(self._ids)}"
        self._listeners[request_id] = (asyncio.get_running_loop(), queue)
        try:
            self.add_request(prompt_ids, params, request_id)
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    return
        finally:
            self._listeners.pop(request_id, None)
            if request_id in self.requests:
                self.abort(request_id)

    def _loop(self) -> None:
        while not self._stopping:
            if not self.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.step()
            except Exception as error:  # a fault of the model or the engine: fail what is running, go on
                outputs = self._fail_all(error)
            self._publish(outputs)

    def _fail_all(self, error: Exception) -> list:
        failed = []
        for request in list(self.requests.values()):
            self.scheduler.remove(request)
            request.finish("abort")
            self._retire(request)
            failed.append((request.request_id, RuntimeError(f"the engine failed: {error}")))
        return failed

    def _publish(self, outputs: list) -> None:
        for out in outputs:
            request_id, item = (out.request_id, out) if isinstance(out, RequestOutput) else out
            listener = self._listeners.get(request_id)
            if listener is not None:
                loop, queue = listener
                with contextlib.suppress(RuntimeError):  # its event loop has closed
                    loop.call_soon_threadsafe(queue.put_nowait, item)


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string starts in text, if one is there."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _quarter_of_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
