"""Block-by-block calibrated quantization: memory of one block, one pass of the model, resumable.

:func:`quantize_sequentially` is the pipeline, top-down:

1. **Trace** (:mod:`.trace`): the float model runs over the calibration batches once (its own trajectories, from
   a pipeline or your ``forward_fn``). Every block invocation's inputs are recorded as links to earlier blocks'
   outputs or as external tensors (the denoiser's inputs, what the model computes between blocks).
   With ``bits_per_weight``, a first pass over the blocks measures every block's candidate settings on its
   statistics (tables only) and one knapsack allocates the budget over the whole model (:meth:`_Run.allocate`).
2. **Per block**, in the order the model runs them:

   a. *statistics* of the block's selected layers, from its cached inputs (batch by batch, as
      :func:`~.sampling.collect_statistics` sums them);
   b. *bits plan*: the block's settings (with a budget: from the plan of step 1);
   c. *fits*: every layer of the block by :func:`~.fit.quantize_calibrated` (activation-weighted codebooks and
      error feedback);
   d. *refinement* (``refine_steps`` per block): codes frozen, the block's float parameters trained to map its
      inputs to the float model's block outputs (:func:`~.refine.refine_block`);
   e. *outputs*: every block sees the float model's inputs (``block_inputs="float"``, the default: measured
      better on the bundled models), or the quantized block's outputs on its inputs become the inputs of the
      blocks that read them (``block_inputs="quantized"``: each fit also absorbs the error arriving from earlier
      blocks, as GPTQ does);
   f. *checkpoint* (with ``work_dir``): the block's stored tensors, its plan and the cached activations still
      needed go to the work folder (:mod:`.work_folder`); a rerun of the same call resumes after the last
      finished block.
3. **Finish**: the plan becomes the saved config's ``module_overrides``, and a diffusers model gets its quantizer
   and config entry, as :func:`~diffusers_otq.api.quantize_model` gives.

Memory: one block's statistics and fits, plus the cached activations (kept in memory up to
``max_activation_bytes``, spilled to disk as safetensors above it); never the statistics of every layer at once.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from ..api import attach_quantizer
from ..config import OTQConfig
from ..convert import LayerReport, PlannedLayer, convert_model, plan_layers, set_submodule
from ..layers import OTQLayerMixin
from .activations import ActivationStore
from .allocation import BitsPlan, CandidateTable, LayerChoice, candidate_specs, measure_candidates, spec_nbytes
from .blocks import BlockCalls, block_outputs
from .config import CalibrationConfig, CalibrationError
from .fit import calibrated_quantizer
from .probes import eval_mode
from .processes import add_flat, all_gather_objects, barrier, gather_in_order, rank_and_world
from .refine import CallShard, RefineReport, refine_block
from .statistics import CalibrationStatistics, LayerStatistics, StatisticsCollector, plan_gram_blocks
from .trace import BlockTrace, External, Output, trace_blocks
from .work_folder import Progress, WorkFolder


__all__ = ["SequentialReport", "quantize_sequentially"]

logger = logging.getLogger(__name__)


@dataclass
class SequentialReport:
    """What a block-by-block run did: per-layer reports, the bits plan (with a budget), per-block refinement,
    the blocks resumed from a work folder, and where the time went."""

    reports: list[LayerReport] = field(default_factory=list)
    choices: list[LayerChoice] = field(default_factory=list)
    refinement: dict[str, dict[str, Any]] = field(default_factory=dict)
    resumed_blocks: int = 0
    blocks: int = 0
    calls: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    peak_activation_bytes: int = 0
    spilled_bytes: int = 0


# ------------------------------------------------------------------------------------------------- driver


def quantize_sequentially(
    model: nn.Module,
    config: OTQConfig,
    calibration: CalibrationConfig,
    run_batch: Callable[[int], Any],
    num_batches: int,
    weight_of: Callable[[tuple, dict], tuple[float, str]],
    *,
    progress: bool = True,
    compute_metrics: bool = True,
    provenance: dict[str, Any] | None = None,
) -> SequentialReport:
    """Calibrate and quantize ``model`` in place, one block at a time (see the module docstring).

    Args:
        model: the float denoiser; ``run_batch`` must call it (directly, or through its pipeline).
        config: what to quantize (``bits``, or a ``bits_per_weight`` budget).
        calibration: fit, refinement and activation-cache settings (``block_inputs``, ``max_activation_bytes``,
            ``work_dir``, ``refine_steps`` per block).
        run_batch: ``run_batch(b)`` runs calibration batch ``b`` through the float model.
        num_batches: calibration batches.
        weight_of: ``(args, kwargs) -> (timestep weight, context)`` of one denoiser call.
        progress: a progress bar over the blocks (with an ETA).
        compute_metrics: per-layer relative MSE and W2 in the reports.
        provenance: recorded in the saved config (what ran), beside the plan.

    Returns:
        A :class:`SequentialReport`.

    Raises:
        CalibrationError: a selected layer no calibration input reached (with ``unseen_layers="error"``); a work
            folder holding another run.
        ValueError: a bits budget below what the model can reach.
    """
    run = _Run(model, config, calibration, compute_metrics)
    started = time.perf_counter()
    with eval_mode(model), torch.no_grad():
        if run.budget is not None:
            run.allocate(run_batch, num_batches, weight_of, progress)
        trace = run.trace(run_batch, num_batches, weight_of)
        done = run.resume(trace)
        bar = tqdm(total=len(trace.order), initial=done, desc="OTQ blocks", unit="block", disable=not progress)
        for position in range(done, len(trace.order)):
            bar.set_postfix_str(trace.order[position])
            run.block(trace, position)
            bar.update(1)
        bar.close()
        run.unseen_layers()
    run.finish(provenance)
    run.report.seconds["total"] = time.perf_counter() - started
    run.store.close()
    logger.info(
        "Quantized %d layers in %d blocks in %.1f s (trace %.1f s, statistics %.1f s, fits %.1f s, refinement %.1f "
        "s); activations: peak %.0f MiB in memory, %.0f MiB spilled",
        len(run.report.reports), run.report.blocks, run.report.seconds["total"], run.report.seconds["trace"],
        run.report.seconds["statistics"], run.report.seconds["fits"], run.report.seconds["refinement"],
        run.store.peak_memory_bytes / 2**20, run.store.spilled_bytes / 2**20,
    )  # fmt: skip
    return run.report


class _Run:
    """The state of one sequential run; each method is one step of the pipeline."""

    def __init__(self, model: nn.Module, config: OTQConfig, calibration: CalibrationConfig, metrics: bool) -> None:
        self.model = model
        self.config = config
        self.calibration = calibration
        self.metrics = metrics
        self.budget = config.bits_per_weight
        self.base = OTQConfig.from_dict({**config.to_dict(), "bits_per_weight": None})
        skip = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        self.plan = plan_layers(model, partial(self.base.layer_spec, skip=skip))  # a shared module: every name
        if not self.plan:
            raise CalibrationError(
                f"the config selects no nn.Linear/nn.Conv2d layer of {type(model).__name__}; nothing to calibrate."
            )
        unique = _unique(self.plan)
        self.numel = sum(layer.module.weight.numel() for layer in unique)
        if self.budget is not None:
            _check_budget_reachable(unique, self.budget, self.numel, config.group_size or 64)
        self.quantized: dict[int, str] = {}  # id(float module) -> the name it was converted under
        self.rank, self.world = rank_and_world()
        self.work = None if calibration.work_dir is None else WorkFolder(calibration.work_dir, self.rank, self.world)
        self.store_folder = None if self.work is None else self.work.spill
        self.store = ActivationStore(calibration.max_activation_bytes, self.store_folder)
        self.chosen: dict[str, LayerChoice] = {}  # the budget's plan by layer name (:meth:`allocate`)
        self.report = SequentialReport()
        self.converted: list[PlannedLayer] = []  # planned layers with their final specs, in conversion order
        self.original_dtype = getattr(model, "dtype", None)
        # the float model's block outputs are streamed when blocks read float inputs, and as refinement targets
        self.float_stream = calibration.block_inputs == "float" or calibration.refine_steps > 0

    # ---------------------------------------------------------------------------------------- 1. trace

    def trace(self, run_batch: Callable[[int], Any], num_batches: int, weight_of: Callable) -> BlockTrace:
        started = time.perf_counter()
        self.num_batches = num_batches
        trace = trace_blocks(self.model, run_batch, range(self.rank, num_batches, self.world), self.store, weight_of)
        orders = all_gather_objects(trace.order, self.world)
        if any(order != orders[0] for order in orders):
            raise CalibrationError(
                f"the processes ran {type(self.model).__name__}'s blocks in different orders ({orders}); block-by-block "
                "calibration needs the same model code on every process."
            )
        self.consumers = trace.consumers()
        self.external_last = _external_last_use(trace)
        self.report.blocks = len(trace.order)
        self.report.calls = sum(all_gather_objects(len(trace.calls), self.world))  # every process's calls
        self.order = trace.order
        self.report.seconds["trace"] += time.perf_counter() - started
        return trace

    # ------------------------------------------------------------------------------- 1b. budget plan

    def allocate(self, run_batch: Callable[[int], Any], num_batches: int, weight_of: Callable, progress: bool) -> None:
        """With a bits budget, step b for the whole model before any fit: a first pass over the blocks measures
        every block's candidates on its statistics (float inputs; only the tables are kept), and one knapsack
        allocates the budget over every layer, as the whole-model allocator does. (A per-block share of the budget
        cost 7 dB of sample PSNR on the bundled DiT at 2.5 bits/weight: the sensitive blocks need more than their
        share.) The plan is kept in the work folder, so a resumed run skips this pass."""
        saved = None if self.work is None else self.work.plan()
        if saved is not None:
            self.chosen = {choice.name: choice for choice in saved}
            return
        started = time.perf_counter()
        trace = self.trace(run_batch, num_batches, weight_of)
        tables, seen = [], set()
        bar = tqdm(total=len(trace.order), desc="OTQ plan", unit="block", disable=not progress)
        for position, name in enumerate(trace.order):
            layers = [layer for layer in self.plan if _inside(layer.name, name) and id(layer.module) not in seen]
            seen |= {id(layer.module) for layer in layers}
            keep = partial(self._float_kept, trace, position, None)
            statistics = self._statistics(trace, name, trace.invocations_of(name), layers, "f", on_outputs=keep)
            if layers:
                tables.append(self._candidates(layers, statistics))
            self._drop(trace, position)
            bar.update(1)
        bar.close()
        plan = CandidateTable.concat(tables).allocate(self.budget)
        self.chosen = {choice.name: choice for choice in plan.choices}
        self.store.close()
        self.store = ActivationStore(self.calibration.max_activation_bytes, self.store_folder)
        self.report.seconds["plan"] += time.perf_counter() - started
        if self.work is not None:
            self.work.save_plan(plan.choices)

    # --------------------------------------------------------------------------------------- 2. blocks

    def block(self, trace: BlockTrace, position: int) -> None:
        """Steps a-f of the module docstring for the block at ``position`` of ``trace.order``."""
        name = trace.order[position]
        invocations = trace.invocations_of(name)
        layers = [layer for layer in self.plan if _inside(layer.name, name) and layer.name not in self._done_names]
        quantized_inputs = self.calibration.block_inputs == "quantized"
        refine = self.calibration.refine_steps > 0 and bool(layers)
        stream = "q" if quantized_inputs else "f"

        # a. statistics on the block's inputs; the float outputs (the float stream, refinement targets)
        started = time.perf_counter()
        targets: dict[tuple[int, int], list[torch.Tensor]] = {}
        if quantized_inputs:
            statistics = self._statistics(trace, name, invocations, layers, "q")
            if self.float_stream:
                self._float_outputs(trace, name, position, invocations, targets if refine else None)
        else:
            statistics = self._statistics(
                trace, name, invocations, layers, "f",
                on_outputs=partial(self._float_kept, trace, position, targets if refine else None),
            )  # fmt: skip
        self.report.seconds["statistics"] += time.perf_counter() - started

        if layers:
            # b. bits plan, c. fits
            started = time.perf_counter()
            self._convert(self._plan(name, layers, statistics), calibrated_quantizer(statistics, self.calibration))
            del statistics
            self.report.seconds["fits"] += time.perf_counter() - started
            # d. refinement
            if refine:
                started = time.perf_counter()
                self._refine(trace, name, invocations, stream, targets)
                self.report.seconds["refinement"] += time.perf_counter() - started
        targets.clear()
        # e. outputs
        if quantized_inputs:
            self._stream_outputs(trace, name, position, invocations, "q")
        self._drop(trace, position)
        # f. checkpoint
        if self.work is not None:
            self._checkpoint(trace, position, [layer.name for layer in layers])

    @property
    def _done_names(self) -> set[str]:
        return {layer.name for layer in self.converted}

    def _module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def _convert(self, planned: list[PlannedLayer], quantizer: Any = None) -> None:
        """Step c: fit and swap in the planned layers; a module already converted under another name (shared by
        two blocks) is reused, not fitted twice. With several processes each fits every ``world``-th layer and
        the fitted tensors are exchanged, so every process ends with the same layers."""
        fresh = _unique([layer for layer in planned if id(layer.module) not in self.quantized])
        mine = fresh[self.rank :: self.world]
        reports = convert_model(self.model, mine, progress=False, compute_metrics=self.metrics, quantizer=quantizer)
        if self.world > 1:
            payload = {layer.name: (_layer_tensors(self._module(layer.name)), report)
                       for layer, report in zip(mine, reports, strict=True)}  # fmt: skip
            fitted = {k: v for part in all_gather_objects(payload, self.world) for k, v in part.items()}
            for layer in fresh:
                if layer not in mine:
                    self._restore_layer(layer, fitted[layer.name][0])
            reports = [fitted[layer.name][1] for layer in fresh]
        self.report.reports += reports
        for layer in planned:
            first = self.quantized.setdefault(id(layer.module), layer.name)
            if first != layer.name:
                set_submodule(self.model, layer.name, self.model.get_submodule(first))
        self.converted += planned

    def _resolver(self, stream: str, call: int) -> Callable[[Output], torch.Tensor]:
        def resolve(leaf: Output) -> torch.Tensor:
            return self.store.get(f"{stream}.{call}.{leaf.invocation}.{leaf.index}")

        return resolve

    def _run(
        self, trace: BlockTrace, module: nn.Module, call: int, invocation: int, stream: str
    ) -> list[torch.Tensor]:
        args, kwargs = trace.inputs(call, invocation, self._resolver(stream, call))
        device = _device_of(module, self.model)
        args, kwargs = _to(args, device), _to(kwargs, device)
        return block_outputs(module(*args, **kwargs))

    def _statistics(
        self,
        trace: BlockTrace,
        name: str,
        invocations: list[tuple[int, int]],
        layers: list[PlannedLayer],
        stream: str,
        on_outputs: Callable[[int, int, list[torch.Tensor]], None] | None = None,
    ) -> CalibrationStatistics:
        """Step a: the block runs on every invocation's inputs from ``stream`` while hooks sum its layers'
        statistics batch by batch (each batch's sums first, in call order, as
        :func:`~.sampling.collect_statistics` does); ``on_outputs(call, invocation, outputs)`` sees the outputs."""
        if not layers and on_outputs is None:
            return CalibrationStatistics({})
        modules = {layer.name: layer.module for layer in layers}
        grams = plan_gram_blocks(modules, self.calibration.records_gram, self.calibration.gram_block)
        collector = StatisticsCollector(modules, grams, self.calibration.max_gram_rows)
        module = self._module(name)
        mine = dict(_by_batch(trace, invocations))
        totals: dict[str, LayerStatistics] | None = None
        with collector.attached():
            # rounds of `world` batches: batch `start + rank` is this process's; the sums are added in batch order
            for start in range(0, self.num_batches, self.world):
                batch = start + self.rank
                collector.start_batch()
                if totals is None:
                    totals = {n: LayerStatistics.zeros_like(stats) for n, stats in collector.batch().items()}
                for call, invocation in mine.get(batch, []):
                    collector.weight = trace.calls[call].weight
                    collector.context = f"{trace.calls[call].context}, block {name}"
                    outputs = self._run(trace, module, call, invocation, stream)
                    if on_outputs is not None:
                        on_outputs(call, invocation, outputs)
                if not modules:
                    continue
                if self.world == 1:
                    for layer_name, stats in totals.items():
                        stats.add_(collector.batch()[layer_name])
                else:
                    ran = batch in mine
                    for flat in gather_in_order(collector.batch() if ran else None, totals, self.world):
                        add_flat(totals, flat)
        totals = totals or {}
        seen = {n: s for n, s in totals.items() if s.seen}
        return CalibrationStatistics(seen, {"block": name})

    def _float_kept(
        self,
        trace: BlockTrace,
        position: int,
        targets: dict[tuple[int, int], list[torch.Tensor]] | None,
        call: int,
        invocation: int,
        outputs: list[torch.Tensor],
    ) -> None:
        """Float outputs: into the float stream where later blocks read them, and into ``targets`` when given."""
        self._keep(trace, "f", call, invocation, outputs, position)
        if targets is not None:
            targets[call, invocation] = [t.detach().float().cpu() for t in outputs]

    def _float_outputs(
        self,
        trace: BlockTrace,
        name: str,
        position: int,
        invocations: list[tuple[int, int]],
        targets: dict[tuple[int, int], list[torch.Tensor]] | None,
    ) -> None:
        """The float block on the float stream (:meth:`_float_kept` keeps what is needed)."""
        module = self._module(name)
        for call, invocation in invocations:
            self._float_kept(
                trace, position, targets, call, invocation, self._run(trace, module, call, invocation, "f")
            )

    def _stream_outputs(
        self, trace: BlockTrace, name: str, position: int, invocations: list[tuple[int, int]], stream: str
    ) -> None:
        """Step e: the (quantized) block's outputs on ``stream`` that later blocks read, into ``stream``."""
        module = self._module(name)
        needed = [
            (c, i) for c, i in invocations if any((c, i, k) in self.consumers for k in range(self._outs(trace, c, i)))
        ]
        for call, invocation in needed:
            self._keep(trace, stream, call, invocation, self._run(trace, module, call, invocation, stream), position)

    @staticmethod
    def _outs(trace: BlockTrace, call: int, invocation: int) -> int:
        return trace.calls[call].invocations[invocation].outputs

    def _keep(
        self, trace: BlockTrace, stream: str, call: int, invocation: int, outputs: list[torch.Tensor], position: int
    ) -> None:
        for index, tensor in enumerate(outputs):
            last = self.consumers.get((call, invocation, index))
            if last is not None and last > position:
                self.store.put(f"{stream}.{call}.{invocation}.{index}", tensor)

    def _drop(self, trace: BlockTrace, position: int) -> None:
        """Forget the cached tensors no block after ``position`` reads."""
        for (call, invocation, index), last in self.consumers.items():
            if last == position:
                for stream in ("q", "f"):
                    self.store.pop(f"{stream}.{call}.{invocation}.{index}")
        for key in self.external_last.get(position, ()):
            self.store.pop(key)

    def _plan(self, name: str, layers: list[PlannedLayer], statistics: CalibrationStatistics) -> list[PlannedLayer]:
        """Step b: the block's layers with their settings (with a budget: from the plan :meth:`allocate` made)."""
        unseen = [layer.name for layer in layers if layer.name not in statistics]
        if unseen and self.calibration.unseen_layers == "error":
            raise _unseen_error(unseen)
        if self.budget is None:
            return layers
        by_module = {id(layer.module): self.chosen[layer.name] for layer in self.plan if layer.name in self.chosen}
        fresh = _unique([layer for layer in layers if id(layer.module) not in self.quantized])
        self.report.choices += [by_module[id(layer.module)] for layer in fresh]
        return [replace(layer, spec=by_module[id(layer.module)].spec) for layer in layers]

    def _candidates(self, layers: list[PlannedLayer], statistics: CalibrationStatistics) -> CandidateTable:
        """The block's candidate table; with several processes each measures every ``world``-th layer and the
        rows are exchanged (in the one-process layer order)."""
        names = [layer.name for layer in _unique(layers)]
        mine = names[self.rank :: self.world]
        measure = partial(measure_candidates, self.model, self.base, statistics or None, self.calibration,
                          progress=False)  # fmt: skip
        if self.world == 1:
            return measure(names=names)
        table = measure(names=mine) if mine else None
        rows = {} if table is None else {
            layer.name: tuple(getattr(table, part)[i] for part in _ROW_PARTS) for i, layer in enumerate(table.layers)
        }  # fmt: skip
        parts = all_gather_objects((rows, None if table is None else (table.sensitivity, table.estimate)), self.world)
        rows = {k: v for part, _ in parts for k, v in part.items()}
        sensitivity, estimate = next(kind for _, kind in parts if kind is not None)
        planned = {layer.name: layer for layer in layers}
        columns = list(zip(*(rows[n] for n in names), strict=True))
        return CandidateTable(tuple(planned[n] for n in names), *(tuple(c) for c in columns),
                              sensitivity=sensitivity, estimate=estimate)  # fmt: skip

    def _refine(
        self,
        trace: BlockTrace,
        name: str,
        invocations: list[tuple[int, int]],
        stream: str,
        targets: dict[tuple[int, int], list[torch.Tensor]],
    ) -> None:
        """Step d: the quantized block learns to map its inputs (``stream``) to the float block's outputs."""
        # contiguous copies: torch's CPU backward through GroupNorm crashes on some channels-last-strided inputs
        calls = [_contiguous(trace.inputs(c, i, self._resolver(stream, c))) for c, i in invocations]
        recorded = BlockCalls(calls, [targets[c, i] for c, i in invocations])
        shard = self._shard(trace, invocations, recorded) if self.world > 1 else None
        with torch.enable_grad():
            outcome: RefineReport = refine_block(self._module(name), recorded, self.calibration,
                                                 f"OTQ refine {name}", shard)  # fmt: skip
        self.report.refinement[name] = {
            "loss_before": outcome.loss_before, "loss_after": outcome.loss_after, "steps": outcome.steps,
            "best_step": outcome.best_step, "stopped": outcome.stopped,
        }  # fmt: skip

    def _shard(self, trace: BlockTrace, invocations: list[tuple[int, int]], recorded: BlockCalls) -> CallShard:
        """Where each of the block's calls is, in the one-process order (batch, then call order)."""
        mine = [(trace.calls[c].batch, c, self.rank, local, recorded.outputs[local][0].shape[0])
                for local, (c, _) in enumerate(invocations)]  # fmt: skip
        every = sorted(item for part in all_gather_objects(mine, self.world) for item in part)
        local = tuple(entry[3] if entry[2] == self.rank else None for entry in every)
        return CallShard(local, tuple(entry[4] for entry in every), self.world)

    def unseen_layers(self) -> None:
        """Layers of blocks that never ran: refused, or quantized data-free (``unseen_layers="data-free"``)."""
        left = [layer for layer in self.plan if layer.name not in self._done_names]
        if not left:
            return
        if self.calibration.unseen_layers == "error":
            raise _unseen_error([layer.name for layer in left])
        logger.warning(
            "No calibration input reached %s; they are quantized data-free.", ", ".join(layer.name for layer in left)
        )
        if self.budget is not None:
            left = [replace(layer, spec=self.chosen[layer.name].spec) if layer.name in self.chosen else layer
                    for layer in left]  # fmt: skip
            self.report.choices += [self.chosen[layer.name] for layer in _unique(left) if layer.name in self.chosen]
        self._convert(left)

    # --------------------------------------------------------------------------------------- 3. finish

    def finish(self, provenance: dict[str, Any] | None) -> None:
        """The saved config: the plan as ``module_overrides`` (budget runs), what ran in ``provenance``; a diffusers
        model gets its quantizer (:func:`~diffusers_otq.api.attach_quantizer`)."""
        record = dict(provenance or self.config.provenance or {})
        record["calibration"] = {
            **record.get("calibration", {}),
            **self.calibration.describe(),
            "sequential": True,
            "blocks": self.report.blocks,
            "calls": self.report.calls,
        }
        if self.report.refinement:
            # in block order (a resumed run reads them back from JSON): the float sums below depend on the order
            refined = sorted(self.report.refinement.items(), key=lambda item: self.order.index(item[0]))
            blocks = [record for _, record in refined]
            stopped = [f"{name}: {r['stopped']}" for name, r in refined if r["stopped"]]
            record["refinement"] = {
                "scope": "sequential blocks", "blocks": len(blocks), "steps_per_block": self.calibration.refine_steps,
                "steps": sum(r["steps"] for r in blocks),
                "loss_before": sum(r["loss_before"] for r in blocks) / len(blocks),  # mean relative block error
                "loss_after": sum(r["loss_after"] for r in blocks) / len(blocks),
                "lr": self.calibration.refine_lr, "batch_size": self.calibration.refine_batch_size,
                "float_params": self.calibration.refine_float_params, "stopped": "; ".join(stopped) or None,
            }  # fmt: skip
        if self.budget is not None:
            plan = BitsPlan(self.budget, tuple(self.report.choices), "output")
            config = plan.resolved_config(self.config, record)
        else:
            config = OTQConfig.from_dict({**self.config.to_dict(), "provenance": record})
        order = {layer.name: i for i, layer in enumerate(self.plan)}
        converted = sorted(self.converted, key=lambda layer: order[layer.name])
        attach_quantizer(self.model, config, converted, self.original_dtype)
        self.report.reports.sort(key=lambda r: order.get(r.name, len(order)))

    # ------------------------------------------------------------------------------------ work folder

    def _fingerprint(self, trace: BlockTrace) -> dict[str, Any]:
        return {
            "model": type(self.model).__name__,
            "layers": [[layer.name, list(layer.module.weight.shape)] for layer in self.plan],
            "config": json.loads(json.dumps(self.config.to_dict(), default=str)),
            "calibration": json.loads(json.dumps(self.calibration.describe(), default=str)),
            "block_inputs": self.calibration.block_inputs,
            "blocks": trace.order,
            "calls": len(trace.calls),
            "processes": self.world,
        }

    def resume(self, trace: BlockTrace) -> int:
        """With a work folder: check it belongs to this run and restore its finished blocks; returns how many."""
        if self.work is None:
            return 0
        progress = self.work.open(self._fingerprint(trace))
        if progress is None:
            return 0
        done = progress.done
        self.report.choices = progress.choices
        self.report.reports = [LayerReport(**r) for r in progress.reports]
        self.report.refinement = progress.refinement
        chosen = {c.name: c.spec for c in self.report.choices}
        for position in range(done):
            tensors, names = self.work.block(position)
            for layer in [layer for layer in self.plan if layer.name in names]:
                layer = replace(layer, spec=chosen.get(layer.name, layer.spec))
                prefix = f"{layer.name}."
                self._restore_layer(layer, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
                self.quantized.setdefault(id(layer.module), layer.name)
                self.converted.append(layer)
        self.store.load(self.work.streams(done - 1))
        for position in range(done):  # externals the finished blocks were the last to read
            for key in self.external_last.get(position, ()):
                self.store.pop(key)
        self.report.resumed_blocks = done
        logger.info("Resuming from %s after %d of %d blocks", self.work.path, done, len(trace.order))
        return done

    def _restore_layer(self, layer: PlannedLayer, tensors: dict[str, torch.Tensor]) -> None:
        """Swap in ``layer`` quantized from its stored tensors (``weight``, ``codebook``, ..., ``bias``)."""
        weight = layer.module.weight
        quantized = layer.target.empty_like(layer.module, layer.spec, weight.dtype, weight.device)
        for stored in quantized.stored_tensors():
            quantized.set_stored(stored, tensors[stored].to(weight.device, copy=True))
        if quantized.bias is not None:
            quantized.bias.data.copy_(tensors["bias"])
        set_submodule(self.model, layer.name, quantized)

    def _checkpoint(self, trace: BlockTrace, position: int, names: list[str]) -> None:
        """Step f: the live cached activations (every process), then the block's layers and the progress record
        (see :mod:`.work_folder`)."""
        streams = [key for key in self.store.keys() if not key.startswith("x.")]
        self.store.save(self.work.streams(position), streams)
        barrier(self.world)  # every process's activations are written before the progress record moves on
        progress = Progress(position + 1, self.report.choices, [asdict(r) for r in self.report.reports],
                            self.report.refinement)  # fmt: skip
        layers = {name: _layer_tensors(self._module(name)) for name in names}
        self.work.finish_block(position, trace.order[position], layers, progress)
        barrier(self.world)
        self.work.streams(position - 1).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ helpers


def _layer_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """An OTQ layer's stored tensors and bias (CPU, contiguous), by name; {} for anything else."""
    if not isinstance(module, OTQLayerMixin):
        return {}
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.stored_tensors().items()}
    if module.bias is not None:
        tensors["bias"] = module.bias.detach().cpu().contiguous()
    return tensors


