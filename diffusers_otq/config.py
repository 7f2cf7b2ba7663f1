"""``OTQConfig``: the quantization config diffusers (and transformers) pass to the "otq" quantizer.

It is saved as ``quantization_config`` in each quantized model's ``config.json`` and rebuilt with
``OTQConfig(**that_dict)`` on reload, so every field is JSON-safe and the constructor validates everything:

>>> from diffusers_otq import OTQConfig
>>> config = OTQConfig(bits=3, modules_to_not_convert=["proj_out"], module_overrides={"attn*": {"bits": 4}})
>>> config.as_code()
"OTQConfig(bits=3, method='ot-vp', granularity='channel', modules_to_not_convert=['proj_out'], module_overrides={'attn*': {'bits': 4}})"
>>> print(repr(OTQConfig(bits=2)))  # as diffusers prints its configs: class name and the JSON of what differs
OTQConfig {
  "bits": 2,
  "format_version": 7,
  "quant_method": "otq"
}
<BLANKLINE>
>>> OTQConfig.from_dict(config.to_dict()) == config
True
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from enum import Enum
from typing import Any

import torch
from diffusers.quantizers.quantization_config import QuantizationConfigMixin as DiffusersQuantizationConfigMixin
from torch import nn

from .checkpoint import CheckpointError
from .convert import matches_module_name
from .noise_bands import check_band_edges
from .options import CODEBOOK_DTYPES, DEFAULT_METHOD, SCALED_CODEBOOK_DTYPES, LayerSpec


logger = logging.getLogger(__name__)

try:  # transformers is optional for diffusers; with it, the same config also serves text encoders
    from transformers.utils.quantization_config import (
        QuantizationConfigMixin as TransformersQuantizationConfigMixin,
    )
except ImportError:  # pragma: no cover - transformers is a dependency of this package
    TransformersQuantizationConfigMixin = object  # type: ignore[misc,assignment]


__all__ = ["FORMAT_VERSION", "OTQConfig", "OTQMethod"]

FORMAT_VERSION = 7
"""Version of the packed checkpoint layout (see :mod:`diffusers_otq.quantized_tensor`); bumped on any change.

1: codes, codebooks, group scales. 2: adds the optional low-rank branch (``lowrank_up``, ``lowrank_down``) and
input rotation (``rotation_signs``) of :mod:`diffusers_otq.structure`. 3: the packed codes are stored as
``<layer>.weight`` (was ``<layer>.packed``), where diffusers' LoRA loaders look for a layer's weight, and the header
checksums cover every tensor with its dtype and shape. 4: the headers also carry the checksums of the config.json
fields (:mod:`diffusers_otq.config_checksums`), compared with config.json on load. 5: vector codebooks
(``vector_dim``: ``(C, K, d)`` codebooks, one ``bits * d``-bit code per ``d`` consecutive inputs). 6: int8
codebooks (``codebook_dtype="int8"``: integer codewords plus one float32 ``codebook_scale`` per codebook). 7:
codebooks per noise-level band (``noise_band_edges``: ``B`` sets of codebooks stacked in ``codebook``, ``(B * C, K)``,
over the same codes; :mod:`diffusers_otq.noise_bands`). Checkpoints of versions 1-6 load unchanged (their ``packed``
entries are read as ``weight``; versions 1-3 have no config checksums to compare; without ``vector_dim`` a layer is
scalar; without ``codebook_scale`` its codebook holds the codewords themselves; without ``noise_band_edges`` it has
one set of codebooks)."""

_DTYPE_NAMES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in CODEBOOK_DTYPES + SCALED_CODEBOOK_DTYPES
}
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
_STRUCTURE_OPTIONS = ("rank", "rotation", "rotation_block")
_RESOLVED_ONLY = ("rotation_seed", "noise_bands")  # LayerSpec fields derived from the config, not set per layer
_OVERRIDABLE = (*(f.name for f in fields(LayerSpec) if f.name not in (*_STRUCTURE_OPTIONS, *_RESOLVED_ONLY)),
                *_STRUCTURE_OPTIONS)  # fmt: skip


class OTQMethod(str, Enum):
    """The ``quant_method`` of :class:`OTQConfig` (diffusers reads ``.value``)."""

    OTQ = "otq"


def _dtype_name(value: object, what: str) -> str | None:
    """Normalise a codebook dtype (torch dtype or name) to its JSON name ("float16", ...), or None."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
    elif isinstance(value, str):
        name = _DTYPE_ALIASES.get(value.removeprefix("torch."), value.removeprefix("torch."))
    else:
        name = ""
    if name not in _DTYPE_NAMES:
        raise ValueError(
            f"{what}={value!r} is not supported; expected None (automatic) or one of {list(_DTYPE_NAMES)}."
        )
    return name


