"""Key/value caches: what attention has already computed for earlier positions.

Every cache keeps one invariant that the attention mask relies on: the key stored in slot j of a
sequence is the key of that sequence's position j. So sequences of different lengths can share a
batch without left padding: each writes at its own positions, and `causal_mask` hides slots past a
query's position (which also hides anything a padded prefill wrote there, before it is overwritten).

The model never owns a cache: a caller creates one per generation (or per server slot set) and
passes it to `forward`, which calls `update` once per layer.
"""

import torch


class KVCache:
    """Interface. `update` stores k, v (B, n_kv_heads, T, hd) at `positions` (B, T) for one layer and
    returns all keys and values of that layer, (B, n_kv_heads, S, hd), slot j holding position j."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def _write(buf: torch.Tensor, x: torch.Tensor, positions: torch.Tensor) -> None:
    """buf[b, :, positions[b, t]] = x[b, :, t] for every b, t, in place."""
    batch = torch.arange(buf.shape[0], device=buf.device)[:, None]  # (B, 1)
    buf[batch, :, positions] = x.transpose(1, 2)  # advanced indices first: (B, T, n_kv, hd)


class ContiguousKVCache(KVCache):
    """Grows as positions advance (capacity doubles, so appends are amortized O(1)).

    The simple cache for one-off runs; returns exactly the slots written so far. Reading the largest
    position costs a host sync once per forward pass, which is why compiled decoding uses
    `StaticKVCache` instead.
    """

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0  # slots in use: largest position written + 1

    def update(self, layer, k, v, positions):
        if layer == 0:
            self.length = max(self.length, int(positions.max()) + 1)
        if self.k[layer] is None or self.k[layer].shape[2] < self.length:
            self._grow(layer, k)
        _write(self.k[layer], k, positions)
        _write(self.v[layer], v, positions)
        return self.k[layer][:, :, : self.length], self.v[layer][:, :, : self.length]

    def _grow(self, layer: int, like: torch.Tensor) -> None:
        b, n_kv, _, hd = like.shape
        capacity = max(self.length, 2 * (0 if self.k[layer] is None else self.k[layer].shape[2]))
        for bufs in (self.k, self.v):
            new = like.new_zeros(b, n_kv, capacity, hd)
            if bufs[layer] is not None:
                new[:, :, : bufs[layer].shape[2]] = bufs[layer]
            bufs[layer] = new


class StaticKVCache(KVCache):
    """Preallocated for `max_seq_len` positions: fixed shapes and in-place writes, so a compiled
    decode step never recompiles and CUDA graphs can replay it. A decode step attends over all slots
    (masked); an eager prompt over the slots up to its last position."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_seq_len = max_seq_len
        self.prompt_slots = max_seq_len  # slots a prompt's layers attend over: set by its first layer

    @classmethod
    def over(cls, k: list[torch.Tensor], v: list[torch.Tensor]) -> "StaticKVCache":
        """A cache on existing per-layer tensors (e.g. a compiled graph's inputs), written in place."""
        cache = cls.__new__(cls)
        cache.k, cache.v = list(k), list(v)
        cache.max_seq_len = cache.prompt_slots = k[0].shape[2]
        return cache

    def update(self, layer, k, v, positions):
        _write(self.k[layer], k, positions)
        _write(self.v[layer], v, positions)
        if k.shape[2] > 1 and not torch.compiler.is_compiling():
            # A prompt, run eagerly: its queries see no slot past its last position, so attending over the
            # slots up to there is the same (llama-1b, 128 tokens into 2048 slots: 16x less attention work).
            # Every layer sees the same positions: read the largest once per forward (on a GPU, a sync).
            if layer == 0:
                self.prompt_slots = int(positions.max()) + 1
            used = self.prompt_slots
            return self.k[layer][:, :, :used], self.v[layer][:, :, :used]
        return self.k[layer], self.v[layer]


class PagedKVCache(KVCache):
    """Keys and values of many sequences in one shared pool of fixed-size blocks (Kwon et al. 2023, vLLM).

    A sequence owns a list of blocks, its block table: position p lives in block `table[p // block_size]`
    at offset `p % block_size`. Sequences come and go without moving anyone's keys, blocks holding the
    same prefix can be shared, and memory is reserved a block at a time, not a whole context per sequence.

    Before each forward pass the caller says, with `bind`, which blocks each row of the batch reads (block
    tables, padded with any block: slots past a row's position are masked) and which slot each fed token is
    written to (a padding token's slot is a scratch block nobody reads unmasked). `update` writes there and
    returns each row's keys and values gathered through its table, slot j holding position j, as the
    other caches do, so models attend to them unchanged.
    """

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.block_tables = self.slots = None

    def bind(self, block_tables: torch.Tensor, slots: torch.Tensor) -> None:
        """block_tables (B, n_blocks): the blocks each row reads, in position order; slots (B, T): where
        each fed token's key and value go, as block * block_size + offset."""
        self.block_tables, self.slots = block_tables, slots

    def update(self, layer, k, v, positions):
        out = []
        for pool, x in ((self.k[layer], k), (self.v[layer], v)):
            pool.view(-1, *pool.shape[2:])[self.slots] = x.transpose(1, 2)  # (B, T, n_kv, hd) into their slots
            rows = pool[self.block_tables]  # (B, n_blocks, block_size, n_kv, hd)
            out.append(rows.flatten(1, 2).transpose(1, 2))  # (B, n_kv, S, hd), slot j holding position j
        return out[0], out[1]


def new_cache(config, batch_size: int, max_seq_len: int | None = None, static: bool = False,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
    """An empty cache for a decoder whose config has n_layers, n_kv_heads, head_dim and max_seq_len."""
    if not static:
        return ContiguousKVCache(config.n_layers)
    return StaticKVCache(config.n_layers, batch_size, config.n_kv_heads, config.head_dim,
                         max_seq_len or config.max_seq_len, dtype, device)
