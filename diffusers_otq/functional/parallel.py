"""Running independent tensor tasks on the CPU cores torch is allowed to use.

Codebook fits are row-wise and their PyTorch ops are small (a row holds a few thousand values), so torch's own
intra-op threads leave most of a second core idle. Running whole row chunks side by side in worker threads
(each with one intra-op thread; the ops release the GIL) uses every core instead. The results do not depend on
the number of workers: every task is computed exactly as it would be alone and results come back in task order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch


__all__ = ["fit_workers", "intra_op_threads", "run_tasks", "run_tasks_single_threaded"]

T = TypeVar("T")


def fit_workers(device: torch.device) -> int:
    """Worker threads for CPU fits: ``torch.get_num_threads()`` (the user's thread budget); 1 on accelerators,
    whose kernels are already parallel."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


def _single_intra_op_thread() -> None:
    torch.set_num_threads(1)  # per thread: the caller's own setting is left alone


def run_tasks(tasks: Sequence[Callable[[], T]], workers: int) -> list[T]:
    """Run ``tasks`` on up to ``workers`` threads; return their results in task order.

    Args:
        tasks: independent callables (they must not write to shared tensors' overlapping regions).
        workers: thread count; 1 (or a single task) runs them in the calling thread.

    Returns:
        ``[task() for task in tasks]``, the first exception raised by a task is re-raised.
    """
    if workers <= 1 or len(tasks) <= 1:
        return [task() for task in tasks]
    with ThreadPoolExecutor(max_workers=min(workers, len(tasks)), initializer=_single_intra_op_thread) as pool:
        futures = [pool.submit(task) for task in tasks]
        return [future.result() for future in futures]


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads in the calling thread; its own setting is restored after.

    Some multi-threaded kernels (LAPACK factorisations, large reductions) sum in an order that depends on their
    thread count; work that must give the same bits for any thread budget runs them with one thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_tasks_single_threaded(tasks: Sequence[Callable[[], T]], workers: int) -> list[T]:
    """:func:`run_tasks` where every task runs with one intra-op thread, also when they run in the calling thread
    (one task, or one worker): the results are then the same bits for any number of workers."""
    if workers <= 1 or len(tasks) <= 1:
        with intra_op_threads(1):
            return [task() for task in tasks]
    return run_tasks(tasks, workers)