def _override_pairs(overrides: object) -> list[tuple[Any, Any]] | None:
    """``module_overrides`` as ordered (pattern, options) pairs: from a mapping, or from the [[pattern, options],
    ...] list :meth:`OTQConfig.to_dict` writes; None if it is neither."""
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    if isinstance(overrides, list | tuple) and all(isinstance(p, list | tuple) and len(p) == 2 for p in overrides):
        pairs = [tuple(p) for p in overrides]
        patterns = [p for p, _ in pairs]
        if len(set(map(repr, patterns))) != len(patterns):
            return None
        return pairs
    return None


def _spec_kwargs(options: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Validate a mapping of :class:`LayerSpec` fields (codebook dtype given by name) and return it as kwargs
    (the structure options ``rank``, ``rotation``, ``rotation_block`` are validated and left out)."""
    unknown = sorted(set(options) - set(_OVERRIDABLE))
    if unknown:
        raise ValueError(f"{what} has unknown option(s) {unknown}; allowed: {list(_OVERRIDABLE)}.")
    _check_structure(options, what)
    kwargs = {k: v for k, v in options.items() if k not in _STRUCTURE_OPTIONS}
    if "codebook_dtype" in kwargs:
        kwargs["codebook_dtype"] = _DTYPE_NAMES.get(_dtype_name(kwargs["codebook_dtype"], f"{what} codebook_dtype"))
    return kwargs


def _check_structure(options: Mapping[str, Any], what: str) -> None:
    """Types of the structure options: ``rank`` int >= 0, ``rotation`` bool, ``rotation_block`` None or a power
    of two >= 2 (whether it divides a layer's channels is checked per layer)."""
    rank = options.get("rank", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"{what}: rank={rank!r} must be an int >= 0 (0: no low-rank branch), e.g. rank=16.")
    if not isinstance(options.get("rotation", False), bool):
        raise ValueError(f"{what}: rotation={options['rotation']!r} must be True or False.")
    block = options.get("rotation_block")
    if block is not None and (
        isinstance(block, bool) or not isinstance(block, int) or block < 2 or block & (block - 1)
    ):
        raise ValueError(
            f"{what}: rotation_block={block!r} must be None (per layer: the largest power of two dividing its input "
            "channels) or a power of two >= 2, e.g. 64."
        )


def _resolve_structure(spec: LayerSpec, options: Mapping[str, Any], explicit: Mapping[str, Any], name: str,
                       module: nn.Module | None) -> LayerSpec:  # fmt: skip
    """Fill ``rank`` and ``rotation_block`` of ``spec`` for ``module`` (None: no structure can be resolved).

    A config-wide ``rank`` applies where it is at most half of ``min(out, in)`` (smaller layers get no branch); a
    ``rank`` set for the layer by an override must fit ``min(out, in)``. Rotations need ``groups == 1``; a
    config-wide rotation skips grouped convs and odd widths, an override that asks for one fails there.
    """
    rank, rotate, block = options["rank"], options["rotation"], options["rotation_block"]
    if module is None or not (rank or rotate):
        return spec
    from .functional.lowrank import check_rank
    from .functional.rotation import hadamard_block_size
    from .structure import check_rotation_block

    shape = module.weight.shape
    rows, width, channels = shape[0], shape[1:].numel(), shape[1]
    grouped = getattr(module, "groups", 1) != 1
    if grouped and ("rank" in explicit and rank or "rotation" in explicit and rotate):
        raise ValueError(
            f"layer {name!r} is a grouped conv (groups={module.groups}): a low-rank branch or rotation needs groups=1; "
            "drop rank/rotation from its module_overrides entry."
        )
    resolved_rank = 0
    if rank and not grouped:
        if "rank" in explicit:
            resolved_rank = check_rank(rank, rows, width, name)
        elif rank <= min(rows, width) // 2:
            resolved_rank = rank
    resolved_block = 0
    if rotate and not grouped:
        if block is not None:
            resolved_block = check_rotation_block(block, channels, name)
        else:
            auto = hadamard_block_size(channels)
            resolved_block = auto if auto >= 2 else 0
    return replace(spec, rank=resolved_rank, rotation_block=resolved_block)


class OTQConfig(DiffusersQuantizationConfigMixin, TransformersQuantizationConfigMixin):
    """Optimal-transport codebook quantization of every ``nn.Linear``/``nn.Conv2d`` weight of a model.

    Args:
        bits: code width, 1..8 (2-4 is the intended range); each codebook has ``2**bits`` entries.
        method: codebook fitter: ``"ot-vp"`` (default: Lloyd-Max cells with the codewords stretched to keep each
            row's variance, see :data:`~diffusers_otq.options.DEFAULT_METHOD`), ``"ot"`` (W2-optimal Lloyd-Max,
            lowest weight MSE), ``"ot-equal-mass"`` (the paper's),
            ``"uniform"``, ``"piecewise"`` or ``"log2"`` (the paper's baselines).
        granularity: ``"channel"`` (one codebook per output channel, default), ``"group"`` (absmax scale per
            ``group_size`` inputs plus a normalised codebook) or ``"tensor"`` (one codebook per weight).
        group_size: inputs per scale group, for ``granularity="group"`` (layers it does not divide fall back to
            per-channel codebooks).
        modules_to_not_convert: module-name patterns kept in full precision; a pattern matches a whole
            dot-separated component run (``"proj_out"`` matches ``"blocks.0.proj_out"``) or is an fnmatch glob.
            The model class's ``_keep_in_fp32_modules`` are always kept too.
        codebook_dtype: codebook storage dtype (``"float16"``, ``"bfloat16"``, ``"float32"``, ``"int8"`` or a torch
            dtype); None picks float16 (bfloat16 for bfloat16 weights). ``"int8"`` stores 8-bit codewords and one
            float32 scale per codebook: half the bits of float16 on a large (vector) codebook.
        codebook_scope: with groups, ``"tensor"`` (one shared normalised codebook, default) or ``"channel"``.
        vector_dim: codeword dimension ``d`` (1, 2, 4 or 8; default 1, scalar): ``d`` consecutive inputs of a row share
            one ``bits * d``-bit code into a codebook of ``2**(bits * d)`` vectors fitted by weighted k-means
            (``bits * d <= 8``: 2-D up to 4 bits, 4-D up to 2 bits, 8-D at 1 bit; methods ``"ot"``/``"ot-vp"``).
            With ``granularity="group"`` and the default ``codebook_scope="tensor"`` one codebook of 16 pairs (2 bits,
            ``d=2``) costs 512 bits per layer. Layers whose rows ``d`` does not divide stay scalar.
        module_overrides: ``{pattern: {option: value}}`` for mixed precision, e.g. ``{"attn*": {"bits": 4}}``;
            options are any of ``bits, method, granularity, group_size, codebook_dtype, codebook_scope, rank,
            rotation, rotation_block``; the
            first pattern (in order) that matches a module name applies. Saved as a list of ``[pattern, options]``
            pairs (``config.json`` sorts dict keys, a list keeps the order); both forms are accepted.
        rank: rank ``r`` of a 16-bit low-rank branch ``U V`` beside the codes of every layer where ``r`` is at most
            half of ``min(out, in)`` (``W ~ U V + Q(W - U V)``, fitted by alternation; the factors count in the
            bits per weight). 0 (default): none. Per layer: ``module_overrides={"attn*": {"rank": 32}}``.
        rotation: rotate each layer's input channels by a randomized block-Hadamard transform before fitting
            (and the activations in the forward); grouped convs and odd widths are skipped.
        rotation_block: the Hadamard block (a power of two dividing the rotated layers' input channels); None
            (default) takes the largest power of two dividing each layer's channels.
        rotation_seed: seed of the rotations' random signs (mixed with each layer name; the signs are stored).
        bits_per_weight: a storage budget instead of one bit width: the average bits per quantized weight, every
            code, codebook and scale counted (e.g. 2.5). :func:`diffusers_otq.quantize_model` and
            :func:`diffusers_otq.quantize_pipeline` measure each layer's sensitivity (from calibration statistics
            when given, else data-free) and choose per-layer settings by an exact knapsack: bits 1-8 with
            per-channel codebooks, 2-8 with groups of ``group_size`` (default 64), 2-3 with one codebook per
            tensor; the plan is written into ``module_overrides`` and
            this field is cleared, so the saved checkpoint reloads with plain ``from_pretrained``. Layers matched
            by ``module_overrides`` you give keep your settings (and count towards the budget). Quantize-on-load
            cannot allocate (it sees one weight at a time) and refuses it.
        noise_band_edges: ``B - 1`` ascending timesteps (in the units the denoiser is called with) that split its
            calls into ``B`` noise-level bands, each with its own set of codebooks over the shared codes
            (:mod:`diffusers_otq.noise_bands`): written by calibration with ``CalibrationConfig(noise_bands=B)``,
            which refines each band's codebooks on its own calls; every set counts in the bits per weight. None
            (default): one set. A loaded model picks each call's set from its timestep.
        provenance: informational record of how the codebooks were produced (calibration settings, the bits budget
            and what was reached), written by diffusers-otq; ignored when loading.
        format_version: checkpoint layout version; loading a checkpoint written by a newer layout fails clearly.
        quant_method: always ``"otq"`` (accepted so ``OTQConfig(**config_dict)`` works on reload).

    Raises:
        ValueError: any invalid value (the message names it, lists the allowed values and the fix).
    """

    def __init__(
        self,
        bits: int = 4,
        method: str = DEFAULT_METHOD,
        granularity: str = "channel",
        group_size: int | None = None,
        modules_to_not_convert: list[str] | None = None,
        codebook_dtype: str | torch.dtype | None = None,
        codebook_scope: str = "tensor",
        vector_dim: int = 1,
        module_overrides: Mapping[str, Mapping[str, Any]] | Sequence[Sequence[Any]] | None = None,
        rank: int = 0,
        rotation: bool = False,
        rotation_block: int | None = None,
        rotation_seed: int = 0,
        bits_per_weight: float | None = None,
        noise_band_edges: Sequence[float] | None = None,
        provenance: Mapping[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str | OTQMethod = OTQMethod.OTQ,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise ValueError(
                f"OTQConfig got unknown option(s) {sorted(unknown)}. If this config comes from a checkpoint written "
                "by a newer diffusers-otq, upgrade it (pip install -U diffusers-otq); otherwise fix the spelling."
            )
        if quant_method != OTQMethod.OTQ.value:
            raise ValueError(f"OTQConfig needs quant_method='otq', got {quant_method!r}.")
        if isinstance(format_version, bool) or not isinstance(format_version, int) or format_version < 1:
            raise ValueError(f"format_version={format_version!r} is invalid; expected a positive int.")
        if format_version > FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses OTQ format_version={format_version}, but this diffusers-otq reads versions "
                f"up to {FORMAT_VERSION}; upgrade it: pip install -U diffusers-otq."
            )
        if modules_to_not_convert is not None and not isinstance(modules_to_not_convert, str | bytes):
            try:
                modules_to_not_convert = list(modules_to_not_convert)  # once: a generator is read a single time
            except TypeError:
                pass  # not iterable: refused below
        if modules_to_not_convert is not None and (
            not isinstance(modules_to_not_convert, list) or not all(isinstance(p, str) for p in modules_to_not_convert)
        ):
            raise ValueError(
                f"modules_to_not_convert={modules_to_not_convert!r} must be a list of module-name patterns, "
                'e.g. ["proj_out", "time_embedding"].'
            )
        self.quant_method = OTQMethod.OTQ
        self.format_version = format_version
        self.bits = bits
        self.method = method
        self.granularity = granularity
        self.group_size = group_size
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None
        self.codebook_dtype = _dtype_name(codebook_dtype, "codebook_dtype")
        self.codebook_scope = codebook_scope
        self.vector_dim = vector_dim
        _check_structure({"rank": rank, "rotation": rotation, "rotation_block": rotation_block}, "OTQConfig")
        if isinstance(rotation_seed, bool) or not isinstance(rotation_seed, int) or rotation_seed < 0:
            raise ValueError(f"rotation_seed={rotation_seed!r} must be an int >= 0.")
        self.rank = rank
        self.rotation = rotation
        self.rotation_block = rotation_block
        self.rotation_seed = rotation_seed
        self.module_overrides = self._check_overrides(module_overrides)
        self.bits_per_weight = self._check_budget(bits_per_weight)
        self.noise_band_edges = None if noise_band_edges is None else check_band_edges(noise_band_edges)
        self.provenance = self._check_provenance(provenance)
        self.base_spec()  # validates bits, method, granularity, group_size, codebook_scope, vector_dim

    @staticmethod
    def _check_budget(value: object) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 32:
            raise ValueError(
                f"bits_per_weight={value!r} must be a number of bits per weight in (0, 32], e.g. 2.5; the smallest "
                "reachable budget depends on the model (2-bit codes plus codebooks) and is checked when allocating."
            )
        return float(value)

    @staticmethod
    def _check_provenance(value: object) -> dict[str, Any] | None:
        if value is None:
            return None
        try:
            if not isinstance(value, Mapping):
                raise TypeError(type(value).__name__)
            return json.loads(json.dumps(dict(value), sort_keys=True))
        except (TypeError, ValueError) as err:
            raise ValueError(f"provenance must be a JSON-safe dict (or None), got {value!r}: {err}") from None

    def check_resolved(self) -> None:
        """Raise if ``bits_per_weight`` still needs the allocator (a plain layer-by-layer quantizer cannot use it).

        Raises:
            ValueError: with the call that resolves it.
        """
        if self.bits_per_weight is not None:
            raise ValueError(
                f"OTQConfig(bits_per_weight={self.bits_per_weight}) needs every weight before the first one is "
                "quantized, to spend the bits where they matter; quantize-on-load sees one weight at a time. Load the "
                "float model, then call diffusers_otq.quantize_model(model, config) (data-free) or "
                "diffusers_otq.quantize_pipeline(pipe, config, calibration=CalibrationConfig(...)), and save that: "
                "the saved checkpoint reloads with plain from_pretrained."
            )

    def _check_overrides(
        self, overrides: Mapping[str, Mapping[str, Any]] | Sequence[Sequence[Any]] | None
    ) -> dict[str, dict[str, Any]] | None:
        if overrides is None:
            return None
        pairs = _override_pairs(overrides)
        if pairs is None:
            raise ValueError(
                f"module_overrides={overrides!r} must map module-name patterns to option dicts, "
                'e.g. {"attn*": {"bits": 4}}.'
            )
        checked: dict[str, dict[str, Any]] = {}
        for pattern, options in pairs:
            what = f"module_overrides[{pattern!r}]"
            if not isinstance(pattern, str) or not isinstance(options, Mapping):
                raise ValueError(f"{what}={options!r} must be a dict of options keyed by a str pattern.")
            try:  # values too, now: a bad override is refused even if it never matches a layer
                base = LayerSpec(bits=self.bits, method=self.method, granularity=self.granularity,
                                 group_size=self.group_size, vector_dim=self.vector_dim)  # fmt: skip
                replace(base, **_spec_kwargs(options, what))
            except ValueError as err:
                raise ValueError(f"{what}: {err}") from None
            checked[pattern] = {
                k: (_dtype_name(v, f"{what} codebook_dtype") if k == "codebook_dtype" else v)
                for k, v in options.items()
            }
        return checked

    # ----------------------------------------------------------------------------------------- layer decisions

    def base_spec(self) -> LayerSpec:
        """The :class:`LayerSpec` of a layer no override matches."""
        return LayerSpec(
            bits=self.bits,
            method=self.method,
            granularity=self.granularity,
            group_size=self.group_size,
            codebook_dtype=_DTYPE_NAMES.get(self.codebook_dtype) if self.codebook_dtype else None,
            codebook_scope=self.codebook_scope,
            rotation_seed=self.rotation_seed,
            vector_dim=self.vector_dim,
            noise_bands=self.noise_bands,
        )

    @property
    def noise_bands(self) -> int:
        """Sets of codebooks per layer: ``len(noise_band_edges) + 1``, or 1 without edges."""
        return 1 if self.noise_band_edges is None else len(self.noise_band_edges) + 1

    def warn_unmatched_overrides(self, names: Sequence[str]) -> list[str]:
        """Log a warning for every ``module_overrides`` pattern that names none of ``names`` (a typo would
        otherwise quantize those layers with the base settings without a word); returns those patterns."""
        unmatched = [p for p in (self.module_overrides or {}) if not any(matches_module_name(n, [p]) for n in names)]
        if unmatched:
            logger.warning(
                "module_overrides pattern(s) %s match no nn.Linear/nn.Conv2d layer of the model; their settings are "
                "not used (check the names: print([n for n, _ in model.named_modules()])).",
                ", ".join(map(repr, unmatched)),
            )
        return unmatched

    def layer_spec(self, name: str, module: nn.Module | None = None, skip: tuple[str, ...] = ()) -> LayerSpec | None:
        """How the module called ``name`` is quantized, or None if it stays in full precision.

        ``skip`` adds patterns to ``modules_to_not_convert`` (the quantizer passes ``_keep_in_fp32_modules``).
        """
        if matches_module_name(name, [*(self.modules_to_not_convert or ()), *skip]):
            return None
        spec = self.base_spec()
        structure = {"rank": self.rank, "rotation": self.rotation, "rotation_block": self.rotation_block}
        for pattern, options in (self.module_overrides or {}).items():
            if matches_module_name(name, [pattern]):
                what = f"module_overrides[{pattern!r}] applied to {name!r}"
                try:
                    spec = replace(spec, **_spec_kwargs(options, what))
                    explicit = {k: v for k, v in options.items() if k in _STRUCTURE_OPTIONS}
                    return _resolve_structure(spec, {**structure, **explicit}, explicit, name, module)
                except ValueError as err:
                    raise ValueError(f"{what}: {err}") from None
        return _resolve_structure(spec, structure, {}, name, module)

    # ------------------------------------------------------------------------------------------ serialisation

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any], return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """Rebuild a stored config (``config.json``'s ``quantization_config``; diffusers calls this on load).

        Raises:
            CheckpointError: the stored dict is not a valid OTQConfig (not a mapping, unknown or bad values); the
                message quotes the validation error and says the config was edited or damaged.
        """
        if not isinstance(config_dict, Mapping):
            raise CheckpointError(
                f"quantization_config is {config_dict!r:.120} ({type(config_dict).__name__}), not a mapping of "
                "OTQConfig fields; config.json was edited or damaged. Restore it or re-save the model."
            )
        try:
            return super().from_dict(dict(config_dict), return_unused_kwargs, **kwargs)
        except CheckpointError:
            raise
        except (TypeError, ValueError) as error:
            raise CheckpointError(
                f"quantization_config {json.dumps(config_dict, default=str)[:200]} is not a valid OTQConfig: {error} "
                "If it comes from config.json, the file was edited or damaged: restore it or re-save the model."
            ) from error

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; ``OTQConfig(**config.to_dict())`` rebuilds an equal config."""
        return {
            "quant_method": self.quant_method.value,
            "format_version": self.format_version,
            "bits": self.bits,
            "method": self.method,
            "granularity": self.granularity,
            "group_size": self.group_size,
            "modules_to_not_convert": copy.deepcopy(self.modules_to_not_convert),
            "codebook_dtype": self.codebook_dtype,
            "codebook_scope": self.codebook_scope,
            "vector_dim": self.vector_dim,
            # [pattern, options] pairs: the first match wins, and config.json is written with sorted keys, so a
            # dict would lose the order on reload (OTQConfig accepts both forms).
            "module_overrides": (
                None
                if self.module_overrides is None
                else [[pattern, copy.deepcopy(options)] for pattern, options in self.module_overrides.items()]
            ),
            "rank": self.rank,
            "rotation": self.rotation,
            "rotation_block": self.rotation_block,
            "rotation_seed": self.rotation_seed,
            "bits_per_weight": self.bits_per_weight,
            "noise_band_edges": copy.deepcopy(self.noise_band_edges),
            "provenance": copy.deepcopy(self.provenance),
        }

    def to_diff_dict(self) -> dict[str, Any]:
        """The entries that differ from ``OTQConfig()``, plus ``quant_method`` and ``format_version``."""
        default = OTQConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if k in ("quant_method", "format_version") or v != default[k]}

    def to_json_string(self, use_diff: bool = True) -> str:
        """JSON text of :meth:`to_diff_dict` (or :meth:`to_dict` with ``use_diff=False``)."""
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OTQConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable, like every QuantizationConfigMixin

    def __repr__(self) -> str:
        """diffusers' form for quantization configs: ``OTQConfig {json of the non-default fields}``."""
        return f"{type(self).__name__} {self.to_json_string()}"

    def as_code(self) -> str:
        """The constructor call that rebuilds this config (``OTQConfig(bits=3, ...)``), for messages and docs."""
        shown = {"bits": self.bits, "method": self.method, "granularity": self.granularity}
        hidden = ("quant_method", "format_version", "provenance")
        shown.update({k: v for k, v in self.to_diff_dict().items() if k not in hidden})
        if "module_overrides" in shown:
            shown["module_overrides"] = self.module_overrides  # the ordered mapping, as written
        return f"OTQConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def for_pipeline(self, components: tuple[str, ...] | list[str] = ("transformer",)) -> Any:
        """Wrap this config for ``DiffusionPipeline.from_pretrained`` (which needs a PipelineQuantizationConfig).

        >>> OTQConfig(bits=3).for_pipeline(["transformer"]).quant_mapping["transformer"].bits
        3
        """
        from diffusers import PipelineQuantizationConfig

        return PipelineQuantizationConfig(quant_mapping={name: self for name in components})
