"""What the loading checks need to know about accelerate's offloading: which device a ``device_map`` gives a tensor,
and which tensors on the meta device are offloaded (held by an accelerate hook) rather than missing.

With a ``device_map`` that offloads (``"cpu"`` entries beside an accelerator, or ``"disk"``), diffusers dispatches
the model with accelerate's hooks before the quantizer's final checks run: the parameters of an offloaded module
are on ``meta`` by then, by design, and come back from the hook's weights map for each forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from accelerate.hooks import AlignDevicesHook
from torch import nn


__all__ = ["device_in_map", "is_offloaded", "missing_tensors", "offloaded_modules", "stored_value"]


def device_in_map(name: str, device_map: Mapping[str, Any]) -> Any:
    """The device ``device_map`` gives ``name`` (a tensor or module): the entry of its longest mapped prefix, as
    diffusers resolves it while loading.

    Raises:
        ValueError: no prefix of ``name`` is mapped (and there is no ``""`` entry).
    """
    module = name
    while module and module not in device_map:
        module = module.rpartition(".")[0]
    if module not in device_map:
        raise ValueError(f"device_map gives no device to {name!r} (nor to any module above it); add an entry for it.")
    return device_map[module]


def is_offloaded(module: nn.Module) -> bool:
    """Whether an accelerate hook holds ``module``'s own parameters (accelerate's ``has_offloaded_params``, which
    accelerate < 1.1 lacks)."""
    hook = getattr(module, "_hf_hook", None)
    return isinstance(hook, AlignDevicesHook) and bool(hook.offload)


def stored_value(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module``'s own parameter or buffer ``name`` (its state-dict name) as stored: from its offload hook's
    weights map while offloaded (a tensor on the CPU, or memory-mapped from the offload folder), else the tensor
    itself."""
    tensor = module._parameters[name] if name in module._parameters else module._buffers[name]
    if tensor is not None and tensor.device.type == "meta" and is_offloaded(module):
        return module._hf_hook.weights_map[name]
    return tensor


def offloaded_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The submodules whose own parameters an accelerate offload hook holds (:func:`is_offloaded`)."""
    for name, module in model.named_modules():
        if is_offloaded(module):
            yield name, module


def missing_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers left on the meta device that no offload hook holds."""
    held = {name for name, _ in offloaded_modules(model)}
    missing = []
    for name, module in model.named_modules():
        if name in held:
            continue
        for key, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is not None and tensor.device.type == "meta":
                missing.append(f"{name}.{key}" if name else key)
    return missing
