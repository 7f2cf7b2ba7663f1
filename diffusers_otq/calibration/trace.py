"""The dataflow between a denoiser's blocks along its own sampling trajectories, recorded once.

Block-by-block calibration (:mod:`.sequential`) replays one block at a time on cached inputs. For that it needs,
for every denoiser call of the calibration run and every block invocation in it, where each input tensor of the
invocation comes from:

* :class:`Output`: a tensor an earlier block returned in the same call. It is *linked*: the replay feeds whatever
  that block gives (its float or its quantized output), and keeps it only until its last consumer ran.
* :class:`External`: anything else (the denoiser's own inputs, tensors the model computes between blocks such
  as ``emb + class_emb``). Kept as the float model computed it, in an :class:`~.activations.ActivationStore`.

:func:`trace_blocks` runs the float model once over the calibration batches with a forward hook on every block
(:func:`~.blocks.block_names`) and finds links by object identity: a block's input *is* the tensor an earlier
block returned (every output of the current call is held until the call ends, so identities are not reused). A
link to a block that comes at or after the consumer in the processing order (a block fed by its own output, or
by a later block) is recorded as an external instead, so the replay never needs a block it has not yet run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from .activations import ActivationStore
from .blocks import block_names, block_outputs


__all__ = ["BlockTrace", "External", "Invocation", "Output", "TracedCall", "trace_blocks"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Output:
    """Input leaf linked to leaf ``index`` of the outputs of invocation ``invocation`` of the same call."""

    invocation: int
    index: int


@dataclass(frozen=True)
class External:
    """Input leaf recorded from the float model, stored under ``key``."""

    key: str


@dataclass
class Invocation:
    """One call of one block inside a denoiser call: the ``(args, kwargs)`` structure and each leaf's source
    (:class:`Output`, :class:`External`, or the non-tensor value itself)."""

    block: str
    spec: TreeSpec
    leaves: list[Any]
    outputs: int = 0  # number of tensor leaves it returned


@dataclass
class TracedCall:
    """One denoiser call: its calibration batch, timestep weight, a description and its block invocations."""

    batch: int
    weight: float
    context: str
    invocations: list[Invocation] = field(default_factory=list)


@dataclass
class BlockTrace:
    """Every traced call, the blocks in processing order (first invocation order) and the external tensors."""

    calls: list[TracedCall]
    order: list[str]
    externals: ActivationStore

    def invocations_of(self, block: str) -> list[tuple[int, int]]:
        """``(call, invocation)`` indices of every invocation of ``block``, in call order."""
        return [
            (c, i) for c, call in enumerate(self.calls) for i, inv in enumerate(call.invocations) if inv.block == block
        ]

    def consumers(self) -> dict[tuple[int, int, int], int]:
        """``(call, invocation, output leaf)`` -> position in :attr:`order` of the last block that reads it (the
        outputs nobody reads are absent): a replay keeps an output until that block ran."""
        position = {name: i for i, name in enumerate(self.order)}
        last: dict[tuple[int, int, int], int] = {}
        for c, call in enumerate(self.calls):
            for inv in call.invocations:
                for leaf in inv.leaves:
                    if isinstance(leaf, Output):
                        key = (c, leaf.invocation, leaf.index)
                        last[key] = max(last.get(key, -1), position[inv.block])
        return last

    def inputs(self, call: int, invocation: int, resolve: Callable[[Output], torch.Tensor]) -> tuple[tuple, dict]:
        """The ``(args, kwargs)`` of one invocation, with linked leaves from ``resolve`` and externals from the
        store."""
        inv = self.calls[call].invocations[invocation]
        leaves = [
            resolve(leaf) if isinstance(leaf, Output) else self.externals.get(leaf.key) if isinstance(leaf, External)
            else leaf
            for leaf in inv.leaves
        ]  # fmt: skip
        return tree_unflatten(leaves, inv.spec)

    def external_bytes(self) -> int:
        """Bytes of the recorded external tensors (in memory and spilled)."""
        return self.externals.memory_bytes + self.externals.spilled_bytes


class _Recorder:
    """The hooks of :func:`trace_blocks`: a pre-hook on the denoiser opens a call, a forward hook per block
    records its invocation."""

    def __init__(self, externals: ActivationStore, weight_of: Callable[[tuple, dict], tuple[float, str]]) -> None:
        self.externals = externals
        self.weight_of = weight_of
        self.calls: list[TracedCall] = []
        self.order: list[str] = []
        self.batch = -1
        self._produced: dict[int, tuple[int, int, str]] = {}  # id(tensor) -> (invocation, leaf, block)
        self._held: list[Any] = []  # keeps this call's outputs alive, so their ids stay unique
        # id(tensor) -> (key, version) of the batch's externals (held too): a pipeline passes the same prompt
        # states to every step, stored once unless modified in place in between
        self._external_ids: dict[int, tuple[str, int]] = {}
        self._held_externals: list[torch.Tensor] = []

    def start_batch(self, batch: int) -> None:
        self.batch = batch
        self._produced, self._held, self._external_ids, self._held_externals = {}, [], {}, []

    def start_call(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        weight, context = self.weight_of(args, kwargs)
        self.calls.append(
            TracedCall(self.batch, weight, f"batch {self.batch}, denoiser call {len(self.calls)}{context}")
        )
        self._produced, self._held = {}, []

    def hook_for(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self.calls:
                return  # the block ran outside a denoiser call (nothing to replay it in)
            if name not in self.order:
                self.order.append(name)
            call = self.calls[-1]
            position = self.order.index(name)
            leaves, spec = tree_flatten((args, kwargs))
            recorded = []
            for leaf in leaves:
                if not isinstance(leaf, torch.Tensor):
                    recorded.append(leaf)
                    continue
                source = self._produced.get(id(leaf))
                if source is not None and self.order.index(source[2]) < position:
                    recorded.append(Output(source[0], source[1]))
                else:
                    recorded.append(External(self._external(leaf)))
            index = len(call.invocations)
            outputs = block_outputs(output)
            for i, tensor in enumerate(outputs):
                self._produced[id(tensor)] = (index, i, name)
            self._held.append(outputs)
            call.invocations.append(Invocation(name, spec, recorded, len(outputs)))

        return hook

    def _external(self, tensor: torch.Tensor) -> str:
        known = self._external_ids.get(id(tensor))
        if known is not None and known[1] == tensor._version:
            return known[0]
        key = f"x.{len(self.calls) - 1}.{len(self.externals)}"
        self.externals.put(key, tensor)
        self._external_ids[id(tensor)] = (key, tensor._version)
        self._held_externals.append(tensor)
        return key


@contextmanager
def _hooks(model: nn.Module, recorder: _Recorder) -> Iterator[None]:
    modules = dict(model.named_modules())
    handles = [model.register_forward_pre_hook(recorder.start_call, with_kwargs=True)]
    handles += [modules[n].register_forward_hook(recorder.hook_for(n), with_kwargs=True) for n in block_names(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def trace_blocks(
    model: nn.Module,
    run_batch: Callable[[int], Any],
    batches: Sequence[int],
    externals: ActivationStore,
    weight_of: Callable[[tuple, dict], tuple[float, str]],
    *,
    progress: Callable[[], None] | None = None,
) -> BlockTrace:
    """Run ``run_batch(b)`` for each of ``batches`` with hooks on ``model`` and its blocks; return the
    :class:`BlockTrace`.

    Args:
        model: the float denoiser (called by ``run_batch``, directly or through its pipeline).
        run_batch: runs calibration batch ``b``.
        batches: the calibration batches to run, in order (this process's share with several processes).
        externals: where the external inputs go (they stay there; the trace refers to them by key).
        weight_of: ``(args, kwargs) -> (timestep weight, context text)`` of a denoiser call.
        progress: called after every batch.

    Raises:
        ValueError: ``run_batch`` never called the model, or no block ran inside a call.
    """
    recorder = _Recorder(externals, weight_of)
    with _hooks(model, recorder), torch.no_grad():
        for batch in batches:
            recorder.start_batch(batch)
            run_batch(batch)
            recorder.start_batch(-1)  # release the batch's tensors
            if progress is not None:
                progress()
    if batches and (not recorder.calls or not recorder.order):
        raise ValueError(
            f"the calibration batches never ran {type(model).__name__}'s blocks inside a call of the model; "
            "nothing to calibrate block by block."
        )
    trace = BlockTrace(recorder.calls, recorder.order, externals)
    logger.info(
        "Traced %d denoiser calls through %d blocks; %.1f MiB of external inputs",
        len(trace.calls), len(trace.order), trace.external_bytes() / 2**20,
    )  # fmt: skip
    return trace
