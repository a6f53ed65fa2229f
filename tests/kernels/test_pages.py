"""Moving weights onto huge pages: the same tensors, values and sharing, on memory advised for 2 MB pages."""

import mmap
from pathlib import Path

import pytest
import torch

import modelcode
from modelcode.kernels import kernels_available, pack_bf16_linears
from modelcode.kernels.fuse import fuse_projections
from modelcode.kernels.pages import HUGE_PAGE, huge_page_bytes, move_to_huge_pages

LINUX_MADVISE = pytest.mark.skipif(
    not hasattr(mmap, "MADV_HUGEPAGE") or not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(),
    reason="madvise(MADV_HUGEPAGE) needs Linux with transparent huge pages built in")


def vm_flags(address: int) -> list[str]:
    """The flags of this process's mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            start, end = (int(a, 16) for a in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@LINUX_MADVISE
def test_huge_page_bytes_are_aligned_and_advised():
    region = huge_page_bytes(3 * HUGE_PAGE + 100)
    assert region.dtype == torch.uint8 and region.numel() == 3 * HUGE_PAGE + 100
    assert region.data_ptr() % HUGE_PAGE == 0
    assert "hg" in vm_flags(region.data_ptr())  # MADV_HUGEPAGE applied: the kernel may back it with 2 MB pages
    region.fill_(7)
    assert int(region.sum()) == 7 * region.numel()


@LINUX_MADVISE
@pytest.mark.parametrize("inference", [False, True])
def test_moving_keeps_values_sharing_and_tensor_objects(inference):
    with torch.inference_mode(inference):  # inference tensors too (a model made inside inference mode)
        lm = modelcode.load("tinystories-656k", dtype="bfloat16")
    model = lm.model
    if kernels_available():
        pack_bf16_linears(model)
        fuse_projections(model)
    tokens = torch.tensor([lm.tokenizer.encode("Once upon a time", bos=True)])
    with torch.inference_mode():
        before = model(tokens)
        state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    tensors = [*params.values(), *model.buffers()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}

    moved = move_to_huge_pages(model, min_bytes=0)  # the small model's tensors too

    assert moved == sum(storages.values())  # each storage once, however many tensors share it (tied, fused)
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    with torch.inference_mode():
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        assert torch.equal(model(tokens), before)
    embedding = model.tok_embeddings.weight
    assert embedding.data_ptr() % HUGE_PAGE == 0 and "hg" in vm_flags(embedding.data_ptr())
    if kernels_available():  # a fused layer's members still view its matrix
        attention = model.layers[0].attention
        fused = attention.qkv.fused.weight
        assert attention.wk.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()


@LINUX_MADVISE
def test_small_tensors_stay_and_moved_parameters_still_train():
    model = torch.nn.Sequential(torch.nn.Linear(16, 1024), torch.nn.Linear(1024, 1024))  # 64 KB, 4 MB
    small, large = model[0].weight.data_ptr(), model[1].weight.data_ptr()
    x = torch.randn(2, 16)
    before = model(x)
    assert move_to_huge_pages(model) == 1024 * 1024 * 4
    assert model[0].weight.data_ptr() == small and model[1].weight.data_ptr() != large
    assert torch.equal(model(x), before)
    model(x).sum().backward()
    assert model[1].weight.grad.shape == (1024, 1024)
