"""The evaluation config (YAML) and its expansion into work units.

A config lists models, sampler settings, metric sizes and *blocks*; each block is a sub-grid
``methods x granularities x bits x scopes`` (plus ``methods x budgets`` mixed-precision variants and peer
formats) with the metric sets and seeds to compute on it. Blocks overlap freely: a :class:`Unit` (one model
quantized one way) collects every ``(metric_set, seed)`` task any block asks of it, so each variant is
quantized once per process.

A block's ``budgets`` (bits/weight, e.g. ``[2.0, 2.5]``) give variants of granularity ``"mixed"`` whose row
``bits`` is the budget as a float (``2.0``, ``2.5``), so their keys never collide with a code width's. The
calibrated methods (``ot-vp+aw``, ``ot-vp+ef``, ``ot-vp+cal``) fit on statistics collected once per model with
the ``calibration`` section (sizes and seed) and the ``sampling`` section (steps and guidance).

``weights`` and ``probe`` do not depend on the seed and always use seed 0; ``samples``, ``fid`` and ``steps``
use the block's seeds (seed ``s`` draws the noise of batch ``b`` from ``manual_seed(s * 1_000_003 + b)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..calibration import CalibrationConfig
from ..options import GRANULARITIES
from .gguf import GGUF_FORMATS
from .peers import PEER_FORMATS
from .store import row_key
from .variants import CALIBRATED, EVAL_METHODS, MIXED, MIXED_METHODS, SCOPES, Variant


__all__ = ["METRIC_SETS", "Calibration", "EvalConfig", "Unit", "expand_units", "load_config"]

METRIC_SETS: tuple[str, ...] = ("weights", "probe", "samples", "fid", "steps")
SEEDLESS: tuple[str, ...] = ("weights", "probe")


@dataclass(frozen=True)
class Sampling:
    """How samples are drawn: Euler ``steps``, CFG ``guidance_scale``, ``batch_size`` images per batch."""

    steps: int = 15
    guidance_scale: float = 2.0
    batch_size: int = 50


@dataclass(frozen=True)
class Sizes:
    """How many images each metric uses."""

    probe_images: int = 64  # the paper's t=0 velocity probe: the first 64 test images
    latent_images: int = 10_000  # the paper's latent probe: 10k random test images (seed 0)
    samples: int = 100  # sample PSNR/SSIM and class accuracy, per seed
    fid_samples: int = 500  # FID vs full precision and vs the test set, per seed
    fid_test_images: int = 10_000  # test images behind the test-set Inception statistics
    steps_sweep: tuple[int, ...] = (5, 10, 15, 30, 50)
    steps_samples: int = 32
    grid_images: int = 10  # samples saved as a PNG row per variant (seed 0)


@dataclass(frozen=True)
class Calibration:
    """The calibration statistics of the calibrated methods: ``num_samples`` images sampled by the full-precision
    pipeline in batches of ``batch_size``, noise from ``seed`` (batch ``b``: ``manual_seed(seed * 1_000_003 +
    b)``, so the seed must be none of the evaluation's seeds). Steps and guidance come from :class:`Sampling`.
    ``refine_steps`` and ``refine_eval_every`` set the refinement of the refined methods (``ot-vp+ref``)."""

    num_samples: int = 64
    batch_size: int = 32
    seed: int = 1234
    refine_steps: int = 0  # refinement steps of the refined methods (ot-vp+ref); 0: their default, REFINE_STEPS
    refine_eval_every: int = CalibrationConfig.refine_eval_every  # steps between measurements of the teacher loss


@dataclass(frozen=True)
class Block:
    """A sub-grid and what to measure on it (``budgets``: bits/weight budgets of mixed-precision variants)."""

    name: str
    methods: tuple[str, ...] = ()
    granularities: tuple[str, ...] = ("channel",)
    bits: tuple[int, ...] = ()
    budgets: tuple[float, ...] = ()
    scopes: tuple[str, ...] = ("deploy",)
    peers: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ("weights", "probe")
    seeds: tuple[int, ...] = (0,)
    reference: bool = False  # also measure the full-precision model with these metric sets


@dataclass(frozen=True)
class EvalConfig:
    """A whole evaluation: models, sampler, sizes, blocks, the group size of ``group`` granularity, threads."""

    models: tuple[str, ...]
    blocks: tuple[Block, ...]
    sampling: Sampling = field(default_factory=Sampling)
    sizes: Sizes = field(default_factory=Sizes)
    group_size: int = 64
    threads: int = 1
    calibration: Calibration = field(default_factory=Calibration)

    def calibration_config(self) -> CalibrationConfig:
        """The :class:`~diffusers_otq.CalibrationConfig` of the statistics (and the base of every calibrated fit):
        the ``calibration`` section's sizes, seed and refinement, the sampler's steps and guidance, no progress
        bars. Only the refined methods refine (:meth:`~.variants.CalibratedFit.calibration`)."""
        return CalibrationConfig(
            num_samples=self.calibration.num_samples,
            batch_size=self.calibration.batch_size,
            num_inference_steps=self.sampling.steps,
            guidance_scale=self.sampling.guidance_scale,
            seed=self.calibration.seed,
            refine_steps=self.calibration.refine_steps,
            refine_eval_every=self.calibration.refine_eval_every,
            progress=False,
        )


@dataclass(frozen=True)
class Unit:
    """One model in one variant (``variant=None``: the full-precision reference) and its tasks."""

    model: str
    variant: Variant | None
    tasks: tuple[tuple[str, int], ...]  # (metric_set, seed), sorted

    @property
    def method(self) -> str:
        return "fp" if self.variant is None else self.variant.method

    @property
    def calibrated(self) -> bool:
        """Whether quantizing this unit needs the model's calibration statistics."""
        return self.variant is not None and self.variant.calibrated

    def row_fields(self) -> dict[str, Any]:
        """The key fields of this unit's rows (without metric_set and seed)."""
        if self.variant is None:
            return {"model": self.model, "method": "fp", "granularity": "none", "bits": 32, "scope": "deploy"}
        v = self.variant
        return {
            "model": self.model,
            "method": v.method,
            "granularity": v.granularity,
            "bits": v.bits,
            "scope": v.scope,
        }

    def pending(self, done: set[str]) -> list[tuple[str, int]]:
        """The ``(metric_set, seed)`` tasks whose row key (see :func:`~.store.row_key`) is not in ``done``."""
        fields = self.row_fields()
        return [(m, s) for m, s in self.tasks if row_key({**fields, "metric_set": m, "seed": s}) not in done]


def _tuple(value: Any, what: str, kind: type) -> tuple:
    items = value if isinstance(value, list | tuple) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, kind):
            raise ValueError(f"{what} must be a {kind.__name__} or a list of them, got {value!r}.")
    return tuple(items)