_ROW_PARTS = ("options", "sizes", "errors", "distortions", "fixed")  # a candidate table's per-layer fields


def _inside(layer: str, block: str) -> bool:
    return layer == block or layer.startswith(block + ".")


def _unique(plan: list[PlannedLayer]) -> list[PlannedLayer]:
    seen: set[int] = set()
    out = []
    for layer in plan:
        if id(layer.module) not in seen:
            seen.add(id(layer.module))
            out.append(layer)
    return out


def _by_batch(trace: BlockTrace, invocations: list[tuple[int, int]]) -> list[tuple[int, list[tuple[int, int]]]]:
    groups: dict[int, list[tuple[int, int]]] = {}
    for call, invocation in invocations:
        groups.setdefault(trace.calls[call].batch, []).append((call, invocation))
    return sorted(groups.items())


def _external_last_use(trace: BlockTrace) -> dict[int, list[str]]:
    """Position in ``trace.order`` -> the external keys no later block reads."""
    position = {name: i for i, name in enumerate(trace.order)}
    last: dict[str, int] = {}
    for call in trace.calls:
        for inv in call.invocations:
            for leaf in inv.leaves:
                if isinstance(leaf, External):
                    last[leaf.key] = max(last.get(leaf.key, -1), position[inv.block])
    out: dict[int, list[str]] = defaultdict(list)
    for key, at in last.items():
        out[at].append(key)
    return out


