"""Compiled decoding, after gpt-fast: a static KV cache and compiled decode steps.

Eager decoding pays, for every new token, the Python and dispatch cost of each op of the model, and a
growing cache changes shapes at every step. Here the cache is preallocated for a fixed number of
positions (slot j holds position j, written in place), and positions travel as tensors, never as Python
ints: every decode step of a given batch size has the same shapes and the same graph, so the step is
compiled once per batch size, whatever the prompt lengths or the number of new tokens.

What is compiled is `decode_steps`: k decode steps in one call, each feeding one token per sequence and
sampling the next inside the graph (greedy, or from noise drawn outside with the caller's seeded
generator, so results equal plain generation's). A call costs a fixed ~0.1 ms on CPU besides its
kernels (dynamo's guards, the wrappers, the host reading the new tokens, Python's loop): nothing beside a
1B model's step, but a large part of a 656K one's (see BENCHMARKS.md). So small models unroll
k = 8 steps per call (and check for stops after each call, dropping what a finished sequence sampled
past its end); large ones take k = 1, as k multiplies the compile time. Prefill runs eagerly: its shapes
change with every prompt, and it is a few large matrix products, where eager kernels already run well.

How the step is compiled depends on the device. On GPU the step is recorded as a CUDA graph and
replayed, all its kernels with one launch (`mode="reduce-overhead"`), and `decode` launches each call
before the host reads the last one's tokens, so the GPU never waits for the host's stop checks. On CPU
inductor writes C++; with `freeze` it takes the weights as constants, which lets `autotune` time its own
C++ micro-GEMMs (AMX or AVX-512, on weights prepacked for them) against the library kernels, shape by
shape, and keep the faster.
For the one-row matmuls of decoding its kernels stream weights faster than eager `F.linear` (see
BENCHMARKS.md). The price: a second, prepacked copy of the weights in memory (a third, briefly, while
compiling), a longer compile, and weights that must not change afterwards. Faster still are modelcode's own
CPU kernels, which `LM.compile` installs on the model first (`quantization.host.prepare_decoding`): the layers
they take are no longer plain Linear layers, so inductor leaves them to those kernels, with no second copy.

Small models on CPU do not compile their steps in each process: `aot.py` compiles them ahead of time once per
machine and keeps them on disk, and a later process loads them in about 0.1 s.
"""

import dataclasses

import torch
from torch import nn

from modelcode.errors import ArgumentError
from modelcode.generation import aot
from modelcode.generation.generate import decode_step, decode_steps
from modelcode.generation.sampling import SamplingParams, exponential_race
from modelcode.kernels.cpu import attention_kernel_available
from modelcode.layers import KVCache, StaticKVCache

# Positions a compiled model keeps cache slots for, unless told otherwise (or the model's context if smaller).
# Every step attends over all the slots (masked), so a cache far longer than needed costs time.
DEFAULT_MAX_SEQ_LEN = 2048

# Graphs of the compiled steps in one process (batch sizes x sampling settings x compiled models), at most.
MAX_GRAPHS = 256

# Inductor's C++ kernels run on one thread unless each thread would get at least this many values (see below).
PARALLEL_KERNEL_MIN_VALUES_PER_THREAD = 16384

# Models with at most this many bytes of weights decode several steps per compiled call (see above).
SMALL_MODEL_BYTES = 64 * 2**20
SMALL_MODEL_STEPS_PER_CALL = 8


def default_steps_per_call(model: nn.Module) -> int:
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return SMALL_MODEL_STEPS_PER_CALL if weight_bytes <= SMALL_MODEL_BYTES else 1


def saves_steps(model: nn.Module) -> bool:
    """Whether a model's compiled steps are kept on disk per machine by default (`aot.py`): small enough for several
    steps per call, on CPU, outside torch.distributed."""
    split = torch.distributed.is_available() and torch.distributed.is_initialized()
    return next(model.parameters()).device.type == "cpu" and not split and default_steps_per_call(model) > 1


def compile_settings(device: torch.device, freeze: bool = True, autotune: bool = True) -> tuple[dict, dict]:
    """For a decode step on this device: keyword arguments for `torch.compile`, and the inductor settings
    to hold while it compiles."""
    if device.type == "cuda":
        return {"mode": "reduce-overhead"}, {}  # CUDA graphs
    # The C++ wrapper calls the kernels from C++ rather than Python: it matters for small models. A decode
    # step's elementwise kernels and norms are small (a few thousand values per sequence): starting and joining
    # threads costs more than it saves below ~16K values per thread, so those run on one (llama-1b int4 batch 1:
    # ~5% faster; inductor's default splits from 512).
    # The C++ wrapper cannot call torch.distributed's collectives: a tensor-parallel model keeps Python's.
    split = torch.distributed.is_available() and torch.distributed.is_initialized()
    settings = {"cpp_wrapper": not split, "cpp.min_chunk_size": PARALLEL_KERNEL_MIN_VALUES_PER_THREAD}
    if freeze:
        # Freezing folds the weights into the compiled code as constants (inference only); max_autotune
        # times inductor's C++ GEMMs, which need constant weights, against the library's for each shape.
        settings |= {"freezing": True, "max_autotune": autotune, "max_autotune_report_choices_stats": False,
                     "autotune_num_choices_displayed": 0}
    return {}, settings


