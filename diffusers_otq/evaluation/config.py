"""The evaluation config (YAML) and its expansion into work units.

A config lists models, sampler settings, metric sizes and *blocks*; each block is a sub-grid
``methods x granularities x bits x scopes`` (plus peer formats) with the metric sets and seeds to compute on
it. Blocks overlap freely: a :class:`Unit` (one model quantized one way) collects every ``(metric_set, seed)``
task any block asks of it, so each variant is quantized once per process.

``weights`` and ``probe`` do not depend on the seed and always use seed 0; ``samples``, ``fid`` and ``steps``
use the block's seeds (seed ``s`` draws the noise of batch ``b`` from ``manual_seed(s * 1_000_003 + b)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..functional.fitters import METHODS
from ..options import GRANULARITIES
from .peers import PEER_FORMATS
from .store import row_key
from .variants import SCOPES, Variant


__all__ = ["METRIC_SETS", "EvalConfig", "Unit", "expand_units", "load_config"]

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
class Block:
    """A sub-grid and what to measure on it."""

    name: str
    methods: tuple[str, ...] = ()
    granularities: tuple[str, ...] = ("channel",)
    bits: tuple[int, ...] = ()
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


@dataclass(frozen=True)
class Unit:
    """One model in one variant (``variant=None``: the full-precision reference) and its tasks."""

    model: str
    variant: Variant | None
    tasks: tuple[tuple[str, int], ...]  # (metric_set, seed), sorted

    @property
    def method(self) -> str:
        return "fp" if self.variant is None else self.variant.method

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


def _block(data: Any, index: int) -> Block:
    where = f"blocks[{index}]"
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError(f"{where} must be a mapping with a 'name', got {data!r}.")
    _known_keys(data, set(Block.__dataclass_fields__), where)
    peers = data.get("peers", [])
    peers = tuple(PEER_FORMATS) if peers == "all" else _tuple(peers, f"{where}.peers", str)
    block = Block(
        name=str(data["name"]),
        methods=_choices(_tuple(data.get("methods", []), f"{where}.methods", str), list(METHODS), f"{where}.methods"),
        granularities=_choices(
            _tuple(data.get("granularities", ["channel"]), f"{where}.granularities", str),
            list(GRANULARITIES),
            f"{where}.granularities",
        ),
        bits=_choices(_tuple(data.get("bits", []), f"{where}.bits", int), list(range(1, 9)), f"{where}.bits"),
        scopes=_choices(
            _tuple(data.get("scopes", ["deploy"]), f"{where}.scopes", str), list(SCOPES), f"{where}.scopes"
        ),
        peers=_choices(peers, list(PEER_FORMATS), f"{where}.peers"),
        metrics=_choices(
            _tuple(data.get("metrics", ["weights", "probe"]), f"{where}.metrics", str),
            list(METRIC_SETS),
            f"{where}.metrics",
        ),
        seeds=_tuple(data.get("seeds", [0]), f"{where}.seeds", int),
        reference=bool(data.get("reference", False)),
    )
    if block.methods and not block.bits:
        raise ValueError(f"{where} ({block.name}) lists methods but no bits; add e.g. bits: [2, 3, 4].")
    return block


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
    _known_keys(data, {"models", "blocks", "sampling", "sizes", "group_size", "threads"}, where)
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
    )
    if config.sampling.steps < 1 or config.sampling.batch_size < 1 or config.threads < 1:
        raise ValueError(f"{where}: sampling.steps, sampling.batch_size and threads must be >= 1.")
    return config


def _tasks(block: Block) -> set[tuple[str, int]]:
    return {(metric, 0) if metric in SEEDLESS else (metric, seed) for metric in block.metrics for seed in block.seeds}


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
            variants += [Variant(peer, "native", PEER_FORMATS[peer].bits, "deploy") for peer in block.peers]
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
