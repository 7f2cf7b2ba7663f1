"""Refinement: with the codes frozen, fit the quantized model's float parameters to the teacher's velocity.

The teacher is the full-precision model itself: before quantization, :func:`~.sampling.record_teacher_calls` runs it along its
own sampling trajectories (class labels or prompts, as calibration does) and keeps every denoiser call's
inputs and output. :func:`refine_model` then trains, with Adam on those calls, the float parameters of the
quantized layers:

* the codebooks (float32 copies of the stored rows; re-sorted with their codes and stored back in their
  storage dtype afterwards, so the packed format is unchanged),
* the per-row group-scale maxima (``scale_max``, stored in float32),
* the low-rank factors, and the layers' biases,
* with ``CalibrationConfig(refine_float_params=True)``, every other float parameter of the model (of the block,
  with ``refine_scope="blocks"``): embedding tables, norm affines, layers left in full precision. They are
  stored in full precision either way, so training them costs no stored bit; it helps the bundled DiT (its
  class-embedding tables: +0.2-0.4 dB of sample PSNR) and hurts the bundled UNet at 3.05 bits/weight (-1.2 dB),
  so it is off by default (results/two-bit.md section 3c),

minimising the relative velocity error ``sum ||v_student - v_teacher||^2 / sum ||v_teacher||^2`` on random
sub-batches of the recorded calls. Where the sampler guides (class pipelines with guidance ``s != 1``, see
:func:`~.sampling.sampler_guidance`), the error is that of the velocity the sampler steps with,
``v_null + s (v_cond - v_null)``, on pairs of rows (a sample's conditional row and its null-class row): errors the
two branches share cancel in it, and the conditional branch counts ``s^2`` times (the bundled DiT at a 2.0
bits/weight budget sampled with guidance 2: 23.24 -> 23.90 dB of sample PSNR over the per-branch error,
results/two-bit.md). With ``CalibrationConfig(refine_scope="blocks")`` it trains one block at a
time instead (memory of one block's forward and backward, for large models): each block, in order, learns to
map the inputs the quantized model gives it to its full-precision outputs (:mod:`.blocks`, recorded with the
teacher), for ``refine_steps`` steps per block. The loss it reports is measured on all recorded calls before, during (every
``refine_eval_every`` steps) and after training; the parameters with the lowest reported loss are kept, so
refinement never makes it worse. A NaN/Inf loss or gradient stops training at that step, keeps the last good
parameters and says which step.

With codebooks per noise-level band (``CalibrationConfig(noise_bands=B)``, :mod:`diffusers_otq.noise_bands`), every
layer holds ``B`` sets of codebooks over its codes and the model's router decodes each call with the set of its
timestep's band, so a step trains the codebooks of its call's band (biases, scale maxima and low-rank factors are
shared by all bands); the whole model then trains ``B * refine_steps`` steps, ``refine_steps`` per band on average.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from ..functional.codebook_storage import decode_scaled_codebook, store_codebook
from ..functional.error_feedback import sort_codebook
from ..functional.packing import pack_codes
from ..layers import OTQLayerMixin
from .blocks import BlockCalls, block_names, block_outputs, record_block_calls
from .config import CalibrationConfig, CalibrationError
from .probes import ProbeInputs, eval_mode, model_output, velocity_error
from .sampling import denoiser_of, record_teacher_calls, sampler_guidance


__all__ = [
    "BlockFit",
    "RefineReport",
    "TeacherCalls",
    "float_parameters",
    "guided_velocity",
    "refine_block",
    "refine_model",
    "require_teacher",
    "train_block",
]

logger = logging.getLogger(__name__)

_TRAINABLE_BUFFERS = ("codebook", "scale_max", "lowrank_up", "lowrank_down")


@dataclass
class TeacherCalls:
    """Recorded denoiser calls of the full-precision model and its outputs (the refinement targets).

    ``guidance``: the sampler's guidance scale ``s`` where each call holds ``2B`` rows, ``B`` conditional then
    their ``B`` null-class twins (refinement then fits the guided velocity), or None (each row on its own).
    """

    inputs: ProbeInputs
    outputs: list[torch.Tensor]
    blocks: dict[str, BlockCalls] | None = None  # per-block calls, for refine_scope="blocks"
    guidance: float | None = None

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.outputs) or not self.outputs:
            raise CalibrationError(
                f"a teacher needs recorded calls with their outputs; got {len(self.inputs)} calls and "
                f"{len(self.outputs)} outputs. Record them with TeacherCalls.from_pipeline(pipe, calibration) before quantizing."
            )
        odd = [] if self.guidance is None else [tuple(o.shape) for o in self.outputs if o.dim() == 0 or o.shape[0] % 2]
        if odd:
            raise CalibrationError(
                f"guidance={self.guidance!r} pairs each call's conditional rows with as many null-class rows, but "
                f"outputs of shape {odd[0]} have an odd batch; pass guidance=None for unguided calls."
            )

    @classmethod
    def record(
        cls, model: nn.Module, inputs: ProbeInputs, *, blocks: bool = False, guidance: float | None = None
    ) -> TeacherCalls:
        """Run the (full-precision) ``model`` on every recorded call and keep its outputs; with ``blocks``, also
        every block's inputs and outputs (:mod:`.blocks`), the targets of ``refine_scope="blocks"``;
        ``guidance`` as in the class doc."""
        names = block_names(model) if blocks else []
        with eval_mode(model), torch.no_grad(), record_block_calls(model, names) as recorded:
            outputs = [model_output(model, args, kwargs).detach().float().cpu() for args, kwargs in inputs.calls]
        return cls(inputs, outputs, recorded if blocks else None, guidance)

    @classmethod
    def from_pipeline(
        cls, pipe: Any, calibration: CalibrationConfig, *, model: nn.Module | None = None, blocks: bool = False
    ) -> TeacherCalls:
        """The teacher of a (full-precision) pipeline: its denoiser calls along ``calibration.refine_samples``
        trajectories of its own (:func:`~.sampling.record_teacher_calls`), their outputs and the sampler's guidance
        (:func:`~.sampling.sampler_guidance`). ``model``: the denoiser to record (default: the pipeline's)."""
        model = model if model is not None else denoiser_of(pipe)
        calls = record_teacher_calls(pipe, calibration, model=model)
        return cls.record(model, calls, blocks=blocks, guidance=sampler_guidance(pipe, calibration))


@dataclass(frozen=True)
class RefineReport:
    """What refinement did: the reported teacher loss before and after, steps run, where it stopped and why.

    ``best_step`` is the step whose parameters were kept (scope ``"model"``); with ``scope="blocks"`` every
    block keeps its own best, ``steps`` counts the steps of all ``blocks`` trained and ``best_step`` is None.
    """

    loss_before: float
    loss_after: float
    steps: int
    best_step: int | None
    seconds: float
    stopped: str | None = None  # why training stopped early (e.g. NaN at step 37), or None
    scope: str = "model"
    blocks: int = 0  # blocks trained one at a time (scope "blocks")
    guidance: float | None = None  # the guided velocity's scale where the whole model fitted it (TeacherCalls)

    def describe(self) -> dict[str, Any]:
        return {
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "steps": self.steps,
            "best_step": self.best_step,
            "seconds": round(self.seconds, 3),
            "stopped": self.stopped,
            "scope": self.scope,
            "blocks": self.blocks,
            "guidance": self.guidance,
        }


def _to(value: Any, device: torch.device) -> Any:
    return tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, value)