def _device_of(module: nn.Module, model: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers(), *model.parameters()):
        return tensor.device
    return torch.device("cpu")


def _to(value: Any, device: torch.device) -> Any:
    return tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, value)


def _contiguous(value: Any) -> Any:
    return tree_map(lambda v: v.contiguous() if isinstance(v, torch.Tensor) else v, value)


def _check_budget_reachable(plan: list[PlannedLayer], budget: float, numel: int, group_size: int) -> None:
    """Refuse a budget below the cheapest setting of every layer before any work (sizes need no fit)."""
    floor = 0
    for layer in plan:
        weight = layer.module.weight
        specs = candidate_specs(layer.spec, weight[0].numel(), group_size, weight.shape[0])
        floor += min(spec_nbytes(weight, spec) for spec in specs)
    if budget * numel / 8 < floor:
        raise ValueError(
            f"bits_per_weight={budget} is below what this model can reach: the cheapest setting of every layer "
            f"takes {floor * 8 / numel:.3f} bits/weight over its {numel:,} quantized weights. Raise bits_per_weight "
            f"to at least {math.ceil(floor * 800 / numel) / 100:.2f}, or keep small layers in float "
            "(modules_to_not_convert)."
        )


def _unseen_error(names: list[str]) -> CalibrationError:
    return CalibrationError(
        f"{len(names)} selected layer(s) received no input during calibration: {', '.join(names)}. The sampling "
        "never runs them (or only with zero timestep weight). Exclude them with modules_to_not_convert, or pass "
        "CalibrationConfig(unseen_layers='data-free') to quantize them without statistics."
    )
