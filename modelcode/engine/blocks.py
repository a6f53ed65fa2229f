"""The KV pool's bookkeeping: which blocks are free, who holds which, and the prefix cache.

Prefix caching (vLLM's automatic prefix caching, SGLang's radix cache in spirit): a block that is full
is known by the hash of its tokens and of every token before it (its parent's hash), so two requests that
start with the same tokens (a system prompt, a chat's earlier turns) map their first blocks to the same
keys. A new request takes the blocks of its longest cached prefix instead of computing them again.
Blocks are reference-counted; one nobody holds stays cached until its memory is needed, and the least
recently used goes first.
"""

from collections import OrderedDict

SCRATCH_BLOCK = 0  # never handed out: padding tokens write here, and short block tables are padded with it


def block_hashes(tokens: list[int], block_size: int) -> list[int]:
    """The chain hash of each full block of `tokens`: block i's covers tokens[: (i + 1) * block_size]."""
    hashes, parent = [], None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start : start + block_size])))
        hashes.append(parent)
    return hashes


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # never cached or evicted; pop() takes 1 first
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, int] = {}  # block -> its chain hash, for full blocks
        self.cached: dict[int, int] = {}  # chain hash -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first

    @property
    def available(self) -> int:
        """Blocks that `allocate` can hand out: free ones and cached ones nobody holds."""
        return len(self.free) + len(self.evictable)

    @property
    def used(self) -> int:
        """Blocks some request holds."""
        return self.num_blocks - 1 - self.available

    def allocate(self, n: int) -> list[int]:
        if n > self.available:
            raise MemoryError(f"{n} KV blocks asked for, {self.available} available")
        blocks = []
        for _ in range(n):
            if self.free:
                block = self.free.pop()
            else:  # evict the least recently used cached block
                block, _ = self.evictable.popitem(last=False)
                del self.cached[self.hash_of.pop(block)]
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def longest_prefix(self, hashes: list[int]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`, now held by the caller."""
        blocks = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            self.evictable.pop(block, None)
            self.refs[block] += 1
        return blocks

    def cache(self, block: int, h: int) -> None:
        """Block is full and holds the tokens hashed as h: later requests may share it."""
        if block in self.hash_of or h in self.cached:
            return  # already cached, or another block holds the same tokens
        self.hash_of[block], self.cached[h] = h, block

    def release(self, blocks: list[int]) -> None:
        """The caller no longer holds these; the last holder's cached blocks become evictable, last first so
        that a sequence's tail is evicted before its head (a shorter prefix stays useful)."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)
