"""The first-use build never hangs: real processes build, get SIGKILLed mid-build, wait on a held lock, run out of
time or find no compiler, each in a temporary ``TORCH_EXTENSIONS_DIR``, and every later process either loads
the kernels or falls back to the reference path with one warning, within a bounded time.

The subprocesses import the functional layer without the package ``__init__`` (which imports diffusers): it
imports torch only, and starting takes 4 s instead of 15 on a busy 2-core machine. The tests that let a build run
to its end (about a minute each: after a SIGKILL midway, and after a kill of the parent only) are marked slow; the
CI tests stop every build they start within seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import diffusers_otq
from diffusers_otq.functional import cpu_kernels, kernel_build
from diffusers_otq.functional.kernel_build import BUILD_TIMEOUT_ENV, build_timeout


fcntl = pytest.importorskip("fcntl")  # the lock and the process groups tested here are POSIX's

_PACKAGE = str(Path(diffusers_otq.__file__).parent)
_FIRST_USE = f"""
import json, logging, sys, time, types
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
package = types.ModuleType("diffusers_otq")
package.__path__ = [{_PACKAGE!r}]
sys.modules["diffusers_otq"] = package
import torch
from diffusers_otq.functional import cpu_kernels
from diffusers_otq.functional.dequant_ops import dequantize_rows, reference_dequantize
from diffusers_otq.functional.kernel_check import check_layers
started = time.monotonic()
module = cpu_kernels.load()
seconds = time.monotonic() - started
layer = check_layers(torch.device("cpu"))[1]
args = (layer.packed, layer.codebook, layer.scales, layer.rows, layer.n, layer.bits, torch.float32)
equal = torch.equal(dequantize_rows(*args), reference_dequantize(*args))
print(json.dumps({{"loaded": module is not None, "seconds": seconds, "equal": equal}}), flush=True)
"""
"""A fresh process's first use of the CPU kernels: loads them (or not), then checks the op against the reference."""

needs_compiler = pytest.mark.skipif(cpu_kernels.load() is None, reason="the CPU kernels cannot be built here")

BUILDING = "Building the OTQ CPU kernels"
WAITING = "Waiting for another process to finish building"
UNAVAILABLE = "OTQ CPU kernels unavailable"


