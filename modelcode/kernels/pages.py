"""Weights on 2 MB pages, for decoding on CPU.

A decode step streams every weight from memory once. On the usual 4 KB pages that crosses a page, and
takes a TLB miss, every 4 KB, and Linux gives a process 2 MB ("huge") pages only where it asks for them
(`/sys/kernel/mm/transparent_hugepage/enabled` is `madvise` on most distributions). So `install_cpu_kernels`
moves the model's large tensors onto memory it asked huge pages for (`madvise(MADV_HUGEPAGE)`, before
the first touch, which is when the kernel picks the pages): a copy, one tensor at a time, after which the
old memory is freed. Tensors that share memory (a fused layer and its members' views, tied embeddings)
keep sharing it.

Where the system gives no huge pages (THP `never`) the copy still works and only the speed-up is lost;
where madvise is missing (not Linux), nothing is moved.
"""

import mmap

import torch
from torch import nn

from modelcode.kernels.fuse import FusedSameInput

HUGE_PAGE = 2 * 2**20


def huge_page_bytes(nbytes: int) -> torch.Tensor | None:
    """An untouched uint8 tensor of `nbytes` starting on a 2 MB boundary, advised onto huge pages; None
    where that cannot be asked for.

    The memory is mapped here rather than taken from the allocator, which may hand out memory it has
    touched before (glibc serves allocations below its mmap threshold, raised to 32 MB as large blocks are
    freed, from its heap), and pages once touched stay 4 KB."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    # Private: mmap's default, a shared mapping, is shmem, which THP's `enabled` setting does not cover.
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        return None
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive while any view of it lives
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start:start + nbytes]


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters and buffers, and those of layers kept outside its module tree (a fused group's)."""
    seen, out = set(), []
    modules = list(model.modules())
    modules += [m.fused for m in modules if isinstance(m, FusedSameInput)]
    for module in modules:
        for t in [*module._parameters.values(), *module._buffers.values()]:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


@torch.inference_mode()  # in-place on the model's tensors, inference tensors among them
def move_to_huge_pages(model: nn.Module, min_bytes: int = HUGE_PAGE) -> int:
    """Move the model's CPU tensors whose memory is at least `min_bytes` onto huge pages, in place (the
    same tensor objects, their memory replaced); returns the bytes moved."""
    by_storage: dict[int, list[torch.Tensor]] = {}
    for t in _tensors(model):
        if t.device.type == "cpu" and t.untyped_storage().nbytes() >= min_bytes:
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    moved = 0
    for tensors in by_storage.values():
        old = tensors[0].untyped_storage()
        region = huge_page_bytes(old.nbytes())
        if region is None:
            return moved
        region.copy_(torch.empty(0, dtype=torch.uint8).set_(old))
        base = region.storage_offset()  # bytes, region being uint8
        for t in tensors:
            size = t.element_size()
            t.set_(region.untyped_storage(), (base + t.storage_offset() * size) // size, t.shape, t.stride())
        moved += old.nbytes()
    return moved
