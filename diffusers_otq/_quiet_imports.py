"""Import diffusers without the optional backends' load-time noise on stderr.

diffusers imports torchao and bitsandbytes when they are installed (the evaluation extras install them to
compare against), and they log at import: missing CUDA/cutlass extensions, no Triton, no ``kernels`` package,
torch's pytree deprecation of their enums, diffusers' own "Unable to import torchao Tensor objects". None of it
concerns a user of this package, and every ``diffusers-otq`` command printed it. Those loggers are raised to
ERROR while diffusers is imported and restored afterwards: warnings those libraries emit later, when they are
used, are untouched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager


__all__ = ["quiet_imports"]

_NOISY_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree", "transformers")


@contextmanager
def quiet_imports() -> Iterator[None]:
    """Inside the block, the optional backends' import-time warnings are not printed (errors still are)."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    had_verbosity = "DIFFUSERS_VERBOSITY" in os.environ
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    if not had_verbosity:  # diffusers reads it when it configures its root logger, on first use
        os.environ["DIFFUSERS_VERBOSITY"] = "error"
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if not had_verbosity:
            del os.environ["DIFFUSERS_VERBOSITY"]
            import diffusers.utils.logging as diffusers_logging

            diffusers_logging.set_verbosity(diffusers_logging.WARNING)  # diffusers' default


with quiet_imports():
    import diffusers  # noqa: F401  (the import this module exists for)
    import diffusers.quantizers  # noqa: F401