def _slice_call(args: tuple, kwargs: dict, rows: torch.Tensor, batch: int) -> tuple[tuple, dict]:
    """The call restricted to ``rows`` of its batch (tensors, nested too, whose first dimension is the batch)."""

    def pick(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value[rows]
        return value

    return tree_map(pick, args), tree_map(pick, kwargs)


def float_parameters(module: nn.Module, calibration: CalibrationConfig) -> list[nn.Parameter]:
    """The floating-point parameters of ``module`` that refinement trains beside the OTQ buffers: the OTQ layers'
    biases, and with ``calibration.refine_float_params`` every float parameter of ``module`` (the codes, a uint8
    parameter, are never among them)."""
    if calibration.refine_float_params:
        return [p for p in module.parameters() if p.is_floating_point()]
    return [m.bias for m in module.modules() if isinstance(m, OTQLayerMixin) and m.bias is not None]


@contextmanager
def _trainable(layers: list[OTQLayerMixin], floats: list[nn.Parameter]) -> Iterator[list[torch.Tensor]]:
    """Swap each layer's float buffers for float32 leaves that require grad and make ``floats`` trainable;
    yields the parameters. An int8 codebook becomes its decoded float32 codewords (its ``codebook_scale`` None
    meanwhile). On exit the buffers are float32 tensors without grad (:func:`_store` casts or encodes them) and
    ``floats`` require grad as they did before."""
    params: list[torch.Tensor] = []
    for layer in layers:
        if layer._buffers.get("codebook_scale") is not None:  # int8: train the decoded codewords themselves
            layer._buffers["codebook"] = decode_scaled_codebook(layer.codebook, layer.codebook_scale)  # every band
            layer._buffers["codebook_scale"] = None
        for name in _TRAINABLE_BUFFERS:
            buffer = layer._buffers.get(name)
            if buffer is not None:
                leaf = buffer.detach().to(torch.float32).clone().requires_grad_(True)
                layer._buffers[name] = leaf
                params.append(leaf)
    flags = [p.requires_grad for p in floats]
    for param in floats:
        param.requires_grad_(True)
    try:
        yield params + list(floats)
    finally:
        for layer in layers:
            for name in _TRAINABLE_BUFFERS:
                if layer._buffers.get(name) is not None:
                    layer._buffers[name] = layer._buffers[name].detach()
        for param, flag in zip(floats, flags, strict=True):
            param.grad = None
            param.requires_grad_(flag)


def _store(layer: OTQLayerMixin, dtypes: dict[str, torch.dtype]) -> None:
    """Write refined float32 buffers back in their storage dtypes (an int8 codebook encoded with a new
    ``codebook_scale``); scalar codebook rows re-sorted with their codes (vector codewords have no order); with noise
    bands, the first band's rows are sorted and the other bands' follow (their codes are the same)."""
    codebook, scale = store_codebook(layer._buffers["codebook"], dtypes["codebook"])
    scalar, first = codebook.dim() == 2, codebook[: codebook.shape[0] // layer.noise_bands]
    if scalar and bool((first[:, 1:] < first[:, :-1]).any()):  # refinement moved codewords past each other
        codes = layer.quantized_weight().codes().to(torch.int64)
        codebook, codes = sort_codebook(codebook, codes, layer.noise_bands)
        layer.set_stored("weight", pack_codes(codes.reshape(-1).to(torch.uint8), layer.bits))
    layer._buffers["codebook"] = codebook.contiguous()
    if scale is not None:
        layer._buffers["codebook_scale"] = scale
    for name in ("scale_max", "lowrank_up", "lowrank_down"):
        if layer._buffers.get(name) is not None:
            layer._buffers[name] = layer._buffers[name].to(dtypes[name]).contiguous()


@dataclass
class _Snapshot:
    """Copies of the trained tensors: per layer its float buffers by name, and the float parameters in order."""

    buffers: list[dict[str, torch.Tensor]]
    floats: list[torch.Tensor]


def _snapshot(layers: list[OTQLayerMixin], floats: list[nn.Parameter]) -> _Snapshot:
    buffers = [
        {n: layer._buffers[n].detach().clone() for n in _TRAINABLE_BUFFERS if layer._buffers.get(n) is not None}
        for layer in layers
    ]
    return _Snapshot(buffers, [p.detach().clone() for p in floats])


def _restore(layers: list[OTQLayerMixin], floats: list[nn.Parameter], snapshot: _Snapshot) -> None:
    with torch.no_grad():
        for layer, state in zip(layers, snapshot.buffers, strict=True):
            for name, value in state.items():
                layer._buffers[name].copy_(value)
        for param, value in zip(floats, snapshot.floats, strict=True):
            param.copy_(value)


def _put_back(
    layers: list[OTQLayerMixin],
    stored: list[dict[str, torch.Tensor]],
    floats: list[nn.Parameter],
    float_values: list[torch.Tensor],
) -> None:
    """Undo refinement: the layers' stored tensors and the float parameters as they were before it."""
    for layer, tensors in zip(layers, stored, strict=True):
        for name, tensor in tensors.items():
            layer.set_stored(name, tensor)
    with torch.no_grad():
        for param, value in zip(floats, float_values, strict=True):
            param.copy_(value)


def guided_velocity(velocity: torch.Tensor, scale: float) -> torch.Tensor:
    """``v_null + s (v_cond - v_null)`` of a (2B, ...) batch whose first ``B`` rows are conditional and the last
    ``B`` their null-class twins; shape (B, ...)."""
    conditional, null = velocity.chunk(2)
    return null + scale * (conditional - null)


def _loss(model: nn.Module, teacher: TeacherCalls) -> float:
    """The reported teacher loss: relative velocity error over every recorded call (float64 sums); of the guided
    velocity where the teacher's calls are guided."""
    guided = None if teacher.guidance is None else partial(guided_velocity, scale=teacher.guidance)
    return velocity_error(model, teacher.inputs, teacher.outputs, guided)


def require_teacher(teacher: TeacherCalls | None) -> TeacherCalls:
    """``teacher``, or a :class:`CalibrationError` that says what a teacher is and how to get one."""
    if teacher is None:
        raise CalibrationError(
            "refinement needs a teacher: the full-precision model's velocity along its own trajectories. Use "
            "quantize_pipeline(pipe, config, CalibrationConfig(refine_steps=...)) (it records the teacher before "
            "quantizing), or pass teacher=TeacherCalls.record(float_model, calls)."
        )
    return teacher


def refine_model(model: nn.Module, teacher: TeacherCalls | None, calibration: CalibrationConfig) -> RefineReport:
    """Train the quantized ``model``'s float parameters (codes frozen) to match ``teacher`` (see module doc).

    Args:
        model: a model whose selected layers are already OTQ layers.
        teacher: the full-precision model's recorded calls and outputs (with its blocks' calls for
            ``refine_scope="blocks"``).
        calibration: ``refine_steps``, ``refine_lr``, ``refine_batch_size``, ``refine_eval_every``,
            ``refine_scope``, ``seed``. With codebooks per noise band (:mod:`diffusers_otq.noise_bands`; the model's
            router picks each call's band) the whole model trains ``refine_steps * bands`` steps, so that every
            band's codebooks get about ``refine_steps`` steps of their own.

    Returns:
        A :class:`RefineReport`; the model holds the parameters with the lowest reported loss.

    Raises:
        CalibrationError: no teacher (or one without block calls for ``refine_scope="blocks"``), or no OTQ
            layer in ``model``.
    """
    teacher = require_teacher(teacher)
    layers = [m for m in model.modules() if isinstance(m, OTQLayerMixin)]
    if not layers:
        raise CalibrationError(f"{type(model).__name__} has no OTQ layer to refine; quantize it first.")
    if calibration.refine_scope == "blocks" and teacher.blocks is None:
        raise CalibrationError(
            "refine_scope='blocks' needs the teacher's block calls: record it with "
            "TeacherCalls.record(float_model, calls, blocks=True) (quantize_pipeline does when refine_scope='blocks')."
        )
    dtypes = [{n: layer._buffers[n].dtype for n in _TRAINABLE_BUFFERS if layer._buffers.get(n) is not None}
              for layer in layers]  # fmt: skip
    stored = [{n: t.detach().clone() for n, t in layer.stored_tensors().items()} for layer in layers]
    floats = float_parameters(model, calibration)
    float_values = [p.detach().clone() for p in floats]
    started = time.perf_counter()
    with eval_mode(model):
        before = _loss(model, teacher)
        if calibration.refine_scope == "blocks":
            steps, best_step, stopped, blocks = _refine_blocks(model, teacher, calibration)
        else:
            device = next(model.parameters(), layers[0].packed).device
            bands = max(layer.noise_bands for layer in layers)  # each band's codebooks get refine_steps of its own
            calibration = replace(calibration, refine_steps=calibration.refine_steps * bands)
            fit = _train(layers, floats, _model_step(model, teacher, calibration, device),
                         lambda: _loss(model, teacher), calibration, "OTQ refine", first=before)  # fmt: skip
            steps, best_step, stopped, blocks = fit.ran, fit.best_step, fit.stopped, 0
    for layer, layer_dtypes in zip(layers, dtypes, strict=True):
        _store(layer, layer_dtypes)
    after = _loss(model, teacher)  # after storage rounding: what the saved model reports
    if after > before:  # storage rounding (or blocks fitted apart) undid the gain: put the unrefined model back
        _put_back(layers, stored, floats, float_values)
        after, best_step = before, 0
    guidance = teacher.guidance if calibration.refine_scope == "model" else None
    report = RefineReport(before, after, steps, best_step, time.perf_counter() - started, stopped,
                          calibration.refine_scope, blocks, guidance)  # fmt: skip
    logger.info(
        "Refined %d layers (%s) in %.1f s: teacher loss %.4g -> %.4g%s",
        len(layers), f"{blocks} blocks" if blocks else "whole model", report.seconds, report.loss_before,
        report.loss_after, f"; {stopped}" if stopped else "",
    )  # fmt: skip
    return report


@dataclass(frozen=True)
class BlockFit:
    """The outcome of one training run: steps run, the step whose parameters were kept (0: the starting ones),
    why it stopped early (or None), and the measured loss before and at the kept step."""

    ran: int
    best_step: int
    stopped: str | None
    loss_before: float = math.nan
    loss_after: float = math.nan


def _train(
    layers: list[OTQLayerMixin],
    floats: list[nn.Parameter],
    step_loss: Callable[[torch.Generator], torch.Tensor | None],
    eval_loss: Callable[[], float],
    calibration: CalibrationConfig,
    desc: str,
    reduce: Callable[[list[torch.Tensor], torch.Tensor | None], float] | None = None,
    first: float | None = None,
) -> BlockFit:
    """Adam on ``layers``' float buffers and the float parameters ``floats``: ``refine_steps`` steps of
    ``step_loss``, ``eval_loss`` measured before (unless the caller passes that value as ``first``: one pass over
    every recorded call saved) and every ``refine_eval_every`` steps; the layers and ``floats`` end with the values
    of the lowest measured loss.

    With several processes ``step_loss`` returns None where another process holds the step's call, and
    ``reduce(params, loss)`` sums the gradients and the loss over the processes (returns the loss)."""
    generator = torch.Generator().manual_seed(calibration.seed)
    steps, every = calibration.refine_steps, calibration.refine_eval_every
    stopped, ran = None, 0
    with _trainable(layers, floats) as params:
        best = first = eval_loss() if first is None else first
        best_step, best_state = 0, _snapshot(layers, floats)
        optimizer = torch.optim.Adam(params, lr=calibration.refine_lr)
        bar = tqdm(range(1, steps + 1), desc=desc, unit="step", disable=not calibration.progress)
        for step in bar:
            ran = step
            loss = step_loss(generator)
            optimizer.zero_grad(set_to_none=True)
            if loss is not None:
                loss.backward()
            value = float(loss.detach()) if reduce is None else reduce(params, loss)
            grads_finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
            loss_finite = math.isfinite(value)
            if not loss_finite or not grads_finite:
                stopped = f"non-finite {'loss' if not loss_finite else 'gradient'} at step {step}"
                logger.warning("Refinement stopped: %s; keeping the best parameters (step %d).", stopped, best_step)
                break
            optimizer.step()
            if step % every == 0 or step == steps:
                current = eval_loss()
                if math.isfinite(current) and current < best:
                    best, best_step, best_state = current, step, _snapshot(layers, floats)
                bar.set_postfix(loss=f"{current:.4g}", best=f"{best:.4g}")
        bar.close()
        _restore(layers, floats, best_state)
    return BlockFit(ran, best_step, stopped, first, best)


def _model_step(
    model: nn.Module, teacher: TeacherCalls, calibration: CalibrationConfig, device: torch.device
) -> Callable[[torch.Generator], torch.Tensor]:
    """One training loss of the whole model: relative velocity error on a random sub-batch of a random call (of
    the guided velocity on ``refine_batch_size // 2`` pairs of rows where the teacher's calls are guided)."""
    scale = teacher.guidance

    def step(generator: torch.Generator) -> torch.Tensor:
        call = int(torch.randint(len(teacher.outputs), (1,), generator=generator))
        (args, kwargs), target = teacher.inputs.calls[call], teacher.outputs[call]
        batch = target.shape[0]
        if scale is None:
            rows = torch.randperm(batch, generator=generator)[: calibration.refine_batch_size]
        else:  # a sample's conditional row and its null-class twin together
            pairs = torch.randperm(batch // 2, generator=generator)[: max(1, calibration.refine_batch_size // 2)]
            rows = torch.cat([pairs, pairs + batch // 2])
        sub_args, sub_kwargs = _slice_call(args, kwargs, rows, batch)
        ref = target[rows].to(device)
        out = model_output(model, sub_args, sub_kwargs).float()
        if scale is not None:
            out, ref = guided_velocity(out, scale), guided_velocity(ref, scale)
        return (out - ref).square().sum() / ref.square().sum().clamp_min(1e-30)

    return step


def _block_error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum ||out - ref||^2, sum ||ref||^2)`` over a block's output tensors."""
    if len(outputs) != len(targets):
        raise CalibrationError(f"a block returned {len(outputs)} tensors where its teacher returned {len(targets)}.")
    num = sum((o.float() - r.to(o.device)).square().sum() for o, r in zip(outputs, targets, strict=True))
    den = sum(r.square().sum() for r in targets)
    return num, torch.as_tensor(den)


def _student_inputs(model: nn.Module, name: str, teacher: TeacherCalls, recorded: BlockCalls) -> BlockCalls:
    """The block's calls with the inputs the quantized model (earlier blocks already refined) gives it, and the
    full-precision outputs as targets: the block learns to undo the error that reaches it, not only its own.
    Falls back to the recorded full-precision inputs when the block runs a different number of times."""
    with torch.no_grad(), record_block_calls(model, [name]) as seen:
        for args, kwargs in teacher.inputs.calls:
            model_output(model, args, kwargs)
    if len(seen[name]) != len(recorded):
        logger.warning("Block %s ran %d times on the quantized model, %d on the teacher; training it on the "
                       "teacher's inputs.", name, len(seen[name]), len(recorded))  # fmt: skip
        return recorded
    return BlockCalls(seen[name].calls, recorded.outputs)


def _refine_blocks(
    model: nn.Module, teacher: TeacherCalls, calibration: CalibrationConfig
) -> tuple[int, None, str | None, int]:
    """Train each block with OTQ layers, one at a time in definition order, to map the inputs the quantized model
    gives it (:func:`_student_inputs`) to its recorded full-precision outputs.

    Returns ``(steps of all blocks, None, why it stopped or None, blocks trained)``.
    """
    modules = dict(model.named_modules())
    total, trained = 0, 0
    for name, recorded in (teacher.blocks or {}).items():
        block = modules[name]
        layers = [m for m in block.modules() if isinstance(m, OTQLayerMixin)]
        if not layers:
            continue
        if not len(recorded):
            logger.warning("Block %s has OTQ layers but ran in no teacher call; it is not refined.", name)
            continue
        recorded = _student_inputs(model, name, teacher, recorded)
        fit = train_block(block, recorded, calibration, f"OTQ refine {name}")
        total, trained = total + fit.ran, trained + 1
        if fit.stopped:
            return total, None, f"{fit.stopped} of block {name}", trained
    return total, None, None, trained


@dataclass(frozen=True)
class CallShard:
    """A block's calls split across processes. Call ``g`` in the one-process order is this process's recorded call
    ``local[g]``, or None where another process holds it; ``rows[g]`` is its batch size. Every process draws the
    same steps; the one holding a step's call computes its gradient and the others add zeros, so the sums are the
    one-process gradients exactly."""

    local: tuple[int | None, ...]
    rows: tuple[int, ...]
    world: int

    def __len__(self) -> int:
        return len(self.local)


def _summed_over_processes(params: list[torch.Tensor], loss: torch.Tensor | None) -> float:
    """Gradients and loss summed over the processes (zeros from a process without the step's call)."""
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        torch.distributed.all_reduce(param.grad)
    value = torch.zeros(1, dtype=torch.float64) if loss is None else loss.detach().to("cpu", torch.float64).reshape(1)
    torch.distributed.all_reduce(value)
    return float(value)


def train_block(
    block: nn.Module, recorded: BlockCalls, calibration: CalibrationConfig, desc: str, shard: CallShard | None = None
) -> BlockFit:
    """Train the OTQ layers of ``block`` (codes frozen) to map each recorded call's inputs to its recorded outputs.

    Each step takes a random call and ``refine_batch_size`` random rows of it and minimises the relative error
    ``sum ||out - target||^2 / sum ||target||^2`` over the block's output tensors; the error over every call is
    measured before and every ``refine_eval_every`` steps, and the block keeps the parameters of the lowest one.

    Args:
        block: a module holding OTQ layers; their float buffers and biases are trained (with
            ``calibration.refine_float_params``, every float parameter of the block).
        recorded: the calls to learn from: inputs (any device) and target output tensors.
        calibration: ``refine_steps``, ``refine_lr``, ``refine_batch_size``, ``refine_eval_every``, ``seed``.
        desc: the progress bar's label.
        shard: with several processes, which of the block's calls this process holds (:class:`CallShard`); the
            result is the same bits as one process holding every call.

    Raises:
        CalibrationError: ``block`` has no OTQ layer, or returns another number of tensors than its targets.
    """
    layers = [m for m in block.modules() if isinstance(m, OTQLayerMixin)]
    if not layers:
        raise CalibrationError(f"{desc}: the block has no OTQ layer to train.")
    device = layers[0].packed.device

    def step(generator: torch.Generator) -> torch.Tensor | None:
        call = int(torch.randint(len(recorded) if shard is None else len(shard), (1,), generator=generator))
        batch = recorded.outputs[call][0].shape[0] if shard is None else shard.rows[call]
        rows = torch.randperm(batch, generator=generator)[: calibration.refine_batch_size]
        if shard is not None:
            call = shard.local[call]
            if call is None:
                return None  # another process holds it
        (args, kwargs), targets = recorded.calls[call], recorded.outputs[call]
        sub_args, sub_kwargs = _slice_call(args, kwargs, rows, batch)
        refs = [t[rows] if t.dim() > 0 and t.shape[0] == batch else t for t in targets]
        num, den = _block_error(block_outputs(block(*_to(sub_args, device), **_to(sub_kwargs, device))), refs)
        return num / den.to(num.device).clamp_min(1e-30)

    reduce = None if shard is None else _summed_over_processes
    floats = float_parameters(block, calibration)
    return _train(layers, floats, step, lambda: _block_loss(block, recorded, device, shard), calibration, desc, reduce)


@torch.no_grad()
def _block_loss(block: nn.Module, recorded: BlockCalls, device: torch.device, shard: CallShard | None = None) -> float:
    """Relative error of ``block``'s outputs over every recorded call (float64 sums in the one-process call order,
    gathered from every process with a ``shard``)."""
    errors = []
    for (args, kwargs), targets in zip(recorded.calls, recorded.outputs, strict=True):
        n, d = _block_error(block_outputs(block(*_to(args, device), **_to(kwargs, device))), targets)
        errors.append((float(n), float(d)))
    if shard is not None:
        where = {local: index for index, local in enumerate(shard.local) if local is not None}
        gathered: list[Any] = [None] * shard.world
        torch.distributed.all_gather_object(gathered, [(where[i], e) for i, e in enumerate(errors)])
        errors = [e for _, e in sorted(item for part in gathered for item in part)]
    num = den = 0.0
    for n, d in errors:
        num, den = num + n, den + d
    return num / den if den > 0 else 0.0


def refine_block(
    block: nn.Module, recorded: BlockCalls, calibration: CalibrationConfig, desc: str, shard: CallShard | None = None
) -> RefineReport:
    """:func:`train_block`, then the trained parameters are stored in their storage dtypes; if the stored block's
    error over the recorded calls is above the error it started with, the block's stored tensors are put back.

    Returns:
        A :class:`RefineReport` (scope ``"block"``) with the error before and after storage.
    """
    layers = [m for m in block.modules() if isinstance(m, OTQLayerMixin)]
    dtypes = [{n: layer._buffers[n].dtype for n in _TRAINABLE_BUFFERS if layer._buffers.get(n) is not None}
              for layer in layers]  # fmt: skip
    stored = [{n: t.detach().clone() for n, t in layer.stored_tensors().items()} for layer in layers]
    floats = float_parameters(block, calibration)
    float_values = [p.detach().clone() for p in floats]
    started = time.perf_counter()
    with eval_mode(block):
        fit = train_block(block, recorded, calibration, desc, shard)
        for layer, layer_dtypes in zip(layers, dtypes, strict=True):
            _store(layer, layer_dtypes)
        device = layers[0].packed.device
        after = _block_loss(block, recorded, device, shard)
    best_step = fit.best_step
    if after > fit.loss_before:
        _put_back(layers, stored, floats, float_values)
        after, best_step = fit.loss_before, 0
    return RefineReport(fit.loss_before, after, fit.ran, best_step, time.perf_counter() - started, fit.stopped,
                        "block", 1)  # fmt: skip