@pytest.fixture
def extensions_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``TORCH_EXTENSIONS_DIR`` for this test and the processes it starts."""
    root = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    for name in (BUILD_TIMEOUT_ENV, "DIFFUSERS_OTQ_NO_CPU_KERNELS", "CXX"):
        monkeypatch.delenv(name, raising=False)
    return root


def _start(**env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _FIRST_USE], env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def _first_use(timeout: float, **env: str) -> tuple[dict, str]:
    """Runs a fresh process's first use to the end, failing the test if it takes longer than ``timeout``."""
    process = _start(**env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(process.pid)
        pytest.fail(f"the first use hung: still running after {timeout} s")
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1]), stderr


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started, as when a job is killed: each process is stopped before its
    children are listed, so none escapes by starting another."""
    found: dict[int, psutil.Process] = {}
    frontier = [psutil.Process(pid)]
    while frontier:
        process = frontier.pop()
        with contextlib.suppress(psutil.NoSuchProcess):
            process.suspend()
            found[process.pid] = process
            frontier.extend(process.children())
    for process in found.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(list(found.values()), timeout=30)


def _lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _wait_for(path: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the first process ended before {path.name} appeared: {process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            _kill_tree(process.pid)
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if text in cmdline:
            found.append(cmdline[:200])
    return found


def _kill_midway() -> Path:
    """Start a first use and SIGKILL it (with its compiler) while it builds; returns the build folder."""
    directory = cpu_kernels.build_directory()
    first = _start()
    _wait_for(directory / "lock", first, timeout=120)  # torch's lock: the compiler is running
    time.sleep(1.0)
    _kill_tree(first.pid)
    first.communicate()
    assert (directory / "lock").exists(), "the killed build should have left torch's lock behind"
    assert _lock_is_free(directory / "build.lock"), "the operating system should have released the build lock"
    return directory


@needs_compiler
def test_a_build_killed_midway_leaves_no_hang_and_the_next_process_goes_on(extensions_dir: Path) -> None:
    """The next process neither waits for the dead build nor trips over its stale lock: it starts its own build at
    once (here with a 15 s limit, so it ends on the reference path with one warning; the slow test below lets it
    finish), and its results equal the reference."""
    directory = _kill_midway()
    started = time.monotonic()
    result, stderr = _first_use(timeout=120, **{BUILD_TIMEOUT_ENV: "15"})
    assert time.monotonic() - started < 90, stderr[-3000:]
    assert f"Removed {directory / 'lock'}, left behind by a build that was killed" in stderr
    assert stderr.count(BUILDING) == 1 and WAITING not in stderr
    assert result["loaded"] or stderr.count(UNAVAILABLE) == 1, stderr[-3000:]
    assert result["equal"]


@pytest.mark.slow
@needs_compiler
def test_a_build_killed_midway_leaves_no_hang_and_the_next_process_builds(extensions_dir: Path) -> None:
    directory = _kill_midway()
    result, stderr = _first_use(timeout=540, **{BUILD_TIMEOUT_ENV: "480"})
    assert result["loaded"] and result["equal"], stderr[-3000:]
    assert stderr.count(BUILDING) == 1 and WAITING not in stderr
    assert f"Removed {directory / 'lock'}, left behind by a build that was killed" in stderr

    fd = os.open(directory / "build.lock", os.O_RDWR)  # held here: a finished build loads without the lock
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        again, stderr = _first_use(timeout=120)
    finally:
        os.close(fd)
    assert again["loaded"] and again["equal"] and again["seconds"] < 5, (again, stderr[-3000:])
    assert BUILDING not in stderr and WAITING not in stderr


def test_waiting_for_a_build_that_does_not_finish_falls_back_with_one_warning(extensions_dir: Path) -> None:
    directory = cpu_kernels.build_directory()
    directory.mkdir(parents=True)
    fd = os.open(directory / "build.lock", os.O_RDWR | os.O_CREAT)  # this process is "building"
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"pid {os.getpid()} (the test)".encode())
    try:
        result, stderr = _first_use(timeout=120, **{BUILD_TIMEOUT_ENV: "2"})
    finally:
        os.close(fd)
    assert not result["loaded"] and result["equal"]
    assert 2 <= result["seconds"] < 30
    assert stderr.count(WAITING) == 1 and f"pid {os.getpid()} (the test)" in stderr
    assert stderr.count(UNAVAILABLE) == 1 and f"gave up after 2 s ({BUILD_TIMEOUT_ENV}) waiting" in stderr
    assert BUILDING not in stderr


def test_a_build_past_the_deadline_is_killed_with_its_compiler(extensions_dir: Path) -> None:
    result, stderr = _first_use(timeout=120, **{BUILD_TIMEOUT_ENV: "5"})
    assert not result["loaded"] and result["equal"]
    assert result["seconds"] < 5 + 15  # the deadline plus the kill grace and some slack
    assert stderr.count(BUILDING) == 1
    assert stderr.count(UNAVAILABLE) == 1 and f"did not finish within 5 s ({BUILD_TIMEOUT_ENV}" in stderr
    time.sleep(0.5)
    assert not _processes_mentioning(str(extensions_dir)), "a compiler outlived the deadline"


def test_without_a_compiler_the_reference_path_is_used_and_the_reason_logged_once(extensions_dir: Path) -> None:
    result, stderr = _first_use(timeout=120, CXX=str(extensions_dir / "no-such-compiler"))
    assert not result["loaded"] and result["equal"]
    assert stderr.count(UNAVAILABLE) == 1
    assert "no-such-compiler: not found" in stderr and "a C++ compiler, ninja and the Python headers" in stderr


@pytest.mark.slow
@needs_compiler
def test_a_killed_parent_leaves_its_build_running_and_the_next_process_waits_for_it(extensions_dir: Path) -> None:
    directory = cpu_kernels.build_directory()
    first = _start()
    _wait_for(directory / "lock", first, timeout=120)
    first.kill()  # the parent only: its builder (own process group, holding the lock) finishes the build
    first.communicate()
    result, stderr = _first_use(timeout=540, **{BUILD_TIMEOUT_ENV: "480"})
    assert result["loaded"] and result["equal"], stderr[-3000:]
    assert stderr.count(WAITING) == 1 and BUILDING not in stderr


def test_the_build_folder_is_keyed_by_python_torch_and_source(extensions_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    folder = kernel_build.build_directory("ext", "int f();", ["-O3"])
    tag = f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}"
    assert folder.parent == extensions_dir / "diffusers_otq"
    assert folder.name.startswith(f"{tag}-torch{torch.__version__}-")
    assert kernel_build.build_directory("ext", "int f();", ["-O3"]) == folder
    assert kernel_build.build_directory("ext", "int g();", ["-O3"]) != folder
    assert kernel_build.build_directory("ext", "int f();", ["-O2"]) != folder
    monkeypatch.setattr(torch, "__version__", "9.9.9+other")
    assert kernel_build.build_directory("ext", "int f();", ["-O3"]).name.startswith(f"{tag}-torch9.9.9+other-")


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan", "inf"])
def test_a_bad_timeout_names_the_value_and_the_fix(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(BUILD_TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=rf"{BUILD_TIMEOUT_ENV} must be a positive number of seconds, got '{value}'"):
        build_timeout()


def test_the_timeout_defaults_to_ten_minutes_and_reads_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BUILD_TIMEOUT_ENV, raising=False)
    assert build_timeout() == kernel_build.DEFAULT_BUILD_TIMEOUT_S == 600
    monkeypatch.setenv(BUILD_TIMEOUT_ENV, "90.5")
    assert build_timeout() == 90.5
