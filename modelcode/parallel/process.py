"""Joining a tensor-parallel run: one process per rank, started by torchrun, which puts RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address in each one's environment. Ranks talk over gloo on CPU and NCCL on GPU.
"""

import os

import torch
import torch.distributed as dist

from modelcode.parallel.ranks import launched_by_torchrun
from modelcode.parallel.shard import TensorParallel


def start(tp: int, device: str | torch.device) -> tuple[TensorParallel | None, torch.device]:
    """Join the run's process group (once per process) as one of its `tp` ranks: this rank's share and device
    (cuda:LOCAL_RANK on GPU). tp=1 outside torchrun, or in a run of one process, splits nothing (None)."""
    if tp < 1:
        raise ValueError(f"tp={tp}: give the number of ranks to split the model across, 1 or more")
    if tp == 1 and not launched_by_torchrun():
        return None, torch.device(device)
    if not launched_by_torchrun():
        raise ValueError(f"tp={tp} runs one process per rank, started by torchrun: torchrun --standalone "
                         f"--nproc-per-node {tp} --no-python modelcode generate ... --tp {tp}")
    world = int(os.environ["WORLD_SIZE"])
    if world != tp:
        raise ValueError(f"tp={tp} but torchrun started {world} processes: launch with --nproc-per-node {tp}, "
                         f"or pass --tp {world}")
    device = torch.device(device)
    if tp == 1:
        return None, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    same_random_state(device)
    return TensorParallel(dist.get_rank(), world, dist.group.WORLD), device


def same_random_state(device: torch.device) -> None:
    """Seed every rank's default generator alike (rank 0 draws the seed), so that unseeded sampling draws the
    same tokens on all of them."""
    seed = torch.randint(2**62, (1,), device=device)
    dist.broadcast(seed, src=0)
    torch.manual_seed(int(seed))
