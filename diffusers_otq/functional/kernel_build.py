"""First-use build of C++ kernels that never hangs: a folder per interpreter and torch, an owner-bound lock, a bound.

``torch.utils.cpp_extension.load_inline`` alone builds into ``<root>/<py>_<accelerator>/<name>`` under a ``lock``
file that names no owner: a process killed while building leaves it behind and every later process waits on it
forever, silently; two virtual environments with different torch builds share that folder and rebuild in turn.
:func:`load_extension` wraps it:

* **One folder per interpreter, torch build and source** (:func:`build_directory`):
  ``<root>/diffusers_otq/<py tag>-torch<version>-<hash>/``, where ``<root>`` is ``TORCH_EXTENSIONS_DIR`` or torch's
  default extensions root (``~/.cache/torch_extensions``) and the hash covers the source, the compiler flags, the
  Python ABI and the torch build. A finished build leaves ``built.json`` there; later processes import the library
  straight away (no lock, no compiler run), so a machine builds once per Python/torch/source combination.
* **A lock that dies with its owner**: ``build.lock`` in that folder, held with ``fcntl.flock`` (the operating
  system releases it when its holder dies, however it dies); it names its holder (pid, host, start time) for the
  waiting message. Whoever holds it removes torch's own ``lock`` file, which can then only be a leftover of a
  killed build.
* **A bound**: waiting and building share one deadline, :data:`BUILD_TIMEOUT_ENV` seconds (default
  :data:`DEFAULT_BUILD_TIMEOUT_S`) from the first use. The compiler runs in a child process, in its own process
  group and holding the lock too, so it finishes (or is killed at the deadline, with the compiler it started)
  even when the process that started it is killed. Past the deadline :func:`load_extension` raises
  :class:`KernelBuildError` and callers take their reference path.
* **A visible message**: one ``WARNING`` when a build starts (what, where, about how long) and one when waiting
  for another process's build; the compiler's output goes to ``build.log`` in the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import torch


try:
    import fcntl
except ImportError:  # Windows: msvcrt byte-range locks, also released when their holder dies
    fcntl = None


__all__ = [
    "BUILD_TIMEOUT_ENV",
    "DEFAULT_BUILD_TIMEOUT_S",
    "KernelBuildError",
    "build_directory",
    "build_timeout",
    "load_extension",
]

logger = logging.getLogger(__name__)

BUILD_TIMEOUT_ENV = "DIFFUSERS_OTQ_KERNEL_BUILD_TIMEOUT"
"""Seconds a process spends at most on first use (waiting for another process's build plus its own build)."""
DEFAULT_BUILD_TIMEOUT_S = 600.0

_MARKER = "built.json"  # written last, atomically: the library next to it is complete and imports
_LOCK = "build.lock"
_TORCH_LOCK = "lock"  # torch.utils.file_baton.FileBaton's file inside the build folder
_LOG = "build.log"
_POLL_S = 0.2
_COMPILER_ERROR = re.compile(r"error|not found|No such file", re.IGNORECASE)
_NOT_MESSAGES = ("[", "FAILED:", "BUILD FAILED")  # ninja's progress and failed-step lines, ours
_KILL_GRACE_S = 5.0  # the child enforces the deadline itself; the parent stops it this much later
_TERM_GRACE_S = 3.0  # from SIGTERM to SIGKILL

# Runs in a fresh interpreter (no diffusers_otq import): reads its spec from stdin, builds with load_inline (which
# also imports the library, proving it loads) and writes the marker. SIGALRM at the deadline sends SIGTERM to its
# process group: itself and ninja, which passes it on to the compiler (ninja runs each command in a process group
# of its own, out of reach of the builder's group).
_BUILDER = r"""
import json, os, signal, sys
spec = json.loads(sys.stdin.read())
sys.path[:] = spec["sys_path"]
if hasattr(signal, "SIGALRM"):
    signal.signal(signal.SIGALRM, lambda *_: os.killpg(0, signal.SIGTERM))
    signal.alarm(spec["seconds"])
from torch.utils.cpp_extension import load_inline
try:
    module = load_inline(name=spec["name"], cpp_sources=[spec["source"]], extra_cflags=spec["cflags"],
                         build_directory=spec["directory"], verbose=True)
except Exception as err:
    lines = str(err).strip().splitlines()
    print("BUILD FAILED: %s: %s" % (type(err).__name__, lines[0] if lines else ""), flush=True)
    sys.exit(1)
marker = os.path.join(spec["directory"], spec["marker"])
with open(marker + ".tmp", "w") as f:
    json.dump({"module": spec["name"], "library": os.path.basename(module.__file__)}, f)
os.replace(marker + ".tmp", marker)
"""


class KernelBuildError(RuntimeError):
    """The extension could not be built or loaded (in time); the message says why, where, and what to do."""


def build_timeout() -> float:
    """Seconds allowed for first use, from :data:`BUILD_TIMEOUT_ENV` (default :data:`DEFAULT_BUILD_TIMEOUT_S`).

    Raises:
        ValueError: the variable is set to something other than a positive, finite number of seconds.
    """
    raw = os.environ.get(BUILD_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_BUILD_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(
            f"{BUILD_TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}; set e.g. "
            f"{BUILD_TIMEOUT_ENV}=900, or unset it for the default {DEFAULT_BUILD_TIMEOUT_S:.0f} s."
        )
    return seconds


def _fingerprint(name: str, source: str, cflags: Sequence[str]) -> tuple[str, str]:
    """``(folder name, hash)`` of everything the library depends on."""
    python_tag = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    torch_build = [
        torch.__version__,
        str(getattr(torch.version, "git_version", "")),
        str(torch.version.cuda),
        str(getattr(torch.version, "hip", None)),
        str(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "")),
    ]
    interpreter = [python_tag, sys.implementation.name, sys.platform, platform.machine()]
    parts = [name, source, *cflags, *interpreter, *torch_build]
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]
    return f"{python_tag}-torch{torch.__version__}-{digest}", digest


