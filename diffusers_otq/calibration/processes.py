"""Several processes (``accelerate launch --num_processes N``): who runs which batch, and exact sums across them.

Calibration splits its batches across processes: process ``r`` of ``w`` runs batches ``r, r + w, ...``. Sums
are made in batch order whatever the process count: after each round of ``w`` batches every process gathers
the round's per-batch sums (zeros from a process without a batch in that round) and adds them to its totals in
rank order, which is batch order. The float64 additions are therefore the same, in the same order, as with one
process: the statistics, and everything fitted from them, are the same bits.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .statistics import LayerStatistics


__all__ = ["add_flat", "all_gather_objects", "barrier", "gather_in_order", "rank_and_world"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world)``; starts accelerate's process group when launched with several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_in_order(
    batch: dict[str, LayerStatistics] | None, template: dict[str, LayerStatistics], world: int
) -> list[torch.Tensor]:
    """Every process's batch statistics of this round as flat float64 tensors, in rank order (zeros from a
    process without a batch); add them with :func:`add_flat`."""
    source = batch if batch is not None else template
    tensors = [t for name in template for t in source[name].tensors()]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if batch is None:
        flat.zero_()
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    parts = [torch.empty_like(flat, device=device) for _ in range(world)]
    torch.distributed.all_gather(parts, flat.to(device))
    return [p.to(flat.device) for p in parts]


def add_flat(totals: dict[str, LayerStatistics], flat: torch.Tensor) -> None:
    """``totals += flat`` (a flat tensor of :func:`gather_in_order`), tensor by tensor in ``totals`` order."""
    offset = 0
    for stats in totals.values():
        for t in stats.tensors():
            size = t.numel()
            t += flat[offset : offset + size].view_as(t)
            offset += size


def all_gather_objects(value: Any, world: int) -> list[Any]:
    """``value`` of every process, in rank order (pickled by torch.distributed: tensors travel exactly)."""
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def barrier(world: int) -> None:
    """Wait for every process (nothing with one process)."""
    if world > 1:
        torch.distributed.barrier()
