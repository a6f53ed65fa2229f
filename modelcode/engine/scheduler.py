"""Which tokens of which requests the next forward pass computes.

Every step decodes every running request (one token each), then spends what is left of a token budget
on prompts: the rest of a prompt already started, then new requests, oldest first. A long prompt is
prefilled a chunk per step (chunked prefill, as vLLM), so it never stalls the others' decoding for more
than one chunk, nor a short prompt behind it. When the KV pool runs out, the latest request to arrive
gives its blocks back (preemption) and waits, first in line, to be recomputed: never an error.
"""

from collections import deque
from dataclasses import dataclass

from modelcode.engine.blocks import BlockPool, block_hashes
from modelcode.engine.request import Request, Status


@dataclass
class Chunk:
    """Feed request.ids[start : start + length] at positions start, start + 1, ..."""

    request: Request
    start: int
    length: int

    @property
    def completes(self) -> bool:
        """Whether this chunk reaches the request's last token, so its last logits choose the next one."""
        return self.start + self.length == len(self.request.ids)


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch_size: int, max_batched_tokens: int):
        self.pool, self.max_batch_size, self.max_batched_tokens = pool, max_batch_size, max_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in order of arrival
        self.preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Drop a finished or aborted request and give its blocks back."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.pool.release(request.blocks)
        request.blocks, request.num_computed = [], 0

    def schedule(self) -> list[Chunk]:
        budget = self.max_batched_tokens
        chunks = []
        for request in list(self.running):
            if request.status is not Status.RUNNING:
                continue  # preempted a moment ago, to make room for an earlier request
            left = len(request.ids) - request.num_computed
            # Decoding always goes; a prompt takes what budget is left, and at most half of it while others
            # wait, so that a short prompt arriving behind a long one is not held until that one is done.
            share = budget // 2 if self.waiting else budget
            length = 1 if left == 1 else min(left, share)
            if length <= 0 or not self._make_room(request, length):
                continue
            chunks.append(Chunk(request, request.num_computed, length))
            budget -= length
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            request = self.waiting[0]
            self._reuse_prefix(request)
            length = min(len(request.ids) - request.num_computed, budget)
            if not self._reserve(request, request.num_computed + length):
                self.pool.release(request.blocks)  # wait for memory, without holding any
                request.blocks, request.num_computed = [], 0
                break
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.running.append(request)
            chunks.append(Chunk(request, request.num_computed, length))
            budget -= length
        return chunks

    def computed(self, chunk: Chunk) -> None:
        """The chunk's keys and values are in its blocks: blocks it filled join the prefix cache."""
        request = chunk.request
        request.num_computed += chunk.length
        full = request.num_computed // self.pool.block_size
        if full > len(request.hashes):
            request.hashes = block_hashes(request.ids[: full * self.pool.block_size], self.pool.block_size)
            for block, h in zip(request.blocks[:full], request.hashes):
                self.pool.cache(block, h)

    def _reuse_prefix(self, request: Request) -> None:
        """Start a newly admitted request from the cached blocks of its longest known prefix. At least one
        token is always left to compute (its logits choose the next token); a request that scores its
        prompt (echo) computes all of it."""
        if request.wants_prompt_logprobs:
            return
        hashes = block_hashes(request.ids[: len(request.ids) - 1], self.pool.block_size)
        request.blocks = self.pool.longest_prefix(hashes)
        request.num_computed = len(request.blocks) * self.pool.block_size
        request.hashes = hashes[: len(request.blocks)]
        if request.output.token_ids == [] and request.output.cached_tokens == 0:
            request.output.cached_tokens = request.num_computed  # on first admission, not a recomputation

    def _make_room(self, request: Request, length: int) -> bool:
        """Blocks for a running request's next chunk, preempting the latest arrivals while there are none.
        False if the request preempted itself."""
        while not self._reserve(request, request.num_computed + length):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _reserve(self, request: Request, n_tokens: int) -> bool:
        """Blocks for the first n_tokens of the request, if the pool has them."""
        need = -(-n_tokens // self.pool.block_size) - len(request.blocks)
        if need > self.pool.available:
            return False
        if need > 0:
            request.blocks += self.pool.allocate(need)
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.pool.release(request.blocks)
        request.blocks, request.num_computed, request.hashes = [], 0, []
        request.status = Status.WAITING
        self.waiting.appendleft(request)  # the latest arrival is preempted first, so arrival order holds
        self.preemptions += 1
