"""Which rank this process is, for the CLI: every rank runs the same program on the same inputs and, since
collectives hand each rank the same sums and the same gathered logits, computes the same tokens; so only rank 0
prints them, and only rank 0 reads the terminal (`read_line` hands each line to the others). Light on imports:
the CLI calls these before it loads anything.
"""

import contextlib
import os
import sys
import traceback


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_first_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def quiet_other_ranks() -> None:
    """Under torchrun, let only rank 0 print: the others' stdout and stderr go nowhere, except the traceback of
    a crash, which still reaches the terminal, tagged with its rank."""
    if is_first_rank():
        return
    rank = os.environ["RANK"]
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (open for the life of the process)

    def report(kind, value, tb):
        print(f"[rank {rank}] " + "".join(traceback.format_exception(kind, value, tb)), file=sys.__stderr__)

    sys.excepthook = report


def read_line(prompt: str) -> str | None:
    """`input(prompt)` on rank 0, the same line on every rank (None at the end of input or on Ctrl-C)."""
    line = [None]
    if is_first_rank():
        with contextlib.suppress(EOFError, KeyboardInterrupt):
            line[0] = input(prompt)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(line, src=0)
    return line[0]
