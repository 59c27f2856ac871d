"""Several processes on one job (`accelerate launch`, torchrun): who am I, wait for the others, share
what each trained.

Process index and count come from the launcher's environment (`RANK`, `WORLD_SIZE`); "rank" in
conceptkit always means a LoRA rank, never a process.
"""

from __future__ import annotations

import os

import torch


def processes() -> tuple[int, int]:
    """(this process's index, the number of processes): (0, 1) without a launcher."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def barrier(count: int) -> None:
    """Wait until every one of `count` processes is here (nothing to wait for alone)."""
    if count > 1:
        from accelerate import PartialState  # only launched runs pay for importing accelerate

        PartialState().wait_for_everyone()


def share_rows(params, mine: torch.Tensor) -> None:
    """Every process ends with every row: rows `mine` (dim 0) of each parameter are this process's,
    the others' are summed in from the processes that own them (a process's own rows stay exact)."""
    import torch.distributed as dist

    for p in params:
        keep = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
        keep[mine.to(p.device)] = True
        with torch.no_grad():
            mask = keep.view(-1, *([1] * (p.dim() - 1))).to(p.dtype)
            p.mul_(mask)
            dist.all_reduce(p.data)


def sum_across(values: list[float]) -> list[float]:
    """The element-wise sum of `values` over every process."""
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return [float(v) for v in total]