class CompiledModel:
    """Stands in for a causal LM in `generate`, `TextStream` and `ChatSession`: same `config`,
    `parameters`, `new_cache`, `hidden_states`, `logits` and `__call__` (all eager: prefill), and a compiled
    `decode_steps`, which `decode` uses in place of its one-step `generate.decode_steps`.

    Its context is `max_seq_len` positions (prompt and new tokens together); `config.max_seq_len` says so
    to the generation code, which ends sequences there. It keeps one static cache per batch size and hands
    the same one out again, so a compiled model serves one generation (or one chat) at a time.

    `steps_per_call`: decode steps per compiled call (default: 8 for models of at most 64 MiB of weights,
    else 1). `freeze` compiles the weights in as constants (fastest, twice the memory of the weights left to
    inductor's GEMMs, weights must not change afterwards); `autotune`, with `freeze`, lets inductor time its
    own matmul kernels (slower to compile). On GPU both are ignored: the steps run as a CUDA graph. One graph is
    compiled per batch size and sampling setting (temperature, top-k, top-p, logprobs or not).

    `saved` (default: for models small enough for several steps per call, on CPU, outside torch.distributed)
    keeps each graph compiled ahead of time on disk, per machine (`aot.py`), and loads it from there when it
    is; `build=False` never compiles: a graph not on disk runs as eager steps. `fingerprint` names the
    weights in the store (default: a hash of them as they are now).
    """

    def __init__(self, model: nn.Module, max_seq_len: int | None = None, freeze: bool = True, autotune: bool = True,
                 steps_per_call: int | None = None, saved: bool | None = None, build: bool = True,
                 fingerprint: str | None = None):
        context = model.config.max_seq_len
        if max_seq_len is not None and not 1 < max_seq_len <= context:
            raise ValueError(f"max_seq_len={max_seq_len} for the compiled cache must be between 2 and the model's "
                             f"context ({context} positions)")
        if steps_per_call is not None and steps_per_call < 1:
            raise ArgumentError("steps_per_call", f"must be at least 1, got {steps_per_call}")
        self.model = model
        self.max_seq_len = max_seq_len or min(context, DEFAULT_MAX_SEQ_LEN)
        self.config = dataclasses.replace(model.config, max_seq_len=self.max_seq_len)
        self.steps_per_call = steps_per_call or default_steps_per_call(model)
        self.device = next(model.parameters()).device
        self._caches: dict[int, StaticKVCache] = {}
        kwargs, self._inductor_settings = compile_settings(self.device, freeze, autotune)
        self.saved, self.build = saves_steps(model) if saved is None else saved, build
        if not self.saved:  # (saved steps are exported instead, and loading them needs no part of dynamo: ~0.5 s)
            torch.compiler.assume_constant_result(attention_kernel_available)  # it reads files: dynamo cannot trace it
            # dynamic=False: one graph per batch size, specialized to its shapes, never a symbolic one.
            self._steps = torch.compile(self._unrolled_steps, fullgraph=True, dynamic=False, **kwargs)
        self._compiled: set[tuple] = set()  # (batch size, sampling settings) whose steps have been compiled
        self._packages: dict[tuple, object] = {}  # key -> loaded package (`saved`)
        self.unbuilt: set[tuple] = set()  # keys that ran eagerly for want of a package (`build=False`)
        self.fingerprint = (fingerprint or aot.model_fingerprint(model)) if self.saved else None

    def _unrolled_steps(self, tokens: torch.Tensor, positions: torch.Tensor, last_position: torch.Tensor,
                        cache: KVCache, races: torch.Tensor | None, temperature: float, top_k: int | None,
                        top_p: float, logprobs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What is compiled: `decode_step` k times, unrolled, the sampled token fed straight back."""
        params = SamplingParams(temperature, top_k, top_p)
        new, lps = [], []
        for i in range(self.steps_per_call):
            next_tokens, lp = decode_step(self.model, cache, tokens, positions + i, last_position, params, logprobs,
                                          race=None if races is None else races[i])
            new.append(next_tokens)
            lps.append(lp)
            tokens = next_tokens[:, None]
        return torch.stack(new, 1), torch.stack(lps, 1) if logprobs else None

    def decode_steps(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                     last_position: int | torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                     logprobs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`generate.decode_steps`'s contract, k steps at once: (B, k) new ids and (B, k) logprobs (or None)."""
        batch = tokens.shape[0]
        if cache is not self._caches.get(batch):  # a cache that is not ours: one eager step
            return decode_steps(self.model, cache, tokens, positions, last_position, params, generator, logprobs)
        races = None
        if params.temperature > 0:  # the noise each step samples with, in the order plain decoding draws it
            shape = (batch, self.config.vocab_size)
            races = torch.stack([exponential_race(shape, self.device, generator) for _ in range(self.steps_per_call)])
        # The graph is specialized to its inputs' strides: the last column of k > 1 steps' output is copied out.
        tokens = tokens[:, -1:]
        if tokens.stride() != (1, 1):
            tokens = tokens.clone(memory_format=torch.contiguous_format)
        args = (tokens, positions, torch.as_tensor(last_position, device=self.device), cache, races,
                params.temperature, params.top_k, params.top_p, logprobs)
        key = (batch, params, logprobs)
        if self.saved:
            return self._saved_steps(key, args)
        if key in self._compiled:
            # All that can tell this call's inputs from another's is in `key`, and its graph is compiled: of
            # dynamo's guards (every weight's metadata: 0.7 ms a call for llama-1b) only those that tell the
            # compiled graphs apart need to run.
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self._cloned(self._steps(*args))
        from torch._inductor import config  # imported here: it takes a second, and only compiling needs it

        # The first call compiles. Dynamo reads `freezing` while it traces, i.e. inside this call, so the
        # settings are held around it (global config, restored on exit). Every CompiledModel shares the code
        # of `_unrolled_steps`, whose graphs dynamo caps at 8 to catch accidental recompiles; each new key
        # here is a deliberate one.
        with config.patch(self._inductor_settings), torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS):
            try:
                out = self._steps(*args)
            except torch._dynamo.exc.TorchDynamoException as e:
                raise ValueError(f"torch.compile cannot capture {type(self.model).__name__}'s decode step as one "
                                 "graph (e.g. dynamic NTK rotary scaling reads the largest position on the host "
                                 f"every step): generate without compile. The compiler said: {e}") from e
        self._compiled.add(key)
        return self._cloned(out)

    def _saved_steps(self, key: tuple, args: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The steps through this key's package: loaded from the store (compiled into it first if missing);
        without a package and `build=False`, the same steps run eagerly."""
        if key in self.unbuilt:  # found missing before (`build=False`): runs eagerly without looking again
            return self._unrolled_steps(*args)
        tokens, positions, last_position, cache, races = args[:5]
        inputs = (tokens, positions, last_position, tuple(cache.k), tuple(cache.v))
        inputs += () if races is None else (races,)
        package = self._packages.get(key)
        if package is None:
            settings = {k: v for k, v in self._inductor_settings.items() if k != "cpp_wrapper"}  # AOT: always C++
            path = aot.package_path(self.fingerprint, aot.graph_fingerprint(
                key, self.steps_per_call, self.max_seq_len, sorted(settings.items())))
            if not path.exists():
                if not self.build:
                    self.unbuilt.add(key)
                    return self._unrolled_steps(*args)
                with torch.inference_mode(False):  # export traces ordinary tensors
                    example = tuple(torch.utils._pytree.tree_map(torch.clone, inputs))
                try:
                    aot.build_package(_Steps(self, *key[1:]), example, settings, path)
                except Exception as e:  # export's and inductor's errors share no base class
                    raise ValueError(f"torch.export cannot capture {type(self.model).__name__}'s decode step as one "
                                     f"graph: generate without compile. It said: {e}") from e
            package = self._packages[key] = aot.load_package(path)
        out = package(*inputs)
        return (out[0], out[1]) if key[2] else (out if isinstance(out, torch.Tensor) else out[0], None)

    def _cloned(self, out: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
        # A CUDA graph's outputs live in memory its next replay overwrites, and the tokens are fed back in.
        if self.device.type != "cuda":
            return out
        return tuple(None if t is None else t.clone() for t in out)

    def parameters(self, recurse: bool = True):
        return self.model.parameters(recurse)

    def new_cache(self, batch_size: int) -> StaticKVCache:
        """This batch size's static cache (made on first use, then reused: slots past a sequence's
        position are masked, so what an earlier generation left there is never seen)."""
        if batch_size not in self._caches:
            cache = self.model.new_cache(batch_size, self.max_seq_len, static=True)
            if self.device.type == "cuda":
                for t in cache.k + cache.v:  # the CUDA graph reads and writes these in place, never copies
                    torch._dynamo.mark_static_address(t)
            self._caches[batch_size] = cache
        return self._caches[batch_size]

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        return self.model.hidden_states(tokens, positions, cache)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.logits(h)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                 cache: KVCache | None = None) -> torch.Tensor:
        return self.model(tokens, positions, cache)


class _Steps(nn.Module):
    """A compiled model's unrolled steps for one sampling setting, as a module over the cache's tensors: what
    `aot.build_package` exports. Returns the new ids, and their logprobs when asked for."""

    def __init__(self, compiled: CompiledModel, params: SamplingParams, logprobs: bool):
        super().__init__()
        self.model = compiled.model  # the weights, as the exported program's constants
        self.unrolled, self.params, self.logprobs = compiled._unrolled_steps, params, logprobs

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, last_position: torch.Tensor,
                k: tuple[torch.Tensor, ...], v: tuple[torch.Tensor, ...], races: torch.Tensor | None = None):
        p = self.params
        ids, lps = self.unrolled(tokens, positions, last_position, StaticKVCache.over(k, v), races, p.temperature,
                                 p.top_k, p.top_p, self.logprobs)
        return (ids, lps) if self.logprobs else ids