def _choices(values: tuple, allowed: tuple | list, what: str) -> tuple:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{what}: {bad} not allowed; expected values from {list(allowed)}.")
    return values


def _known_keys(data: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected keys from {sorted(allowed)}.")


def _budgets(value: Any, what: str) -> tuple[float, ...]:
    """Bits/weight budgets as floats in (0, 32] (``2`` and ``2.0`` are the same budget)."""
    items = value if isinstance(value, list | tuple) else [value]
    for item in items:
        if (
            isinstance(item, bool)
            or not isinstance(item, int | float)
            or not math.isfinite(item)
            or not 0 < item <= 32
        ):
            raise ValueError(
                f"{what} must be bits/weight budgets in (0, 32] (a number or a list of them), got {value!r}; "
                "e.g. budgets: [2.0, 2.5, 3.0]."
            )
    return tuple(float(item) for item in items)


def _block(data: Any, index: int) -> Block:
    where = f"blocks[{index}]"
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError(f"{where} must be a mapping with a 'name', got {data!r}.")
    _known_keys(data, set(Block.__dataclass_fields__), where)
    peers = data.get("peers", [])
    peers = tuple(PEER_FORMATS) if peers == "all" else _tuple(peers, f"{where}.peers", str)
    granularities = _tuple(data.get("granularities", ["channel"]), f"{where}.granularities", str)
    if MIXED in granularities:
        raise ValueError(
            f"{where}.granularities: {MIXED!r} is not a granularity to list; mixed-precision variants come from a "
            "bits/weight budget, e.g. budgets: [2.0, 2.5]."
        )
    block = Block(
        name=str(data["name"]),
        methods=_choices(
            _tuple(data.get("methods", []), f"{where}.methods", str), list(EVAL_METHODS), f"{where}.methods"
        ),
        granularities=_choices(granularities, list(GRANULARITIES), f"{where}.granularities"),
        bits=_choices(_tuple(data.get("bits", []), f"{where}.bits", int), list(range(1, 9)), f"{where}.bits"),
        budgets=_budgets(data.get("budgets", []), f"{where}.budgets"),
        scopes=_choices(
            _tuple(data.get("scopes", ["deploy"]), f"{where}.scopes", str), list(SCOPES), f"{where}.scopes"
        ),
        peers=_choices(peers, [*PEER_FORMATS, *GGUF_FORMATS], f"{where}.peers"),
        metrics=_choices(
            _tuple(data.get("metrics", ["weights", "probe"]), f"{where}.metrics", str),
            list(METRIC_SETS),
            f"{where}.metrics",
        ),
        seeds=_tuple(data.get("seeds", [0]), f"{where}.seeds", int),
        reference=bool(data.get("reference", False)),
    )
    if block.methods and not block.bits and not block.budgets:
        raise ValueError(
            f"{where} ({block.name}) lists methods but no bits or budgets; add e.g. bits: [2, 3, 4] (code widths) "
            "or budgets: [2.5] (bits/weight, mixed precision)."
        )
    if block.budgets and not block.methods:
        raise ValueError(f"{where} ({block.name}) lists budgets but no methods; add e.g. methods: [ot-vp+cal].")
    not_mixed = [m for m in block.methods if m not in MIXED_METHODS]
    if block.budgets and not_mixed:
        raise ValueError(
            f"{where} ({block.name}): budgets run our methods {list(MIXED_METHODS)} only, got {not_mixed}; move "
            f"{not_mixed} to a block without budgets."
        )
    calibrated = [m for m in block.methods if m in CALIBRATED]
    if "paper" in block.scopes and (calibrated or block.budgets):
        what = f"the calibrated method(s) {calibrated}" if calibrated else "budgets"
        raise ValueError(
            f"{where} ({block.name}): {what} run in the deploy scope only (they fit the packed Linear/Conv2d "
            "layers), but scopes lists 'paper'; use scopes: [deploy], or move them to a block of their own."
        )
    return block


def _calibration(data: Any, where: str) -> Calibration:
    if not isinstance(data, dict):
        raise ValueError(
            f"{where}: calibration must be a mapping, e.g. {{num_samples: 64, seed: 1234}}, got {data!r}."
        )
    _known_keys(data, set(Calibration.__dataclass_fields__), f"{where}: calibration")
    for name, value in data.items():
        low = 0 if name in ("seed", "refine_steps") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(
                f"{where}: calibration.{name}={value!r} must be an int >= {low}, e.g. "
                f"{name}: {getattr(Calibration(), name)}."
            )
    return Calibration(**data)


def load_config(source: Path | dict) -> EvalConfig:
    """Parse a YAML file (or an already parsed dict) into an :class:`EvalConfig`; every mistake is a ValueError
    that names the key, the bad value and what is allowed."""
    if isinstance(source, dict):
        data, where = source, "config"
    else:
        import yaml

        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation config {path} does not exist; see scripts/configs/ for examples.")
        data, where = yaml.safe_load(path.read_text()), str(path)
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a YAML mapping, got {type(data).__name__}.")
    _known_keys(data, {"models", "blocks", "sampling", "sizes", "group_size", "threads", "calibration"}, where)
    if not data.get("models") or not data.get("blocks"):
        raise ValueError(f"{where} needs non-empty 'models' and 'blocks'.")
    sampling, sizes = data.get("sampling") or {}, data.get("sizes") or {}
    _known_keys(sampling, set(Sampling.__dataclass_fields__), f"{where}: sampling")
    _known_keys(sizes, set(Sizes.__dataclass_fields__), f"{where}: sizes")
    if "steps_sweep" in sizes:
        sizes = {**sizes, "steps_sweep": _tuple(sizes["steps_sweep"], "sizes.steps_sweep", int)}
    config = EvalConfig(
        models=_tuple(data["models"], "models", str),
        blocks=tuple(_block(block, i) for i, block in enumerate(data["blocks"])),
        sampling=Sampling(**sampling),
        sizes=Sizes(**sizes),
        group_size=int(data.get("group_size", 64)),
        threads=int(data.get("threads", 1)),
        calibration=_calibration(data.get("calibration") or {}, where),
    )
    if config.sampling.steps < 1 or config.sampling.batch_size < 1 or config.threads < 1:
        raise ValueError(f"{where}: sampling.steps, sampling.batch_size and threads must be >= 1.")
    seeds = sorted({seed for block in config.blocks for seed in block.seeds})
    calibrated = any(method in CALIBRATED for block in config.blocks for method in block.methods)
    if calibrated and config.calibration.seed in seeds:
        raise ValueError(
            f"{where}: calibration.seed={config.calibration.seed} is also an evaluation seed (the blocks use seeds "
            f"{seeds}); the calibration samples must not share the evaluated noise. Pick another seed, e.g. "
            f"calibration: {{seed: {Calibration().seed}}}."
        )
    config.calibration_config()  # the sizes and sampler settings make a valid CalibrationConfig
    return config


def _tasks(block: Block) -> set[tuple[str, int]]:
    return {(metric, 0) if metric in SEEDLESS else (metric, seed) for metric in block.metrics for seed in block.seeds}


def _peer_bits(name: str) -> int:
    """The nominal code bits of a peer format (a library's, or a GGUF type built with llama.cpp)."""
    return GGUF_FORMATS[name].bits if name in GGUF_FORMATS else PEER_FORMATS[name].bits


def expand_units(config: EvalConfig) -> list[Unit]:
    """Every unit of the config in a fixed order (model, then reference, ours, peers), tasks merged over blocks."""
    tasks: dict[tuple[str, Variant | None], set[tuple[str, int]]] = {}
    for model in config.models:
        for block in config.blocks:
            variants: list[Variant | None] = [None] if block.reference else []
            variants += [
                Variant(method, granularity, bits, scope, config.group_size)
                for scope in block.scopes
                for method in block.methods
                for granularity in block.granularities
                for bits in block.bits
            ]
            variants += [
                Variant(method, MIXED, budget, scope, config.group_size)
                for scope in block.scopes
                for method in block.methods
                for budget in block.budgets
            ]
            variants += [Variant(peer, "native", _peer_bits(peer), "deploy") for peer in block.peers]
            for variant in variants:
                found = _tasks(block)
                if variant is None:  # the full-precision model has no weight error and no steps sweep against itself
                    found = {task for task in found if task[0] not in ("weights", "steps")}
                tasks.setdefault((model, variant), set()).update(found)
    order = {metric: i for i, metric in enumerate(METRIC_SETS)}
    return [
        Unit(model, variant, tuple(sorted(found, key=lambda t: (order[t[0]], t[1]))))
        for (model, variant), found in tasks.items()
        if found
    ]
