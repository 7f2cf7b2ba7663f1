"""Blocks of a denoiser and their recorded full-precision calls, for block-by-block refinement.

Block-by-block refinement trains one block at a time, so the memory of a training step is that of one block's
forward and backward, not the whole model's. Its targets are recorded once, before quantization: while the
full-precision teacher runs its recorded denoiser calls, a forward hook on every block keeps the block's
inputs and outputs (detached, on the CPU). A block then learns to map the inputs the quantized model gives it
(its recorded full-precision inputs where the quantized model calls it a different number of times) to its
full-precision outputs.

The blocks of a model are its direct children, with every ``nn.ModuleList`` / ``nn.Sequential`` child split
into its items: ``transformer_blocks.0``, ``transformer_blocks.1``, ..., ``time_embedding``, ``proj_out`` for
a DiT; ``down_blocks.0``, ..., ``mid_block``, ``up_blocks.0``, ..., ``conv_in`` for a UNet.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map


__all__ = ["BlockCalls", "block_names", "block_outputs", "record_block_calls"]


def block_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s blocks in definition order (see module doc)."""
    names = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList | nn.Sequential):
            names.extend(f"{name}.{item}" for item, _ in child.named_children())
        else:
            names.append(name)
    return names


def block_outputs(output: Any) -> list[torch.Tensor]:
    """The tensors of a block's output (a tensor, nested tuples/lists/dicts, or a diffusers output object)."""
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    return [leaf for leaf in tree_leaves(output) if isinstance(leaf, torch.Tensor)]


@dataclass
class BlockCalls:
    """Every recorded call of one block: its ``(args, kwargs)`` and its output tensors (float32, CPU)."""

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    outputs: list[list[torch.Tensor]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.calls)

    def nbytes(self) -> int:
        """Bytes of the recorded tensors (inputs and outputs)."""
        leaves = tree_leaves((self.calls, self.outputs))
        return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _detached(value: Any) -> Any:
    """Detached contiguous CPU copies of the tensors in ``value`` (contiguous: torch's CPU backward through
    GroupNorm segfaults on some channels-last-strided inputs that diffusers' attention blocks produce)."""

    def copy(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        return v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)

    return tree_map(copy, value)


@contextmanager
def record_block_calls(model: nn.Module, names: list[str]) -> Iterator[dict[str, BlockCalls]]:
    """Inside the block, every call of the named blocks of ``model`` is recorded into the yielded mapping.

    Raises:
        KeyError: a name is not a submodule of ``model``.
    """
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise KeyError(f"{type(model).__name__} has no block(s) {missing}; its blocks are {block_names(model)}.")
    recorded = {name: BlockCalls() for name in names}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            recorded[name].calls.append((_detached(args), _detached(kwargs)))
            recorded[name].outputs.append([t.detach().float().cpu() for t in block_outputs(output)])

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name), with_kwargs=True) for name in names]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
