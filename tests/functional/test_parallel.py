"""run_tasks: order, errors, the per-thread intra-op setting; fit_workers per device."""

from __future__ import annotations

import threading

import pytest
import torch

from diffusers_otq.functional.parallel import fit_workers, intra_op_threads, run_tasks, run_tasks_single_threaded


def test_results_come_back_in_task_order() -> None:
    tasks = [lambda i=i: torch.full((3,), float(i)).sum().item() for i in range(7)]
    assert run_tasks(tasks, workers=3) == [3.0 * i for i in range(7)]
    assert run_tasks(tasks, workers=1) == [3.0 * i for i in range(7)]


def test_tasks_run_on_worker_threads_with_one_intra_op_thread_each() -> None:
    caller_threads = torch.get_num_threads()
    seen = run_tasks([lambda: (threading.get_ident(), torch.get_num_threads())] * 4, workers=2)
    assert {threads for _, threads in seen} == {1}
    assert threading.get_ident() not in {ident for ident, _ in seen}
    assert torch.get_num_threads() == caller_threads  # the caller's setting is untouched


def test_a_failing_task_raises_its_exception() -> None:
    def fail() -> None:
        raise ValueError("task 2 failed")

    with pytest.raises(ValueError, match="task 2 failed"):
        run_tasks([lambda: 1, fail, lambda: 3], workers=2)


def test_workers_follow_the_thread_budget_on_cpu_and_are_one_elsewhere() -> None:
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert fit_workers(torch.device("cpu")) == 2
        assert fit_workers(torch.device("meta")) == 1
    finally:
        torch.set_num_threads(previous)


def test_single_threaded_tasks_run_with_one_intra_op_thread_wherever_they_run() -> None:
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        probe = [lambda: torch.get_num_threads()]
        assert run_tasks(probe, workers=2) == [2]  # one task runs in the calling thread, with its setting
        assert run_tasks_single_threaded(probe, workers=2) == [1]
        assert run_tasks_single_threaded(probe * 3, workers=2) == [1, 1, 1]
        assert run_tasks_single_threaded(probe * 3, workers=1) == [1, 1, 1]
        assert torch.get_num_threads() == 2
        with intra_op_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