def _extensions_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def build_directory(name: str, source: str, cflags: Sequence[str]) -> Path:
    """The folder :func:`load_extension` builds ``name`` in (not created here).

    Args:
        name: the extension's base name (a Python identifier).
        source: its C++ source.
        cflags: the extra compiler flags.

    Returns:
        ``<root>/diffusers_otq/<py tag>-torch<version>-<hash>``, ``<root>`` being ``TORCH_EXTENSIONS_DIR`` or torch's
        default extensions root.
    """
    return _extensions_root() / "diffusers_otq" / _fingerprint(name, source, cflags)[0]


def _import_built(directory: Path, module_name: str) -> ModuleType | None:
    """The library a finished build left in ``directory``, or None when there is none (import errors propagate)."""
    try:
        info = json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    if info.get("module") != module_name:
        return None
    spec = importlib.util.spec_from_file_location(module_name, directory / info["library"])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {directory / info['library']}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _try_lock(fd: int) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    import msvcrt

    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _owner(path: Path) -> str:
    try:
        return path.read_text().strip() or "an unknown process"
    except OSError:
        return "an unknown process"


@contextlib.contextmanager
def _build_lock(path: Path, deadline: float, timeout: float, what: str) -> Iterator[int]:
    """Holds ``path`` exclusively (yields its descriptor, which a child may inherit to keep holding it); waits for
    another holder until ``deadline`` with one warning, then raises :class:`KernelBuildError`."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waiting = False
        while True:
            try:
                if _try_lock(fd):
                    break
            except OSError as err:
                raise KernelBuildError(
                    f"cannot lock {path} ({err}); point TORCH_EXTENSIONS_DIR at a folder on a local disk"
                ) from err
            if not waiting:
                waiting = True
                logger.warning(
                    "Waiting for another process to finish building the %s in %s (held by %s); waiting at most "
                    "%.0f s (%s).", what, path.parent, _owner(path), timeout, BUILD_TIMEOUT_ENV,
                )  # fmt: skip
            if time.monotonic() >= deadline:
                raise KernelBuildError(
                    f"gave up after {timeout:.0f} s ({BUILD_TIMEOUT_ENV}) waiting for another process "
                    f"({_owner(path)}) building them in {path.parent}; later processes load them once it is done"
                )
            time.sleep(_POLL_S)
        owner = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, owner.encode())
        yield fd
    finally:
        os.close(fd)  # releases the lock (a child that inherited it keeps it until it exits)


def _signal_group(group: int, sig: int) -> bool:
    """Sends ``sig`` to process group ``group``; whether it had members."""
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _stop(process: subprocess.Popen) -> None:
    """Stops the builder and what it started: SIGTERM to its process group (ninja passes it on to the compiler),
    a moment for them to go, then SIGKILL to whatever is left of the group."""
    if not hasattr(os, "killpg"):
        process.kill()
        process.wait()
        return
    deadline = time.monotonic() + _TERM_GRACE_S
    _signal_group(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=_TERM_GRACE_S)
    while _signal_group(process.pid, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _exit_status(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def _build(spec: dict, directory: Path, lock_fd: int, deadline: float, timeout: float) -> None:
    """Runs the builder child until it exits or the deadline passes; raises :class:`KernelBuildError` on failure."""
    seconds = math.ceil(deadline - time.monotonic())
    if seconds <= 0:
        raise KernelBuildError(f"no time left to build them in {directory} ({timeout:.0f} s, {BUILD_TIMEOUT_ENV})")
    if not sys.executable:
        raise KernelBuildError("no Python executable to run the compiler from (sys.executable is empty)")
    posix = os.name == "posix"
    log_path = directory / _LOG
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", _BUILDER], stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
            cwd=directory, start_new_session=posix, pass_fds=(lock_fd,) if posix else (),
        )  # fmt: skip
    try:
        os.write(lock_fd, f", compiler run by pid {process.pid}".encode())  # it keeps the lock if we are killed
        process.stdin.write(json.dumps({**spec, "seconds": seconds}).encode())
        process.stdin.close()
        returncode = process.wait(timeout=seconds + _KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        _stop(process)
        returncode = None
    except BaseException:  # Ctrl-C or any other interruption: the compiler does not outlive it
        _stop(process)
        raise
    if returncode == 0:
        return
    if returncode < 0:  # killed, e.g. by itself at the deadline: nothing of its group lingers
        _stop(process)
    if returncode is None or time.monotonic() >= deadline:
        raise KernelBuildError(
            f"the build in {directory} did not finish within {timeout:.0f} s ({BUILD_TIMEOUT_ENV}; compiler output "
            f"in {log_path}); raise {BUILD_TIMEOUT_ENV} to give it longer"
        )
    lines = log_path.read_text(errors="replace").splitlines()
    failure = [line.removeprefix("BUILD FAILED: ") for line in lines if line.startswith("BUILD FAILED")]
    reason = failure[-1] if failure else f"the builder {_exit_status(returncode)}"
    messages = [line.strip() for line in lines if not line.startswith(_NOT_MESSAGES) and " -o " not in line]
    cause = [line for line in messages if _COMPILER_ERROR.search(line)]
    if cause:  # the compiler's first complaint, e.g. "c++: not found" or "main.cpp:12: error: ..."
        reason += f": {cause[0][:300]}"
    raise KernelBuildError(
        f"{reason} (compiler output in {log_path}); a C++ compiler, ninja and the Python headers enable them"
    )


def load_extension(
    name: str, source: str, cflags: Sequence[str], *, what: str, timeout: float | None = None
) -> ModuleType:
    """The compiled extension, imported from a finished build or built now (see the module doc).

    Args:
        name: the extension's base name (a Python identifier); the module is ``<name>_<hash>``.
        source: its C++ source (``PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)`` defines the module).
        cflags: extra compiler flags.
        what: what it is, for the messages (e.g. ``"OTQ CPU kernels"``).
        timeout: seconds for waiting plus building; None reads :func:`build_timeout`.

    Returns:
        The imported extension module.

    Raises:
        KernelBuildError: it failed to build or import, or did not finish in time (the message says why and where).
    """
    timeout = build_timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    folder, digest = _fingerprint(name, source, cflags)
    directory = _extensions_root() / "diffusers_otq" / folder
    module_name = f"{name}_{digest}"
    with contextlib.suppress(Exception):  # a broken earlier build is rebuilt below, under the lock
        module = _import_built(directory, module_name)
        if module is not None:
            return module
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KernelBuildError(f"cannot create {directory} ({err}); point TORCH_EXTENSIONS_DIR elsewhere") from err
    with _build_lock(directory / _LOCK, deadline, timeout, what) as lock_fd:
        try:
            module = _import_built(directory, module_name)  # the build we waited for
        except Exception as err:  # noqa: BLE001 - a broken library: build it again
            logger.info("Rebuilding the %s in %s: the earlier build does not import (%s).", what, directory, err)
            (directory / _MARKER).unlink(missing_ok=True)
            for library in directory.glob(f"{module_name}.*"):
                library.unlink()
            module = None
        if module is not None:
            return module
        stale = directory / _TORCH_LOCK
        if stale.exists():  # nobody else can be building here while we hold build.lock
            stale.unlink(missing_ok=True)
            logger.info("Removed %s, left behind by a build that was killed.", stale)
        logger.warning(
            "Building the %s (C++, once per Python and torch version) in %s; this usually takes about a minute "
            "(at most %.0f s, %s), later processes load them in a fraction of a second.",
            what, directory, timeout, BUILD_TIMEOUT_ENV,
        )  # fmt: skip
        started = time.monotonic()
        spec = {"name": module_name, "source": source, "cflags": list(cflags), "directory": str(directory),
                "marker": _MARKER, "sys_path": sys.path}  # fmt: skip
        _build(spec, directory, lock_fd, deadline, timeout)
        logger.info("Built the %s in %.0f s.", what, time.monotonic() - started)
        try:
            module = _import_built(directory, module_name)
        except Exception as err:
            raise KernelBuildError(f"the library built in {directory} does not import ({err})") from err
    if module is None:
        raise KernelBuildError(f"the build in {directory} left no {_MARKER} (compiler output in {directory / _LOG})")
    return module
